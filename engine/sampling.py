"""Per-request sampling parameters, and the per-row sampler that runs inside the jitted step."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
MAX_LOGPROBS = 20  # top alternatives a step computes per token (OpenAI's top_logprobs limit)
MAX_STOP = 4  # stop strings per request (OpenAI's limit)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. temperature 0 is greedy (top_k/top_p then do nothing).

    top_k 0 and top_p 1.0 disable those filters. `stop_token_ids` are added to the model's own stop
    tokens (its EOS and end-of-turn token) unless `ignore_eos` is set, which benchmarks use to
    generate exactly `max_new_tokens`. `stop`: up to MAX_STOP strings that end the text where they
    first appear in it (matched on the detokenized text, left out of it; engine/detokenize.py).
    `logprobs`: None, or the number (0..MAX_LOGPROBS) of most likely alternatives to report with
    each generated token's log-probability (of the model's distribution, before temperature).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    n: int = 1  # samples of the prompt (prefilled once, each sample keyed by scheduler.sample_seed)
    stop: tuple[str, ...] = field(default_factory=tuple)
    logprobs: int | None = None

    def __post_init__(self):
        ids = self.stop_token_ids
        if isinstance(ids, (str, bytes)) or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                                    for t in ids):
            raise ValueError(f"stop_token_ids must be a list of integers, got {ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) and x for x in stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        if len(stop) > MAX_STOP:
            raise ValueError(f"stop takes at most {MAX_STOP} strings, got {len(stop)}")
        object.__setattr__(self, "stop", tuple(stop))
        lp = self.logprobs
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, numbers.Integral) or not 0 <= lp <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}] (the alternatives reported "
                             f"with each token), got {lp!r}")
        # seed and top_k go to the device as int32: a larger value is an error here, not an overflow there.
        for name, low, allowed in (("max_new_tokens", 1, " >= 1"), ("top_k", 0, " >= 0 (0 disables it)"),
                                   ("seed", INT32_MIN, ""), ("n", 1, " >= 1 (samples of the prompt)")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer{allowed}, got {value!r}")
            if value < low:
                raise ValueError(f"{name} must be an integer{allowed or f' >= {low}'}, got {value!r}")
            if name not in ("max_new_tokens", "n") and value > INT32_MAX:
                raise ValueError(f"{name} must be at most {INT32_MAX} (a 32-bit integer), got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}")
            try:
                object.__setattr__(self, name, float(value))
            except OverflowError:  # an integer too large for a float
                object.__setattr__(self, name, math.inf)
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")


def row_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """A PRNG key per row from its request seed and the position of the token being sampled, so a
    request samples the same tokens whichever slot and batch it runs in."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.PRNGKey(s), p))(seeds, positions)


def filtered_logits(logits, temperature, top_k, top_p):
    """logits [B,V] f32 -> (sorted-descending logits with filtered entries at -inf, sort order).

    temperature [B] > 0, top_k [B] (0: off), top_p [B] (1: off). top-p keeps the smallest set of
    most likely tokens whose probability reaches top_p (always at least one).
    """
    V = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1) / temperature[:, None]
    ranks = jnp.arange(V)[None, :]
    k = jnp.where(top_k > 0, top_k, V)[:, None]
    sorted_logits = jnp.where(ranks < k, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(mass_before < top_p[:, None], sorted_logits, -jnp.inf)
    return sorted_logits, order


def sample(logits, temperature, top_k, top_p, keys):
    """Per-row token choice. logits [B,V]; temperature/top_k/top_p [B]; keys [B,2] -> tokens [B].

    A row without top-k or top-p draws from its tempered logits directly; a row with either draws
    from the filtered, sorted logits (`filtered_logits`). Which way a row goes depends on its own
    parameters only, so its token does not depend on the rows beside it."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filters = (top_k > 0) | (top_p < 1.0)

    def stochastic(_):
        safe_t = jnp.where(temperature > 0, temperature, 1.0)
        plain = jax.vmap(jax.random.categorical)(keys, logits / safe_t[:, None]).astype(jnp.int32)

        def filtered(_):
            sorted_logits, order = filtered_logits(logits, safe_t, top_k, top_p)
            choice = jax.vmap(jax.random.categorical)(keys, sorted_logits)
            drawn = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
            return jnp.where(filters, drawn, plain)

        # The sort over V (~0.8 s for 64 rows of a 49k vocabulary on CPU) only runs for rows that filter.
        drawn = jax.lax.cond(jnp.any(filters & (temperature > 0)), filtered, lambda _: plain, None)
        return jnp.where(temperature > 0, drawn, greedy)

    # All-greedy batches skip sampling altogether.
    return jax.lax.cond(jnp.any(temperature > 0), stochastic, lambda _: greedy, None)


def token_logprobs(logits, tokens, wanted):
    """Log-probabilities of the model's distribution (float32 logits, before temperature and
    filters): (of `tokens` [B], the MAX_LOGPROBS most likely ids [B, K] and theirs [B, K]); zeros
    unless `wanted` (a scalar bool), so a step with no request asking for them skips the top-k."""
    B, V = logits.shape
    K = min(MAX_LOGPROBS, V)

    def compute(_):
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        top, ids = jax.lax.top_k(lp, K)
        return jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0], ids.astype(jnp.int32), top

    def skip(_):
        return jnp.zeros(B, jnp.float32), jnp.zeros((B, K), jnp.int32), jnp.zeros((B, K), jnp.float32)

    return jax.lax.cond(wanted, compute, skip, None)
