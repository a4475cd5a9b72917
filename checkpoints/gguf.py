"""GGUF files (llama.cpp's format) in: metadata, config, dequantized weights, tokenizer.

llama.cpp stores W_q and W_k with the rows of each head permuted for its interleaved RoPE; shardlm
uses the half-split (HF) RoPE, so `_unpermute` undoes that on import.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

MAGIC = b"GGUF"


class CheckpointError(ValueError):
    """A model file or folder that cannot be read; the message names the file and what is wrong."""


def _reader(path: str):
    import gguf

    if not os.path.exists(path):
        raise CheckpointError(f"model path does not exist: {path}")
    if not os.path.isfile(path):
        raise CheckpointError(f"not a GGUF file (it is a directory): {path}")
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise CheckpointError(f"not a GGUF file (no GGUF magic bytes): {path}")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # gguf raises assorted errors on truncated or corrupt files
        raise CheckpointError(f"cannot read GGUF file {path} (truncated or corrupt?): {e}") from None


def read_metadata(path: str) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as plain Python values (str, int, float, bool, list)."""
    return _metadata(_reader(path))


def _metadata(reader) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's permutation of the rows [n_heads * head_dim, D] of W_q / W_k."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


class GGUFWeights:
    """Lazy access to the tensors of a GGUF file, dequantized to float32 one tensor at a time."""

    def __init__(self, path: str):
        self.path = path
        self.reader = _reader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.metadata = _metadata(self.reader)  # parsing a GGUF's fields takes seconds: once

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 in GGUF's row-major order ([out, in] for projections)."""
        import gguf

        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        t = self.tensors[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot dequantize tensor {name!r} ({t.tensor_type.name}): {e}") from None
        expected = tuple(int(d) for d in reversed(t.shape))
        if tuple(w.shape) != expected:
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {w.shape}, expected {expected}")
        w = np.asarray(w, dtype=np.float32)
        arch = self.metadata.get("general.architecture", "llama")
        if name.endswith("attn_q.weight"):
            w = _unpermute(w, int(self.metadata[f"{arch}.attention.head_count"]))
        elif name.endswith("attn_k.weight"):
            meta = self.metadata
            w = _unpermute(w, int(meta.get(f"{arch}.attention.head_count_kv", meta[f"{arch}.attention.head_count"])))
        return w


def param_source(weights: GGUFWeights, config) -> Callable[[tuple], np.ndarray]:
    """Maps a model parameter path (as in models/llama.py) to its array in the model's layout."""

    def source(path: tuple) -> np.ndarray:
        name = "/".join(str(p) for p in path)
        if name == "embed":
            return weights.get("token_embd.weight")  # [V, D]
        if name == "final_norm/scale":
            return weights.get("output_norm.weight")
        if name == "lm_head":
            return weights.get("output.weight").T  # [D, V]
        parts = name.split("/")
        assert parts[0] == "layers", name
        i, rest = int(parts[1]), "/".join(parts[2:])
        blk = f"blk.{i}."
        D, N, K, H = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
        if rest == "attn_norm/scale":
            return weights.get(blk + "attn_norm.weight")
        if rest == "mlp_norm/scale":
            return weights.get(blk + "ffn_norm.weight")
        if rest == "attn/q":
            return weights.get(blk + "attn_q.weight").T.reshape(D, N, H)
        if rest == "attn/k":
            return weights.get(blk + "attn_k.weight").T.reshape(D, K, H)
        if rest == "attn/v":
            return weights.get(blk + "attn_v.weight").T.reshape(D, K, H)
        if rest == "attn/o":
            return weights.get(blk + "attn_output.weight").T.reshape(N, H, D)
        if rest == "mlp/gate":
            return weights.get(blk + "ffn_gate.weight").T
        if rest == "mlp/up":
            return weights.get(blk + "ffn_up.weight").T
        if rest == "mlp/down":
            return weights.get(blk + "ffn_down.weight").T
        raise CheckpointError(f"{weights.path}: no GGUF tensor for parameter {name!r}")

    return source
