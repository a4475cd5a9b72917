"""`shardlm convert` and `shardlm inspect`: any supported model in, a shardlm checkpoint out; summaries."""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter

import jax.numpy as jnp

from shardlm.checkpoints import hf, loader, orbax_io
from shardlm.checkpoints.gguf import CheckpointError
from shardlm.models import quant

CONVERT_DTYPES = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "f32": jnp.float32, "float32": jnp.float32}


def _source_dtype(src: str):
    """bf16 for a bf16 HF folder or shardlm checkpoint (its own precision), else float32."""
    try:
        dtypes = describe(src)["dtypes"]
    except CheckpointError:
        return jnp.float32  # the load reports what is wrong
    return jnp.bfloat16 if max(dtypes, key=dtypes.get, default="") in ("BF16", "bfloat16") else jnp.float32


def convert(src: str, dst: str, *, dtype: str | None = None, force: bool = False, progress=None,
            quantize: str | None = None) -> str:
    """Load `src` (GGUF file, HF folder or shardlm checkpoint) and save it as a shardlm checkpoint at `dst`.

    dtype: "bf16"/"bfloat16" or "f32"/"float32" (None: bf16 for a bf16 source, else f32). Nothing is written at `dst`
    unless the whole conversion succeeds; an existing `dst` is an error unless `force`.
    quantize: None or "int8" (int8 weights and their scales are saved; see models/quant.py).
    """
    if dtype is not None and dtype not in CONVERT_DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; allowed: {', '.join(CONVERT_DTYPES)}")
    quant.check_mode(quantize)
    dst = orbax_io.check_destination(dst, force)  # before the (slow) load
    src = os.path.abspath(os.path.expanduser(src))
    if os.path.abspath(dst) == src:
        raise CheckpointError(f"source and destination are the same path: {src}")
    target = CONVERT_DTYPES[dtype] if dtype else _source_dtype(src)
    loaded = loader.load(src, dtype=target, progress=progress, quantize=quantize)
    files = [os.path.join(src, f) for f in hf.TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))] \
        if os.path.isdir(src) else []
    return orbax_io.save(dst, loaded.model, loaded.config, tokenizer=loaded.tokenizer, tokenizer_files=files,
                         force=force, extra={"source": src})


def describe(path: str) -> dict:
    """Format, config, parameter count, parameters per dtype and bytes on disk of a model path."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise CheckpointError(f"model path does not exist: {path}")
    dtypes: Counter = Counter()
    if orbax_io.is_checkpoint(path):
        meta = orbax_io.read_metadata(path)
        fmt, config = "shardlm", meta["config"]
        for info in meta["params"].values():
            dtypes[info["dtype"]] += math.prod(info["shape"])
        files = [os.path.join(root, f) for root, _, names in os.walk(path) for f in names]
    elif os.path.isdir(path):
        if not hf.is_hf_folder(path):
            raise CheckpointError(f"{path} is neither a shardlm checkpoint nor a Hugging Face model folder")
        fmt, config = "huggingface", hf.read_config(path)
        weights = hf.HFWeights(path)
        hf.check_head_dim(weights, config)
        for name, shape in weights.shape_of.items():
            dtypes[weights.dtype_of[name]] += math.prod(shape)
        files = sorted(set(weights.file_of.values()))
    else:
        from shardlm.checkpoints.gguf import GGUFWeights
        from shardlm.models.config import ModelConfig

        weights = GGUFWeights(path)
        try:
            config = ModelConfig.from_gguf_metadata(weights.metadata, weights.tensors.keys())
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: {e}") from None
        fmt = "gguf"
        for t in weights.tensors.values():
            dtypes[t.tensor_type.name] += int(t.n_elements)
        files = [path]
    n_params = sum(dtypes.values())
    # A mixture of experts' parameters one token uses: all but the experts it is not routed to.
    active = n_params - (config.n_params - config.n_active_params)
    return {"path": path, "format": fmt, "config": dataclasses.asdict(config), "n_params": n_params,
            "n_active_params": active, "dtypes": dict(dtypes), "size_bytes": sum(os.path.getsize(f) for f in files)}
