"""The Llama family in Flax NNX: Llama 2/3, Mistral, Qwen2, SmolLM2.

RMSNorm, RoPE (half-split, HF convention) with linear or Llama 3 scaling, SwiGLU, grouped-query
attention (MHA and MQA as its edge cases), tied or untied embeddings, optional QKV bias (Qwen2).

Every parameter carries logical axis names in its `axes` metadata and every activation constraint
names its dimensions; sharding/ maps the names to mesh axes. Glossary: B batch, T query tokens,
S cached sequence, D d_model, N query heads, K kv heads, G = N/K, H head dim, F d_ff, V vocab.

Forward: `model(tokens [B,T], positions [B,T], cache) -> (logits [B,T,V], cache)`. `cache` is any
pytree with per-layer lists `k`, `v` of [B,S,K,H] and a `replace(k=, v=)` method (engine.KVCache).
New keys/values are written at their absolute positions (contiguous within a row); a query at
position p attends to cache slots 0..p, so padded tokens after a prompt never leak into it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shardlm.models.config import ModelConfig
from shardlm.sharding.blocks import project_in, project_out
from shardlm.sharding.rules import gather_weight, shard


def _axes(var: nnx.Param) -> tuple[str, ...]:
    return var.get_metadata()["axes"]


def _w(var: nnx.Param):
    """A weight's value as used outside the projection blocks (gathered under weight-gathered layouts)."""
    return gather_weight(var[...], _axes(var))


def _param(rngs: nnx.Rngs, shape, axes, dtype, scale: float | None = None, init: str = "normal"):
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (jax.random.normal(rngs.params(), shape, jnp.float32) * scale).astype(dtype)
    return nnx.Param(value, axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs):
        self.scale = _param(rngs, (dim,), ("norm",), dtype, init="ones")
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2] with the config's scaling (computed at trace time, a constant)."""
    H = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.float64) / H))
    s = cfg.rope_scaling
    if s.kind == "linear":
        inv_freq = inv_freq / s.factor
    elif s.kind == "llama3":
        low_wavelen = s.original_max_position / s.low_freq_factor
        high_wavelen = s.original_max_position / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = np.where(medium, (1 - smooth) * inv_freq / s.factor + smooth * inv_freq, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x, positions, inv_freq):
    """x [B,T,n,H] rotated by positions [B,T] (HF's rotate_half convention)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q = _param(rngs, (D, N, H), ("embed", "q_heads", "head_dim"), dtype, D**-0.5)
        self.k = _param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), dtype, D**-0.5)
        self.v = _param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), dtype, D**-0.5)
        self.o = _param(rngs, (N, H, D), ("q_heads", "head_dim", "embed"), dtype, (N * H) ** -0.5)
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, (N, H), ("q_heads", "head_dim"), dtype, init="zeros")
            self.k_bias = _param(rngs, (K, H), ("kv_heads", "head_dim"), dtype, init="zeros")
            self.v_bias = _param(rngs, (K, H), ("kv_heads", "head_dim"), dtype, init="zeros")
        self.cfg = cfg

    def __call__(self, x, positions, k_cache, v_cache):
        cfg = self.cfg
        B, T, _ = x.shape
        K, H = cfg.n_kv_heads, cfg.head_dim
        G = cfg.n_heads // K
        q, k, v = project_in(x, [self.q[...], self.k[...], self.v[...]], [_axes(self.q), _axes(self.k), _axes(self.v)])
        if cfg.qkv_bias:
            q, k, v = q + _w(self.q_bias), k + _w(self.k_bias), v + _w(self.v_bias)
        inv_freq = rope_frequencies(cfg)
        # The attention core's layout: heads-sharded, or batch-sharded (an all-to-all from the
        # projections' heads-sharded layout) so the KV cache is split by rows, not replicated.
        q = shard(apply_rope(q, positions, inv_freq), ("attn_batch", "seq", "attn_heads", "head_dim"))
        k = shard(apply_rope(k, positions, inv_freq), ("attn_batch", "seq", "attn_kv_heads", "head_dim"))
        v = shard(v, ("attn_batch", "seq", "attn_kv_heads", "head_dim"))

        # Write the new keys/values at their positions (contiguous per row, starting at
        # positions[:, 0]); a per-row update that the partitioner keeps local under batch sharding.
        write = jax.vmap(lambda c, u, p: jax.lax.dynamic_update_slice(c, u.astype(c.dtype), (p, 0, 0)))
        k_cache, v_cache = write(k_cache, k, positions[:, 0]), write(v_cache, v, positions[:, 0])
        cache_axes = ("attn_batch", "cache_seq", "attn_kv_heads", "head_dim")
        k_cache, v_cache = shard(k_cache, cache_axes), shard(v_cache, cache_axes)

        S = k_cache.shape[1]
        qg = q.reshape(B, T, K, G, H)
        scores = jnp.einsum("btkgh,bskh->bkgts", qg, k_cache.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = scores * (H**-0.5)
        visible = jnp.arange(S)[None, None, :] <= positions[:, :, None]  # [B, T, S] causal over cache slots
        scores = jnp.where(visible[:, None, None], scores, -1e30)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v_cache).reshape(B, T, K * G, H).astype(x.dtype)
        out = shard(out, ("attn_batch", "seq", "attn_heads", "head_dim"))
        return project_out(out, self.o[...], _axes(self.o)), k_cache, v_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.d_ff
        self.gate = _param(rngs, (D, F), ("embed", "mlp"), dtype, D**-0.5)
        self.up = _param(rngs, (D, F), ("embed", "mlp"), dtype, D**-0.5)
        self.down = _param(rngs, (F, D), ("mlp", "embed"), dtype, F**-0.5)

    def __call__(self, x):
        gate, up = project_in(x, [self.gate[...], self.up[...]], [_axes(self.gate), _axes(self.up)])
        return project_out(jax.nn.silu(gate) * up, self.down[...], _axes(self.down))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype, rngs)
        self.attn = Attention(cfg, dtype, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype, rngs)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(self, x, positions, k_cache, v_cache):
        with jax.named_scope("attention"):
            h, k_cache, v_cache = self.attn(self.attn_norm(x), positions, k_cache, v_cache)
        x = shard(x + h, ("batch", "seq", "act_embed"))
        with jax.named_scope("mlp"):
            x = shard(x + self.mlp(self.mlp_norm(x)), ("batch", "seq", "act_embed"))
        return x, k_cache, v_cache


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), dtype, 1.0)
        # One module (and one weight array per projection) per layer: unrolled at trace time, which
        # decodes faster than a scan over stacked weights (see DESIGN.md, measured on CPU).
        self.layers = nnx.List([Block(cfg, dtype, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), dtype, cfg.d_model**-0.5)

    def __call__(self, tokens, positions, cache, logits_index=None):
        """tokens, positions [B,T] -> logits [B,T,V] (or [B,1,V] at `logits_index` [B]), cache."""
        # Look up rows in the table's own D sharding, then move to the residual's: XLA 0.11's
        # partitioner aborts on a gather whose output is split further than its operand.
        x = shard(_w(self.embed)[tokens], ("batch", "seq", "act_embed_lookup"))
        x = shard(x, ("batch", "seq", "act_embed"))  # [B, T, D]
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                x, k, v = layer(x, positions, cache.k[i], cache.v[i])
            ks.append(k)
            vs.append(v)
        if logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)  # [B, 1, D]
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, _w(self.embed), preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("btd,dv->btv", x, _w(self.lm_head), preferred_element_type=jnp.float32)
        return shard(logits, ("batch", "seq", "act_vocab")), cache.replace(k=ks, v=vs)
