"""Model configuration: a frozen, hashable dataclass with named presets and converters."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

_HF_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "max_position_embeddings", "head_dim", "num_local_experts", "num_experts",
            "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
            "shared_expert_intermediate_size")
_HF_NUMBERS = ("rms_norm_eps", "rope_theta")


def _check_hf_types(hf: dict) -> None:
    """config.json fields of the wrong JSON type ("vocab_size": "49152") are errors naming the field,
    not a crash or a silent conversion later."""
    for key in _HF_INTS:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{key} must be a non-negative integer, got {json.dumps(value)}")
    for key in _HF_NUMBERS:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{key} must be a number, got {json.dumps(value)}")
    if "tie_word_embeddings" in hf and not isinstance(hf["tie_word_embeddings"], bool):
        raise ValueError(f"tie_word_embeddings must be true or false, got {json.dumps(hf['tie_word_embeddings'])}")


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


ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
GEMMA_FAMILIES = ("gemma2", "gemma3")


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
    qk_norm: bool = False  # Qwen3: an RMSNorm over head_dim on each query and key head, before RoPE
    family: str = "llama"
    # Mixture of experts (family "moe", models/moe.py); 0 experts: a dense model.
    n_experts: int = 0  # E
    experts_per_token: int = 0  # k, the top-k routed to
    expert_d_ff: int = 0  # each expert's F (HF moe_intermediate_size; Mixtral's intermediate_size)
    norm_topk_prob: bool = True  # renormalise the k routing weights to sum to 1 (Mixtral; Qwen3-MoE's flag)
    dense_layers: tuple[int, ...] = ()  # layers with the dense d_ff MLP instead of experts (Qwen3-MoE)
    shared_expert_d_ff: int = 0  # Qwen2-MoE: a SwiGLU every token goes through, gated by sigmoid(x . w)
    # PaLM-style shapes (for planning; not runnable yet): attention and MLP read the same input.
    parallel_block: bool = False
    # Gemma 2 / 3 (families "gemma2", "gemma3", models/gemma.py); the defaults change nothing.
    activation: str = "silu"  # the MLP's gate: silu (SwiGLU), gelu_tanh or gelu (GeGLU, tanh-approximate or exact)
    layer_types: tuple[str, ...] = ()  # per layer "full_attention" | "sliding_attention"; (): all full
    sliding_window: int = 0  # W: a sliding layer's query at q sees keys q - W < j <= q
    rope_local_theta: float = 0.0  # the sliding layers' RoPE base, unscaled (Gemma 3); 0: rope_theta and rope_scaling
    query_pre_attn_scalar: float = 0.0  # attention scores scaled by its -1/2 power; 0: head_dim's
    attn_softcap: float = 0.0  # scores -> cap * tanh(scores / cap) before the mask (Gemma 2); 0: none
    final_softcap: float = 0.0  # logits -> cap * tanh(logits / cap) (Gemma 2); 0: none

    def __post_init__(self):
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len"):
            if getattr(self, field) < 1:
                raise ValueError(f"ModelConfig.{field} must be >= 1, got {getattr(self, field)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))  # hashable when read from JSON
        if self.family == "moe":
            if self.n_experts < 1 or self.expert_d_ff < 1:
                raise ValueError(f"a mixture of experts needs n_experts >= 1 and expert_d_ff >= 1, got "
                                 f"{self.n_experts} and {self.expert_d_ff}")
            if not 1 <= self.experts_per_token <= self.n_experts:
                raise ValueError(f"experts_per_token must be in 1..n_experts={self.n_experts}, got "
                                 f"{self.experts_per_token}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        object.__setattr__(self, "layer_types", tuple(self.layer_types))  # a list from JSON stays hashable
        if self.layer_types and (len(self.layer_types) != self.n_layers
                                 or set(self.layer_types) - {"full_attention", "sliding_attention"}):
            raise ValueError(f"layer_types must name full_attention or sliding_attention for each of the "
                             f"{self.n_layers} layers, got {self.layer_types}")
        if "sliding_attention" in self.layer_types and self.sliding_window < 1:
            raise ValueError(f"sliding_attention layers need sliding_window >= 1, got {self.sliding_window}")
        if any(not 0 <= i < self.n_layers for i in self.dense_layers):
            raise ValueError(f"dense_layers {self.dense_layers} must be layers 0..{self.n_layers - 1}")

    def layer_window(self, layer: int) -> int:
        """The sliding window of `layer`'s attention; 0: it attends to the whole context."""
        sliding = self.layer_types and self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.family == "moe" and layer not in self.dense_layers

    @property
    def n_params(self) -> int:
        """Every parameter (all experts of a mixture of experts)."""
        return self._count_params(self.n_experts)

    @property
    def n_active_params(self) -> int:
        """The parameters one token uses: the router and its experts_per_token experts of each MoE layer."""
        return self._count_params(self.experts_per_token)

    def _count_params(self, experts: int) -> int:
        D, F, N, K, H, V = self.d_model, self.d_ff, self.n_heads, self.n_kv_heads, self.head_dim, self.vocab_size
        per_layer = D * (N + 2 * K) * H + N * H * D + 2 * D
        if self.family in GEMMA_FAMILIES:  # norms after attention and after the MLP too
            per_layer += 2 * D
        if self.qkv_bias:
            per_layer += (N + 2 * K) * H
        if self.qk_norm:
            per_layer += 2 * H
        moe = sum(self.is_moe_layer(i) for i in range(self.n_layers))
        shared = 3 * D * self.shared_expert_d_ff + D if self.shared_expert_d_ff else 0  # and its gate [D, 1]
        mlps = (self.n_layers - moe) * 3 * D * F + moe * (D * self.n_experts + experts * 3 * D * self.expert_d_ff
                                                          + shared)
        return self.n_layers * per_layer + mlps + V * D * (1 if self.tie_embeddings else 2) + D

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ----- converters -----

    @classmethod
    def from_hf_config(cls, hf: dict) -> "ModelConfig":
        """From a Hugging Face config.json (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2, Mixtral,
        Qwen2-MoE, Qwen3-MoE), read as transformers 5 reads
        it: RoPE from `rope_parameters` (what transformers 5 writes) or the legacy top-level `rope_theta` /
        `rope_scaling`. A field that changes the model's math and that shardlm does not implement is a
        ValueError naming the field and its value; fields that do not (dropout, token ids, dtype, ...)
        are ignored."""
        if hf.get("model_type") == "gemma3" and isinstance(hf.get("text_config"), dict):
            hf = _gemma3_text_config(hf)  # Gemma3ForConditionalGeneration: its language model
        model_type = hf.get("model_type", "")
        if model_type not in _HF_DEFAULTS:
            raise ValueError(f"unsupported architecture {model_type!r} ({hf.get('architectures')}); "
                             f"supported model_type: {', '.join(_HF_DEFAULTS)}")
        defaults = _HF_DEFAULTS[model_type]
        _check_hf_types(hf)
        n_heads, d_model = hf["num_attention_heads"], hf["hidden_size"]
        head_dim = hf.get("head_dim", defaults.get("head_dim"))  # Qwen3's default: 128, not hidden / heads
        if not head_dim:
            if d_model % n_heads:
                raise ValueError(f"head_dim is not given and hidden_size={d_model} is not a multiple of "
                                 f"num_attention_heads={n_heads}")
            head_dim = d_model // n_heads
        max_pos = int(hf.get("max_position_embeddings", defaults["max_position_embeddings"]))
        _check_hf_math(hf, model_type)
        if "rope_theta" in defaults:  # the family's base where neither rope_parameters nor the top level has one
            hf = {"rope_theta": defaults["rope_theta"], **hf}
        if model_type in _HF_GEMMA:
            gemma = _hf_gemma_fields(hf, model_type, defaults, max_pos)
            rope_theta, scaling = gemma.pop("rope_theta"), gemma.pop("rope_scaling")
        else:
            gemma = {}
            layer_types = _hf_layer_types(hf, model_type, max_pos)
            rope_theta, scaling = _hf_rope(hf, layer_types, max_pos)
        n_kv_heads = hf["num_key_value_heads"] if "num_key_value_heads" in hf else defaults["num_key_value_heads"]
        return cls(
            name=hf.get("_name_or_path") or model_type,
            vocab_size=hf["vocab_size"],
            d_model=d_model,
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=n_kv_heads or n_heads,
            head_dim=head_dim,
            d_ff=hf["intermediate_size"],
            max_seq_len=max_pos,
            rope_theta=rope_theta,
            rope_scaling=scaling,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", defaults.get("tie_word_embeddings", False))),
            # Qwen2's q/k/v biases are built in; transformers' Mistral and Qwen2 ignore `attention_bias`
            # (Qwen3's is refused in _check_hf_math). Qwen3's q/k norms are built in.
            qkv_bias=model_type == "qwen2" or (model_type == "qwen2_moe" and hf.get("qkv_bias", True) is not False),
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
            **(_hf_moe_fields(hf, model_type, defaults) if model_type in _HF_MOE else {}),
            **gemma,
        )

    @classmethod
    def from_gguf_metadata(cls, meta: dict, tensor_names=()) -> "ModelConfig":
        """From GGUF key/values (see checkpoints.gguf.read_metadata); `tensor_names` tells tying. Read as
        llama.cpp reads them, including the values its loader hard-codes per architecture (Gemma's
        window pattern and attention scale, Qwen-MoE's routing normalisation); a key that changes the
        math and that shardlm does not implement (YaRN, partial rotary, sigmoid routing, ...) is a
        ValueError naming the key and its value."""
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}")

        def get(key, default=None):
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ValueError(f"GGUF metadata lacks {arch}.{key}")
            return value

        n_heads = int(get("attention.head_count"))
        d_model = int(get("embedding_length"))
        n_layers = int(get("block_count"))
        vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
        head_dim = int(meta.get(f"{arch}.attention.key_length", d_model // n_heads))
        max_pos = int(get("context_length", 8192))
        extra = {}
        if arch in _GGUF_GEMMA:
            extra = _gguf_gemma_fields(meta, arch, n_layers, d_model, n_heads, head_dim)
        elif arch in _GGUF_MOE or (arch == "llama" and meta.get("llama.expert_count")):  # Mixtral: llama + experts
            extra = _gguf_moe_fields(meta, arch, int(get("feed_forward_length")))
        scale = (extra.get("query_pre_attn_scalar") or head_dim) ** -0.5
        _check_gguf_math(meta, arch, head_dim, max_pos, set(tensor_names), scale)
        return cls(
            name=meta.get("general.name", arch),
            vocab_size=int(vocab),
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            d_ff=int(get("feed_forward_length")),
            max_seq_len=max_pos,
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=_gguf_rope_scaling(meta, arch),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings="output.weight" not in set(tensor_names),
            qkv_bias=arch in ("qwen2", "qwen2moe"),
            qk_norm=arch in ("qwen3", "qwen3moe", "gemma3"),
            **extra,
        )


# llama.cpp's architectures that shardlm reads: llama (also Mistral, SmolLM2; with llama.expert_count, Mixtral),
# qwen2 (q/k/v biases), qwen3 (q/k norms; blk.N.attn_q_norm.weight, blk.N.attn_k_norm.weight), the mixtures of
# experts qwen2moe and qwen3moe, and Gemma 2 / Gemma 3's text model.
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "gemma2", "gemma3")
_GGUF_MOE = ("qwen2moe", "qwen3moe")
_GGUF_GEMMA = ("gemma2", "gemma3")

# ----- Hugging Face config.json, as transformers 5 reads it -----

# transformers' values for fields a config.json leaves out, where they differ by family.
_HF_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "num_key_value_heads": None},
    "mistral": {"max_position_embeddings": 4096 * 32, "num_key_value_heads": 8, "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "sliding_window": 4096},
    "qwen3": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "sliding_window": 4096, "head_dim": 128},
    # Mixture of experts (family "moe"); Mixtral's RoPE base defaults to 1e6 (its default_theta).
    "mixtral": {"max_position_embeddings": 4096 * 32, "num_key_value_heads": 8, "sliding_window": None,
                "rope_theta": 1e6, "num_experts": 8, "num_experts_per_tok": 2},
    "qwen3_moe": {"max_position_embeddings": 32768, "num_key_value_heads": 4, "sliding_window": 4096,
                  "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                  "norm_topk_prob": False, "decoder_sparse_step": 1},
    "qwen2_moe": {"max_position_embeddings": 32768, "num_key_value_heads": 16, "sliding_window": 4096,
                  "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                  "norm_topk_prob": False, "decoder_sparse_step": 1, "shared_expert_intermediate_size": 5632},
}
_HF_MOE = ("mixtral", "qwen3_moe", "qwen2_moe")
# Gemma 2 and Gemma 3's text model: transformers' Gemma2Config / Gemma3TextConfig defaults.
_HF_DEFAULTS["gemma2"] = {
    "max_position_embeddings": 8192, "num_key_value_heads": 4, "head_dim": 256, "tie_word_embeddings": True,
    "rope_theta": 10000.0, "sliding_window": 4096, "window_every": 2, "query_pre_attn_scalar": 256,
    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
_HF_DEFAULTS["gemma3_text"] = {
    "max_position_embeddings": 131072, "num_key_value_heads": 4, "head_dim": 256, "tie_word_embeddings": True,
    "rope_theta": 1e6, "rope_local_base_freq": 10000.0, "sliding_window": 4096, "window_every": 6,
    "query_pre_attn_scalar": 256, "attn_logit_softcapping": None, "final_logit_softcapping": None}
_HF_GEMMA = ("gemma2", "gemma3_text")
# transformers' ACT2FN names of the two GELUs
_HF_GELU = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}
_HF_ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor")


def _refuse(field: str, value, why: str):
    raise ValueError(f"{field}={value!r} is not supported: {why}")


def _check_hf_math(hf: dict, model_type: str) -> None:
    """Refuse the fields (other than RoPE and attention windows) that change the math and that
    shardlm does not implement."""
    act = hf.get("hidden_act", "silu")
    if model_type not in _HF_GEMMA and act not in ("silu", "swish"):  # Gemma's is hidden_activation  # transformers' ACT2FN: both are x * sigmoid(x)
        _refuse("hidden_act", act, "shardlm's MLP is SwiGLU (silu)")
    if model_type == "llama":  # transformers' Mistral and Qwen2 hard-code their biases and ignore these
        for field in ("attention_bias", "mlp_bias"):  # attention_bias adds o_proj's bias too
            if hf.get(field):
                _refuse(field, hf[field], "shardlm's Llama has no projection biases")
    if model_type in ("qwen3", "qwen3_moe") and hf.get("attention_bias"):  # transformers' Qwen3: biases on q, k, v and o_proj
        _refuse("attention_bias", hf["attention_bias"], "shardlm's Qwen3 has no attention projection biases")
    quant = hf.get("quantization_config")
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        _refuse("quantization_config.quant_method", method, "shardlm reads float weights (bf16/f16/f32)")


def _hf_moe_fields(hf: dict, model_type: str, defaults: dict) -> dict:
    """The mixture-of-experts fields of a Mixtral or Qwen3-MoE config.json. transformers reads the
    expert count from num_local_experts or num_experts (an alias of each other); router_aux_loss_coef,
    router_jitter_noise and output_router_logits are training-only and ignored."""
    n_experts = hf.get("num_local_experts", hf.get("num_experts", defaults["num_experts"]))
    top_k = hf.get("num_experts_per_tok", defaults["num_experts_per_tok"])
    if n_experts < 1:
        _refuse("num_experts", n_experts, "a mixture of experts needs at least one expert")
    if not 1 <= top_k <= n_experts:
        _refuse("num_experts_per_tok", top_k, f"it must be in 1..num_experts={n_experts} (a mixture of experts)")
    if model_type == "mixtral":  # every layer is sparse, its experts intermediate_size wide, always renormalised
        return dict(family="moe", n_experts=n_experts, experts_per_token=top_k, expert_d_ff=hf["intermediate_size"])
    # Qwen2/3-MoE: layer i has experts unless listed in mlp_only_layers or (i + 1) % decoder_sparse_step != 0
    step = hf.get("decoder_sparse_step", defaults["decoder_sparse_step"])
    if step < 1:
        _refuse("decoder_sparse_step", step, "it must be >= 1")
    only = hf.get("mlp_only_layers") or []
    if not isinstance(only, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in only):
        raise ValueError(f"mlp_only_layers must be a list of layer numbers, got {json.dumps(only)}")
    dense = tuple(i for i in range(hf["num_hidden_layers"]) if i in only or (i + 1) % step)
    return dict(family="moe", n_experts=n_experts, experts_per_token=top_k,
                expert_d_ff=hf.get("moe_intermediate_size", defaults["moe_intermediate_size"]),
                norm_topk_prob=bool(hf.get("norm_topk_prob", defaults["norm_topk_prob"])), dense_layers=dense,
                shared_expert_d_ff=hf.get("shared_expert_intermediate_size",
                                          defaults.get("shared_expert_intermediate_size", 0)))


def _hf_layer_types(hf: dict, model_type: str, max_pos: int) -> list[str]:
    """Each layer's attention type; refuses a sliding window that masks anything within max_pos.

    shardlm attends to the whole context. transformers' window W masks the keys at or before q - W,
    and no position reaches max_position_embeddings (the Engine caps max_seq_len there), so a window
    of at least max_position_embeddings is plain causal attention and is accepted."""
    n_layers = hf["num_hidden_layers"]
    full = ["full_attention"] * n_layers
    if model_type == "llama":  # transformers' Llama has no sliding window: both fields are ignored
        return hf.get("layer_types") or full
    if model_type in ("mistral", "mixtral", "qwen3_moe"):  # one window for every layer; layer_types ignored
        window = hf.get("sliding_window", _HF_DEFAULTS[model_type]["sliding_window"])
        if model_type == "qwen3_moe" and not hf.get("use_sliding_window"):  # its window needs the flag
            window = None
        if window is not None and window < max_pos:
            default = "" if "sliding_window" in hf else ", transformers' default when absent"
            _refuse("sliding_window", window, f"shardlm has no sliding window (accepted: null or >= "
                                              f"max_position_embeddings={max_pos}{default})")
        return full
    # qwen2, qwen3 and qwen2_moe: the window applies only with use_sliding_window, to layers from max_window_layers on
    window = hf.get("sliding_window", _HF_DEFAULTS[model_type]["sliding_window"]) if hf.get("use_sliding_window") \
        else None
    types = hf.get("layer_types") or [
        "sliding_attention" if window is not None and i >= hf.get("max_window_layers", 28) else "full_attention"
        for i in range(n_layers)]
    types = ["full_attention" if t == "attention" else t for t in types]  # transformers' legacy name
    for t in types:
        if t not in ("full_attention", "sliding_attention"):
            _refuse("layer_types", t, f"{model_type} layers are full_attention or sliding_attention")
    if "sliding_attention" in types:
        if window is None:
            _refuse("sliding_window", window, "layer_types has sliding_attention layers without a window "
                                              "(use_sliding_window false or sliding_window null)")
        if window < max_pos:
            _refuse("sliding_window", window, f"shardlm has no sliding window (use_sliding_window is true and "
                                              f"layer_types has sliding_attention layers; accepted: >= "
                                              f"max_position_embeddings={max_pos})")
    return types


def _hf_rope(hf: dict, layer_types: list[str], max_pos: int) -> tuple[float, RopeScaling]:
    """rope_theta and scaling. As transformers: a legacy `rope_scaling` dict replaces `rope_parameters`;
    a dict's missing rope_theta / partial_rotary_factor come from the top level (rope_theta then
    defaults to 10000). Families with layer types may nest one dict per type: the types in use must
    agree, since shardlm has one RoPE for all layers."""
    where = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = hf.get(where) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{where}={params!r} is not a JSON object")
    if not any(isinstance(v, dict) for v in params.values()):
        return _hf_rope_dict(params, where, hf, max_pos, nested=False)
    used = list(dict.fromkeys(layer_types))
    for t in used:
        if not isinstance(params.get(t), dict):
            raise ValueError(f"{where} has no RoPE parameters for layer type {t!r} (it has {sorted(params)})")
    found = {t: _hf_rope_dict(params[t], f"{where}.{t}", hf, max_pos, nested=True) for t in used}
    if len(set(found.values())) > 1:
        _refuse(where, {t: params[t] for t in used}, "the layer types differ and shardlm has one RoPE for all layers")
    return found[used[0]]


def _hf_rope_dict(p: dict, where: str, hf: dict, max_pos: int, nested: bool) -> tuple[float, RopeScaling]:
    def first(key):  # the dict's value, else the top level's (named for errors), else None
        if p.get(key) is not None:
            return p[key], f"{where}.{key}"
        return hf.get(key), key

    type_key = "rope_type" if "rope_type" in p else "type"
    kind = p.get(type_key) or "default"
    if kind not in _HF_ROPE_TYPES:
        _refuse(f"{where}.{type_key}", kind, f"shardlm implements RoPE types {', '.join(_HF_ROPE_TYPES)}")
    theta, _ = first("rope_theta")
    partial, name = first("partial_rotary_factor")
    if partial is not None and float(partial) != 1.0:
        _refuse(name, partial, "shardlm rotates the whole head (partial_rotary_factor 1)")
    needed = {"default": (), "linear": ("factor",), "llama3": _LLAMA3_KEYS}[kind]
    missing = [k for k in needed if p.get(k) is None]
    if missing:
        raise ValueError(f"{where}: rope_type {kind!r} needs {', '.join(missing)}")
    theta = 10000.0 if theta is None else float(theta)
    if kind == "default":
        return theta, RopeScaling()
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(p["factor"]))
    # llama3: a top-level original_max_position_embeddings wins over the dict's (transformers, for
    # Phi-3-style configs; not for nested dicts); max_position_embeddings when neither has it
    original = hf.get("original_max_position_embeddings") if not nested else None
    if original is None:
        original = p.get("original_max_position_embeddings") or max_pos
    return theta, RopeScaling(kind="llama3", factor=float(p["factor"]), low_freq_factor=float(p["low_freq_factor"]),
                              high_freq_factor=float(p["high_freq_factor"]), original_max_position=int(original))


def _gemma3_text_config(hf: dict) -> dict:
    """A Gemma3ForConditionalGeneration config.json's language model as a gemma3_text config (as
    transformers' Gemma3Config builds its text_config; tie_word_embeddings is the outer config's)."""
    text = {"model_type": "gemma3_text", "tie_word_embeddings": hf.get("tie_word_embeddings", True),
            **hf["text_config"]}
    text.setdefault("_name_or_path", hf.get("_name_or_path"))
    return text


def _hf_gemma_fields(hf: dict, model_type: str, defaults: dict, max_pos: int) -> dict:
    """Gemma 2 / Gemma 3 text: the family's ModelConfig fields, RoPE included, read as transformers'
    Gemma2Config / Gemma3TextConfig read them. Gemma 2's layers alternate sliding and full attention,
    Gemma 3's are sliding but every sixth (`sliding_window_pattern`), unless `layer_types` says."""
    def number(key):
        value = hf.get(key, defaults.get(key))
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"{key} must be a non-negative number or null, got {json.dumps(value)}")
        return value

    act = hf.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in _HF_GELU:
        _refuse("hidden_activation", act, f"shardlm's Gemma MLP is GeGLU ({', '.join(_HF_GELU)})")
    for field in ("attention_bias", "use_bidirectional_attention"):
        if hf.get(field):
            _refuse(field, hf[field], "shardlm's Gemma has no projection biases and attends causally")
    n_layers = hf["num_hidden_layers"]
    every = hf.get("sliding_window_pattern", defaults["window_every"])  # Gemma 3's legacy pattern
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % every else "full_attention"
                                      for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers:
        raise ValueError(f"layer_types must list the {n_layers} layers' attention types, got {json.dumps(types)}")
    for t in types:
        if t not in ("full_attention", "sliding_attention"):
            _refuse("layer_types", t, f"{model_type} layers are full_attention or sliding_attention")
    window = number("sliding_window")
    if "sliding_attention" in types and not window:
        _refuse("sliding_window", window, "layer_types has sliding_attention layers without a window")
    rope = _hf_gemma_rope(hf, types, max_pos) if model_type == "gemma3_text" else \
        dict(zip(("rope_theta", "rope_scaling"), _hf_rope(hf, types, max_pos)))
    # transformers' Gemma 3 attention takes no soft cap (Gemma3Attention never passes it), so neither does shardlm
    attn_cap = number("attn_logit_softcapping") if model_type == "gemma2" else None
    final_cap = number("final_logit_softcapping")
    return dict(rope, family="gemma2" if model_type == "gemma2" else "gemma3", activation=_HF_GELU[act],
                layer_types=tuple(types), sliding_window=int(window or 0),
                query_pre_attn_scalar=float(number("query_pre_attn_scalar")),
                attn_softcap=float(attn_cap or 0.0), final_softcap=float(final_cap or 0.0))


def _hf_gemma_rope(hf: dict, layer_types: list[str], max_pos: int) -> dict:
    """Gemma 3's two RoPEs: full-attention layers' (rope_theta, default 1e6, and any scaling) and the
    sliding layers' (rope_local_base_freq, default 1e4, unscaled). As transformers: `rope_parameters`
    holds one dict per layer type; a legacy top-level `rope_scaling` updates the full layers' dict and
    legacy `rope_theta` / `rope_local_base_freq` fill the dicts' missing bases."""
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(not isinstance(v, dict) for v in params.values()):
        raise ValueError(f"rope_parameters={params!r}: gemma3 needs one dict per layer type "
                         f"(full_attention, sliding_attention)")
    full = {**params.get("full_attention", {}), **(hf.get("rope_scaling") or {})}
    full.setdefault("rope_theta", hf["rope_theta"])
    local = dict(params.get("sliding_attention", {}))
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", _HF_DEFAULTS["gemma3_text"]["rope_local_base_freq"]))
    theta, scaling = _hf_rope_dict(full, "rope_parameters.full_attention", hf, max_pos, nested=True)
    local_theta, local_scaling = _hf_rope_dict(local, "rope_parameters.sliding_attention", hf, max_pos, nested=True)
    if local_scaling != RopeScaling() and "sliding_attention" in layer_types:
        _refuse("rope_parameters.sliding_attention", local, "shardlm's sliding layers have unscaled RoPE")
    return dict(rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta)


# ----- GGUF metadata, as llama.cpp reads it -----

# Keys that change the math if set to anything but their neutral value (absent is neutral).
_GGUF_NEUTRAL = {"expert_count": 0, "logit_scale": 1.0, "embedding_scale": 1.0, "residual_scale": 1.0,
                 "attn_logit_softcapping": 0.0, "final_logit_softcapping": 0.0, "attention.causal": True,
                 "attention.max_alibi_bias": 0.0, "attention.clamp_kqv": 0.0}


def _check_gguf_math(meta: dict, arch: str, head_dim: int, max_pos: int, tensor_names: set,
                     scale: float) -> None:
    """Refuse the keys that change the math and that shardlm does not implement; `scale` is the
    attention scale llama.cpp uses for this file (1/sqrt(head_dim) but for the Gemma 27Bs)."""
    neutral = dict(_GGUF_NEUTRAL)
    if arch in _GGUF_MOE or arch == "llama":  # their experts are read by _gguf_moe_fields
        del neutral["expert_count"]
    if arch in _GGUF_GEMMA:  # Gemma 2's soft caps are read; llama.cpp's Gemma 3 reads the final cap only
        del neutral["attn_logit_softcapping"], neutral["final_logit_softcapping"]
    for key, value in neutral.items():
        value_in_file = meta.get(f"{arch}.{key}", value)
        if value_in_file != value:
            _refuse(f"{arch}.{key}", value_in_file, "shardlm does not implement it")
    given = meta.get(f"{arch}.attention.scale", 0.0)  # 0: llama.cpp's own scale
    if given and not math.isclose(given, scale, rel_tol=1e-6):
        _refuse(f"{arch}.attention.scale", given, f"shardlm scales attention by {scale:.6g} for this model "
                                                  f"(1/sqrt(head_dim={head_dim}) but for the Gemma 27Bs)")
    for key in ("attention.value_length", "rope.dimension_count"):  # llama.cpp's defaults: head_dim
        value = meta.get(f"{arch}.{key}", head_dim)
        if value != head_dim:
            _refuse(f"{arch}.{key}", value, f"shardlm needs it equal to head_dim={head_dim} (the key length)")
    window = meta.get(f"{arch}.attention.sliding_window")
    if arch not in _GGUF_GEMMA and window and window < max_pos:  # a window of at least the context masks nothing
        _refuse(f"{arch}.attention.sliding_window", window,
                f"shardlm has no sliding window for {arch} (accepted: >= context_length={max_pos})")
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("tensor rope_freqs.weight (per-frequency RoPE factors, e.g. Llama 3.1's rope scaling) "
                         "is not supported")


# llama.cpp's ExpertGatingFuncType: 0 (absent) is the architecture's own, softmax for these; 1 softmax, 2 sigmoid.
_GGUF_SOFTMAX_GATING = (0, 1)


def _gguf_moe_fields(meta: dict, arch: str, d_ff: int) -> dict:
    """A mixture of experts as llama.cpp runs it: Mixtral (llama with experts; blk.N.ffn_*_exps),
    Qwen2-MoE (a sigmoid-gated shared expert) and Qwen3-MoE. Softmax over all experts, the top k;
    llama.cpp renormalises the k weights for llama and qwen3moe and never for qwen2moe (its graphs
    hard-code it; no key says so), and every layer has experts. An expert's width is
    expert_feed_forward_length, else feed_forward_length for llama and feed_forward_length / k for
    the Qwen ones (llama.cpp's fallbacks)."""
    def key(k):
        return f"{arch}.{k}"

    n_experts = int(meta.get(key("expert_count"), 0) or 0)
    top_k = int(meta.get(key("expert_used_count"), 0) or 0)
    if n_experts < 1:
        _refuse(key("expert_count"), n_experts, f"llama.cpp's {arch} mixture of experts needs at least one expert")
    if not 1 <= top_k <= n_experts:
        _refuse(key("expert_used_count"), top_k, f"it must be in 1..{key('expert_count')}={n_experts}")
    gating = meta.get(key("expert_gating_func"), 0)
    if gating not in _GGUF_SOFTMAX_GATING:
        _refuse(key("expert_gating_func"), gating, "shardlm routes by a softmax over the experts (1)")
    weights_scale = meta.get(key("expert_weights_scale"), 0.0)
    if weights_scale not in (0.0, 1.0):  # 0: llama.cpp does not scale
        _refuse(key("expert_weights_scale"), weights_scale, "shardlm does not scale the routing weights")
    if meta.get(key("expert_shared_count"), 0) and arch != "qwen2moe":
        _refuse(key("expert_shared_count"), meta[key("expert_shared_count")],
                f"shardlm's {arch} has no shared experts")
    expert_d_ff = meta.get(key("expert_feed_forward_length")) or (d_ff if arch == "llama" else d_ff // top_k)
    fields = dict(family="moe", n_experts=n_experts, experts_per_token=top_k, expert_d_ff=int(expert_d_ff),
                  norm_topk_prob=arch != "qwen2moe")
    if arch == "qwen2moe":  # the shared expert's width; llama.cpp's fallback: feed_forward_length
        fields["shared_expert_d_ff"] = int(meta.get(key("expert_shared_feed_forward_length")) or d_ff)
    return fields


# llama.cpp's Gemma loaders: the layer count of the 27B models, whose attention scale is d_model / n_heads
# (query_pre_attn_scalar 144 or 168) rather than head_dim; the sliding-window pattern and window defaults.
_GGUF_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_GGUF_GEMMA_WINDOW_EVERY = {"gemma2": 2, "gemma3": 6}


def _gguf_gemma_fields(meta: dict, arch: str, n_layers: int, d_model: int, n_heads: int, head_dim: int) -> dict:
    """Gemma 2 / Gemma 3's text model as llama.cpp's loader reads it. GeGLU (tanh GELU). Layer i slides
    unless i % p == p - 1, p = attention.sliding_window_pattern (a number, or one bool per layer), else 2
    (Gemma 2) or 6 (Gemma 3); Gemma 2's window defaults to 4096, Gemma 3 slides only where the file has
    a window. Gemma 2's soft caps default to 50 (attention) and 30 (logits); Gemma 3 caps the logits
    only if final_logit_softcapping says so. Gemma 3's sliding layers rotate with rope.freq_base_swa
    (default 10000), unscaled. No key holds query_pre_attn_scalar: llama.cpp uses head_dim, or
    d_model / n_heads for the 27B models (known by their layer count), and so does this."""
    def key(k):
        return f"{arch}.{k}"

    window = meta.get(key("attention.sliding_window"), 4096 if arch == "gemma2" else 0)
    if window is None or isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"{key('attention.sliding_window')} must be a non-negative integer, got {window!r}")
    pattern = meta.get(key("attention.sliding_window_pattern"), _GGUF_GEMMA_WINDOW_EVERY[arch])
    if isinstance(pattern, list):
        if len(pattern) != n_layers:
            raise ValueError(f"{key('attention.sliding_window_pattern')} lists {len(pattern)} layers, "
                             f"the model has {n_layers}")
        sliding = [bool(p) for p in pattern]
    else:  # llama.cpp's set_swa_pattern: period 0 slides everywhere
        p = int(pattern)
        sliding = [p == 0 or i % p < p - 1 for i in range(n_layers)]
    if not window:
        sliding = [False] * n_layers
    scalar = d_model // n_heads if n_layers == _GGUF_GEMMA_27B_LAYERS[arch] else head_dim
    fields = dict(family=arch, activation="gelu_tanh", sliding_window=int(window),
                  layer_types=tuple("sliding_attention" if s else "full_attention" for s in sliding),
                  query_pre_attn_scalar=float(scalar),
                  final_softcap=float(meta.get(key("final_logit_softcapping"), 30.0 if arch == "gemma2" else 0.0)))
    if arch == "gemma2":
        fields["attn_softcap"] = float(meta.get(key("attn_logit_softcapping"), 50.0))
    elif any(sliding):
        fields["rope_local_theta"] = float(meta.get(key("rope.freq_base_swa"), 10000.0))
    return fields


def _gguf_rope_scaling(meta: dict, arch: str) -> RopeScaling:
    # llama.cpp: the type defaults to linear; the factor is rope.scaling.factor, else the older
    # rope.scale_linear, and 0 means 1; type "none" never scales.
    kind = meta.get(f"{arch}.rope.scaling.type", "linear")
    if kind not in ("none", "linear"):
        _refuse(f"{arch}.rope.scaling.type", kind, "shardlm implements GGUF RoPE scaling none and linear")
    key = f"{arch}.rope.scaling.factor"
    factor = float(meta[key] if key in meta else meta.get(f"{arch}.rope.scale_linear", 0.0)) or 1.0
    return RopeScaling(kind="linear", factor=factor) if kind == "linear" and factor != 1.0 else RopeScaling()


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
        # Mixtures of experts (family "moe", models/moe.py), from each model's Hugging Face
        # config.json: mistralai/Mixtral-8x7B-v0.1 (46.7B parameters, 12.9B active per token, as
        # Mistral AI's announcement states), Qwen/Qwen3-30B-A3B (30.5B, 3.3B active, its model card).
        ModelConfig("mixtral-8x7b", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                    head_dim=128, d_ff=14336, max_seq_len=32768, rope_theta=1e6, family="moe", n_experts=8,
                    experts_per_token=2, expert_d_ff=14336),
        ModelConfig("qwen3-30b-a3b", vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4,
                    head_dim=128, d_ff=6144, max_seq_len=40960, rope_theta=1e6, norm_eps=1e-6, qk_norm=True,
                    family="moe", n_experts=128, experts_per_token=8, expert_d_ff=768, norm_topk_prob=True),
        # For planning: DeepSeek-V3's shape (deepseek-ai/DeepSeek-V3 config.json; arXiv 2412.19437:
        # 671B parameters, 37B activated) with standard grouped-query attention in place of its
        # multi-head latent attention (MLA), which shardlm does not implement: 128 heads of head_dim
        # 128 (MLA's v_head_dim and qk_nope_head_dim) over 8 kv heads (Llama 3 70B/405B's ratio, and
        # a count the planner's 8-way head splits divide). GQA's q/k/v/o projections hold 250M
        # parameters a layer to MLA's 187M, so this has ~675B parameters and ~41B active (DeepSeek's
        # 671B / 37B plus 61 x 62M), and caches 2 x 8 x 128 values a token to MLA's 576. Routed
        # experts 256, top 8 of width 2048, one shared expert of 2048 (the "shared" MLP, counted with
        # Qwen2-MoE's scalar gate: D parameters a layer that DeepSeek has not), the first 3 layers
        # dense (first_k_dense_replace) with d_ff 18432; the multi-token-prediction module and
        # YaRN RoPE scaling are left out (no effect on the planner's step costs).
        ModelConfig("deepseek-v3-like", vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, n_kv_heads=8,
                    head_dim=128, d_ff=18432, max_seq_len=163840, norm_eps=1e-6, family="moe", n_experts=256,
                    experts_per_token=8, expert_d_ff=2048, shared_expert_d_ff=2048, dense_layers=(0, 1, 2)),
    ]
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
