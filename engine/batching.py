"""Continuous batching: keep every decode slot busy, refilling finished slots from the queue.

Works on anything with the engine contract (prefill / insert / generate / init_decode_state,
`bucket`, `batch_size`, `max_seq_len`), so the loop is tested against the arithmetic MockEngine in
milliseconds. Requests are admitted in the order of their prefill bucket (stable, so equal buckets
keep the caller's order): each prefill shape is compiled once, early, and every process of a
multi-host job admits the same requests at the same step.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from shardlm.engine.detokenize import TextStream
from shardlm.engine.job_control import at_step
from shardlm.engine.sampling import SamplingParams

LOOKAHEAD = 4  # a streamed run queues up to this many requests per slot


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: SamplingParams
    stop_ids: frozenset[int] = frozenset()  # the model's own stop tokens (EOS, end of turn)
    key: object = None  # caller's handle, passed back in Result
    tokenizer: object = None  # set: each sample's text is decoded as it grows (Result.stream), for stop strings


@dataclass
class Result:
    key: object
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated, without the stop token
    finish_reason: str | None = None  # "stop" or "length" ("error": the request could not run)
    error: str | None = None  # why, when finish_reason is "error"
    # n > 1 samples: a Result per sample, in sample order (token_ids and finish_reason above are
    # sample 0's; finish_reason is set once every sample is finished)
    samples: list["Result"] = field(default_factory=list)
    stream: TextStream | None = None  # the text so far, with Request.tokenizer
    # with SamplingParams.logprobs: per generated token, (its logprob, ((id, logprob), ...) of the
    # most likely alternatives, as many as asked for)
    logprobs: list[tuple[float, tuple[tuple[int, float], ...]]] | None = None


def _stops(req: Request) -> frozenset[int]:
    own = frozenset() if req.sampling.ignore_eos else req.stop_ids
    return own | frozenset(req.sampling.stop_token_ids)


def accept(result: Result, req: Request, token: int, max_seq_len: int, logprobs=None) -> bool:
    """Take one sampled token (and, if the request asked for them, its logprobs: the row of
    sampling.token_logprobs's arrays, (chosen, top ids, top)); return True when the request is
    finished: a stop token, a stop string, max_new_tokens, or the context full."""
    k = req.sampling.logprobs
    if k is not None and result.logprobs is None:
        result.logprobs = []
    if token in _stops(req):
        result.finish_reason = "stop"
        if result.stream is not None:
            result.stream.finish()
        return True
    result.token_ids.append(token)
    if k is not None and logprobs is not None:
        chosen, ids, top = logprobs
        result.logprobs.append((float(chosen), tuple((int(i), float(p)) for i, p in zip(ids[:k], top[:k]))))
    if req.tokenizer is not None:
        if result.stream is None:
            result.stream = TextStream(req.tokenizer, req.sampling.stop)
        if result.stream.add(token):
            result.finish_reason = "stop"
            return True
    if len(result.token_ids) >= req.sampling.max_new_tokens or len(req.prompt_ids) + len(result.token_ids) >= max_seq_len:
        result.finish_reason = "length"
        if result.stream is not None:
            result.stream.finish()
        return True
    return False


def to_host(x) -> np.ndarray:
    """x as a host array; an array spread over several processes is gathered first, so every process
    of a multi-host job sees the same tokens and runs the same next step."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def run(engine, params, requests: Iterable[Request], on_result: Callable[[Result], None] | None = None,
        on_step: Callable[[int], None] | None = None, on_token: Callable[[Result], None] | None = None,
        control=None) -> list[Result]:
    """Generate for every request; results in request order. `on_result` sees each as it finishes,
    `on_step(n_tokens)` each decode step, `on_token(result)` each request after each token it takes
    (streaming; a stop token is not added, so the last call may see no new token). `control`
    (engine/job_control.py) may drain (no more admissions; the slots run to their end) or stop the
    loop: requests it leaves unfinished have finish_reason None.

    `requests` as a list or tuple: all queued at once. As any other iterable (a stream): taken as
    the queue runs short (LOOKAHEAD per slot, ordered by bucket within what is queued), finished
    results dropped once `on_result` has seen them, and the returned list is empty."""
    streamed = not isinstance(requests, (list, tuple))
    incoming = iter(requests)
    reqs: dict[int, Request] = {}
    results: dict[int, Result] = {}
    queue: collections.deque[int] = collections.deque()
    ids = itertools.count()  # request order
    slots: list[int | None] = [None] * engine.batch_size
    state = engine.init_decode_state()

    def enqueue() -> None:
        new = []
        while not streamed or len(queue) + len(new) < LOOKAHEAD * engine.batch_size:
            req = next(incoming, None)
            if req is None:
                break
            i = next(ids)
            reqs[i], results[i] = req, Result(req.key, list(req.prompt_ids))
            new.append(i)
        if new:
            merged = sorted([*queue, *new], key=lambda i: (engine.bucket(len(reqs[i].prompt_ids)), i))
            queue.clear()
            queue.extend(merged)

    def take(i: int, token: int) -> bool:
        done = accept(results[i], reqs[i], token, engine.max_seq_len)
        if on_token is not None:
            on_token(results[i])
        return done

    def finish(i: int):
        if on_result is not None:
            on_result(results[i])
        if streamed:
            del reqs[i], results[i]

    last = ()  # the previous step's slots and tokens, for the control's lockstep digest
    while True:
        go, admit = at_step(control, last, drain=queue.clear)
        if not go:
            break
        if admit:
            enqueue()
        if not queue and all(s is None for s in slots):
            break
        for slot in range(engine.batch_size):
            while slots[slot] is None and queue:
                i = queue.popleft()
                req = reqs[i]
                prefix = engine.prefill(params, req.prompt_ids, req.sampling)
                if take(i, int(prefix.token)):
                    finish(i)
                    continue
                state = engine.insert(prefix, state, slot, req.sampling)
                slots[slot] = i
        if all(s is None for s in slots):
            continue
        state, tokens = engine.generate(params, state)
        tokens = to_host(tokens)
        last = ([-1 if i is None else i for i in slots], tokens)
        n_active = 0
        for slot, i in enumerate(slots):
            if i is None:
                continue
            n_active += 1
            if take(i, int(tokens[slot])):
                slots[slot] = None
                finish(i)
        if on_step is not None:
            on_step(n_active)
    return [] if streamed else list(results.values())
