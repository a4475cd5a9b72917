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


@jax.jit
def _window_nll(logits, tokens, first, last):
    """logits [1,W,V], tokens [1,W] -> (sum of -log p over targets first..last-1, count)."""
    window = tokens.shape[1]
    logp = jax.nn.log_softmax(logits[0, :-1], axis=-1)  # predicts tokens 1..W-1
    target_logp = jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1)[:, 0]
    t = jnp.arange(1, window)
    scored = (t >= first) & (t < last)
    return -jnp.sum(jnp.where(scored, target_logp, 0.0)), jnp.sum(scored)


def perplexity_of_ids(llm, ids, *, window: int | None = None, stride: int | None = None) -> dict:
    """{"perplexity", "tokens" (scored), "nll" (mean)} of token ids under `llm` (an engine.llm.LLM)."""
    engine = llm.engine
    ids = np.asarray(ids, np.int32)
    if ids.size < 2:
        raise ValueError(f"the text has {ids.size} token(s); perplexity needs at least 2")
    window = min(window or 512, engine.max_seq_len, max(int(ids.size), 2))
    stride = stride or window // 2
    if not 0 < stride <= window - 1:
        raise ValueError(f"stride must be in [1, {window - 1}] for a window of {window}, got {stride}")
    total, count, scored_to = 0.0, 0, 1  # tokens before scored_to are already scored
    begin = 0
    while scored_to < ids.size:
        end = min(begin + window, ids.size)
        tokens = np.zeros((1, window), np.int32)
        tokens[0, : end - begin] = ids[begin:end]
        logits = engine.forward(llm.params, tokens)  # one fresh cache per window, written and read back
        nll, n = _window_nll(logits, tokens, np.int32(scored_to - begin), np.int32(end - begin))
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
