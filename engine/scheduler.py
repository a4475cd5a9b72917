"""The host-side scheduler of the paged engine: a waiting queue, the running sequences, the page pool.

Each step it first admits waiting requests, oldest first, while the running count stays within
`max_num_seqs` and the pages reserved stay within the pool: a sequence reserves
ceil(min(prompt + max_new_tokens, max_seq_len) / P) pages at admission, so a running sequence
never runs out of pages in decode; pages are allocated only as its tokens arrive (a prefill chunk,
then one token a decode step), so the pages held are ceil(tokens / P) per sequence, within one
page per sequence of the tokens in flight. The head of the queue waits until it fits (no
skipping), so admission order is the request order in every process of a multi-host job. A request
whose reservation exceeds the whole pool can never run: it is that request's error.

Then it picks one kind of step, alternating when both have work:
- prefill: chunks of the admitted prompts not yet prefilled, oldest first, packed into one row up
  to `max_num_batched_tokens` (each chunk taking whole blocks of `query_block` tokens of it); a
  prompt longer than the budget goes over several steps;
- decode: one token for every sequence whose prompt is done.
Alternating (rather than mixing decode tokens into the prefill row) keeps each step's attention
specialised (a decode row reads one page per step per sequence; a packed row gathers per token),
and a running sequence still gets a token between each chunk of a long prompt.

The engine does the arithmetic: `engine.prefill(params, chunks, pool)` and
`engine.decode(params, batch, pool)` return the sampled tokens (first arrays of their results);
`run` drives any engine with those two methods (tests use engine/mock_engine.py's).
Stop and length rules are batching.accept's.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable, Iterable

from shardlm.engine.batching import Request, Result, accept, to_host
from shardlm.engine.job_control import at_step
from shardlm.engine.kv_pages import PagePool
from shardlm.engine.sampling import SamplingParams

LOOKAHEAD = 4  # a streamed run queues up to this many requests per sequence slot


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens start .. start + len(token_ids) - 1 of sequence seq_id, prefilled in one step."""

    seq_id: int
    token_ids: tuple[int, ...]
    start: int
    last: bool  # completes the prompt: its first token is sampled at the chunk's last position
    sampling: SamplingParams


@dataclass(frozen=True)
class PrefillBatch:
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class DecodeBatch:
    seq_ids: tuple[int, ...]
    tokens: tuple[int, ...]  # the token each sequence feeds, at position positions[i]
    positions: tuple[int, ...]
    samplings: tuple[SamplingParams, ...]


@dataclass
class _Seq:
    seq_id: int
    req: Request
    reserved: int  # pages
    done: int = 0  # prompt tokens prefilled
    token: int | None = None  # the next token to feed (set once the prompt is done)


class Scheduler:
    def __init__(self, *, num_pages: int, page_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_seq_len: int, query_block: int = 1, keep_results: bool = True):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < page_size:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) is smaller than the page size "
                             f"({page_size}); give a budget of at least one page")
        self.pool = PagePool(num_pages, page_size)
        self.max_num_seqs, self.max_num_batched_tokens, self.max_seq_len = max_num_seqs, max_num_batched_tokens, max_seq_len
        self.query_block = query_block  # each chunk takes whole blocks of this many tokens of the budget
        self.waiting: collections.deque[_Seq] = collections.deque()
        self.running: list[_Seq] = []  # admitted, in admission order
        self.results: dict[int, Result] = {}  # by seq_id, in request order
        self.keep_results = keep_results  # False: a finished result is dropped once `forget_finished` runs
        self._finished: list[int] = []
        self._forgotten = 0  # results dropped so far (seq ids keep counting)
        self.reserved = 0
        self._last = None

    def pages_needed(self, req: Request) -> int:
        return self.pool.pages_for(min(len(req.prompt_ids) + req.sampling.max_new_tokens, self.max_seq_len))

    def add(self, req: Request) -> Result:
        """Queue a request; its Result (finish_reason "error" at once if it can never fit the pool)."""
        result, seq_id = Result(req.key, list(req.prompt_ids)), len(self.results) + self._forgotten
        self.results[seq_id] = result
        need = self.pages_needed(req)
        if need > self.pool.num_pages:
            result.finish_reason = "error"
            result.error = str(ValueError(
                f"a prompt of {len(req.prompt_ids)} tokens with max_new_tokens {req.sampling.max_new_tokens} needs "
                f"{need} pages of {self.pool.page_size} tokens; the pool has {self.pool.num_pages} pages"))
            self._finished.append(seq_id)
        else:
            self.waiting.append(_Seq(seq_id, req, need))
        return result

    def forget_finished(self) -> None:
        """Without keep_results, drop the results that finished (their callbacks have run): a
        stream of requests holds only what is waiting or running."""
        if not self.keep_results:
            for seq_id in self._finished:
                del self.results[seq_id]
            self._forgotten += len(self._finished)
        self._finished = []

    def _admit(self):
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.reserved + seq.reserved > self.pool.num_pages:
                return
            self.waiting.popleft()
            self.reserved += seq.reserved
            self.running.append(seq)

    def drain(self) -> None:
        """Admit nothing more: the waiting requests, and admitted ones whose prefill has not begun,
        stay unfinished (finish_reason None); sequences already started run on."""
        self.waiting.clear()
        for s in [s for s in self.running if s.done == 0 and s.token is None]:
            self.running.remove(s)
            self.reserved -= s.reserved

    def schedule(self) -> PrefillBatch | DecodeBatch | None:
        """The next step (its pages allocated), or None when every request is done."""
        self._admit()
        prefilling = [s for s in self.running if s.token is None]
        decoding = [s for s in self.running if s.token is not None]
        if prefilling and (not decoding or self._last != "prefill"):
            self._last = "prefill"
            budget, chunks, Q = self.max_num_batched_tokens, [], self.query_block
            for s in prefilling:
                prompt = s.req.prompt_ids
                n = min(len(prompt) - s.done, budget // Q * Q)
                if n == 0:
                    break
                self.pool.allocate(s.seq_id, n)
                chunks.append(Chunk(s.seq_id, tuple(prompt[s.done:s.done + n]), s.done, s.done + n == len(prompt),
                                    s.req.sampling))
                budget -= -(-n // Q) * Q
            return PrefillBatch(tuple(chunks))
        if decoding:
            self._last = "decode"
            for s in decoding:
                self.pool.allocate(s.seq_id, 1)
            return DecodeBatch(tuple(s.seq_id for s in decoding), tuple(s.token for s in decoding),
                               tuple(self.pool.length(s.seq_id) - 1 for s in decoding),
                               tuple(s.req.sampling for s in decoding))
        return None

    def update(self, batch: PrefillBatch | DecodeBatch, tokens) -> list[Result]:
        """Take a step's sampled tokens (one per chunk or sequence); returns the results it finished."""
        by_id = {s.seq_id: s for s in self.running}
        if isinstance(batch, PrefillBatch):
            sampled = []
            for chunk, token in zip(batch.chunks, tokens):
                by_id[chunk.seq_id].done += len(chunk.token_ids)
                if chunk.last:
                    sampled.append((chunk.seq_id, token))
        else:
            sampled = list(zip(batch.seq_ids, tokens))
        finished = []
        for seq_id, token in sampled:
            s, result = by_id[seq_id], self.results[seq_id]
            if accept(result, s.req, int(token), self.max_seq_len):
                self.pool.free(seq_id)
                self.reserved -= s.reserved
                self.running.remove(s)
                finished.append(result)
                self._finished.append(seq_id)
            else:
                s.token = int(token)
        return finished


def run(engine, params, requests: Iterable[Request], on_result: Callable[[Result], None] | None = None,
        on_step: Callable[[PrefillBatch | DecodeBatch, Scheduler], None] | None = None,
        on_token: Callable[[Result], None] | None = None, control=None) -> list[Result]:
    """Generate for every request; results in request order (a request that can never fit the pool
    has finish_reason "error" and its message in `error`). `on_result` sees each as it finishes,
    `on_step(batch, scheduler)` each step after its tokens are taken, `on_token(result)` each
    request after each token it takes (streaming; a stop token is not added). `control`
    (engine/job_control.py) may drain or stop the loop: requests it leaves unfinished have
    finish_reason None.

    `requests` as a list or tuple: every prompt is checked before any work. As any other iterable
    (a stream, e.g. a job's input): requests are taken as the queue runs short (LOOKAHEAD per
    sequence slot), each checked as it is taken, finished results are dropped once `on_result`
    has seen them, and the returned list is empty: memory holds what waits or runs, not the stream."""
    streamed = not isinstance(requests, (list, tuple))
    sched = Scheduler(num_pages=engine.num_pages, page_size=engine.page_size, max_num_seqs=engine.max_num_seqs,
                      max_num_batched_tokens=engine.max_num_batched_tokens, max_seq_len=engine.max_seq_len,
                      query_block=engine.query_block, keep_results=not streamed)
    if not streamed:
        for req in requests:
            engine.check_prompt(req.prompt_ids)
    incoming = iter(requests)
    lookahead = LOOKAHEAD * engine.max_num_seqs if streamed else None

    def take() -> None:  # queue requests up to the look-ahead (all of a list at once)
        while lookahead is None or len(sched.waiting) < lookahead:
            req = next(incoming, None)
            if req is None:
                return
            if streamed:
                engine.check_prompt(req.prompt_ids)
            result = sched.add(req)
            if result.finish_reason == "error" and on_result is not None:
                on_result(result)
        sched.forget_finished()

    last = ()  # the previous step's rows and tokens, for the control's lockstep digest
    while True:
        go, admit = at_step(control, last, drain=sched.drain)
        if not go:
            break
        if admit:
            take()
        if (batch := sched.schedule()) is None:
            break
        step = engine.prefill if isinstance(batch, PrefillBatch) else engine.decode
        tokens = to_host(step(params, batch, sched.pool)[0])
        finished = sched.update(batch, tokens)
        rows = batch.seq_ids if isinstance(batch, DecodeBatch) else [c.seq_id for c in batch.chunks]
        last = (rows, tokens[:len(rows)])
        if on_token is not None:
            sampled = batch.seq_ids if isinstance(batch, DecodeBatch) else [c.seq_id for c in batch.chunks if c.last]
            for seq_id in sampled:
                on_token(sched.results[seq_id])
        if on_step is not None:
            on_step(batch, sched)
        for result in finished:
            if on_result is not None:
                on_result(result)
        sched.forget_finished()
    return list(sched.results.values()) if not streamed else []
