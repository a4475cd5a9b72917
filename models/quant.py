"""Symmetric int8 quantization as typed values: weights per output channel, the KV cache per token
and head.

- `QArray(values, scale, contract)`: a quantized weight as the matmul sees it, a pytree (through
  jit, shard_map and jax.tree) of int8 `values` of the float weight's shape and a float `scale` over
  its output channels (the dimensions not in the static `contract`): w ~= values * scale. `einsum`
  takes a float weight or a QArray: it multiplies the output of the int8 matmul by the scale, and
  per-output-channel scales commute with sums over the contracted dimensions, so a sharded product
  (sharding/blocks.py) applies them to its partial sums before they are reduced.
- `QuantizedWeight`: the same weight as model state, an nnx.Module holding `values` and `scale`
  Params with their own logical axes (the scale's: the weight's output dims, so it shards like
  them). A module holds it in place of the float weight's Param; `w[...]` gives the QArray.
- `QuantizedKV(values, scale)`: one layer's int8 keys or values [B,S,K,H] with one float32 scale per
  token and head [B,S,K,1] (engine/kv_cache.py creates it, models/llama.py Attention writes it).

Quantized: every projection (q, k, v, o, gate, up, down), the embedding table (per vocabulary row,
which for tied embeddings is also the output channel of the lm_head) and an untied lm_head (per
vocabulary column). Norm scales and biases stay in the model's float dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shardlm.sharding.qarray import QArray, einsum  # noqa: F401  (the typed value; re-exported here)

QUANTIZE_MODES = ("int8",)
KV_CACHE_MODES = ("int8",)


def check_mode(mode: str | None) -> str | None:
    """None (or "none", "float") for full precision, else a known quantization; raises otherwise."""
    if mode in (None, "none", "float"):
        return None
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantization {mode!r}; allowed: {', '.join(QUANTIZE_MODES)} (or none)")
    return mode


def check_kv_mode(mode: str | None) -> str | None:
    if mode in (None, "none", "float"):
        return None
    if mode not in KV_CACHE_MODES:
        raise ValueError(f"unknown KV cache quantization {mode!r}; allowed: {', '.join(KV_CACHE_MODES)} (or none)")
    return mode


def quantize(w, contract: tuple[int, ...], scale_dtype, xp=jnp) -> QArray:
    """w -> QArray of int8 values of w's shape and scales over the non-contracted dims; xp is jnp or np."""
    wf = xp.asarray(w).astype(xp.float32)
    amax = xp.max(xp.abs(wf), axis=contract, keepdims=True)
    scale = xp.where(amax > 0, amax / 127.0, 1.0)
    values = xp.clip(xp.round(wf / scale), -127, 127).astype(xp.int8)
    return QArray(values, xp.squeeze(scale, axis=contract).astype(scale_dtype), tuple(contract))


def scale_axes(axes: tuple[str, ...], contract: tuple[int, ...]) -> tuple[str, ...]:
    return tuple(a for d, a in enumerate(axes) if d not in contract)


class QuantizedWeight(nnx.Module):
    """A quantized weight as model state: `values` (int8, the weight's axes) and `scale` (the axes of
    its output dims), each a Param, so loading and placement find every array's logical axes in the
    state. It reads like the Param it replaces: `w[...]` is its QArray, `w.axes` the weight's axes."""

    def __init__(self, w, axes: tuple[str, ...], contract: tuple[int, ...]):
        q = quantize(w, contract, w.dtype)
        self.values = nnx.Param(q.values, axes=tuple(axes))
        self.scale = nnx.Param(q.scale, axes=scale_axes(axes, contract))
        self.contract = q.contract

    @property
    def axes(self) -> tuple[str, ...]:
        return self.values.axes

    def __getitem__(self, index) -> QArray:
        if index is not Ellipsis:
            raise IndexError("a QuantizedWeight is read whole: w[...]")
        return QArray(self.values[...], self.scale[...], self.contract)


def weight_param(value, axes, quantize_mode: str | None, contract: tuple[int, ...]):
    """The Param of a weight, or its QuantizedWeight if asked; `contract`: the dims its matmul sums over."""
    if quantize_mode is None:
        return nnx.Param(value, axes=axes)
    return QuantizedWeight(value, axes, contract)


def quantized_weights(model: nnx.Module) -> dict[tuple, QuantizedWeight]:
    """Path -> QuantizedWeight for each quantized weight of a model (abstract or not)."""
    return {tuple(path): node for path, node in nnx.iter_graph(model) if isinstance(node, QuantizedWeight)}


def is_quantized(model: nnx.Module) -> bool:
    return isinstance(model.embed, QuantizedWeight)


def compute_dtype(model: nnx.Module):
    """The float dtype the model computes in (its scales' under quantization)."""
    return (model.embed.scale if is_quantized(model) else model.embed)[...].dtype


def quantized_source(source, abstract: nnx.Module, sliced: bool = False):
    """Wrap a checkpoint reader `source(path)` (or `source(path, index)` if sliced) for an abstract
    quantized model: the float weight at a QuantizedWeight's path is read in full precision,
    quantized on the host, and its `values` and `scale` parameters are read from that QArray. One
    tensor is held at a time (a sliced reader reads a quantized weight whole: each channel's scale
    needs all its inputs)."""
    weights = quantized_weights(abstract)
    last = {}

    def quantized(path) -> QArray:
        if last.get("path") != path:
            w = weights[path]
            shape = w.values.shape
            full = source(path, tuple(slice(0, n) for n in shape)) if sliced else source(path)
            last.clear()
            last.update(path=path, result=quantize(np.asarray(full), w.contract, w.scale.dtype, xp=np))
        return last["result"]

    def read(path, index=None):
        if path[:-1] not in weights:
            return source(path, index) if sliced else source(path)
        part = getattr(quantized(path[:-1]), path[-1])  # the QArray field of the same name: values or scale
        return part[index] if sliced else part

    return read


def quantize_model(model: nnx.Module, mode: str = "int8", place=None) -> nnx.Module:
    """A full-precision model with its weights quantized one at a time (device to device); each new
    array is put at `place(axes, shape)` (a sharding) when given."""
    mode = check_mode(mode)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    dtype = compute_dtype(model)
    abstract = nnx.eval_shape(lambda: type(model)(model.cfg, dtype=dtype, rngs=nnx.Rngs(0), quantize=mode))
    weights = quantized_weights(abstract)
    graphdef, target = nnx.split(abstract)
    out, last = [], {}
    for path, var in nnx.to_flat_state(target):
        owner = path[:-1]
        if owner in weights:  # a QuantizedWeight's values or scale, from the float weight at its path
            if last.get("path") != owner:
                last = {"path": owner, "result": _quantize_jit(flat[owner][...], weights[owner].contract)}
            value = getattr(last["result"], path[-1])
        else:
            value = flat[path][...]
        if place is not None:
            value = jax.device_put(value, place(var.get_metadata().get("axes"), value.shape))
        out.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(out))


def _quantize_jit(w, contract):
    return jax.jit(quantize, static_argnums=(1, 2))(w, contract, w.dtype)


# ----- the KV cache -----


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKV:
    """One layer's int8 cache of keys or values: x ~= values * scale."""

    values: jax.Array  # int8 [B, S, K, H]
    scale: jax.Array  # float32 [B, S, K, 1]: one per token and head


def quantize_kv(x) -> QuantizedKV:
    """x [B,T,K,H] -> QuantizedKV(int8 [B,T,K,H], f32 scale [B,T,K,1]): one scale per token and head."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return QuantizedKV(jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale)


def weight_bytes(model: nnx.Module) -> dict:
    """Bytes of parameters held by each device, read from the arrays' addressable shards."""
    per_device: dict = {}
    for _, var in nnx.to_flat_state(nnx.state(model)):
        for s in var[...].addressable_shards:
            per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
    return per_device
