"""The paged engine (engine/paged_engine.py) against the dense Engine on a tiny random f32 model, one
CPU device: packed prefill equals each prompt alone, chunked prefill equals a whole prefill, paged
decode equals dense decode and a full forward for page sizes 1, 16 and 64, running sequences decode
between a long prompt's chunks, pages held follow the tokens, clear errors, no steady-state
recompiles."""

import jax
import numpy as np
import pytest
from flax import nnx

from shardlm.engine import batching, scheduler
from shardlm.engine.engine import Engine
from shardlm.engine.paged_engine import PagedEngine
from shardlm.engine.sampling import SamplingParams
from shardlm.engine.scheduler import Chunk, PrefillBatch
from shardlm.models.config import ModelConfig
from shardlm.models.llama import Llama

CFG = ModelConfig("tiny", vocab_size=101, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
                  max_seq_len=2048, rope_theta=10000.0)
LENGTHS = [5, 200, 33, 17, 120, 64, 9, 150]  # 8 prompts, 598 tokens
ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return Llama(CFG, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def dense(model):
    return Engine(model, batch_size=8, max_seq_len=256)


def _prompt(rng, n):
    return [int(t) for t in rng.integers(0, CFG.vocab_size, n)]


def _sampling(i, max_new=32):
    """Even requests greedy, odd ones seeded sampling."""
    if i % 2 == 0:
        return SamplingParams(max_new_tokens=max_new)
    return SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=100 + i, max_new_tokens=max_new)


def _requests(lengths, seed=0, max_new=32):
    rng = np.random.default_rng(seed)
    return [batching.Request(_prompt(rng, n), _sampling(i, max_new), key=i) for i, n in enumerate(lengths)]


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.slow
def test_packed_prefill_equals_each_prompt_alone(model, dense):
    engine = PagedEngine(model, page_size=16, max_num_seqs=8, max_num_batched_tokens=1024, max_seq_len=256)
    reqs = _requests(LENGTHS)
    pool = engine.new_pool()
    for i, r in enumerate(reqs):
        pool.allocate(i, len(r.prompt_ids))
    batch = PrefillBatch(tuple(Chunk(i, tuple(r.prompt_ids), 0, True, r.sampling) for i, r in enumerate(reqs)))
    tokens, logits, _ = engine.prefill(engine.params, batch, pool)
    diffs = []
    for i, r in enumerate(reqs):
        alone = dense.prefill(dense.params, r.prompt_ids, r.sampling)
        diffs.append(_max_diff(logits[i], alone.logits))
        assert int(tokens[i]) == int(alone.token), f"prompt {i}"
    assert max(diffs) < ATOL, diffs


def test_chunked_prefill_equals_one_whole_prefill(model):
    """A 700-token prompt in chunks of 256 (one starting mid-page): each chunk's last logits equal a
    full forward's at that position, the last equals Engine.prefill of the whole prompt."""
    dense = Engine(model, batch_size=1, max_seq_len=1024)
    engine = PagedEngine(model, page_size=16, max_num_seqs=2, max_num_batched_tokens=256, max_seq_len=1024)
    prompt = _prompt(np.random.default_rng(1), 700)
    full = np.asarray(dense.forward(dense.params, np.asarray([prompt], np.int32)))[0]
    pool, start, diffs = engine.new_pool(), 0, []
    for n in (250, 256, 194):
        pool.allocate(0, n)
        chunk = Chunk(0, tuple(prompt[start:start + n]), start, start + n == len(prompt), SamplingParams())
        tokens, logits, _ = engine.prefill(engine.params, PrefillBatch((chunk,)), pool)
        start += n
        diffs.append(_max_diff(logits[0], full[start - 1]))
    whole = dense.prefill(dense.params, prompt)
    diffs.append(_max_diff(logits[0], whole.logits))
    assert int(tokens[0]) == int(whole.token)
    assert max(diffs) < ATOL, diffs


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.slow
def test_paged_decode_equals_dense_and_full_forward(model, dense, page_size):
    reqs = _requests(LENGTHS)
    want = batching.run(dense, dense.params, reqs)
    engine = PagedEngine(model, page_size=page_size, max_num_seqs=8, max_num_batched_tokens=512, max_seq_len=256)
    got = scheduler.run(engine, engine.params, reqs)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert all(len(r.token_ids) == 32 for r in got)
    # Greedy requests: each generated token is the argmax of a full forward (no cache) over the sequence.
    seqs = [r.prompt_ids + g.token_ids for r, g in zip(reqs, got)]
    padded = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, s in enumerate(seqs):
        padded[i, :len(s)] = s
    full = np.asarray(dense.forward(dense.params, padded))
    for i, (r, g) in enumerate(zip(reqs, got)):
        if r.sampling.temperature == 0:
            n = len(r.prompt_ids)
            assert g.token_ids == [int(t) for t in full[i, n - 1:n + 31].argmax(-1)]


@pytest.mark.slow
def test_running_sequences_decode_between_a_long_prompts_chunks(model):
    """While a 2,000-token prompt is prefilled in chunks of 512, the three sequences already running
    get a token after each chunk, their tokens equal running them alone, and the long prompt's equal
    the dense engine's."""
    engine = PagedEngine(model, page_size=16, max_num_seqs=4, max_num_batched_tokens=512, max_seq_len=2048)
    short = _requests([7, 30, 12], seed=2, max_new=24)
    long = batching.Request(_prompt(np.random.default_rng(3), 2000), SamplingParams(max_new_tokens=4), key=3)
    alone = scheduler.run(engine, engine.params, short)
    steps = []
    out = scheduler.run(engine, engine.params, short + [long], on_step=lambda b, s: steps.append(b))
    assert [r.token_ids for r in out[:3]] == [r.token_ids for r in alone]
    chunk_steps = [i for i, b in enumerate(steps) if isinstance(b, PrefillBatch) and
                   any(c.seq_id == 3 for c in b.chunks)]
    # The first chunk shares its step with the 49 short tokens, laid out in 64 (blocks of 16).
    assert len(chunk_steps) == 1 + -(-(2000 - (512 - 64)) // 512)
    assert len(steps[chunk_steps[0]].chunks[-1].token_ids) == 512 - 64
    for i in chunk_steps[:-1]:
        assert isinstance(steps[i + 1], scheduler.DecodeBatch) and set(steps[i + 1].seq_ids) >= {0, 1, 2}
    dense = Engine(model, batch_size=1, max_seq_len=2048)
    (want,) = batching.run(dense, dense.params, [long])
    assert out[3].token_ids == want.token_ids


@pytest.mark.slow
def test_pages_follow_tokens_and_are_freed(model):
    engine = PagedEngine(model, page_size=16, num_pages=40, max_num_seqs=4, max_num_batched_tokens=64,
                         max_seq_len=256)
    reqs = _requests([5, 40, 100, 17, 60, 3], seed=4, max_new=12)
    seen = []

    def check(batch, sched):
        pool = sched.pool
        held = [pool.length(s.seq_id) for s in sched.running if s.seq_id in pool]
        assert pool.pages_in_use == sum(-(-n // 16) for n in held)
        assert pool.pages_in_use * 16 < sum(held) + 16 * max(1, len(held))  # within a page per sequence
        seen.append(sched)

    out = scheduler.run(engine, engine.params, reqs, on_step=check)
    assert all(r.finish_reason == "length" for r in out)
    assert seen[-1].pool.pages_in_use == 0 and seen[-1].pool.free_pages == 40
    assert engine.pool_bytes() == 2 * CFG.n_layers * 40 * 16 * CFG.n_kv_heads * CFG.head_dim * 4


@pytest.mark.slow
def test_bad_input_is_a_clear_error(model):
    with pytest.raises(ValueError, match="page size must be an integer >= 1"):
        PagedEngine(model, page_size=0, max_seq_len=64)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(16\) is smaller than the page size \(32\)"):
        PagedEngine(model, page_size=32, max_num_batched_tokens=16, max_seq_len=64)
    with pytest.raises(ValueError, match="max_num_batched_tokens must be a multiple of 16"):
        PagedEngine(model, page_size=16, max_num_batched_tokens=40, max_seq_len=64)
    with pytest.raises(ValueError, match="kv_pages must be an integer >= 1"):
        PagedEngine(model, num_pages=0, max_seq_len=64)
    with pytest.raises(ValueError, match="memory_fraction must be in"):
        PagedEngine(model, memory_fraction=1.5, max_seq_len=64)
    # A pool larger than the device is refused with the bytes it needs and has, before allocating.
    with pytest.raises(ValueError, match=r"KV pages of 16 tokens need \d+ bytes; the host has \d+ bytes available beside the weights"):
        PagedEngine(model, page_size=16, num_pages=10**9, max_seq_len=64)
    engine = PagedEngine(model, page_size=16, num_pages=4, max_num_seqs=2, max_num_batched_tokens=64, max_seq_len=256)
    reqs = _requests([10, 100], max_new=4)  # 104 tokens need 7 pages of 16; the pool has 4
    out = scheduler.run(engine, engine.params, reqs)
    assert out[0].finish_reason == "length" and len(out[0].token_ids) == 4
    assert out[1].finish_reason == "error" and "needs 7 pages of 16 tokens; the pool has 4 pages" in out[1].error
    with pytest.raises(ValueError, match="outside the vocabulary"):
        scheduler.run(engine, engine.params, [batching.Request([CFG.vocab_size], SamplingParams())])
    with pytest.raises(ValueError, match="needs 7 KV pages of 16 tokens; the pool has 4"):
        engine.check_fits(len(reqs[1].prompt_ids), 4)


@pytest.mark.slow
def test_steady_state_never_recompiles(model):
    engine = PagedEngine(model, page_size=16, max_num_seqs=4, max_num_batched_tokens=128, max_seq_len=256)
    scheduler.run(engine, engine.params, _requests([10, 50, 30, 90], seed=5, max_new=6))  # warm-up
    counts = engine.compiled_count()
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    reqs = _requests([11, 49, 31, 88], seed=6, max_new=6)  # new tokens, lengths and seeds, the same buckets
    reqs[1] = batching.Request(reqs[1].prompt_ids, SamplingParams(temperature=1.2, top_p=0.5, seed=9, max_new_tokens=6))
    scheduler.run(engine, engine.params, reqs)
    assert compiles == []
    assert engine.compiled_count() == counts


MEMORY_RUN = r"""
import json, sys
from shardlm.engine import LLM, SamplingParams, scheduler

llm = LLM.load(max_num_seqs=64, max_seq_len=8192, kv_pages=2048)
engine = llm.engine
questions = ["What is the capital of France?", "Name a colour.", "Why is the sky blue?", "Count to five."]
requests = [llm.request(questions[i % 4] + " " * (i % 7), SamplingParams(max_new_tokens=16, ignore_eos=True), chat=True)
            for i in range(64)]
per_page = engine.pool_bytes() // engine.num_pages
worst = {"over": 0, "running": 0}

def check(batch, sched):  # bytes held against the tokens in flight, every step
    tokens = sum(sched.pool.length(s.seq_id) for s in sched.running if s.seq_id in sched.pool)
    seqs = sum(s.seq_id in sched.pool for s in sched.running)
    held = engine.bytes_held(sched.pool)
    worst["over"] = max(worst["over"], held - tokens * per_page // engine.page_size - seqs * per_page)
    worst["running"] = max(worst["running"], seqs)

results = scheduler.run(engine, llm.params, requests, on_step=check)
# VmHWM is this process's own peak: ru_maxrss would start from the parent's peak (Linux carries it over exec)
peak_rss = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss": peak_rss, "worst": worst,
                  "done": sum(len(r.token_ids) == 16 for r in results), "pool_bytes": engine.pool_bytes(),
                  "max_seq_len": engine.max_seq_len}))
"""


@pytest.mark.slow
def test_64_sequences_of_8192_tokens_in_4_gb():
    """A dense cache for 64 x 8192 tokens of the embedded model would be 64 x 8192 x 46 KB = 24 GB
    (float32); pages hold only what the sequences use: a job of 64 short chat prompts at once."""
    import json
    import subprocess
    import sys

    env = {**__import__("os").environ, "XLA_FLAGS": ""}  # one CPU device, a fresh process to measure
    out = subprocess.run([sys.executable, "-c", MEMORY_RUN], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["done"] == 64 and report["max_seq_len"] == 8192
    assert report["worst"]["running"] == 64  # all 64 sequences held pages at once
    assert report["worst"]["over"] <= 0  # held bytes within one page per sequence of the tokens in flight
    assert report["peak_rss"] < 4 * 2**30, f"peak RSS {report['peak_rss'] / 2**30:.2f} GiB"


# Heads, d_model and d_ff that divide over 8 devices, so the pools split by kv heads.
DIVISIBLE = ModelConfig("divisible", vocab_size=512, d_model=256, n_layers=2, n_heads=8, n_kv_heads=8, head_dim=32,
                        d_ff=1024, max_seq_len=256)


@pytest.mark.parametrize("layout,kv_heads,page_size", [
    ("1d_weight_stationary", 8, 1), ("2d_weight_stationary", 8, 64), ("weight_gathered_xyz", 8, 16),
    ("2d_weight_stationary", 2, 16)])  # 2 kv heads over 8 devices: decode attention batch-sharded
@pytest.mark.slow
def test_layouts_on_8_devices_equal_one_dense_device(layout, kv_heads, page_size):
    """Mixed-length prompts crossing page boundaries, packed prefill then decode, under a layout on
    8 devices: the tokens of the dense engine on one device."""
    import dataclasses

    from shardlm.sharding.placement import Placement

    cfg = dataclasses.replace(DIVISIBLE, n_kv_heads=kv_heads)
    model = Llama(cfg, rngs=nnx.Rngs(5))
    reqs = [batching.Request([(7 * i + 3 * j) % cfg.vocab_size for j in range(5 + 9 * i)],
                             _sampling(i, max_new=24), key=i) for i in range(8)]
    one = Engine(model, batch_size=8, max_seq_len=128)
    want = [r.token_ids for r in batching.run(one, one.params, reqs)]
    placement = Placement.make(cfg, mesh_shape={"x": 2, "y": 2, "z": 2}, layout=layout, batch_size=8)
    engine = PagedEngine(model, placement=placement, page_size=page_size, max_num_seqs=8,
                         max_num_batched_tokens=256, max_seq_len=128)
    assert [r.token_ids for r in scheduler.run(engine, engine.params, reqs)] == want
    assert len({tuple(t) for t in want}) > 1
    if layout.endswith("weight_stationary") and kv_heads == 8:  # the pool [pages, P, K, H] split by kv heads
        assert engine.k[0].addressable_shards[0].data.shape[2] < kv_heads
