"""The KV cache: an explicit pytree that goes into every step and comes out of it (donated)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

# Logical axes of the cache arrays (sharding/ maps them to mesh axes per layout).
KV_AXES = ("attn_batch", "cache_seq", "attn_kv_heads", "head_dim")
LENGTHS_AXES = ("batch",)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    k: list  # per layer [B, S, K, H]
    v: list  # per layer [B, S, K, H]
    lengths: jax.Array  # [B] int32: tokens held per row (the next token's position)

    @classmethod
    def zeros(cls, n_layers: int, batch: int, seq: int, kv_heads: int, head_dim: int, dtype=jnp.float32):
        shape = (batch, seq, kv_heads, head_dim)
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
        return self.k[0].shape[1]
