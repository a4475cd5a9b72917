"""GGUF files (llama.cpp's format) in: metadata, config, dequantized weights, tokenizer.

Architectures (general.architecture): llama (with llama.expert_count: Mixtral), qwen2, qwen3, qwen2moe,
qwen3moe, gemma2, gemma3; the names are those llama.cpp's convert_hf_to_gguf.py writes. Its
conventions, undone on import:

- For llama (Mixtral too) the converter stores W_q and W_k with the rows of each head permuted for
  its interleaved RoPE; shardlm uses the half-split (HF) RoPE, so `_unpermute` undoes that. The
  Qwen and Gemma architectures run llama.cpp's half-split ("NEOX") RoPE and are stored unpermuted.
- Gemma's RMSNorm multiplies by (1 + w) and HF stores w; the converter stores 1 + w (every
  "*norm.weight" tensor, the q/k norms included), so 1 is subtracted again for models/gemma.py.
- Experts are stacked per layer: blk.N.ffn_{gate,up}_exps [E, F, D] and ffn_down_exps [E, D, F] in
  numpy order, the router blk.N.ffn_gate_inp [E, D]; older Mixtral files hold one tensor per expert,
  blk.N.ffn_gate.E.weight. Qwen2-MoE's shared expert: ffn_{gate,up,down}_shexp and its gate
  ffn_gate_inp_shexp, [1, D] as HF's (today's converter) or [D] (older ones squeezed it).
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

MAGIC = b"GGUF"


class CheckpointError(ValueError):
    """A model file or folder that cannot be read; the message names the file and what is wrong."""


# GGUF value types: struct formats of the scalars; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # GGUF's order: the fastest-varying dimension first
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray  # a view of the file: float arrays in numpy order, quantized blocks as uint8 rows

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


class _Header:
    """The metadata and tensor directory of a GGUF file (versions 2 and 3), parsed with struct:
    gguf's own reader builds a numpy view per element of the tokenizer's arrays (seconds for a
    50k-token vocabulary). Tensor data stays in a memory map."""

    def __init__(self, path: str):
        self.buf = np.memmap(path, np.uint8, mode="r")
        self.mem, self.at = memoryview(self.buf), 0
        magic, version = self._unpack("4sI")
        if magic != MAGIC:
            raise ValueError("no GGUF magic bytes")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (versions 2 and 3 are read)")
        n_tensors, n_kv = self._unpack("QQ")
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("I")[0])
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("I")
            dims = self._unpack(f"{n_dims}Q")
            ggml_type, offset = self._unpack("IQ")
            infos.append((name, dims, ggml_type, offset))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self.at // align) * align
        self.tensors = [self._tensor(name, dims, t, data_start + offset) for name, dims, t, offset in infos]

    def _unpack(self, fmt: str):
        fmt = "<" + fmt
        values = struct.unpack_from(fmt, self.mem, self.at)
        self.at += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = self._unpack("Q")
        if self.at + n > len(self.mem):
            raise ValueError("a string runs past the end of the file")
        text = bytes(self.mem[self.at:self.at + n]).decode("utf-8", errors="replace")
        self.at += n
        return text

    def _value(self, kind: int):
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])[0]
        if kind == _STRING:
            return self._string()
        if kind != _ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        item, n = self._unpack("IQ")
        if item in _SCALARS and item != 7:  # numbers in one read
            dtype = np.dtype("<" + _SCALARS[item])
            values = np.frombuffer(self.mem, dtype, n, self.at).tolist()
            self.at += n * dtype.itemsize
            return values
        if item == _STRING:  # a vocabulary: ~100k strings, in one tight loop
            return self._strings(n)
        return [self._value(item) for _ in range(n)]

    def _strings(self, n: int) -> list[str]:
        mem, at, end, out = self.mem, self.at, len(self.mem), []
        length = struct.Struct("<Q").unpack_from
        for _ in range(n):
            (size,) = length(mem, at)
            at += 8
            if at + size > end:
                raise ValueError("a string runs past the end of the file")
            out.append(str(mem[at:at + size], "utf-8", "replace"))
            at += size
        self.at = at
        return out

    def _tensor(self, name, dims, ggml_type, start) -> Tensor:
        import gguf

        kind = gguf.GGMLQuantizationType(ggml_type)
        shape = tuple(int(d) for d in reversed(dims))  # numpy order
        dtype = {"F32": np.float32, "F16": np.float16, "F64": np.float64}.get(kind.name)
        if dtype is not None:  # as gguf's reader: these as typed arrays, every other type as bytes
            data = self.buf[start:start + int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, kind)
            data = self.buf[start:start + int(np.prod(byte_shape))].reshape(byte_shape)
        return Tensor(name, tuple(int(d) for d in dims), kind, data)


def _header(path: str) -> _Header:
    if not os.path.exists(path):
        raise CheckpointError(f"model path does not exist: {path}")
    if not os.path.isfile(path):
        raise CheckpointError(f"not a GGUF file (it is a directory): {path}")
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise CheckpointError(f"not a GGUF file (no GGUF magic bytes): {path}")
    stat = os.stat(path)
    try:
        return _parsed_header(path, stat.st_size, stat.st_mtime_ns)
    except Exception as e:  # truncated or corrupt: struct, numpy and gguf raise assorted errors
        raise CheckpointError(f"cannot read GGUF file {path} (truncated or corrupt?): {e}") from None


@functools.lru_cache(maxsize=1)
def _parsed_header(path: str, size: int, mtime_ns: int) -> _Header:
    """One parse for a loader's read_config then load of the same file (0.3 s for the embedded
    model's 49k-token vocabulary); keyed by size and mtime so a rewritten file is read again."""
    return _Header(path)


def read_metadata(path: str) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as plain Python values (str, int, float, bool, list)."""
    return _header(path).metadata


# The legacy block types, dequantized in one vectorized pass per tensor (gguf's numpy code takes ~2x
# as long, in row groups): bytes per block of 32 values, and the block's layout
# (f16 scale d, an f16 minimum m for Q4_1, then 32 int8 or 16 bytes of 4-bit values: element i in
# the low nibble of byte i, element 16 + i in its high nibble).
_BLOCKS = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def _dequantize_blocks(data: np.ndarray, kind: str) -> np.ndarray:
    """float32 values [n_blocks * 32] of a Q8_0, Q4_0 or Q4_1 tensor's bytes."""
    b = np.asarray(data).view(np.uint8).reshape(-1, _BLOCKS[kind])
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)  # [n, 1]
    out = np.empty((b.shape[0], 32), np.float32)
    if kind == "Q8_0":
        out[:] = b[:, 2:].view(np.int8)
        out *= d
        return out.reshape(-1)
    qs = b[:, 4:] if kind == "Q4_1" else b[:, 2:]
    np.bitwise_and(qs, 0xF, out=out[:, :16], casting="unsafe")
    np.right_shift(qs, 4, out=out[:, 16:], casting="unsafe")
    if kind == "Q4_0":
        out -= 8
    out *= d
    if kind == "Q4_1":
        out += b[:, 2:4].copy().view(np.float16).astype(np.float32)
    return out.reshape(-1)


def dequantize(data: np.ndarray, tensor_type) -> np.ndarray:
    """A tensor's data as float32 in numpy order (gguf's own dequantizer for the types not above)."""
    import gguf

    if tensor_type.name in _BLOCKS:
        shape = gguf.quants.quant_shape_from_byte_shape(data.shape, tensor_type)
        return _dequantize_blocks(data, tensor_type.name).reshape(shape)
    return gguf.quants.dequantize(data, tensor_type)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's permutation of the rows [n_heads * head_dim, D] of W_q / W_k."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


# The architectures whose W_q / W_k rows llama.cpp's convert_hf_to_gguf.py permutes (LlamaModel.permute).
PERMUTED_ARCHITECTURES = ("llama",)
# The architectures whose norm weights the converter stores as 1 + w (GemmaModel and its successors).
PLUS_ONE_NORM_ARCHITECTURES = ("gemma2", "gemma3")


class GGUFWeights:
    """Lazy access to the tensors of a GGUF file, dequantized to float32 one tensor at a time."""

    def __init__(self, path: str):
        self.path = path
        header = _header(path)
        self.tensors = {t.name: t for t in header.tensors}
        self.metadata = header.metadata

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 in GGUF's row-major order ([out, in] for projections)."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        t = self.tensors[name]
        try:
            w = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot dequantize tensor {name!r} ({t.tensor_type.name}): {e}") from None
        expected = tuple(int(d) for d in reversed(t.shape))
        if tuple(w.shape) != expected:
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {w.shape}, expected {expected}")
        w = np.asarray(w, dtype=np.float32)
        arch = self.metadata.get("general.architecture", "llama")
        if arch in PLUS_ONE_NORM_ARCHITECTURES and name.endswith("norm.weight"):
            return w - np.float32(1.0)  # models/gemma.py applies 1 + w, as HF
        if arch not in PERMUTED_ARCHITECTURES:
            return w
        if name.endswith("attn_q.weight"):
            w = _unpermute(w, int(self.metadata[f"{arch}.attention.head_count"]))
        elif name.endswith("attn_k.weight"):
            meta = self.metadata
            w = _unpermute(w, int(meta.get(f"{arch}.attention.head_count_kv", meta[f"{arch}.attention.head_count"])))
        return w


def _experts(weights: GGUFWeights, blk: str, kind: str, n_experts: int) -> np.ndarray:
    """The stacked expert tensor blk.N.ffn_{kind}_exps in our [E, in, out] (GGUF's numpy order is
    [E, out, in]), or the per-expert tensors blk.N.ffn_{kind}.E.weight of older Mixtral files."""
    stacked = f"{blk}ffn_{kind}_exps.weight"
    if stacked in weights.tensors or f"{blk}ffn_{kind}.0.weight" not in weights.tensors:
        return weights.get(stacked).transpose(0, 2, 1)
    return np.stack([weights.get(f"{blk}ffn_{kind}.{e}.weight").T for e in range(n_experts)])


def param_source(weights: GGUFWeights, config) -> Callable[[tuple], np.ndarray]:
    """Maps a model parameter path (as in models/llama.py, gemma.py, moe.py) to its array in the model's layout."""

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
        if rest == "mlp_norm/scale":  # Gemma: pre_feedforward_layernorm (llama.cpp's ffn_norm in both)
            return weights.get(blk + "ffn_norm.weight")
        if rest == "post_attn_norm/scale":  # Gemma's norms on the attention and MLP outputs
            return weights.get(blk + "post_attention_norm.weight")
        if rest == "post_mlp_norm/scale":
            return weights.get(blk + "post_ffw_norm.weight")
        if config.is_moe_layer(i) and rest.startswith("mlp/"):
            E = config.n_experts
            if rest == "mlp/router":  # [E, D] -> [D, E]
                return weights.get(blk + "ffn_gate_inp.weight").T
            if rest in ("mlp/gate", "mlp/up", "mlp/down"):  # [E, D, F] (gate, up), [E, F, D] (down)
                return _experts(weights, blk, rest[4:], E)
            if rest == "mlp/shared_gate":  # Qwen2-MoE: [1, D] or [D] -> [D, 1]
                return weights.get(blk + "ffn_gate_inp_shexp.weight").reshape(D, 1)
            if rest in ("mlp/shared/gate", "mlp/shared/up", "mlp/shared/down"):
                return weights.get(blk + f"ffn_{rest[11:]}_shexp.weight").T
        if rest == "attn/q":
            return weights.get(blk + "attn_q.weight").T.reshape(D, N, H)
        if rest == "attn/k":
            return weights.get(blk + "attn_k.weight").T.reshape(D, K, H)
        if rest == "attn/v":
            return weights.get(blk + "attn_v.weight").T.reshape(D, K, H)
        if rest == "attn/o":
            return weights.get(blk + "attn_output.weight").T.reshape(N, H, D)
        if rest in ("attn/q_bias", "attn/k_bias", "attn/v_bias"):  # qwen2: [heads * H] -> [heads, H]
            return weights.get(blk + f"attn_{rest[5]}.bias").reshape(-1, H)
        if rest in ("attn/q_norm/scale", "attn/k_norm/scale"):  # qwen3: [H], shared by all heads
            return weights.get(blk + f"attn_{rest[5]}_norm.weight")
        if rest == "mlp/gate":
            return weights.get(blk + "ffn_gate.weight").T
        if rest == "mlp/up":
            return weights.get(blk + "ffn_up.weight").T
        if rest == "mlp/down":
            return weights.get(blk + "ffn_down.weight").T
        raise CheckpointError(f"{weights.path}: no GGUF tensor for parameter {name!r}")

    return source
