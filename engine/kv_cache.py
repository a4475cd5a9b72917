"""The KV cache: an explicit pytree that goes into every step and comes out of it (donated)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from shardlm.models.quant import QuantizedKV
from shardlm.sharding.rules import KV_CACHE_AXES as KV_AXES  # logical axes of one layer's [B, S, K, H]

LENGTHS_AXES = ("batch",)


def kv_axes(a) -> tuple[str, ...]:
    """Logical axes of one cache array: [B,S,K,H] per layer, or [L,B,S,K,H] stacked (pipeline stages)."""
    return ("layers",) * (a.ndim - 4) + KV_AXES


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    k: list  # per layer [B, S, K, H] (int8: a QuantizedKV); or one array [L, B, S, K, H] (stacked, pipeline stages)
    v: list  # per layer [B, S, K, H]; or one array [L, B, S, K, H]
    lengths: jax.Array  # [B] int32: tokens held per row (the next token's position)

    @classmethod
    def zeros(cls, n_layers: int, batch: int, seq: int, kv_heads: int, head_dim: int, dtype=jnp.float32,
              stacked: bool = False):
        shape = (batch, seq, kv_heads, head_dim)
        if jnp.dtype(dtype) == jnp.int8:  # per layer a QuantizedKV: int8 [B,S,K,H], scale [B,S,K,1]
            if stacked:
                raise ValueError("an int8 KV cache is not supported with pipeline stages")

            def empty():  # scale 1, as quantize_kv gives a row of zeros
                return QuantizedKV(jnp.zeros(shape, jnp.int8), jnp.ones(shape[:3] + (1,), jnp.float32))
            return cls(k=[empty() for _ in range(n_layers)], v=[empty() for _ in range(n_layers)],
                       lengths=jnp.zeros((batch,), jnp.int32))
        if stacked:
            return cls(k=jnp.zeros((n_layers,) + shape, dtype), v=jnp.zeros((n_layers,) + shape, dtype),
                       lengths=jnp.zeros((batch,), jnp.int32))
        return cls(k=[jnp.zeros(shape, dtype) for _ in range(n_layers)],
                   v=[jnp.zeros(shape, dtype) for _ in range(n_layers)],
                   lengths=jnp.zeros((batch,), jnp.int32))

    def replace(self, **kw) -> "KVCache":
        return dataclasses.replace(self, **kw)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return jax.tree.leaves(self.k)[0].shape[-3]
