"""The Llama family in Flax NNX: Llama 2/3, Mistral, Qwen2, Qwen3 (dense), SmolLM2.

RMSNorm, RoPE (half-split, HF convention) with linear or Llama 3 scaling, SwiGLU, grouped-query
attention (MHA and MQA as its edge cases), tied or untied embeddings, optional QKV bias (Qwen2),
optional QK-norm (Qwen3: an RMSNorm over head_dim, one [H] scale shared by all heads, on each query
and key head after the projection and before RoPE; its head_dim need not be d_model / n_heads).

Every parameter carries logical axis names in its `axes` metadata and every activation constraint
names its dimensions; sharding/ maps the names to mesh axes. Glossary: B batch, T query tokens,
S cached sequence, D d_model, N query heads, K kv heads, G = N/K, H head dim, F d_ff, V vocab.

Forward: `model(tokens [B,T], positions [B,T], cache) -> (logits [B,T,V], cache)`. `cache` is any
pytree with `layer(i)`, the cache view of layer i, and `with_layers(views)` (engine.KVCache, dense
[B,S,K,H] per layer; engine.PagedKVCache, page pools). Each layer's attention makes one call on
its view, `kv.attend(q, k, v, positions)`, which writes the new keys/values and attends over the
cache (models/kv_views.py), so the model does not know how the cache is laid out.
`quantize="int8"` holds each weight as a quant.QuantizedWeight (int8 with per-output-channel scales,
models/quant.py); an int8 cache holds quant.QuantizedKV values.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shardlm.models import quant
from shardlm.models.config import ModelConfig
from shardlm.sharding.blocks import project_in, project_out
from shardlm.sharding.rules import gather_weight, shard


def _axes(var) -> tuple[str, ...]:
    """Logical axes of a Param or a quant.QuantizedWeight (its int8 values')."""
    return var.axes


def _w(var):
    """A weight's value as used outside the projection blocks (gathered under weight-gathered layouts):
    an array, or a QArray whose values and scale are each gathered by their own axes."""
    if isinstance(var, quant.QuantizedWeight):
        return quant.QArray(_w(var.values), _w(var.scale), var.contract)
    return gather_weight(var[...], _axes(var))


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, scale: float | None = None, init: str = "normal"):
    """rngs None: zeros for "normal" too, for a model whose values are read in after (abstract_model:
    tracing 270 random draws took 1.6 s of every load)."""
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros" or rngs is None:
        value = jnp.zeros(shape, dtype)
    else:
        value = (jax.random.normal(rngs.params(), shape, jnp.float32) * scale).astype(dtype)
    return nnx.Param(value, axes=axes)


def _weight(param: nnx.Param, quantize: str | None, contract: tuple[int, ...]):
    """A matmul's weight: the Param, or a quant.QuantizedWeight of it when quantizing; `contract`: the
    dims the matmul sums over (the scale covers the others)."""
    return quant.weight_param(param[...], _axes(param), quantize, contract)


def _ws(module, names):
    """Values (arrays or QArrays) and logical axes of a block's projection weights."""
    weights = [getattr(module, n) for n in names]
    return [w[...] for w in weights], [_axes(w) for w in weights]


# The helpers above under public names, for the family files built on this one (models/moe.py, gemma.py).
make_param, make_weight, weight_in_use = _param, _weight, _w
projection_weights, logical_axes = _ws, _axes


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs | None):
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
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs | None, quantize: str | None = None):
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q = _weight(_param(rngs, (D, N, H), ("embed", "q_heads", "head_dim"), dtype, D**-0.5), quantize, (0,))
        self.k = _weight(_param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), dtype, D**-0.5), quantize, (0,))
        self.v = _weight(_param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), dtype, D**-0.5), quantize, (0,))
        self.o = _weight(_param(rngs, (N, H, D), ("q_heads", "head_dim", "embed"), dtype, (N * H) ** -0.5),
                         quantize, (0, 1))
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, (N, H), ("q_heads", "head_dim"), dtype, init="zeros")
            self.k_bias = _param(rngs, (K, H), ("kv_heads", "head_dim"), dtype, init="zeros")
            self.v_bias = _param(rngs, (K, H), ("kv_heads", "head_dim"), dtype, init="zeros")
        if cfg.qk_norm:  # scales [H] with RMSNorm's logical axis "norm", which no layout splits
            self.q_norm = RMSNorm(H, cfg.norm_eps, dtype, rngs)
            self.k_norm = RMSNorm(H, cfg.norm_eps, dtype, rngs)
        self.cfg = cfg

    def __call__(self, x, positions, kv):
        """x [B,T,D] at positions [B,T], through cache view `kv` (models/kv_views.py) -> (out [B,T,D], kv)."""
        cfg = self.cfg
        q, k, v = project_in(x, *_ws(self, ("q", "k", "v")))
        if cfg.qkv_bias:
            q, k, v = q + _w(self.q_bias), k + _w(self.k_bias), v + _w(self.v_bias)
        if cfg.qk_norm:  # q [B,T,N,H], k [B,T,K,H]: each head normalized over its H dims
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_frequencies(cfg)
        # The attention core's layout: heads-sharded, or batch-sharded (an all-to-all from the
        # projections' heads-sharded layout) so the KV cache is split by rows, not replicated.
        q = shard(apply_rope(q, positions, inv_freq), ("attn_batch", "seq", "attn_heads", "head_dim"))
        k = shard(apply_rope(k, positions, inv_freq), ("attn_batch", "seq", "attn_kv_heads", "head_dim"))
        v = shard(v, ("attn_batch", "seq", "attn_kv_heads", "head_dim"))

        out, kv = kv.attend(q, k, v, positions)  # writes the new keys/values, attends over the cache
        out = out.astype(x.dtype)
        out = shard(out, ("attn_batch", "seq", "attn_heads", "head_dim"))
        return project_out(out, self.o[...], _axes(self.o)), kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs | None, quantize: str | None = None):
        D, F = cfg.d_model, cfg.d_ff
        self.gate = _weight(_param(rngs, (D, F), ("embed", "mlp"), dtype, D**-0.5), quantize, (0,))
        self.up = _weight(_param(rngs, (D, F), ("embed", "mlp"), dtype, D**-0.5), quantize, (0,))
        self.down = _weight(_param(rngs, (F, D), ("mlp", "embed"), dtype, F**-0.5), quantize, (0,))

    def __call__(self, x):
        gate, up = project_in(x, *_ws(self, ("gate", "up")))
        return project_out(jax.nn.silu(gate) * up, self.down[...], _axes(self.down))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs | None, quantize: str | None = None, mlp_class=None):
        """mlp_class: the feed-forward module's class (default MLP; models/moe.py passes its experts')."""
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype, rngs)
        self.attn = Attention(cfg, dtype, rngs, quantize)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype, rngs)
        self.mlp = (mlp_class or MLP)(cfg, dtype, rngs, quantize)

    def __call__(self, x, positions, kv):
        with jax.named_scope("attention"):
            h, kv = self.attn(self.attn_norm(x), positions, kv)
        x = shard(x + h, ("batch", "seq", "act_embed"))
        with jax.named_scope("mlp"):
            x = shard(x + self.mlp(self.mlp_norm(x)), ("batch", "seq", "act_embed"))
        return x, kv


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None, quantize: str | None = None):
        """rngs: the random initialization's keys (None: zeros, for weights read from a checkpoint).
        quantize: None (full precision) or "int8" (weights, embedding and lm_head; models/quant.py)."""
        self.cfg = cfg
        quantize = quant.check_mode(quantize)
        # The table's scale is per vocabulary row (contract D), which for tied embeddings is also the
        # lm_head's output channel.
        self.embed = _weight(_param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), dtype, 1.0), quantize,
                             (1,))
        # One module (and one weight array per projection) per layer: unrolled at trace time, which
        # decodes faster than a scan over stacked weights (see DESIGN.md, measured on CPU).
        self.layers = nnx.List([Block(cfg, dtype, rngs, quantize, self.mlp_class(cfg, i)) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _weight(_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), dtype,
                                          cfg.d_model**-0.5), quantize, (0,))

    @staticmethod
    def mlp_class(cfg: ModelConfig, layer: int) -> type[nnx.Module]:
        """The feed-forward module of `layer` (models/moe.py's subclass picks its experts here)."""
        return MLP

    def __call__(self, tokens, positions, cache, logits_index=None, layers=None):
        """tokens, positions [B,T] -> logits [B,T,V] (or [B,1,V] at `logits_index` [B]), cache.

        The forward in three parts: `embed_tokens`, the layers, `head`. `layers(x, positions, cache)
        -> (x, cache)` runs the layers another way (pipeline stages, sharding/pipeline.py);
        default `run_layers`, one module per layer."""
        x = self.embed_tokens(tokens)
        x, cache = (layers or self.run_layers)(x, positions, cache)
        return self.head(x, logits_index), cache

    def run_layers(self, x, positions, cache):
        """residual [B,T,D] through every layer, each through its view cache.layer(i)."""
        views = []
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                x, kv = layer(x, positions, cache.layer(i))
            views.append(kv)
        return x, cache.with_layers(views)

    def embed_tokens(self, tokens):
        """tokens [B,T] -> residual [B,T,D]."""
        # Look up rows in the table's own D sharding, then move to the residual's: XLA 0.11's
        # partitioner aborts on a gather whose output is split further than its operand.
        table = _w(self.embed)
        if isinstance(table, quant.QArray):  # int8 rows times their scales
            x = table.values[tokens].astype(table.scale.dtype) * table.scale[tokens][..., None]
        else:
            x = table[tokens]
        x = shard(x, ("batch", "seq", "act_embed_lookup"))
        return shard(x, ("batch", "seq", "act_embed"))  # [B, T, D]

    def head(self, x, logits_index=None):
        """residual [B,T,D] -> logits [B,T,V] (or [B,1,V] at `logits_index` [B]; [B,n,V] at
        `logits_index` [B,n], several positions per row: the prompts of a packed row)."""
        if logits_index is not None:
            index = logits_index[:, None, None] if logits_index.ndim == 1 else logits_index[:, :, None]
            x = jnp.take_along_axis(x, index, axis=1)  # [B, 1 or n, D]
        x = self.final_norm(x)
        name = "embed" if self.cfg.tie_embeddings else "lm_head"
        w = _w(getattr(self, name))  # an int8 QArray's per-vocabulary scales apply to the logits
        eq = "btd,vd->btv" if self.cfg.tie_embeddings else "btd,dv->btv"
        logits = quant.einsum(eq, x, w, preferred_element_type=jnp.float32)
        return shard(logits, ("batch", "seq", "act_vocab"))
