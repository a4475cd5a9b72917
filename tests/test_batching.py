"""The continuous batching loop against the arithmetic MockEngine, whose right answer is known.

MockEngine's tokens are a pure function of the prompt and position (`MockEngine.expected`), so any
mix-up of slots, a missed refill or a token fed to the wrong request shows up as a wrong token.
"""

import math

import pytest

from shardlm.engine.batching import Request, run
from shardlm.engine.mock_engine import MockEngine
from shardlm.engine.sampling import SamplingParams

V = 97


class CountingEngine(MockEngine):
    """MockEngine that records the slot of every insert."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.inserted: list[int] = []  # slot of each insert, in order

    def insert(self, prefix, state, slot, sampling=None):
        assert 0 <= slot < self.batch_size
        self.inserted.append(slot)
        return super().insert(prefix, state, slot, sampling)


def prompts(n: int) -> list[list[int]]:
    """n different prompts of different lengths (1 to 7 tokens)."""
    return [[(7 * i + j) % V for j in range(1 + i % 7)] for i in range(n)]


def requests(ps, max_new, **sampling) -> list[Request]:
    return [Request(p, SamplingParams(max_new_tokens=n, **sampling), key=f"r{i}") for i, (p, n) in enumerate(zip(ps, max_new))]


MIXED = [5, 1, 12, 3, 8, 2, 20, 7, 1, 4, 9, 6, 15, 2]


def first_new_index(seq, n=4) -> int:
    """An index i >= 1 where seq[i] does not occur in seq[:i] (so it can serve as a stop token)."""
    for i in range(1, len(seq)):
        if seq[i] not in seq[:i]:
            return i
    raise AssertionError(f"no fresh token in {seq}")


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_tokens_and_order_match_the_mock_for_any_batch_size(batch_size):
    ps = prompts(len(MIXED))
    engine = MockEngine(batch_size=batch_size, max_seq_len=64)
    results = run(engine, None, requests(ps, MIXED))
    assert [r.key for r in results] == [f"r{i}" for i in range(len(MIXED))]
    for r, p, n in zip(results, ps, MIXED):
        assert r.prompt_ids == p
        assert r.token_ids == MockEngine.expected(p, n)
        assert r.finish_reason == "length"
    assert engine.prefill_calls == len(MIXED)  # each request prefilled exactly once


def test_batch_size_1_makes_one_step_per_token_after_the_first():
    engine = MockEngine(batch_size=1)
    run(engine, None, requests(prompts(len(MIXED)), MIXED))
    assert engine.generate_calls == sum(n - 1 for n in MIXED)


@pytest.mark.parametrize("batch_size", [3, 8])
def test_slots_are_refilled_so_steps_are_shared(batch_size):
    total = sum(n - 1 for n in MIXED)  # tokens that need a decode step
    engine = MockEngine(batch_size=batch_size)
    steps = []
    run(engine, None, requests(prompts(len(MIXED)), MIXED), on_step=steps.append)
    assert engine.generate_calls == len(steps)
    assert sum(steps) == total  # on_step counts exactly the tokens decoded
    assert max(MIXED) - 1 <= engine.generate_calls < total
    assert engine.generate_calls >= math.ceil(total / batch_size)
    assert max(steps) == batch_size


def test_equal_requests_fill_every_slot_each_round():
    # 12 requests of 5 tokens in 4 slots: three rounds of 4 steps, every slot busy every step.
    engine = MockEngine(batch_size=4)
    steps = []
    run(engine, None, requests(prompts(12), [5] * 12), on_step=steps.append)
    assert engine.generate_calls == 3 * 4
    assert steps == [4] * 12


def test_every_slot_is_busy_while_requests_wait():
    engine = CountingEngine(batch_size=3)
    n_requests = len(MIXED)
    busy_while_waiting = []

    def on_step(n_active):
        if engine.prefill_calls < n_requests:  # some request not yet started: no slot may idle
            busy_while_waiting.append(n_active)

    results = run(engine, None, requests(prompts(n_requests), MIXED), on_step=on_step)
    assert busy_while_waiting and all(n == 3 for n in busy_while_waiting)
    # Requests with max_new_tokens=1 never take a slot; all others take exactly one.
    assert len(engine.inserted) == sum(n > 1 for n in MIXED)
    assert all(r.finish_reason == "length" for r in results)


def test_max_new_tokens_1_finishes_after_prefill_without_a_slot():
    engine = CountingEngine(batch_size=1)
    ps = prompts(3)
    results = run(engine, None, requests(ps, [1, 1, 4]))
    assert [r.token_ids for r in results] == [MockEngine.expected(ps[0], 1), MockEngine.expected(ps[1], 1),
                                             MockEngine.expected(ps[2], 4)]
    assert engine.inserted == [0]  # only the third request used the slot
    assert engine.generate_calls == 3
    assert [r.finish_reason for r in results] == ["length"] * 3


def test_model_stop_token_ends_with_stop_and_is_not_returned():
    p = [11, 22, 33]
    full = MockEngine.expected(p, 12)
    i = first_new_index(full)
    engine = MockEngine(batch_size=2)
    req = Request(p, SamplingParams(max_new_tokens=12), stop_ids=frozenset({full[i]}), key=0)
    other = Request([5], SamplingParams(max_new_tokens=12), key=1)
    r, r_other = run(engine, None, [req, other])
    assert r.token_ids == full[:i]
    assert r.finish_reason == "stop"
    assert r_other.token_ids == MockEngine.expected([5], 12)  # a neighbour's stop does not touch others


def test_explicit_stop_token_ids_end_with_stop():
    p = [4, 8, 15, 16, 23, 42]
    full = MockEngine.expected(p, 15)
    i = first_new_index(full)
    [r] = run(MockEngine(batch_size=3), None, [Request(p, SamplingParams(max_new_tokens=15, stop_token_ids=(full[i],)))])
    assert (r.token_ids, r.finish_reason) == (full[:i], "stop")


def test_stop_on_the_first_token_returns_nothing_and_uses_no_slot():
    p = [1, 2, 3]
    first = MockEngine.expected(p, 1)[0]
    engine = CountingEngine(batch_size=2)
    [r] = run(engine, None, [Request(p, SamplingParams(max_new_tokens=10), stop_ids=frozenset({first}))])
    assert (r.token_ids, r.finish_reason) == ([], "stop")
    assert engine.inserted == [] and engine.generate_calls == 0


def test_ignore_eos_ignores_model_stops_but_not_explicit_ones():
    p = [9, 9, 9, 9]
    full = MockEngine.expected(p, 10)
    i = first_new_index(full)
    model_stop = Request(p, SamplingParams(max_new_tokens=10, ignore_eos=True), stop_ids=frozenset({full[i]}))
    explicit = Request(p, SamplingParams(max_new_tokens=10, ignore_eos=True, stop_token_ids=(full[i],)),
                       stop_ids=frozenset({full[i]}))
    a, b = run(MockEngine(batch_size=2), None, [model_stop, explicit])
    assert (a.token_ids, a.finish_reason) == (full, "length")
    assert (b.token_ids, b.finish_reason) == (full[:i], "stop")


def test_context_limit_ends_with_length():
    engine = MockEngine(batch_size=2, max_seq_len=16)
    long_p, short_p = list(range(10)), [3]
    results = run(engine, None, requests([long_p, short_p], [100, 4]))
    # Prompt plus generated fill the context exactly.
    assert results[0].token_ids == MockEngine.expected(long_p, 16 - 10)
    assert len(long_p) + len(results[0].token_ids) == engine.max_seq_len
    assert results[0].finish_reason == "length"
    assert results[1].token_ids == MockEngine.expected(short_p, 4)


def test_prompt_one_short_of_the_context_gets_one_token_without_a_slot():
    engine = CountingEngine(batch_size=1, max_seq_len=8)
    p = list(range(7))
    [r] = run(engine, None, [Request(p, SamplingParams(max_new_tokens=50))])
    assert (r.token_ids, r.finish_reason) == (MockEngine.expected(p, 1), "length")
    assert engine.inserted == []


def test_on_result_sees_each_request_once_finished_in_completion_order():
    ps = prompts(6)
    max_new = [10, 1, 3, 10, 2, 1]
    seen = []

    def on_result(r):
        seen.append((r.key, list(r.token_ids), r.finish_reason))

    results = run(MockEngine(batch_size=2), None, requests(ps, max_new), on_result=on_result)
    assert sorted(k for k, _, _ in seen) == sorted(r.key for r in results)
    assert len(seen) == len(results)
    final = {r.key: (r.token_ids, r.finish_reason) for r in results}
    for key, tokens, reason in seen:
        assert (tokens, reason) == final[key]  # complete when reported
    order = [k for k, _, _ in seen]
    assert order.index("r1") < order.index("r0")  # one-token request reported before the long one started earlier


def test_no_requests_no_work():
    engine = MockEngine()
    assert run(engine, None, []) == []
    assert engine.prefill_calls == engine.generate_calls == 0


def test_identical_prompts_in_different_slots_get_identical_tokens():
    p = [42, 7]
    results = run(MockEngine(batch_size=3), None, requests([p] * 5, [6, 9, 2, 9, 6]))
    assert [r.token_ids for r in results] == [MockEngine.expected(p, n) for n in [6, 9, 2, 9, 6]]


def test_admission_follows_the_prefill_bucket_and_keeps_order_within_one():
    """Prompts of 40 tokens (bucket 48) wait behind those of 5 (bucket 32); equal buckets keep order."""
    engine = MockEngine(batch_size=1, max_seq_len=128)
    ps = [[1] * 40, [2] * 5, [3] * 40, [4] * 6]
    started = []
    prefill = engine.prefill
    engine.prefill = lambda params, tokens, sampling=None: started.append(tokens[0]) or prefill(params, tokens)
    results = run(engine, None, requests(ps, [3] * 4))
    assert started == [2, 4, 1, 3]
    assert [r.token_ids for r in results] == [MockEngine.expected(p, 3) for p in ps]  # in request order
