"""The host-side scheduler of the paged engine: a waiting queue, the running sequences, the page pool.

Each step it first admits waiting requests, oldest first, while the running sequences stay within
`max_num_seqs` (a request of n samples counts n) and the pool has room for the prompt's pages
(less what the prefix cache holds, engine/kv_pages.py), a copy of its partial last page for
each further sample, and a watermark of 1% of the pool for the running sequences to grow into.
The prompt's pages are taken at admission; decode takes a page as a sequence crosses a page
boundary. The head of the queue waits until it fits (no skipping), so admission order is the
request order in every process of a multi-host job. A request that could never fit the pool
alone is that request's error.

Then it picks one kind of step, alternating when both have work:
- prefill: chunks of the admitted prompts not yet prefilled, oldest first, packed into one row up
  to `max_num_batched_tokens` (each chunk taking whole blocks of `query_block` tokens of it, and
  the last chunk of an n-sample prompt at least n blocks: each sample is a row of the step); a
  prompt longer than the budget goes over several steps. A prompt whose cached prefix another
  sequence is still prefilling waits for it (the pages are shared, computed once);
- decode: one token for every sequence whose prompt is done.
Alternating (rather than mixing decode tokens into the prefill row) keeps each step's attention
specialised (a decode row reads one page per step per sequence; a packed row gathers per token),
and a running sequence still gets a token between each chunk of a long prompt.

n samples: the prompt is prefilled once; its last chunk samples each sample's first token in a
row of its own (sample i keyed by `sample_seed(seed, i)`), then the samples fork (they share the
prompt's full pages; each gets a copy of its partial last page, `copies` of the next step).

Preemption by recompute: when a decode step finds no free page for a sequence, the newest
decoding sequence (by request order) gives its pages back and goes to the head of the queue with
its prompt and the tokens it generated; re-admitted, it prefills them (mostly from the prefix
cache) and samples on from where it stopped, with the same keys, so its result is unchanged.

The engine does the arithmetic: `engine.prefill(params, batch, pool)` and
`engine.decode(params, batch, pool)` return the sampled tokens (first arrays of their results);
`run` drives any engine with those two methods (tests use engine/mock_engine.py's).
Stop and length rules are batching.accept's.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable

from shardlm.engine.batching import Request, Result, accept, to_host
from shardlm.engine.job_control import at_step
from shardlm.engine.kv_pages import PagePool
from shardlm.engine.sampling import SamplingParams

LOOKAHEAD = 4  # a streamed run queues up to this many requests per sequence slot
WATERMARK = 0.01  # of the pool, kept free at admission for running sequences to grow into


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request: sample 0 keeps the request's seed, so n = 1 is
    unchanged; the others are a hash of (seed, index), a 31-bit integer."""
    if index == 0:
        return seed
    return zlib.crc32(f"{seed}:{index}".encode()) & 0x7FFFFFFF


def max_samples(max_num_seqs: int, max_num_batched_tokens: int, query_block: int) -> int:
    """The most samples (SamplingParams.n) a request may ask for: all are decoded at once, and each
    first token is a row of the prefill step (a block of query_block tokens of its budget)."""
    return max(1, min(max_num_seqs, max_num_batched_tokens // query_block))


def check_samples(n: int, max_num_seqs: int, max_num_batched_tokens: int, query_block: int) -> None:
    limit = max_samples(max_num_seqs, max_num_batched_tokens, query_block)
    if n > limit:
        raise ValueError(f"n = {n} samples is more than this engine runs at once: at most {limit} (max_num_seqs "
                         f"{max_num_seqs}, one prefill row of {query_block} tokens each in {max_num_batched_tokens})")


def pages_needed(n_prompt: int, max_new_tokens: int, n: int, page_size: int, max_seq_len: int) -> int:
    """Pages a request's longest sequence holds, or its prompt's pages and a copy of their partial
    last one for each further sample, whichever is more: what it needs to run alone."""
    copies = n - 1 if n_prompt % page_size else 0
    return max(-(-min(n_prompt + max_new_tokens, max_seq_len) // page_size), -(-n_prompt // page_size) + copies)


def sample_sampling(sampling: SamplingParams, index: int) -> SamplingParams:
    """The SamplingParams sample `index` of a request runs with, as a request of its own (n = 1)."""
    return dataclasses.replace(sampling, seed=sample_seed(sampling.seed, index), n=1)


@dataclass(frozen=True)
class Chunk:
    """Tokens start .. start + len(token_ids) - 1 of sequence seq_id, prefilled in one step."""

    seq_id: int
    token_ids: tuple[int, ...]
    start: int
    last: bool  # completes the prompt: its first token is sampled at the chunk's last position
    sampling: SamplingParams
    samples: int = 1  # rows of the step this chunk samples (a last chunk of n samples: n, sample i seeded by sample_seed)

    @property
    def rows(self) -> int:
        return self.samples if self.last else 1


@dataclass(frozen=True)
class PrefillBatch:
    chunks: tuple[Chunk, ...]
    copies: tuple[tuple[int, int], ...] = ()  # (src page, dst page) to copy before the step writes


@dataclass(frozen=True)
class DecodeBatch:
    seq_ids: tuple[int, ...]
    tokens: tuple[int, ...]  # the token each sequence feeds, at position positions[i]
    positions: tuple[int, ...]
    samplings: tuple[SamplingParams, ...]
    copies: tuple[tuple[int, int], ...] = ()


@dataclass(eq=False)  # compared by identity: running.remove / index / `in` find this sequence
class _Seq:
    seq_id: int  # the pool's key: a new one each time the sequence is admitted
    rid: int  # the request
    sample: int  # which of its samples (0 while a group of samples shares one prefill)
    req: Request  # the prompt and this sample's sampling
    tokens: list[int]  # to prefill: the prompt, then (after a preemption) the tokens generated too
    samples: int = 1  # sequences this one stands for: n until its prompt is done and the samples fork
    done: int = 0  # tokens prefilled or found in the prefix cache
    started: bool = False  # a chunk of it has run
    token: int | None = None  # the next token to feed (set once the prompt is done)


@dataclass
class Stats:
    """What the scheduler counted: prompt tokens submitted (each request once), prefill tokens
    computed, tokens found in the prefix cache, sequences preempted (and recomputed)."""

    prompt_tokens: int = 0
    computed_tokens: int = 0
    cached_tokens: int = 0
    prompts_prefilled: int = 0  # prefills completed (a preempted sequence's again)
    preemptions: int = 0

    @property
    def hit_rate(self) -> float:
        """The share of prefilled positions read from the prefix cache rather than computed."""
        looked = self.cached_tokens + self.computed_tokens
        return self.cached_tokens / looked if looked else 0.0


class Scheduler:
    def __init__(self, *, num_pages: int, page_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_seq_len: int, query_block: int = 1, keep_results: bool = True, prefix_cache: bool = False,
                 stats: Stats | None = None):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < page_size:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) is smaller than the page size "
                             f"({page_size}); give a budget of at least one page")
        self.pool = PagePool(num_pages, page_size, prefix_cache=prefix_cache)
        self.max_num_seqs, self.max_num_batched_tokens, self.max_seq_len = max_num_seqs, max_num_batched_tokens, max_seq_len
        self.query_block = query_block  # each chunk takes whole blocks of this many tokens of the budget
        self.watermark = max(1, int(WATERMARK * num_pages))
        self.waiting: collections.deque[_Seq] = collections.deque()
        self.running: list[_Seq] = []  # admitted, in admission order
        self.results: dict[int, Result] = {}  # by request, in request order
        self.keep_results = keep_results  # False: a finished result is dropped once `forget_finished` runs
        self.stats = Stats() if stats is None else stats  # a caller's, to add this run to
        self._open: dict[int, int] = {}  # request -> samples not finished
        self._finished: list[int] = []
        self._forgotten = 0  # results dropped so far (request numbers keep counting)
        self._ids = itertools.count()
        self._copies: list[tuple[int, int]] = []  # for the next step
        self.fork_pages = 0  # pages promised to the samples of admitted groups, for their partial last page
        self._last = None
        self.last_sampled: list[int] = []  # the requests the last update gave a token (streaming)

    def add(self, req: Request) -> Result:
        """Queue a request; its Result (finish_reason "error" at once if it can never run)."""
        rid = len(self.results) + self._forgotten
        result = Result(req.key, list(req.prompt_ids))
        self.results[rid] = result
        n = req.sampling.n
        need = pages_needed(len(req.prompt_ids), req.sampling.max_new_tokens, n, self.pool.page_size, self.max_seq_len)
        if n > 1:
            result.samples = [Result(req.key, result.prompt_ids) for _ in range(n)]
            result.token_ids = result.samples[0].token_ids
        error = None
        try:
            check_samples(n, self.max_num_seqs, self.max_num_batched_tokens, self.query_block)
        except ValueError as e:
            error = str(e)
        if error is None and need > self.pool.num_pages:
            copies = f" and {n - 1} copies of its partial last page" if n > 1 and len(req.prompt_ids) % self.pool.page_size else ""
            error = (f"a prompt of {len(req.prompt_ids)} tokens with max_new_tokens {req.sampling.max_new_tokens}"
                     f"{copies} needs {need} pages of {self.pool.page_size} tokens; the pool has {self.pool.num_pages} pages")
        if error:
            result.finish_reason, result.error = "error", error
            for r in result.samples:
                r.finish_reason, r.error = "error", error
            self._finished.append(rid)
        else:
            self.stats.prompt_tokens += len(req.prompt_ids)
            self._open[rid] = n
            self.waiting.append(_Seq(-1, rid, 0, req, list(req.prompt_ids), samples=n))
        return result

    def forget_finished(self) -> None:
        """Without keep_results, drop the results that finished (their callbacks have run): a
        stream of requests holds only what is waiting or running."""
        if not self.keep_results:
            for rid in self._finished:
                del self.results[rid]
            self._forgotten += len(self._finished)
        self._finished = []

    def _running_width(self) -> int:
        return sum(s.samples for s in self.running)

    def _fork_pages(self, s: _Seq) -> int:
        return s.samples - 1 if s.samples > 1 and len(s.tokens) % self.pool.page_size else 0

    def _admit(self):
        while self.waiting and self._running_width() + self.waiting[0].samples <= self.max_num_seqs:
            s = self.waiting[0]
            need = self.pool.pages_to_start(s.tokens) + self._fork_pages(s)
            if need + self.fork_pages + (self.watermark if self.running else 0) > self.pool.free_pages:
                return
            self.waiting.popleft()
            s.seq_id = next(self._ids)
            s.done = self.pool.start(s.seq_id, s.tokens)
            self.stats.cached_tokens += s.done
            self.fork_pages += self._fork_pages(s)
            self.running.append(s)

    def drain(self) -> None:
        """Admit nothing more: the waiting requests, and admitted ones whose prefill has not begun,
        stay unfinished (finish_reason None); sequences already started run on."""
        self.waiting.clear()
        for s in [s for s in self.running if not s.started]:
            self.running.remove(s)
            self.pool.free(s.seq_id)
            self.fork_pages -= self._fork_pages(s)

    def abort(self, key) -> Result | None:
        """Stop the request whose Request.key is `key` (a client went away): its sequences leave the
        queue or give their pages back now; its Result (finish_reason "abort") is returned, or None
        when no such request waits or runs."""
        rids = {s.rid for s in [*self.waiting, *self.running] if s.req.key == key}
        if not rids:
            return None
        rid = rids.pop()
        self.waiting = collections.deque(s for s in self.waiting if s.rid != rid)
        gone = [s for s in self.running if s.rid == rid]
        for s in gone:
            self.running.remove(s)
            self.pool.free(s.seq_id)
            self.fork_pages -= self._fork_pages(s)
        if any(s.token is None for s in gone):
            # Its prompt was part-prefilled: sequences not started may share pages it never computed
            # (they wait for them); they go back to the head of the queue to match the cache again.
            back = [s for s in self.running if not s.started]
            for s in back:
                self.running.remove(s)
                self.pool.free(s.seq_id)
                self.fork_pages -= self._fork_pages(s)
                s.seq_id, s.done = -1, 0
            self.waiting.extendleft(reversed(back))
        del self._open[rid]
        result = self.results[rid]
        for r in result.samples or [result]:
            r.finish_reason = r.finish_reason or "abort"
        result.finish_reason = "abort"
        self._finished.append(rid)
        return result

    def _preempt(self, s: _Seq) -> None:
        """s gives its pages back and waits at the head of the queue to prefill what it holds again."""
        self.running.remove(s)
        self.pool.free(s.seq_id)
        result = self._result(s)
        self.waiting.appendleft(_Seq(-1, s.rid, s.sample, s.req, list(s.req.prompt_ids) + result.token_ids))
        self.stats.preemptions += 1

    def _result(self, s: _Seq) -> Result:
        result = self.results[s.rid]
        return result.samples[s.sample] if result.samples else result

    def _take_copies(self) -> tuple[tuple[int, int], ...]:
        copies, self._copies = tuple(self._copies), []
        return copies

    def schedule(self) -> PrefillBatch | DecodeBatch | None:
        """The next step (its pages allocated), or None when every request is done."""
        self._admit()
        prefilling = [s for s in self.running if s.token is None and self.pool.ready(s.seq_id, s.done)]
        decoding = [s for s in self.running if s.token is not None]
        if prefilling and (not decoding or self._last != "prefill"):
            self._last = "prefill"
            budget, chunks, Q = self.max_num_batched_tokens, [], self.query_block
            for s in prefilling:
                n = min(len(s.tokens) - s.done, budget // Q * Q)
                if n == 0:
                    break
                last = s.done + n == len(s.tokens)
                cost = max(-(-n // Q), s.samples if last else 1) * Q
                if cost > budget:  # the samples' rows do not fit beside what is packed: next step
                    continue
                chunks.append(Chunk(s.seq_id, tuple(s.tokens[s.done:s.done + n]), s.done, last, s.req.sampling,
                                    s.samples))
                budget -= cost
            if chunks:
                return PrefillBatch(tuple(chunks), self._take_copies())
        if decoding:
            self._last = "decode"
            self._grow(decoding)
            decoding = [s for s in self.running if s.token is not None]
            return DecodeBatch(tuple(s.seq_id for s in decoding), tuple(s.token for s in decoding),
                               tuple(self.pool.length(s.seq_id) - 1 for s in decoding),
                               tuple(s.req.sampling for s in decoding), self._take_copies())
        return None

    def _grow(self, decoding: list[_Seq]) -> None:
        """A page for each decoding sequence crossing a page boundary, preempting the newest
        decoding sequence while the pool has none (possibly s itself, which then waits at the head
        of the queue): the oldest is preempted only when it is the only one decoding."""
        for s in decoding:
            if s not in self.running:
                continue  # preempted for an older one
            while self.pool.new_pages(s.seq_id, 1) > self.pool.free_pages - self.fork_pages:
                victim = max((d for d in self.running if d.token is not None), key=lambda d: (d.rid, d.sample))
                self._preempt(victim)
                if victim is s:
                    break
            if s in self.running:
                self.pool.append(s.seq_id, [s.token])

    def update(self, batch: PrefillBatch | DecodeBatch, tokens, logprobs=None) -> list[Result]:
        """Take a step's sampled tokens (one per row), and its logprobs arrays (chosen [R], top ids
        [R, K], top [R, K]) when a row asked for them; returns the results it finished."""
        by_id = {s.seq_id: s for s in self.running}
        sampled = []  # (sequence, its row)
        if isinstance(batch, PrefillBatch):
            row = 0
            for chunk in batch.chunks:
                s = by_id[chunk.seq_id]
                s.done += len(chunk.token_ids)
                s.started = True
                self.stats.computed_tokens += len(chunk.token_ids)
                self.pool.computed(s.seq_id, s.done)
                if chunk.last:
                    self.stats.prompts_prefilled += 1
                    sampled += [(f, row + i) for i, f in enumerate(self._fork(s))]
                row += chunk.rows
        else:
            for row, seq_id in enumerate(batch.seq_ids):
                self.pool.computed(seq_id, self.pool.length(seq_id))
                sampled.append((by_id[seq_id], row))
        finished, self.last_sampled = [], [s.rid for s, _ in sampled]
        for s, row in sampled:
            token = tokens[row]
            lp = None if logprobs is None else tuple(a[row] for a in logprobs)
            if accept(self._result(s), s.req, int(token), self.max_seq_len, lp):
                self.pool.free(s.seq_id)
                self.running.remove(s)
                self._open[s.rid] -= 1
                if self._open[s.rid] == 0:
                    del self._open[s.rid]
                    result = self.results[s.rid]
                    if result.samples:
                        result.finish_reason = result.samples[0].finish_reason
                    finished.append(result)
                    self._finished.append(s.rid)
            else:
                s.token = int(token)
        return finished

    def _fork(self, s: _Seq) -> list[_Seq]:
        """A group's sequences once its prompt is done: s as sample 0, then a new sequence per
        further sample sharing s's pages (its partial last page copied at the next step)."""
        if s.samples == 1:
            return [s]
        group, at = [s], self.running.index(s) + 1
        self.fork_pages -= self._fork_pages(s)
        for i in range(1, s.samples):
            child = _Seq(next(self._ids), s.rid, i, dataclasses.replace(s.req, sampling=sample_sampling(s.req.sampling, i)),
                         s.tokens, done=s.done, started=True)
            copy = self.pool.fork(s.seq_id, child.seq_id)
            if copy is not None:
                self._copies.append(copy)
            group.append(child)
        s.samples = 1
        s.req = dataclasses.replace(s.req, sampling=sample_sampling(s.req.sampling, 0))
        self.running[at:at] = group[1:]
        return group


def step(engine, params, sched: Scheduler, batch: PrefillBatch | DecodeBatch) -> tuple:
    """Run one scheduled batch on the engine and give the scheduler its tokens (and logprobs, when
    a row asked for them): (the step's tokens on the host, the results it finished)."""
    run_step = engine.prefill if isinstance(batch, PrefillBatch) else engine.decode
    out = run_step(params, batch, sched.pool)
    tokens = to_host(out[0])
    samplings = batch.samplings if isinstance(batch, DecodeBatch) else [c.sampling for c in batch.chunks]
    logprobs = None
    if any(sp.logprobs is not None for sp in samplings):
        logprobs = tuple(to_host(a) for a in out[2])
    return tokens, sched.update(batch, tokens, logprobs)


def run(engine, params, requests: Iterable[Request], on_result: Callable[[Result], None] | None = None,
        on_step: Callable[[PrefillBatch | DecodeBatch, Scheduler], None] | None = None,
        on_token: Callable[[Result], None] | None = None, control=None, stats: Stats | None = None) -> list[Result]:
    """Generate for every request; results in request order (a request that can never fit the pool
    has finish_reason "error" and its message in `error`). `on_result` sees each as it finishes,
    `on_step(batch, scheduler)` each step after its tokens are taken, `on_token(result)` each
    request after each token it takes (streaming; a stop token is not added). `control`
    (engine/job_control.py) may drain or stop the loop: requests it leaves unfinished have
    finish_reason None. `stats` (a Stats) adds this run's counts to the caller's.

    `requests` as a list or tuple: every prompt is checked before any work. As any other iterable
    (a stream, e.g. a job's input): requests are taken as the queue runs short (LOOKAHEAD per
    sequence slot), each checked as it is taken, finished results are dropped once `on_result`
    has seen them, and the returned list is empty: memory holds what waits or runs, not the stream."""
    streamed = not isinstance(requests, (list, tuple))
    sched = Scheduler(num_pages=engine.num_pages, page_size=engine.page_size, max_num_seqs=engine.max_num_seqs,
                      max_num_batched_tokens=engine.max_num_batched_tokens, max_seq_len=engine.max_seq_len,
                      query_block=engine.query_block, keep_results=not streamed,
                      prefix_cache=getattr(engine, "prefix_cache", False), stats=stats)
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
            if sched.running or sched.waiting:  # every rule above leaves something to run: a bug if not
                raise RuntimeError(f"the scheduler found no step for {len(sched.running)} running and "
                                   f"{len(sched.waiting)} waiting sequences")
            break
        tokens, finished = step(engine, params, sched, batch)
        rows = batch.seq_ids if isinstance(batch, DecodeBatch) else [c.seq_id for c in batch.chunks for _ in range(c.rows)]
        last = (rows, tokens[:len(rows)])
        if on_token is not None:
            for rid in dict.fromkeys(sched.last_sampled):
                on_token(sched.results[rid])
        if on_step is not None:
            on_step(batch, sched)
        for result in finished:
            if on_result is not None:
                on_result(result)
        sched.forget_finished()
    return list(sched.results.values()) if not streamed else []
