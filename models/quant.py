"""Symmetric int8 quantization: weights per output channel, the KV cache per token and head.

A quantized weight `w` is an int8 parameter with the float weight's shape and logical axes, plus a
parameter `w_scale` over its output channels (the dimensions the matmul does not contract), so it
shards like those dimensions of the weight: w ~= int8 * scale. A matmul reads the int8 values and
multiplies its output by the scale; per-output-channel scales commute with sums over the
contracted dimension, so a sharded product may apply them before its partial sums are reduced.

Quantized: every projection (q, k, v, o, gate, up, down), the embedding table (per vocabulary row,
which for tied embeddings is also the output channel of the lm_head) and an untied lm_head (per
vocabulary column). Norm scales and biases stay in the model's float dtype. The KV cache stores
int8 values [B,S,K,H] with one scale per token and head [B,S,K,1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

QUANTIZE_MODES = ("int8",)
KV_CACHE_MODES = ("int8",)

# Contracted dimensions of each quantized weight (the rest are its output channels).
CONTRACT = {"q": (0,), "k": (0,), "v": (0,), "gate": (0,), "up": (0,),  # [D, out...]
            "o": (0, 1), "down": (0,),  # [N, H, D], [F, D]
            "embed": (1,),  # [V, D]: one scale per row (tied: the lm_head's output channel)
            "lm_head": (0,)}  # [D, V]


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


def quantize(w, contract: tuple[int, ...], scale_dtype, xp=jnp):
    """w -> (int8 values of w's shape, scales over the non-contracted dims); xp is jnp or np."""
    wf = xp.asarray(w).astype(xp.float32)
    amax = xp.max(xp.abs(wf), axis=contract, keepdims=True)
    scale = xp.where(amax > 0, amax / 127.0, 1.0)
    values = xp.clip(xp.round(wf / scale), -127, 127).astype(xp.int8)
    return values, xp.squeeze(scale, axis=contract).astype(scale_dtype)


def scale_axes(axes: tuple[str, ...], contract: tuple[int, ...]) -> tuple[str, ...]:
    return tuple(a for d, a in enumerate(axes) if d not in contract)


def weight_param(value, axes, quantize_mode: str | None, name: str):
    """(Param of the weight, Param of its scale or None): the weight quantized if asked."""
    if quantize_mode is None:
        return nnx.Param(value, axes=axes), None
    values, scale = quantize(value, CONTRACT[name], value.dtype)
    return nnx.Param(values, axes=axes), nnx.Param(scale, axes=scale_axes(axes, CONTRACT[name]))


def is_quantized(model: nnx.Module) -> bool:
    return model.embed[...].dtype == jnp.int8


def compute_dtype(model: nnx.Module):
    """The float dtype the model computes in (its scales' under quantization)."""
    return (model.embed_scale if is_quantized(model) else model.embed)[...].dtype


def quantized_source(source, abstract_state, sliced: bool = False):
    """Wrap a checkpoint reader `source(path)` (or `source(path, index)` if sliced) for an abstract
    quantized model: an int8 weight is read in full precision, quantized on the host and returned
    as int8; its `_scale` parameter comes from the same quantization. One tensor is held at a time
    (a sliced reader reads a quantized weight whole: each channel's scale needs all its inputs)."""
    dtypes = {path: var.dtype for path, var in nnx.to_flat_state(abstract_state)}
    last = {}

    def quantized(path):
        if last.get("path") != path:
            shape = next(v.shape for p, v in nnx.to_flat_state(abstract_state) if p == path)
            full = source(path, tuple(slice(0, n) for n in shape)) if sliced else source(path)
            scale_dtype = dtypes[path[:-1] + (path[-1] + "_scale",)]
            last.clear()
            last.update(path=path, result=quantize(np.asarray(full), CONTRACT[path[-1]], scale_dtype, xp=np))
        return last["result"]

    def read(path, index=None):
        name = path[-1]
        if name in CONTRACT and dtypes[path] == jnp.int8:
            part = quantized(path)[0]
        elif isinstance(name, str) and name.endswith("_scale") and name[: -len("_scale")] in CONTRACT:
            part = quantized(path[:-1] + (name[: -len("_scale")],))[1]
        else:
            return source(path, index) if sliced else source(path)
        return part[index] if sliced else part

    return read


def quantize_model(model: nnx.Module, mode: str = "int8", place=None) -> nnx.Module:
    """A full-precision model with its weights quantized one at a time (device to device); each new
    array is put at `place(axes, shape)` (a sharding) when given."""
    mode = check_mode(mode)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    dtype = compute_dtype(model)
    abstract = nnx.eval_shape(lambda: type(model)(model.cfg, dtype=dtype, rngs=nnx.Rngs(0), quantize=mode))
    graphdef, target = nnx.split(abstract)
    out = []
    for path, var in nnx.to_flat_state(target):
        name, axes = path[-1], var.get_metadata().get("axes")
        if var.dtype == jnp.int8:
            value = _quantize_jit(flat[path][...], CONTRACT[name])[0]
        elif isinstance(name, str) and name.endswith("_scale") and name[: -len("_scale")] in CONTRACT:
            base = path[:-1] + (name[: -len("_scale")],)
            value = _quantize_jit(flat[base][...], CONTRACT[base[-1]])[1]
        else:
            value = flat[path][...]
        if place is not None:
            value = jax.device_put(value, place(axes, value.shape))
        out.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(out))


def _quantize_jit(w, contract):
    return jax.jit(quantize, static_argnums=(1, 2))(w, contract, w.dtype)


# ----- the KV cache -----


def quantize_kv(x):
    """x [B,T,K,H] -> (int8 [B,T,K,H], f32 scale [B,T,K,1]): one scale per token and head."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def weight_bytes(model: nnx.Module) -> dict:
    """Bytes of parameters held by each device, read from the arrays' addressable shards."""
    per_device: dict = {}
    for _, var in nnx.to_flat_state(nnx.state(model)):
        for s in var[...].addressable_shards:
            per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
    return per_device
