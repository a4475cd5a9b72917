"""Draining and stopping the generation loops (engine/job_control.py) on the arithmetic mock engines:
a drain admits nothing more and lets every started sequence finish with the tokens it would have had;
the deadline stops the loop; a stopped or drained request is left unfinished (finish_reason None)."""

import pytest

from shardlm.engine import batching, scheduler
from shardlm.engine.batching import Request
from shardlm.engine.job_control import DRAIN, GO, STOP, JobControl
from shardlm.engine.mock_engine import MockEngine, MockPagedEngine
from shardlm.engine.sampling import SamplingParams


def _requests(n, max_new=6):
    return [Request(prompt_ids=[(5 * i + j) % 40 + 1 for j in range(3 + i % 7)], key=i,
                    sampling=SamplingParams(max_new_tokens=max_new)) for i in range(n)]


class DrainAt(JobControl):
    """A drain requested at loop iteration `at` (as a signal would), recording what had started by then."""

    def __init__(self, at, drain_timeout=60.0, **kw):
        super().__init__(drain_timeout, **kw)
        self.at, self.decisions = at, []

    def step(self, seq_ids=None, tokens=None):
        if self.steps + 1 == self.at:
            self.request_drain()
        self.decisions.append(super().step(seq_ids, tokens))
        return self.decisions[-1]


def _started(results):
    return {r.key for r in results if r.token_ids or r.finish_reason}


@pytest.mark.parametrize("loop", ["paged", "slots"])
def test_drain_finishes_started_sequences_and_admits_no_more(loop):
    reqs = _requests(12)
    seen = {}

    def on_token(result):
        seen.setdefault(control.steps, set()).add(result.key)

    control = DrainAt(at=4)
    if loop == "paged":
        engine = MockPagedEngine(page_size=4, num_pages=200, max_num_seqs=3, max_num_batched_tokens=8)
        out = scheduler.run(engine, None, reqs, on_token=on_token, control=control)
    else:
        out = batching.run(MockEngine(batch_size=3), None, reqs, on_token=on_token, control=control)
    want = MockPagedEngine.expected if loop == "paged" else MockEngine.expected
    assert control.decisions[:3] == [GO] * 3 and set(control.decisions[3:]) == {DRAIN}
    started = set().union(*(keys for step, keys in seen.items() if step < 4))
    finished = {r.key for r in out if r.finish_reason is not None}
    assert started and finished, "the drain came before any work or after all of it"
    assert started <= finished, "a sequence that had begun before the drain was left unfinished"
    assert len(finished) < len(reqs), "the drain admitted every request anyway"
    for r, req in zip(out, reqs):  # finished ones have every token they would have had
        if r.finish_reason is not None:
            assert r.token_ids == want(req.prompt_ids, 6) and r.finish_reason == "length"
        else:
            assert r.token_ids == []
    # What the drain left is exactly what a rerun has to do.
    rest = [req for r, req in zip(out, reqs) if r.finish_reason is None]
    again = scheduler.run(MockPagedEngine(page_size=4, num_pages=200, max_num_seqs=3, max_num_batched_tokens=8),
                          None, rest)
    assert [r.token_ids for r in again] == [MockPagedEngine.expected(q.prompt_ids, 6) for q in rest]


@pytest.mark.parametrize("loop", ["paged", "slots"])
def test_drain_timeout_stops_the_loop(loop):
    reqs = _requests(6, max_new=40)
    control = DrainAt(at=3, drain_timeout=0.0)
    if loop == "paged":
        out = scheduler.run(MockPagedEngine(page_size=4, num_pages=200, max_num_seqs=6, max_num_batched_tokens=64),
                            None, reqs, control=control)
    else:
        out = batching.run(MockEngine(batch_size=6, max_seq_len=128), None, reqs, control=control)
    assert control.decisions[-1] == STOP and len(control.decisions) == 3
    assert all(r.finish_reason is None for r in out), "a 40-token request finished within 3 steps"
    assert any(r.token_ids for r in out)


def test_no_signal_changes_nothing():
    reqs = _requests(10)
    engine = MockPagedEngine(page_size=4, num_pages=200, max_num_seqs=3, max_num_batched_tokens=8)
    control = JobControl()
    out = scheduler.run(engine, None, reqs, control=control)
    assert [r.token_ids for r in out] == [MockPagedEngine.expected(q.prompt_ids, 6) for q in reqs]
    assert not control.drained and control.steps > 10


@pytest.mark.parametrize("kw, fragment", [({"drain_timeout": -1}, "drain timeout"),
                                          ({"drain_timeout": float("nan")}, "drain timeout"),
                                          ({"lockstep_every": -2}, "lockstep")])
def test_bad_settings_are_refused(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        JobControl(**kw)
