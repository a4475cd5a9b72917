"""What every process of a job decides together at each step: drain on a signal, stop at the drain
deadline, and check that the processes still run the same steps (lockstep).

The generation loops (scheduler.run, batching.run) call `at_step(control, last, drain)` at the top
of every iteration, which asks `control.step(rows, tokens)` with the previous step's rows and
sampled tokens, and act on the answer:
- GO: go on;
- DRAIN: admit nothing more; sequences already started (prefilled at least in part) run to their
  end, the rest stay pending for a rerun;
- STOP: leave now; unfinished sequences stay pending.
A SIGTERM or SIGINT (`install_signal_handlers`) asks for a drain; the drain deadline
(`drain_timeout` seconds after the step that first saw the request) turns it into a stop. In a job
of several processes the flags of all of them are gathered at every step, so a signal on any
process drains and stops every process at the same step, and every `lockstep_every` steps (default
every step, since the flags are exchanged anyway; and at the end) their digests of the scheduled
rows and sampled tokens are compared: a difference stops the job with the step and the processes
that differ (a divergence would otherwise hang a collective or write wrong output). Writes handed
to `hold` run only once a comparison covering them has passed, so a divergence writes nothing it
produced; in a single process they run at once.
"""

from __future__ import annotations

import os
import signal
import time
import zlib
from typing import Callable

import numpy as np

GO, DRAIN, STOP = 0, 1, 2


class LockstepError(RuntimeError):
    """The processes of a job ran different steps."""


class JobControl:
    def __init__(self, drain_timeout: float = 20.0, lockstep_every: int = 1):
        if not drain_timeout >= 0:
            raise ValueError(f"drain timeout must be a number of seconds >= 0, got {drain_timeout!r}")
        if isinstance(lockstep_every, bool) or not isinstance(lockstep_every, int) or lockstep_every < 0:
            raise ValueError(f"lockstep check interval must be an integer >= 0 steps (0: never), got {lockstep_every!r}")
        self.drain_timeout, self.lockstep_every = drain_timeout, lockstep_every
        self.signalled: int | None = None  # the signal that asked for a drain
        self.drain_started: float | None = None
        self.steps = 0  # steps checked (the loop's iterations)
        self.digest = 0  # crc32 of every step's rows and tokens so far
        self.state = GO
        self.held: list[Callable[[], None]] = []  # writes waiting for the next agreeing comparison

    @property
    def drained(self) -> bool:
        return self.state != GO

    def request_drain(self, signum: int = signal.SIGTERM) -> None:
        if self.signalled is None:
            self.signalled = signum

    def step(self, seq_ids=None, tokens=None) -> int:
        """The decision for the next step, the same on every process; seq_ids and tokens: the rows
        and sampled tokens of the step before (none before the first)."""
        if tokens is not None:
            rows = np.asarray(seq_ids, np.int64).tobytes() + np.asarray(tokens, np.int64).tobytes()
            self.digest = zlib.crc32(rows, self.digest)
        self.steps += 1
        late = self.drain_started is not None and time.monotonic() - self.drain_started > self.drain_timeout
        check = bool(self.lockstep_every) and self.steps % self.lockstep_every == 0
        signalled, late = self._agree(self.signalled is not None, late, check)
        if late:
            self.state = STOP
        elif signalled and self.state == GO:
            self.state, self.drain_started = DRAIN, time.monotonic()
            if self.drain_timeout == 0:
                self.state = STOP
        return self.state

    def hold(self, write: Callable[[], None]) -> None:
        """Run `write` once the steps before it are known to agree (at once in a single process)."""
        self.held.append(write)
        if _processes() == 1:
            self._flush()

    def finish(self) -> None:
        """After the loop (on every process): a last comparison, then the writes still held."""
        self._agree(False, False, check=True)
        self._flush()

    def _flush(self) -> None:
        held, self.held = self.held, []
        for write in held:
            write()

    def _agree(self, signalled: bool, late: bool, check: bool) -> tuple[bool, bool]:
        if _processes() == 1:
            return signalled, late
        from jax.experimental import multihost_utils

        mine = np.asarray([signalled, late, self.steps, self.digest if check else 0], np.int64)
        everyone = np.asarray(multihost_utils.process_allgather(mine))  # [processes, 4]
        differ = [p for p in range(len(everyone)) if not np.array_equal(everyone[p, 2:], everyone[0, 2:])]
        if differ:
            self.held = []  # what they computed since the last agreement is not to be trusted
            raise LockstepError(f"processes {differ} ran different steps than process 0 by step {self.steps} "
                                f"(digests of the scheduled rows and sampled tokens differ); the job stopped, "
                                f"writing nothing computed since the last agreeing check")
        if check or not self.lockstep_every:  # never comparing, nothing waits for a comparison
            self._flush()
        return bool(everyone[:, 0].any()), bool(everyone[:, 1].any())


def at_step(control: JobControl | None, last: tuple, drain: Callable[[], None]) -> tuple[bool, bool]:
    """The loops' decision at the top of a step, `last` the previous step's (rows, tokens) or ():
    (go on, admit more requests); `drain()` runs while draining."""
    if control is None:
        return True, True
    decision = control.step(*last)
    if decision == DRAIN:
        drain()
    return decision != STOP, decision == GO


def _processes() -> int:
    import jax

    return jax.process_count()


def install_signal_handlers(control: JobControl):
    """SIGTERM and SIGINT ask `control` for a drain; a second one exits at once (130 for SIGINT,
    143 for SIGTERM), writing nothing more. Returns a function that restores the old handlers."""
    def handler(signum, frame):
        if control.signalled is not None:
            os.write(2, b"\nsecond signal: stopping now\n")
            os._exit(128 + signum)
        name = signal.Signals(signum).name
        os.write(2, f"\n{name}: draining (finishing running sequences, admitting no more)\n".encode())
        control.request_drain(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(s, h) for s, h in old.items()]
