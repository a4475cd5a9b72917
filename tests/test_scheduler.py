"""The paged scheduler (engine/scheduler.py) on the arithmetic MockPagedEngine, in milliseconds:
tokens equal MockEngine's whatever the chunking, admission by pages and sequence count, pages held
within one page per sequence of the tokens in flight, long prompts interleaved with decode."""

import pytest

from shardlm.engine import scheduler
from shardlm.engine.batching import Request
from shardlm.engine.mock_engine import MockEngine, MockPagedEngine
from shardlm.engine.sampling import SamplingParams


def _requests(lengths, max_new=8, stop=()):
    return [Request(prompt_ids=[(7 * i + j) % 50 + 1 for j in range(n)], key=i,
                    sampling=SamplingParams(max_new_tokens=max_new, stop_token_ids=stop)) for i, n in enumerate(lengths)]


def _expected(req):
    return MockEngine.expected(req.prompt_ids, req.sampling.max_new_tokens)


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


def test_pages_held_track_tokens_and_reservations_cap_admission():
    """Each step: pages held = sum of ceil(tokens / P) (within one page per sequence of the tokens in
    flight); reservations within the pool; running within max_num_seqs; all freed at the end."""
    P, num_pages = 4, 30
    reqs = _requests([10, 3, 25, 7, 14, 1, 20], max_new=6)
    engine = MockPagedEngine(page_size=P, num_pages=num_pages, max_num_seqs=3, max_num_batched_tokens=12)
    seen = []

    def check(batch, sched):
        pool = sched.pool
        tokens = {s.seq_id: pool.length(s.seq_id) if s.seq_id in pool else 0 for s in sched.running}
        assert pool.pages_in_use == sum(-(-n // P) for n in tokens.values())
        assert pool.pages_in_use * P < sum(tokens.values()) + P * max(1, len(tokens))
        assert sched.reserved <= num_pages and len(sched.running) <= 3
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
