"""Gemma 2 and Gemma 3 (text) in Flax NNX: models/llama.py's decoder with Gemma's changes.

- Embeddings scaled by sqrt(D) (in the embedding's dtype, as HF does); tied by default.
- RMSNorm with (1 + w): the checkpoints store w (zeros at init), the norm applies 1 + w in float32.
- Four norms per block: before and after attention, before and after the MLP (the "after" ones on the
  branch, before it joins the residual).
- GeGLU: the MLP's gate through GELU (tanh-approximate, HF's "gelu_pytorch_tanh"; or exact).
- Attention scores scaled by query_pre_attn_scalar**-0.5 (not head_dim's); Gemma 2 soft-caps them,
  cap * tanh(scores / cap) before the mask, and soft-caps the final logits too.
- Sliding-window layers (`ModelConfig.layer_types`): a query at position p sees keys p - W < j <= p.
  Gemma 2 alternates sliding and global layers; Gemma 3 has five sliding layers to one global, its
  sliding layers rotate with their own RoPE base (`rope_local_theta`, unscaled), and it has QK-norm
  (a (1 + w) RMSNorm over head_dim on each query and key head, before RoPE).

The projections, RoPE, logical axes, int8 weights and the forward in parts (`embed_tokens` -> the
layers -> `head`) are Llama's: `Gemma` subclasses `Llama`. A layer's window, scale and soft cap are
static, passed to its cache view's `attend` (models/kv_views.py), so each layer compiles its own
mask. Layers therefore differ in structure, and pipeline stages (which stack identical layers)
refuse the model. Glossary as models/llama.py's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from shardlm.models import llama, quant
from shardlm.models.config import ModelConfig, RopeScaling
from shardlm.models.llama import apply_rope, logical_axes, make_param, make_weight, projection_weights, rope_frequencies
from shardlm.sharding.blocks import project_in, project_out
from shardlm.sharding.rules import shard

GELU = {"gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True), "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


class RMSNorm(nnx.Module):
    """x / rms(x) * (1 + w) in float32; w stored as the checkpoints store it."""

    def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs | None):
        self.scale = make_param(rngs, (dim,), ("norm",), dtype, init="zeros")
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype, rngs: nnx.Rngs | None, quantize: str | None = None):
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q = make_weight(make_param(rngs, (D, N, H), ("embed", "q_heads", "head_dim"), dtype, D**-0.5),
                             quantize, (0,))
        self.k = make_weight(make_param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), dtype, D**-0.5),
                             quantize, (0,))
        self.v = make_weight(make_param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), dtype, D**-0.5),
                             quantize, (0,))
        self.o = make_weight(make_param(rngs, (N, H, D), ("q_heads", "head_dim", "embed"), dtype, (N * H) ** -0.5),
                             quantize, (0, 1))
        if cfg.qk_norm:  # Gemma 3
            self.q_norm = RMSNorm(H, cfg.norm_eps, dtype, rngs)
            self.k_norm = RMSNorm(H, cfg.norm_eps, dtype, rngs)
        self.cfg = cfg
        # Static per layer (part of the graph): the window, and the RoPE of this layer's type.
        self.window = cfg.layer_window(layer)
        self.local_rope = bool(self.window and cfg.rope_local_theta)

    def __call__(self, x, positions, kv):
        """x [B,T,D] at positions [B,T], through cache view `kv` -> (out [B,T,D], kv)."""
        cfg = self.cfg
        q, k, v = project_in(x, *projection_weights(self, ("q", "k", "v")))
        if cfg.qk_norm:  # q [B,T,N,H], k [B,T,K,H]: each head normalized over its H dims
            q, k = self.q_norm(q), self.k_norm(k)
        rope = cfg.replace(rope_theta=cfg.rope_local_theta, rope_scaling=RopeScaling()) if self.local_rope else cfg
        inv_freq = rope_frequencies(rope)
        q = shard(apply_rope(q, positions, inv_freq), ("attn_batch", "seq", "attn_heads", "head_dim"))
        k = shard(apply_rope(k, positions, inv_freq), ("attn_batch", "seq", "attn_kv_heads", "head_dim"))
        v = shard(v, ("attn_batch", "seq", "attn_kv_heads", "head_dim"))

        scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        out, kv = kv.attend(q, k, v, positions, scale=scale, window=self.window, softcap=cfg.attn_softcap)
        out = shard(out.astype(x.dtype), ("attn_batch", "seq", "attn_heads", "head_dim"))
        return project_out(out, self.o[...], logical_axes(self.o)), kv


class MLP(llama.MLP):
    """GeGLU: Llama's gate, up and down projections with GELU on the gate."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs | None, quantize: str | None = None):
        super().__init__(cfg, dtype, rngs, quantize)
        self.activation = cfg.activation

    def __call__(self, x):
        gate, up = project_in(x, *projection_weights(self, ("gate", "up")))
        return project_out(GELU[self.activation](gate) * up, self.down[...], logical_axes(self.down))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype, rngs: nnx.Rngs | None, quantize: str | None = None):
        D, eps = cfg.d_model, cfg.norm_eps
        self.attn_norm = RMSNorm(D, eps, dtype, rngs)
        self.attn = Attention(cfg, layer, dtype, rngs, quantize)
        self.post_attn_norm = RMSNorm(D, eps, dtype, rngs)
        self.mlp_norm = RMSNorm(D, eps, dtype, rngs)
        self.mlp = MLP(cfg, dtype, rngs, quantize)
        self.post_mlp_norm = RMSNorm(D, eps, dtype, rngs)

    def __call__(self, x, positions, kv):
        with jax.named_scope("attention"):
            h, kv = self.attn(self.attn_norm(x), positions, kv)
        x = shard(x + self.post_attn_norm(h), ("batch", "seq", "act_embed"))
        with jax.named_scope("mlp"):
            h = self.post_mlp_norm(self.mlp(self.mlp_norm(x)))
        return shard(x + h, ("batch", "seq", "act_embed")), kv


class Gemma(llama.Llama):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None, quantize: str | None = None):
        """As Llama's: rngs None gives zeros (weights read in after); quantize None or "int8"."""
        self.cfg = cfg
        quantize = quant.check_mode(quantize)
        self.embed = make_weight(make_param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), dtype, 1.0),
                                 quantize, (1,))
        self.layers = nnx.List([Block(cfg, i, dtype, rngs, quantize) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = make_weight(make_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), dtype,
                                                  cfg.d_model**-0.5), quantize, (0,))

    def embed_tokens(self, tokens):
        """tokens [B,T] -> residual [B,T,D], the rows times sqrt(D) rounded to their dtype (HF's)."""
        x = super().embed_tokens(tokens)
        return x * jnp.asarray(math.sqrt(self.cfg.d_model), jnp.float32).astype(x.dtype)

    def head(self, x, logits_index=None):
        logits = super().head(x, logits_index)
        cap = self.cfg.final_softcap
        return cap * jnp.tanh(logits / cap) if cap else logits
