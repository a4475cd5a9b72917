"""Prefix caching, n samples and preemption by recompute on the paged engine (engine/scheduler.py,
engine/kv_pages.py) with a tiny random f32 model, one CPU device: the tokens equal the dense
Engine's (no cache, no sharing) and each sample's own run, and the scheduler's counters show what
was computed."""

import numpy as np
import pytest
from flax import nnx

from shardlm.engine import batching, scheduler
from shardlm.engine.engine import Engine
from shardlm.engine.paged_engine import PagedEngine
from shardlm.engine.sampling import SamplingParams
from shardlm.models.config import ModelConfig
from shardlm.models.llama import Llama

CFG = ModelConfig("tiny", vocab_size=101, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
                  max_seq_len=512, rope_theta=10000.0)


@pytest.fixture(scope="module")
def model():
    return Llama(CFG, rngs=nnx.Rngs(5))


def _run(engine, reqs):
    seen = []
    out = scheduler.run(engine, engine.params, reqs, on_step=lambda b, s: seen.append(s))
    return out, seen[-1]


def _shared_requests(n=12, prefix_len=100, max_new=8):
    rng = np.random.default_rng(2)
    prefix = [int(t) for t in rng.integers(0, CFG.vocab_size, prefix_len)]
    reqs = []
    for i in range(n):
        own = [int(t) for t in rng.integers(0, CFG.vocab_size, 5 + 3 * i)]
        sampling = (SamplingParams(max_new_tokens=max_new) if i % 2 == 0 else
                    SamplingParams(temperature=0.9, top_k=20, seed=50 + i, max_new_tokens=max_new))
        reqs.append(batching.Request(prefix + own, sampling, key=i))
    return reqs


@pytest.mark.parametrize("page_size", [8, 16])
def test_prefix_cache_gives_the_dense_engines_tokens_computing_the_prefix_once(model, page_size):
    reqs = _shared_requests()
    dense = Engine(model, batch_size=4, max_seq_len=256)
    want = [r.token_ids for r in batching.run(dense, dense.params, reqs)]
    for cache in (True, False):
        engine = PagedEngine(model, page_size=page_size, num_pages=256, max_num_seqs=8, max_num_batched_tokens=128,
                             max_seq_len=256, prefix_cache=cache)
        out, sched = _run(engine, reqs)
        assert [r.token_ids for r in out] == want, f"prefix_cache={cache}"
        submitted = sum(len(r.prompt_ids) for r in reqs)
        if cache:
            shared = 100 // page_size * page_size
            assert sched.stats.computed_tokens <= shared + sum(len(r.prompt_ids) - shared for r in reqs)
            assert sched.stats.cached_tokens == (len(reqs) - 1) * shared
        else:
            assert sched.stats.computed_tokens == submitted and sched.stats.cached_tokens == 0


def _sampled(n, seed=7, temperature=1.0):
    rng = np.random.default_rng(seed)
    return [batching.Request([int(t) for t in rng.integers(0, CFG.vocab_size, length)],
                             SamplingParams(temperature=temperature, seed=seed + i, n=n, max_new_tokens=10), key=i)
            for i, length in enumerate([13, 32, 45])]  # 13 and 45 end mid-page: their samples copy a page


def test_n_samples_each_equal_that_sample_run_alone_and_the_prompt_is_prefilled_once(model):
    engine = PagedEngine(model, page_size=16, num_pages=128, max_num_seqs=12, max_num_batched_tokens=128,
                         max_seq_len=256)
    reqs = _sampled(4)
    out, sched = _run(engine, reqs)
    assert sched.stats.prompts_prefilled == 3
    assert sched.stats.computed_tokens == sum(len(r.prompt_ids) for r in reqs)
    for req, res in zip(reqs, out):
        assert len(res.samples) == 4
        alone = [batching.Request(req.prompt_ids, scheduler.sample_sampling(req.sampling, i)) for i in range(4)]
        want, _ = _run(engine, alone)
        assert [s.token_ids for s in res.samples] == [w.token_ids for w in want]
        assert len({tuple(s.token_ids) for s in res.samples}) > 1
    greedy, _ = _run(engine, _sampled(3, temperature=0.0))
    for res in greedy:
        assert all(s.token_ids == res.samples[0].token_ids for s in res.samples)


@pytest.mark.slow
def test_preemption_by_recompute_gives_the_ample_pools_tokens(model):
    rng = np.random.default_rng(4)
    reqs = [batching.Request([int(t) for t in rng.integers(0, CFG.vocab_size, 10 + 7 * i)],
                             SamplingParams(temperature=0.8, seed=i, max_new_tokens=40, n=2 if i == 3 else 1), key=i)
            for i in range(8)]
    ample = PagedEngine(model, page_size=8, num_pages=400, max_num_seqs=8, max_num_batched_tokens=128,
                        max_seq_len=256)
    want, _ = _run(ample, reqs)
    small = PagedEngine(model, page_size=8, num_pages=24, max_num_seqs=8, max_num_batched_tokens=128,
                        max_seq_len=256)  # 8 sequences of up to 100 tokens need ~70 pages
    out, sched = _run(small, reqs)
    assert sched.stats.preemptions > 0
    assert [[s.token_ids for s in r.samples] or r.token_ids for r in out] == \
           [[s.token_ids for s in r.samples] or r.token_ids for r in want]
