"""The paged scheduler (engine/scheduler.py) on the arithmetic MockPagedEngine, in milliseconds:
tokens equal its `expected` whatever the chunking, admission by pages and sequence count, pages held
within one page per sequence of the tokens in flight, long prompts interleaved with decode."""

import pytest

from shardlm.engine import scheduler
from shardlm.engine.batching import Request
from shardlm.engine.mock_engine import MockPagedEngine
from shardlm.engine.sampling import SamplingParams


def _requests(lengths, max_new=8, stop=()):
    return [Request(prompt_ids=[(7 * i + j) % 50 + 1 for j in range(n)], key=i,
                    sampling=SamplingParams(max_new_tokens=max_new, stop_token_ids=stop)) for i, n in enumerate(lengths)]


def _expected(req):
    return MockPagedEngine.expected(req.prompt_ids, req.sampling.max_new_tokens)


@pytest.mark.parametrize("page_size,budget,max_num_seqs", [(1, 4, 1), (4, 16, 4), (8, 8, 3), (16, 64, 8)])
def test_tokens_equal_alone_whatever_the_chunking(page_size, budget, max_num_seqs):
    reqs = _requests([1, 5, 17, 40, 3, 9, 30, 2])
    engine = MockPagedEngine(page_size=page_size, num_pages=200, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=budget)
    out = scheduler.run(engine, None, reqs)
    assert [r.token_ids for r in out] == [_expected(r) for r in reqs]
    assert all(r.finish_reason == "length" for r in out)
    assert [r.key for r in out] == list(range(len(reqs)))


def test_stop_tokens_and_context_length_as_batching():
    reqs = _requests([3, 10], max_new=20)
    stop = _expected(reqs[0])[4]
    reqs[0] = Request(reqs[0].prompt_ids, SamplingParams(max_new_tokens=20, stop_token_ids=(stop,)), key=0)
    engine = MockPagedEngine(max_seq_len=16)
    a, b = scheduler.run(engine, None, reqs)
    first_stop = _expected(reqs[0]).index(stop)
    assert a.finish_reason == "stop" and a.token_ids == _expected(reqs[0])[:first_stop]
    assert b.finish_reason == "length" and len(b.prompt_ids) + len(b.token_ids) == 16


def test_pages_held_track_tokens_and_admission_stays_within_limits():
    """Each step: pages held = sum of ceil(tokens / P) (within one page per sequence of the tokens in
    flight: these prompts share no page); running within max_num_seqs; all freed at the end."""
    P, num_pages = 4, 30
    reqs = _requests([10, 3, 25, 7, 14, 1, 20], max_new=6)
    engine = MockPagedEngine(page_size=P, num_pages=num_pages, max_num_seqs=3, max_num_batched_tokens=12)
    seen = []

    def check(batch, sched):
        pool = sched.pool
        tokens = {s.seq_id: pool.length(s.seq_id) if s.seq_id in pool else 0 for s in sched.running}
        assert pool.pages_in_use == sum(-(-n // P) for n in tokens.values())
        assert pool.pages_in_use * P < sum(tokens.values()) + P * max(1, len(tokens))
        assert sched.pool.free_pages >= sched.fork_pages >= 0 and len(sched.running) <= 3
        seen.append(len(sched.running))

    out = scheduler.run(engine, None, reqs, on_step=check)
    assert [r.token_ids for r in out] == [_expected(r) for r in reqs]
    assert max(seen) == 3


def test_admission_waits_for_pages_in_request_order():
    """A pool that holds one sequence at a time runs them one after another, in request order."""
    reqs = _requests([8, 8, 8], max_new=8)
    engine = MockPagedEngine(page_size=4, num_pages=4, max_num_seqs=4, max_num_batched_tokens=16)
    order = []
    out = scheduler.run(engine, None, reqs, on_result=lambda r: order.append(r.key))
    assert order == [0, 1, 2]
    assert [r.token_ids for r in out] == [_expected(r) for r in reqs]
    assert all(len(ids) == 1 for kind, ids in engine.steps if kind == "decode")


def test_long_prompt_is_chunked_and_running_sequences_decode_between_chunks():
    """While a 2,000-token prompt is prefilled in budget-sized chunks, the sequences already running
    get a token after every chunk, and every request's tokens are unchanged."""
    short = _requests([5, 9, 3], max_new=40)
    long = Request(prompt_ids=[(j * 13) % 50 for j in range(2000)], sampling=SamplingParams(max_new_tokens=4), key=3)
    engine = MockPagedEngine(page_size=16, num_pages=400, max_num_seqs=4, max_num_batched_tokens=256,
                             max_seq_len=4096)
    out = scheduler.run(engine, None, short + [long])
    assert [r.token_ids for r in out] == [_expected(r) for r in short + [long]]
    chunk_steps = [i for i, (kind, chunks) in enumerate(engine.steps) if kind == "prefill" and
                   any(seq == 3 for seq, _, _ in chunks)]
    assert len(chunk_steps) == 2000 // 256 + 1
    for i in chunk_steps[:-1]:  # after each chunk, a decode step for the running sequences
        kind, ids = engine.steps[i + 1]
        assert kind == "decode" and set(ids) >= {0, 1, 2}


def test_a_request_that_can_never_fit_is_its_own_error():
    reqs = _requests([4, 60, 4], max_new=4)  # 64 tokens need 16 pages of 4; the pool has 10
    engine = MockPagedEngine(page_size=4, num_pages=10, max_seq_len=128, max_num_batched_tokens=16)
    errors = []
    out = scheduler.run(engine, None, reqs, on_result=lambda r: errors.append(r.key) if r.error else None)
    assert out[1].finish_reason == "error" and errors == [1]
    assert "needs 16 pages of 4 tokens; the pool has 10 pages" in out[1].error
    assert out[0].token_ids == _expected(reqs[0]) and out[2].token_ids == _expected(reqs[2])


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="smaller than the page size"):
        scheduler.Scheduler(num_pages=8, page_size=16, max_num_seqs=2, max_num_batched_tokens=8, max_seq_len=64)
    with pytest.raises(ValueError, match="page size must be >= 1"):
        scheduler.Scheduler(num_pages=8, page_size=0, max_num_seqs=2, max_num_batched_tokens=8, max_seq_len=64)
    with pytest.raises(ValueError, match="max_num_seqs"):
        scheduler.Scheduler(num_pages=8, page_size=4, max_num_seqs=0, max_num_batched_tokens=8, max_seq_len=64)


# ----- prefix cache, n samples, preemption -----

SYSTEM = [(j * 11) % 89 + 1 for j in range(300)]


def _shared(n_prompts=64, max_new=6, own=lambda i: 5 + i % 13):
    return [Request(prompt_ids=SYSTEM + [(5 * i + j) % 83 + 1 for j in range(own(i))], key=i,
                    sampling=SamplingParams(max_new_tokens=max_new, seed=i)) for i in range(n_prompts)]


def _want(req):
    seed = req.sampling.seed if req.sampling.temperature > 0 else 0
    return MockPagedEngine.expected(req.prompt_ids, req.sampling.max_new_tokens, seed=seed)


@pytest.mark.parametrize("budget", [512, 64])
def test_prefix_cache_computes_a_shared_system_prompt_once(budget):
    """64 prompts sharing 300 tokens: the same tokens with the cache on and off; with it on, prefill
    computes the shared part once plus each prompt's own part from the last whole shared page. At a
    budget of 64 the shared part takes 5 steps, which the prompts sharing it wait for."""
    P = 16
    reqs = _shared()
    runs = {}
    for cache in (False, True):
        engine = MockPagedEngine(page_size=P, num_pages=2000, max_num_seqs=16, max_num_batched_tokens=budget,
                                 max_seq_len=512, prefix_cache=cache)
        sched_seen = []
        out = scheduler.run(engine, None, reqs, on_step=lambda b, s: sched_seen.append(s))
        assert [r.token_ids for r in out] == [_want(r) for r in reqs]
        runs[cache] = (engine.prefill_tokens, sched_seen[-1].stats)
    submitted = sum(len(r.prompt_ids) for r in reqs)
    assert runs[False][0] == runs[False][1].computed_tokens == submitted
    shared = len(SYSTEM) // P * P  # 288: whole pages of the system message
    bound = shared + sum(len(r.prompt_ids) - shared for r in reqs)
    computed, stats = runs[True]
    assert computed == stats.computed_tokens <= bound
    assert stats.cached_tokens == 63 * shared and stats.prompt_tokens == submitted
    assert stats.hit_rate == pytest.approx(63 * shared / submitted)


def test_prefix_cache_eviction_under_a_small_pool_keeps_results():
    """Eight 100-token prefixes, three prompts each, through a pool of 48 pages of 16 tokens: cached
    pages are evicted (least recently freed first) as new prompts need them, every result is
    unchanged, and no page is lost. Prompts in turn over the 8 prefixes find none left (LRU's worst
    case); grouped by prefix, they hit."""
    prefixes = [[(p * 31 + j * 7) % 89 + 1 for j in range(100)] for p in range(8)]
    reqs = [Request(prefixes[i % 8] + [i % 50 + 1] * (3 + i % 4), SamplingParams(max_new_tokens=10, seed=i), key=i)
            for i in range(24)]
    grouped = sorted(reqs, key=lambda r: r.key % 8)
    for prompts in (reqs, reqs[::-1], grouped):
        engine = MockPagedEngine(page_size=16, num_pages=48, max_num_seqs=4, max_num_batched_tokens=128,
                                 max_seq_len=512)
        seen = []
        out = scheduler.run(engine, None, prompts, on_step=lambda b, s: seen.append(s))
        assert [r.token_ids for r in out] == [_want(r) for r in prompts]
        pool, stats = seen[-1].pool, seen[-1].stats
        assert pool.evictions > 0
        assert (stats.cached_tokens >= 8 * 2 * 96) if prompts is grouped else stats.cached_tokens == 0
        assert pool.pages_in_use == 0 and pool.free_pages == 48


def test_prefix_cache_decisions_are_the_same_in_every_run():
    """Multi-host processes run the same schedule: two runs take the same steps with the same pages."""
    def steps():
        engine = MockPagedEngine(page_size=8, num_pages=60, max_num_seqs=5, max_num_batched_tokens=64,
                                 max_seq_len=512)
        tables = []
        scheduler.run(engine, None, _shared(20, max_new=12), on_step=lambda b, s: tables.append(
            s.pool.page_table_array([x.seq_id for x in s.running], 64).tobytes()))
        return engine.steps, tables

    assert steps() == steps()


def _n_requests(n, temperature=1.0):
    return [Request(prompt_ids=[(3 * i + j) % 40 + 1 for j in range(length)], key=i,
                    sampling=SamplingParams(max_new_tokens=9, seed=10 + i, n=n, temperature=temperature))
            for i, length in enumerate([7, 16, 23, 40])]


@pytest.mark.parametrize("page_size", [4, 16])
def test_n_samples_each_equal_that_sample_run_alone(page_size):
    reqs = _n_requests(4)
    engine = MockPagedEngine(page_size=page_size, num_pages=200, max_num_seqs=12, max_num_batched_tokens=64)
    seen = []
    out = scheduler.run(engine, None, reqs, on_step=lambda b, s: seen.append(s))
    for req, res in zip(reqs, out):
        assert len(res.samples) == 4 and res.finish_reason == "length"
        for i, sample in enumerate(res.samples):
            alone = Request(req.prompt_ids, scheduler.sample_sampling(req.sampling, i))
            (want,) = scheduler.run(MockPagedEngine(page_size=page_size, num_pages=200), None, [alone])
            assert sample.token_ids == want.token_ids == _want(alone)
        assert res.token_ids == res.samples[0].token_ids
        assert len({tuple(s.token_ids) for s in res.samples}) > 1  # the keys differ
    stats = seen[-1].stats
    assert stats.prompts_prefilled == 4 and stats.computed_tokens == sum(len(r.prompt_ids) for r in reqs)
    assert engine.prefill_tokens == stats.computed_tokens  # each prompt once, not once a sample
    assert seen[-1].pool.pages_in_use == 0


def test_n_samples_under_greedy_are_identical_and_share_pages():
    reqs = _n_requests(3, temperature=0.0)
    reqs = [Request(r.prompt_ids, SamplingParams(max_new_tokens=9, n=3), key=r.key) for r in reqs]
    engine = MockPagedEngine(page_size=4, num_pages=200, max_num_seqs=9, max_num_batched_tokens=64)
    out = scheduler.run(engine, None, reqs)
    for req, res in zip(reqs, out):
        assert [s.token_ids for s in res.samples] == [_want(Request(req.prompt_ids, SamplingParams(max_new_tokens=9)))] * 3


def test_preemption_by_recompute_keeps_every_result():
    """A pool far smaller than what the sequences need together: the newest decoding sequences are
    preempted and recomputed, and every result equals an ample pool's; none lost or twice."""
    reqs = _requests([10, 3, 25, 7, 14, 1, 20, 9, 30, 5], max_new=24)
    reqs = [Request(r.prompt_ids, SamplingParams(max_new_tokens=24, seed=i, temperature=0.7), key=i)
            for i, r in enumerate(reqs)]
    ample = scheduler.run(MockPagedEngine(page_size=4, num_pages=400, max_num_seqs=8, max_num_batched_tokens=32,
                                          max_seq_len=64), None, reqs)
    for cache in (True, False):
        engine = MockPagedEngine(page_size=4, num_pages=16, max_num_seqs=8, max_num_batched_tokens=32, max_seq_len=64,
                                 prefix_cache=cache)
        seen, running, finished = [], [], []

        def step(batch, sched):
            seen.append(sched)
            running.append(len(sched.running))

        out = scheduler.run(engine, None, reqs, on_step=step, on_result=lambda r: finished.append(r.key))
        assert [r.token_ids for r in out] == [r.token_ids for r in ample] == [_want(r) for r in reqs]
        assert sorted(finished) == list(range(len(reqs)))  # each once
        assert seen[-1].stats.preemptions > 0 and max(running) > 2
        assert seen[-1].pool.pages_in_use == 0


def test_preemption_with_samples_and_streaming():
    reqs = _n_requests(3)
    ample = scheduler.run(MockPagedEngine(page_size=4, num_pages=400, max_num_seqs=12, max_num_batched_tokens=64), None, reqs)
    engine = MockPagedEngine(page_size=4, num_pages=30, max_num_seqs=12, max_num_batched_tokens=64, max_seq_len=64)
    seen, finished = [], []
    scheduler.run(engine, None, iter(reqs), on_step=lambda b, s: seen.append(s.stats.preemptions),
                  on_result=lambda r: finished.append((r.key, [s.token_ids for s in r.samples])))
    assert sorted(finished) == [(r.key, [s.token_ids for s in r.samples]) for r in ample]
    assert seen[-1] > 0


def test_bad_n_is_the_request_error():
    with pytest.raises(ValueError, match=r"n must be an integer >= 1 \(samples of the prompt\), got 0"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="n must be an integer"):
        SamplingParams(n=2.5)
    engine = MockPagedEngine(page_size=4, num_pages=10, max_num_seqs=4, max_num_batched_tokens=16, max_seq_len=64)
    prompt = list(range(1, 8))  # 7 tokens: 2 pages, the second partial
    reqs = [Request(prompt, SamplingParams(max_new_tokens=2, n=5), key=0),  # more than max_num_seqs
            Request(prompt, SamplingParams(max_new_tokens=2, n=4), key=1),  # 2 + 3 copies: fits 10
            Request(list(range(1, 31)), SamplingParams(max_new_tokens=2, n=4), key=2)]  # 8 + 3 copies > 10
    out = scheduler.run(engine, None, reqs)
    assert out[0].finish_reason == "error" and "n = 5 samples is more than this engine runs at once: at most 4" in out[0].error
    assert out[1].finish_reason == "length" and len(out[1].samples) == 4
    assert out[2].finish_reason == "error"
    assert "with max_new_tokens 2 and 3 copies of its partial last page needs 11 pages of 4 tokens; the pool has 10" in out[2].error
