"""Cache views: what one attention layer writes its new keys/values into and attends over.

The model's Attention makes one call, `kv.attend(q, k, v, positions) -> (out, kv)`, and does not
know how the cache is laid out. Two views, both pytrees (they go into and out of jitted steps):

- `DenseKV`: one layer's dense cache k, v [B, S, K, H] (an int8 cache: quant.QuantizedKV of int8
  [B, S, K, H] and scale [B, S, K, 1]). New keys/values are written at their absolute positions (contiguous
  per row, starting at positions[:, 0]); a query at position p sees cache slots 0..p.
- `PagedKV`: one layer's page pools k, v [num_pages, P, K, H] plus the step's `PageMeta` (shared
  by every layer): where each new token goes and which pages each sequence reads
  (models/paged_attention.py). Two kinds of step use it:
  - decode: q [B, 1, N, H], row b is sequence b; `page_tables` [B, max_pages] and `kv_lens` [B]
    (tokens held, the new one included); rows past the live ones have kv_lens 0 (output zeros).
  - packed prefill: q [1, T, N, H], one row of several prompts' tokens (or chunks of them after
    their cached context), each starting at a multiple of the query block Q = T / len(seq_ids);
    `seq_ids` [T / Q] names each block's row of `page_tables` [Bp, max_pages] (-1 for padding),
    `q_positions` [T] each token's position in its sequence (-1 for padding), and kv_lens [Bp]
    counts each sequence's tokens once this step's are written. A token sees only its own
    sequence's positions 0..its own.
  In both, `slot_mapping` [B * T] is the flat pool slot (page * P + offset) of each new token in
  row-major order, -1 for padding (written nowhere).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from shardlm.models import quant
from shardlm.models.paged_attention import KV_PAGES_AXES, paged_attention, write_kv
from shardlm.sharding.rules import KV_CACHE_AXES, shard


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class DenseKV:
    k: object  # [B, S, K, H], or a quant.QuantizedKV (int8 [B, S, K, H], scale [B, S, K, 1])
    v: object

    def attend(self, q, k, v, positions, *, scale=None, window: int = 0, softcap: float = 0.0):
        """q [B,T,N,H], k, v [B,T,K,H] at positions [B,T] -> (out [B,T,N,H] in v's cache dtype, view).

        Static per layer: `scale` of the scores (default H**-0.5); `window` W > 0, a query at p sees
        only slots p - W < j <= p (a sliding-window layer); `softcap` c > 0, scores -> c * tanh(scores / c)
        before the mask."""
        B, T, N, H = q.shape
        K = k.shape[2]
        G = N // K
        # Write the new keys/values at their positions (contiguous per row, starting at
        # positions[:, 0]); a per-row update that the partitioner keeps local under batch sharding.
        write = jax.vmap(lambda c, u, p: jax.lax.dynamic_update_slice(c, u.astype(c.dtype), (p, 0, 0)))
        cache_axes = KV_CACHE_AXES
        # An int8 cache is a quant.QuantizedKV (int8 [B,S,K,H], scale [B,S,K,1]): one scale per token and head.
        int8_kv = isinstance(self.k, quant.QuantizedKV)
        new_k, new_v = (quant.quantize_kv(k), quant.quantize_kv(v)) if int8_kv else (k, v)
        k_cache = jax.tree.map(lambda c, u: shard(write(c, u, positions[:, 0]), cache_axes), self.k, new_k)
        v_cache = jax.tree.map(lambda c, u: shard(write(c, u, positions[:, 0]), cache_axes), self.v, new_v)
        if int8_kv:
            (k_vals, k_scale), (v_vals, v_scale) = (k_cache.values, k_cache.scale), (v_cache.values, v_cache.scale)
        else:
            (k_vals, k_scale), (v_vals, v_scale) = (k_cache, None), (v_cache, None)

        S = k_vals.shape[1]
        qg = q.reshape(B, T, K, G, H)
        scores = jnp.einsum("btkgh,bskh->bkgts", qg, k_vals.astype(q.dtype), preferred_element_type=jnp.float32)
        if int8_kv:  # per-(token, head) scales factor out of the sum over H
            scores = scores * jnp.transpose(k_scale[..., 0], (0, 2, 1))[:, :, None, None, :]
        scores = scores * (H**-0.5 if scale is None else scale)
        if softcap:
            scores = softcap * jnp.tanh(scores / softcap)
        visible = jnp.arange(S)[None, None, :] <= positions[:, :, None]  # [B, T, S] causal over cache slots
        if window:
            visible &= jnp.arange(S)[None, None, :] > positions[:, :, None] - window
        scores = jnp.where(visible[:, None, None], scores, -1e30)
        probs = jax.nn.softmax(scores, axis=-1)
        if int8_kv:  # and out of the sum over S, as weights on the probabilities
            probs = probs * jnp.transpose(v_scale[..., 0], (0, 2, 1))[:, :, None, None, :]
        probs = probs.astype(q.dtype if int8_kv else v_vals.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v_vals.astype(probs.dtype)).reshape(B, T, K * G, H)
        return out, DenseKV(k_cache, v_cache)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PageMeta:
    slot_mapping: jax.Array  # [B * T] int32 flat slot of each new token, -1: padding
    page_tables: jax.Array  # [B or Bp, max_pages] int32
    kv_lens: jax.Array  # [B or Bp] int32 tokens held after this step's are written
    seq_ids: jax.Array | None = None  # packed prefill: [T / Q] int32 page-table row per query block, -1: padding
    q_positions: jax.Array | None = None  # packed prefill: [T] int32 position in its sequence, -1: padding
    # decode: int32 scalar, the leading pages every live row holds in common (full pages of a shared
    # prefix), which attention reads once for the batch
    shared_pages: jax.Array | None = None

    @property
    def packed(self) -> bool:
        return self.seq_ids is not None


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PagedKV:
    k: object  # [num_pages, P, K, H]
    v: object
    meta: PageMeta

    def attend(self, q, k, v, positions, *, scale=None, window: int = 0, softcap: float = 0.0):
        """q [B,T,N,H], k, v [B,T,K,H] -> (out [B,T,N,H], view with the new tokens written).
        `positions` is unused: the meta says where each token goes and what it sees. `scale`,
        `window`, `softcap`: as DenseKV.attend's (paged_attention's)."""
        B, T, N, H = q.shape
        m = self.meta
        constrain = lambda a: shard(a, KV_PAGES_AXES)  # noqa: E731
        k_pages, v_pages = write_kv(self.k, self.v, k.reshape(B * T, *k.shape[2:]), v.reshape(B * T, *v.shape[2:]),
                                    m.slot_mapping)
        k_pages, v_pages = jax.tree.map(constrain, k_pages), jax.tree.map(constrain, v_pages)
        if m.packed:
            out = paged_attention(q.reshape(B * T, N, H), k_pages, v_pages, m.page_tables, m.kv_lens,
                                  m.q_positions, m.seq_ids, query_block=B * T // m.seq_ids.shape[0],
                                  scale=scale, window=window, softcap=softcap).reshape(B, T, N, H)
        else:
            out = paged_attention(q, k_pages, v_pages, m.page_tables, m.kv_lens, shared_pages=m.shared_pages,
                                  scale=scale, window=window, softcap=softcap)
        return out, dataclasses.replace(self, k=k_pages, v=v_pages)
