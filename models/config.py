"""Model configuration: a frozen, hashable dataclass with named presets and converters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 ("llama3") or linear RoPE frequency scaling; `kind="none"` leaves RoPE as is."""

    kind: str = "none"  # none | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.kind not in ("none", "linear", "llama3"):
            raise ValueError(f"unknown RoPE scaling {self.kind!r}; allowed: none, linear, llama3")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int  # V
    d_model: int  # D
    n_layers: int  # L
    n_heads: int  # N
    n_kv_heads: int  # K
    head_dim: int  # H
    d_ff: int  # F
    max_seq_len: int = 8192
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    family: str = "llama"
    # PaLM-style shapes (for planning; not runnable yet): attention and MLP read the same input.
    parallel_block: bool = False

    def __post_init__(self):
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len"):
            if getattr(self, field) < 1:
                raise ValueError(f"ModelConfig.{field} must be >= 1, got {getattr(self, field)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def n_params(self) -> int:
        D, F, N, K, H, V = self.d_model, self.d_ff, self.n_heads, self.n_kv_heads, self.head_dim, self.vocab_size
        per_layer = D * (N + 2 * K) * H + N * H * D + 3 * D * F + 2 * D
        if self.qkv_bias:
            per_layer += (N + 2 * K) * H
        return self.n_layers * per_layer + V * D * (1 if self.tie_embeddings else 2) + D

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ----- converters -----

    @classmethod
    def from_hf_config(cls, hf: dict) -> "ModelConfig":
        """From a Hugging Face config.json (Llama 2/3, Mistral, Qwen2, SmolLM2)."""
        model_type = hf.get("model_type", "")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"unsupported architecture {model_type!r} ({hf.get('architectures')}); "
                             "supported model_type: llama, mistral, qwen2")
        n_heads = hf["num_attention_heads"]
        rs = hf.get("rope_scaling") or {}
        kind = rs.get("rope_type", rs.get("type", "none")) if rs else "none"
        if kind == "default":
            kind = "none"
        scaling = RopeScaling(
            kind=kind,
            factor=float(rs.get("factor", 1.0)),
            low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
            original_max_position=int(rs.get("original_max_position_embeddings", 8192)),
        )
        return cls(
            name=hf.get("_name_or_path") or model_type,
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            d_ff=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 8192),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: dict, tensor_names=()) -> "ModelConfig":
        """From GGUF key/values (see checkpoints.gguf.read_metadata); `tensor_names` tells tying."""
        arch = meta.get("general.architecture")
        if arch not in ("llama", "qwen2"):
            raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: llama, qwen2")

        def get(key, default=None):
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ValueError(f"GGUF metadata lacks {arch}.{key}")
            return value

        n_heads = int(get("attention.head_count"))
        d_model = int(get("embedding_length"))
        vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
        kind = meta.get(f"{arch}.rope.scaling.type", "none")
        scaling = RopeScaling(kind="linear", factor=float(get("rope.scaling.factor"))) if kind == "linear" else RopeScaling()
        return cls(
            name=meta.get("general.name", arch),
            vocab_size=int(vocab),
            d_model=d_model,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=int(meta.get(f"{arch}.attention.key_length", d_model // n_heads)),
            d_ff=int(get("feed_forward_length")),
            max_seq_len=int(get("context_length", 8192)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings="output.weight" not in set(tensor_names),
            qkv_bias=arch == "qwen2",
        )


_LLAMA3_SCALING = RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position=8192)

PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        ModelConfig("smollm2-135m", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                    head_dim=64, d_ff=1536, max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True),
        ModelConfig("tinyllama-1.1b", vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                    head_dim=64, d_ff=5632, max_seq_len=2048),
        ModelConfig("llama3-8b", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                    head_dim=128, d_ff=14336, max_seq_len=131072, rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING),
        ModelConfig("llama3-70b", vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                    head_dim=128, d_ff=28672, max_seq_len=131072, rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING),
        # PaLM (Chowdhery et al. 2022; Pope et al. 2022 Table D.1), for planning: multiquery,
        # SwiGLU, parallel attention/MLP blocks, shared embeddings. 540B's 48 heads are padded to 64
        # by the planner where a layout splits heads 64 ways (Pope et al. sec. 4).
        ModelConfig("palm-540b", vocab_size=256000, d_model=18432, n_layers=118, n_heads=48, n_kv_heads=1,
                    head_dim=256, d_ff=73728, max_seq_len=2048, tie_embeddings=True, parallel_block=True),
        ModelConfig("palm-62b", vocab_size=256000, d_model=8192, n_layers=64, n_heads=32, n_kv_heads=1,
                    head_dim=256, d_ff=32768, max_seq_len=2048, tie_embeddings=True, parallel_block=True),
        ModelConfig("palm-8b", vocab_size=256000, d_model=4096, n_layers=32, n_heads=16, n_kv_heads=1,
                    head_dim=256, d_ff=16384, max_seq_len=2048, tie_embeddings=True, parallel_block=True),
    ]
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
