"""Hugging Face model folders in: config.json, *.safetensors (sharded or not), tokenizer.

Each parameter is read per device slice: `source(path, index)` maps the slice `index` of one of our
parameters to the rows and columns of the HF tensor it comes from and reads only those rows (one
positioned read into a fresh buffer; the safetensors header gives the offsets), so no process ever
holds a whole-model copy. Plain reads rather than safetensors' memory map: mapped file pages count in
the process's RSS until it exits (benchmarks/load_memory.py measured 2x the checkpoint with the map).

HF stores Linear weights as [out, in]; ours are [in, out] with heads split out (q [D,N,H],
o [N,H,D]), so the slice of ours is read transposed. HF's q/k rows are not permuted (its
rotate_half RoPE is the convention of models/llama.py).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable

import ml_dtypes
import numpy as np

from shardlm.checkpoints.gguf import CheckpointError
from shardlm.models.config import GEMMA_FAMILIES, ModelConfig

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


def is_hf_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, CONFIG_FILE)
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    try:
        return ModelConfig.from_hf_config(hf)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def check_head_dim(weights: "HFWeights", config: ModelConfig) -> None:
    """The config's head_dim (given, or hidden_size / num_attention_heads) against layer 0's q_proj,
    so that a wrong head_dim is named as such rather than as a tensor of the wrong shape."""
    name = "model.layers.0.self_attn.q_proj.weight"
    shape = weights.shape_of.get(name)
    if shape is not None and len(shape) == 2 and shape[0] != config.n_heads * config.head_dim:
        rows = config.n_heads * config.head_dim
        raise CheckpointError(f"{os.path.join(weights.folder, CONFIG_FILE)}: head_dim={config.head_dim} with "
                              f"num_attention_heads={config.n_heads} needs {name} of {rows} rows, but its "
                              f"shape is {list(shape)}")


def _read_header(path: str) -> tuple[dict, int]:
    """The checked JSON header of a safetensors file and the offset where its data starts."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if not (isinstance(info, dict) and {"shape", "dtype", "data_offsets"} <= set(info)):
                raise ValueError(f"entry {name!r} lacks shape, dtype or data_offsets")
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name!r} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            nbytes = int(np.prod(info["shape"])) * np.dtype(SAFETENSORS_DTYPES[info["dtype"]]).itemsize
            if end - begin != nbytes or 8 + n + end > size:
                raise ValueError(f"tensor {name!r}: data_offsets {info['data_offsets']} do not fit its shape "
                                 f"{info['shape']} or the file size {size} (truncated?)")
        return header, 8 + n
    except (OSError, struct.error, ValueError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt safetensors file {path}: {e}") from None


class HFWeights:
    """The tensors of a HF folder: name -> file, shapes from the headers, slices read lazily."""

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, INDEX_FILE)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"cannot read {index}: {e}") from None
            files = sorted(set(weight_map.values()))
            for name in files:
                if not os.path.isfile(os.path.join(folder, name)):
                    raise CheckpointError(f"{index} lists {name!r}, which is missing from {folder}")
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors files in {folder}")
        self.file_of: dict[str, str] = {}  # tensor name -> file path
        self.shape_of: dict[str, tuple[int, ...]] = {}
        self.dtype_of: dict[str, str] = {}
        self._offset_of: dict[str, int] = {}  # tensor name -> byte offset of its data in its file
        for name in files:
            path = os.path.join(folder, name)
            header, data_start = _read_header(path)
            for tensor, info in header.items():
                if tensor != "__metadata__":
                    self.file_of[tensor], self.shape_of[tensor] = path, tuple(info["shape"])
                    self.dtype_of[tensor] = info["dtype"]
                    self._offset_of[tensor] = data_start + info["data_offsets"][0]

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self.file_of:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is missing from the safetensors files")
        if self.shape_of[name] != tuple(shape):
            raise CheckpointError(f"{self.file_of[name]}: tensor {name!r} has shape {list(self.shape_of[name])}, "
                                  f"expected {list(shape)}")

    def read(self, name: str, index: tuple) -> np.ndarray:
        """`tensor[index]` (a tuple of slices): reads the rows of the first dimension's slice (rows are
        contiguous in the file), then keeps the slice of the other dimensions."""
        path, shape = self.file_of[name], self.shape_of[name]
        dtype = np.dtype(SAFETENSORS_DTYPES[self.dtype_of[name]])
        spans = [_span(s, n) for s, n in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape)]
        (r0, r1), row = spans[0] if shape else (0, 1), int(np.prod(shape[1:]))
        count = (r1 - r0) * row
        try:
            with open(path, "rb") as f:
                data = np.fromfile(f, dtype, count=count, offset=self._offset_of[name] + r0 * row * dtype.itemsize)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r}: {e}") from None
        if data.size != count:
            raise CheckpointError(f"{path}: tensor {name!r} is truncated")
        if not shape:
            return data.reshape(())
        rest = tuple(slice(a, b) for a, b in spans[1:])
        return np.ascontiguousarray(data.reshape((r1 - r0,) + shape[1:])[(slice(None),) + rest])


def _span(s: slice, size: int) -> tuple[int, int]:
    start, stop, step = s.indices(size)
    assert step == 1, s
    return start, stop


def param_slice_source(weights: HFWeights, config: ModelConfig) -> Callable[[tuple, tuple], np.ndarray]:
    """(parameter path as in models/llama.py, index of a device's slice) -> that slice, from HF tensors.

    Every tensor the model needs is checked (present, right shape) before anything is read.
    """
    D, N, K, H, F, V = (config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.d_ff,
                        config.vocab_size)

    def linear_in(name, heads):  # HF [heads*H, D] -> ours [D, heads, H]
        def read(idx):
            (d0, d1), (n0, n1), (h0, h1) = _span(idx[0], D), _span(idx[1], heads), _span(idx[2], H)
            rows = weights.read(name, (slice(n0 * H, n1 * H), slice(d0, d1)))  # [n*H, d]
            return rows.reshape(n1 - n0, H, d1 - d0)[:, h0:h1].transpose(2, 0, 1)
        return read, (heads * H, D)

    def linear_out(name):  # HF o_proj [D, N*H] -> ours [N, H, D]
        def read(idx):
            (n0, n1), (h0, h1), (d0, d1) = _span(idx[0], N), _span(idx[1], H), _span(idx[2], D)
            cols = weights.read(name, (slice(d0, d1), slice(n0 * H, n1 * H)))  # [d, n*H]
            return cols.reshape(d1 - d0, n1 - n0, H)[:, :, h0:h1].transpose(1, 2, 0)
        return read, (D, N * H)

    def transposed(name, shape):  # HF [out, in] -> ours [in, out]
        return (lambda idx: weights.read(name, (idx[1], idx[0])).T), shape

    def bias(name, heads):  # HF [heads*H] -> ours [heads, H]
        def read(idx):
            (n0, n1), (h0, h1) = _span(idx[0], heads), _span(idx[1], H)
            return weights.read(name, (slice(n0 * H, n1 * H),)).reshape(n1 - n0, H)[:, h0:h1]
        return read, (heads * H,)

    def direct(name, shape):
        return (lambda idx: weights.read(name, idx)), shape

    E, F_e = config.n_experts, config.expert_d_ff
    expert_tensors: list[tuple[str, tuple]] = []  # every per-expert tensor, checked with the rest

    def per_expert(names, shape):  # HF one [out, in] tensor per expert -> ours [E, in, out]
        expert_tensors.extend((n, shape) for n in names)
        def read(idx):
            return np.stack([weights.read(names[e], (idx[2], idx[1])).T for e in range(*_span(idx[0], E))])
        return read, shape

    def fused(name, shape, out, offset=0):  # HF [E, rows, in], ours [E, in, out] = rows offset..offset+out
        def read(idx):
            o0, o1 = _span(idx[2], out)
            return weights.read(name, (idx[0], slice(offset + o0, offset + o1), idx[1])).transpose(0, 2, 1)
        return read, shape

    def add_experts(p, hf):
        """A mixture-of-experts layer: the router and E experts, from the per-expert tensors checkpoints
        hold (Mixtral's block_sparse_moe.experts.N.w1/w3/w2, Qwen2/3-MoE's mlp.experts.N.*_proj, as
        transformers 5's save_pretrained writes them) or the fused [E, ...] tensors of its modules."""
        if hf + "mlp.experts.gate_up_proj" in weights.file_of:
            add(p + "mlp/router", hf + "mlp.gate.weight", transposed, (E, D))
            add(p + "mlp/gate", hf + "mlp.experts.gate_up_proj", fused, (E, 2 * F_e, D), F_e)
            add(p + "mlp/up", hf + "mlp.experts.gate_up_proj", fused, (E, 2 * F_e, D), F_e, F_e)  # gate, then up
            add(p + "mlp/down", hf + "mlp.experts.down_proj", fused, (E, D, F_e), D)
            return
        mixtral = hf + "block_sparse_moe.gate.weight" in weights.file_of
        moe, (gate, up, down) = ("block_sparse_moe.", ("w1", "w3", "w2")) if mixtral else \
            ("mlp.", ("gate_proj", "up_proj", "down_proj"))
        names = lambda w: [f"{hf}{moe}experts.{e}.{w}.weight" for e in range(E)]  # noqa: E731
        add(p + "mlp/router", hf + moe + "gate.weight", transposed, (E, D))
        add(p + "mlp/gate", names(gate), per_expert, (F_e, D))
        add(p + "mlp/up", names(up), per_expert, (F_e, D))
        add(p + "mlp/down", names(down), per_expert, (D, F_e))

    readers: dict[str, tuple[Callable, tuple, str]] = {}

    def add(path, name, maker, *args):
        read, hf_shape = maker(name, *args)
        readers[path] = (read, hf_shape, name)

    # A Gemma3ForConditionalGeneration's language model: save_pretrained writes language_model.model.*
    # (and language_model.lm_head), its modules are named model.language_model.*; the vision tower is not read.
    model, lm_head = "model.", "lm_head.weight"
    if "model.language_model.embed_tokens.weight" in weights.file_of:
        model = "model.language_model."
    elif "language_model.model.embed_tokens.weight" in weights.file_of:
        model, lm_head = "language_model.model.", "language_model.lm_head.weight"
    add("embed", model + "embed_tokens.weight", direct, (V, D))
    add("final_norm/scale", model + "norm.weight", direct, (D,))
    if not config.tie_embeddings:
        add("lm_head", lm_head, transposed, (V, D))
    for i in range(config.n_layers):
        p, hf = f"layers/{i}/", f"{model}layers.{i}."
        add(p + "attn_norm/scale", hf + "input_layernorm.weight", direct, (D,))
        if config.family in GEMMA_FAMILIES:  # four norms (w, applied as 1 + w); post_attention_layernorm
            # is on attention's output here, not before the MLP as in Llama
            add(p + "post_attn_norm/scale", hf + "post_attention_layernorm.weight", direct, (D,))
            add(p + "mlp_norm/scale", hf + "pre_feedforward_layernorm.weight", direct, (D,))
            add(p + "post_mlp_norm/scale", hf + "post_feedforward_layernorm.weight", direct, (D,))
        else:
            add(p + "mlp_norm/scale", hf + "post_attention_layernorm.weight", direct, (D,))
        add(p + "attn/q", hf + "self_attn.q_proj.weight", linear_in, N)
        add(p + "attn/k", hf + "self_attn.k_proj.weight", linear_in, K)
        add(p + "attn/v", hf + "self_attn.v_proj.weight", linear_in, K)
        add(p + "attn/o", hf + "self_attn.o_proj.weight", linear_out)
        if config.qkv_bias:
            add(p + "attn/q_bias", hf + "self_attn.q_proj.bias", bias, N)
            add(p + "attn/k_bias", hf + "self_attn.k_proj.bias", bias, K)
            add(p + "attn/v_bias", hf + "self_attn.v_proj.bias", bias, K)
        if config.qk_norm:  # Qwen3, Gemma 3: one [H] scale each, shared by all heads
            add(p + "attn/q_norm/scale", hf + "self_attn.q_norm.weight", direct, (H,))
            add(p + "attn/k_norm/scale", hf + "self_attn.k_norm.weight", direct, (H,))
        if config.is_moe_layer(i):
            add_experts(p, hf)
            if config.shared_expert_d_ff:  # Qwen2-MoE's shared expert and its gate [1, D]
                F_s = config.shared_expert_d_ff
                add(p + "mlp/shared_gate", hf + "mlp.shared_expert_gate.weight", transposed, (1, D))
                add(p + "mlp/shared/gate", hf + "mlp.shared_expert.gate_proj.weight", transposed, (F_s, D))
                add(p + "mlp/shared/up", hf + "mlp.shared_expert.up_proj.weight", transposed, (F_s, D))
                add(p + "mlp/shared/down", hf + "mlp.shared_expert.down_proj.weight", transposed, (D, F_s))
            continue
        add(p + "mlp/gate", hf + "mlp.gate_proj.weight", transposed, (F, D))
        add(p + "mlp/up", hf + "mlp.up_proj.weight", transposed, (F, D))
        add(p + "mlp/down", hf + "mlp.down_proj.weight", transposed, (D, F))
    check_head_dim(weights, config)
    for _, hf_shape, name in readers.values():
        if isinstance(name, str):  # per-expert lists are in expert_tensors
            weights.check(name, hf_shape)
    for name, hf_shape in expert_tensors:
        weights.check(name, hf_shape)

    def source(path: tuple, index: tuple) -> np.ndarray:
        key = "/".join(str(p) for p in path)
        if key not in readers:
            raise CheckpointError(f"{weights.folder}: no HF tensor for parameter {key!r}")
        return readers[key][0](index)

    return source


def load_tokenizer(folder: str):
    """The folder's tokenizer.json (with tokenizer_config.json's chat template), or None; the
    eos_token_id of generation_config.json (one id or a list, e.g. Llama 3's) also stops generation."""
    from shardlm.checkpoints.tokenizer import tokenizer_from_file

    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    tokenizer = tokenizer_from_file(path)
    generation = os.path.join(folder, "generation_config.json")
    if os.path.isfile(generation):
        try:
            with open(generation) as f:
                eos = json.load(f).get("eos_token_id")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"cannot read {generation}: {e}") from None
        eos = [eos] if isinstance(eos, int) else eos or []
        tokenizer.stop_token_ids = list(dict.fromkeys(tokenizer.stop_token_ids + [int(i) for i in eos]))
    return tokenizer
