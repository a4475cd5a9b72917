"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE): the Llama family with its MLP replaced by experts.

Attention, norms, RoPE, embeddings and head are models/llama.py's (`MoE` subclasses `Llama` and only
picks each layer's feed-forward module); a layer is a `SparseMoE` unless the config lists it in
`dense_layers` (Qwen3-MoE's `mlp_only_layers` / `decoder_sparse_step`), where it keeps Llama's MLP.

SparseMoE, per token: router logits [E] -> softmax over all E experts (float32) -> the top k ->
renormalised over the k chosen (Mixtral always; Qwen3-MoE when `norm_topk_prob`) -> the token's
output is the weighted sum of its k experts' SwiGLU outputs. Qwen2-MoE adds a shared expert, a
dense SwiGLU of width shared_expert_d_ff that every token goes through, scaled by sigmoid(x . w_gate).

Dispatch: the T*k token-slots are sorted by expert and each expert's contiguous run goes through its
own weights with `jax.lax.ragged_dot` (group sizes = tokens per expert), then the slots are unsorted
and summed per token. Chosen over capacity buckets ([E, C, D] with C a guessed per-expert capacity)
because it is exact (no token is dropped when an expert is popular, so the logits are HF's) and has
no padding FLOPs on a backend with a grouped matmul (TPU's ragged_dot instruction / megablox, GPU's
lowering). XLA:CPU has none (JAX lowers ragged_dot there to a slow product masked over all E
groups): on CPU `_expert_matmul` gathers each slot's expert at decode sizes and otherwise scans over
the experts, E/k times the active FLOPs (exact either way).

Weights carry the logical axis "expert" on their E dimension and "expert_mlp" on each expert's F:
gate, up [E, D, F] ("expert", "embed", "expert_mlp"), down [E, F, D] ("expert", "expert_mlp",
"embed"), router [D, E] ("embed", "expert_logits"). The dense layouts of sharding/layouts.py leave
"expert" unsplit and split "expert_mlp" as "mlp" (tensor parallel inside every expert), and the layer
runs the dispatch above on every device. The expert-parallel layouts split "expert": then the layer
calls sharding/experts.py's `expert_parallel` (all-to-all dispatch and combine over the EP axes,
same routing, dropless unless `capacity_factor` is set). Qwen2-MoE's shared expert stays a dense MLP
under either. Glossary as llama.py's, plus E experts, k experts per token, M = B*T*k token-slots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from shardlm.models import llama, quant
from shardlm.models.config import ModelConfig
from shardlm.sharding import experts as expert_parallel
from shardlm.sharding.rules import shard


def route(logits, k: int, renormalise: bool):
    """Router logits [T, E] -> (weights [T, k] float32, expert ids [T, k]): softmax over all experts,
    the top k, renormalised over those k if asked (Mixtral; Qwen3-MoE's norm_topk_prob)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if renormalise:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def _expert_matmul(x, w, group_sizes, expert_of_row):
    """x [M, in] (rows sorted by expert) times each row's expert's weight [E, in, out] -> [M, out].
    An int8 weight (QArray) runs on its values and multiplies each row by its expert's scales [E, out].

    ragged_dot is a grouped matmul on TPU and GPU. XLA:CPU lowers it to a product masked over all E
    experts that runs at a fraction of its matmul speed, so on CPU: with fewer token-slots than half
    the experts (decode at a small batch) each slot's expert is gathered, reading M experts, not E;
    otherwise a scan over the experts multiplies every row by each and keeps its own expert's row
    (the same FLOPs as the masked lowering, at matmul speed). Both are exact."""
    values = w.values if isinstance(w, quant.QArray) else w
    E = values.shape[0]
    if not _on_cpu():
        y = jax.lax.ragged_dot(x, values.astype(x.dtype), group_sizes)
    elif 2 * x.shape[0] <= E:
        y = jnp.einsum("mi,mio->mo", x, values[expert_of_row].astype(x.dtype))  # [M, in, out] gathered
    else:
        def one_expert(y, expert):  # [M, out]
            e, w_e = expert
            return jnp.where((expert_of_row == e)[:, None], x @ w_e.astype(x.dtype), y), None
        y, _ = jax.lax.scan(one_expert, jnp.zeros((x.shape[0], values.shape[2]), x.dtype), (jnp.arange(E), values))
    return y * w.scale[expert_of_row].astype(y.dtype) if isinstance(w, quant.QArray) else y


class SparseMoE(nnx.Module):
    """Router and E SwiGLU experts: x [B,T,D] -> [B,T,D]."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs | None, quantize: str | None = None):
        E, D, F = cfg.n_experts, cfg.d_model, cfg.expert_d_ff
        # The router stays float under int8: [D, E] is small and its top-k decides which experts run.
        self.router = llama.make_param(rngs, (D, E), ("embed", "expert_logits"), dtype, D**-0.5)
        in_axes, out_axes = ("expert", "embed", "expert_mlp"), ("expert", "expert_mlp", "embed")
        self.gate = llama.make_weight(llama.make_param(rngs, (E, D, F), in_axes, dtype, D**-0.5), quantize, (1,))
        self.up = llama.make_weight(llama.make_param(rngs, (E, D, F), in_axes, dtype, D**-0.5), quantize, (1,))
        self.down = llama.make_weight(llama.make_param(rngs, (E, F, D), out_axes, dtype, F**-0.5), quantize, (1,))
        self.k = cfg.experts_per_token
        self.renormalise = cfg.norm_topk_prob
        # Expert-parallel layouts only: None is dropless (exact); a factor c < dropless keeps
        # C = ceil(c x slots / ep) slots per destination group and drops the rest (sharding/experts.py).
        self.capacity_factor: float | None = None
        if cfg.shared_expert_d_ff:  # Qwen2-MoE: Llama's MLP at the shared width, with a scalar gate per token
            self.shared = llama.MLP(cfg.replace(d_ff=cfg.shared_expert_d_ff), dtype, rngs, quantize)
            self.shared_gate = llama.make_param(rngs, (D, 1), ("embed", "shared_gate"), dtype, D**-0.5)

    def __call__(self, x):
        if expert_parallel.expert_axes():
            y = expert_parallel.expert_parallel(
                x, llama.weight_in_use(self.router), llama.weight_in_use(self.gate), llama.weight_in_use(self.up),
                llama.weight_in_use(self.down), functools.partial(route, k=self.k, renormalise=self.renormalise),
                self.capacity_factor)
        else:
            y = self._dispatch(x)
        if hasattr(self, "shared"):
            gate = jax.nn.sigmoid(jnp.einsum("btd,do->bto", x, llama.weight_in_use(self.shared_gate)))  # [B, T, 1]
            y = y + gate * self.shared(x)
        return shard(y, ("batch", "seq", "act_embed"))

    def _dispatch(self, x):
        """The routed experts on every device group: x [B,T,D] -> the weighted sum of each token's k [B,T,D]."""
        B, T, D = x.shape
        E, k = self.router.shape[1], self.k
        # Every token's whole D on each device: the sort and gather below move tokens, not D slices.
        tokens = shard(x, ("batch", "seq", "act_expert_embed")).reshape(B * T, D)  # [B*T, D]
        logits = jnp.einsum("td,de->te", tokens, llama.weight_in_use(self.router))
        weights, experts = route(logits, k, self.renormalise)  # [B*T, k] each

        # Sort the B*T*k token-slots by expert (stable: a token's slots keep their order), so each
        # expert's rows are one contiguous group of ragged_dot.
        flat = experts.reshape(-1)  # [M]
        order = jnp.argsort(flat, stable=True)
        sorted_experts = flat[order]
        group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)  # [E] token-slots per expert
        rows = tokens[order // k]  # [M, D]
        gate = _expert_matmul(rows, llama.weight_in_use(self.gate), group_sizes, sorted_experts)  # [M, F]
        up = _expert_matmul(rows, llama.weight_in_use(self.up), group_sizes, sorted_experts)
        out = _expert_matmul(jax.nn.silu(gate) * up, llama.weight_in_use(self.down), group_sizes, sorted_experts)  # [M, D]

        # Combine: back to slot order (the inverse permutation), weighted sum over each token's k slots.
        out = out[jnp.argsort(order)].reshape(B * T, k, D)
        return jnp.einsum("tkd,tk->td", out, weights.astype(out.dtype)).reshape(B, T, D)


class MoE(llama.Llama):
    """A Llama-family decoder whose feed-forward layers are SparseMoE (those in cfg.dense_layers: MLP)."""

    @staticmethod
    def mlp_class(cfg: ModelConfig, layer: int) -> type[nnx.Module]:
        return llama.MLP if layer in cfg.dense_layers else SparseMoE
