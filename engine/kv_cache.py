"""The KV caches: explicit pytrees that go into every step and come out of it (donated).

`KVCache` is dense, [B, S, K, H] per layer; `PagedKVCache` is page pools [num_pages, P, K, H] per
layer with the step's page metadata. Both give the model `layer(i)`, the cache view one layer
attends through (models/kv_views.py), and `with_layers(views)`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from shardlm.models.kv_views import DenseKV, PagedKV, PageMeta
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

    @staticmethod
    def layer_view(k, v) -> DenseKV:
        """The view of one layer's arrays (a pipeline stage slices them from the stacked cache)."""
        return DenseKV(k, v)

    def layer(self, i: int) -> DenseKV:
        return DenseKV(self.k[i], self.v[i])

    def with_layers(self, views) -> "KVCache":
        return self.replace(k=[kv.k for kv in views], v=[kv.v for kv in views])

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return jax.tree.leaves(self.k)[0].shape[-3]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PagedKVCache:
    k: list  # per layer [num_pages, P, K, H]
    v: list  # per layer [num_pages, P, K, H]
    meta: PageMeta  # this step's slot mapping, page tables, kv_lens (shared by every layer)

    @staticmethod
    def zero_pools(n_layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int, dtype=jnp.float32):
        """(k, v): per layer a zero pool [num_pages, P, K, H] (int8: a QuantizedKV of int8 values
        and float32 scales [num_pages, P, K, 1])."""
        shape = (num_pages, page_size, kv_heads, head_dim)

        def empty():
            if jnp.dtype(dtype) == jnp.int8:  # scale 1, as quantize_kv gives a row of zeros
                return QuantizedKV(jnp.zeros(shape, jnp.int8), jnp.ones(shape[:3] + (1,), jnp.float32))
            return jnp.zeros(shape, dtype)
        return [empty() for _ in range(n_layers)], [empty() for _ in range(n_layers)]

    def layer(self, i: int) -> PagedKV:
        return PagedKV(self.k[i], self.v[i], self.meta)

    def with_layers(self, views) -> "PagedKVCache":
        return dataclasses.replace(self, k=[kv.k for kv in views], v=[kv.v for kv in views])
