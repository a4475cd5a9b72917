"""Perplexity of a text under a loaded model, with a sliding window (`shardlm perplexity`).

Windows of `window` tokens start every `stride` tokens; each scores only the tokens the previous
window did not (so every token after the first is scored once, with up to window - stride tokens of
context before it). The forward goes through the model's KV cache, so an int8 cache is measured too:
each window's keys and values are written to the cache (quantized) and attention reads them back.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shardlm.engine.kv_cache import KVCache
from shardlm.sharding.rules import use_rules


def _window_nll_fn(engine, window: int):
    """jit: (params, tokens [1,W], first, last) -> (sum of -log p over targets first..last-1, count)."""
    cfg = engine.cfg

    def nll(params, tokens, first, last):
        model = nnx.merge(engine.graphdef, params)
        cache = KVCache.zeros(cfg.n_layers, 1, window, cfg.n_kv_heads, cfg.head_dim, engine.cache_dtype)
        positions = jnp.arange(window, dtype=jnp.int32)[None, :]
        logits, _ = model(tokens, positions, cache)  # [1, W, V]
        logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)  # predicts tokens 1..W-1
        target_logp = jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1)[:, 0]
        t = jnp.arange(1, window)
        scored = (t >= first) & (t < last)
        return -jnp.sum(jnp.where(scored, target_logp, 0.0)), jnp.sum(scored)

    return jax.jit(nll)


def perplexity_of_ids(llm, ids, *, window: int | None = None, stride: int | None = None) -> dict:
    """{"perplexity", "tokens" (scored), "nll" (mean)} of token ids under `llm` (an engine.llm.LLM)."""
    engine = llm.engine
    if engine.pipeline is not None:
        raise ValueError("perplexity does not run with pipeline stages; use a mesh without a stage axis")
    ids = np.asarray(ids, np.int32)
    if ids.size < 2:
        raise ValueError(f"the text has {ids.size} token(s); perplexity needs at least 2")
    window = min(window or 512, engine.max_seq_len, max(int(ids.size), 2))
    stride = stride or window // 2
    if not 0 < stride <= window - 1:
        raise ValueError(f"stride must be in [1, {window - 1}] for a window of {window}, got {stride}")
    fn = _window_nll_fn(engine, window)
    total, count, scored_to = 0.0, 0, 1  # tokens before scored_to are already scored
    begin = 0
    while scored_to < ids.size:
        end = min(begin + window, ids.size)
        tokens = np.zeros((1, window), np.int32)
        tokens[0, : end - begin] = ids[begin:end]
        with use_rules(engine.mesh, engine.prefill_rules):
            nll, n = fn(llm.params, tokens, np.int32(scored_to - begin), np.int32(end - begin))
        total, count, scored_to = total + float(nll), count + int(n), end
        begin += stride
    return {"perplexity": math.exp(total / count), "tokens": count, "nll": total / count}


def perplexity(llm, text: str, *, max_tokens: int | None = None, window: int | None = None,
               stride: int | None = None) -> dict:
    """Perplexity of a text (its first `max_tokens` tokens when given) under `llm`."""
    if llm.tokenizer is None:
        raise ValueError("this model has no tokenizer; perplexity needs one to read text")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    ids = llm.tokenizer.encode(text)
    return perplexity_of_ids(llm, ids[:max_tokens] if max_tokens else ids, window=window, stride=stride)
