"""GGUF files of llama.cpp's gemma2, gemma3, qwen3, qwen2moe, qwen3moe and llama-with-experts (Mixtral)
architectures, written from random transformers models with the names, metadata and conventions
llama.cpp's convert_hf_to_gguf.py uses (Gemma's norms stored as 1 + w, Mixtral's Q/K rows permuted,
experts stacked per layer): shardlm reads the weights and config of the HF folder from them, its
logits equal HF's and its greedy tokens HF's; transformers' own GGUF reader (gguf_file=) reads the
same files to the same logits, an independent check of the writer's conventions (it has no Mixtral:
llama-arch files load as LlamaForCausalLM); `shardlm inspect` shows a GGUF's active parameters;
the keys llama.cpp's loaders hard-code (Gemma's window pattern and 27B attention scale, the Qwen-MoE
routing normalisation) and the refused or unsupported ones."""

import re
from unittest import mock

import jax
import numpy as np
import pytest
import test_gemma
import test_moe
import torch
from flax import nnx
from hf_reference import hf_greedy, hf_logits, shardlm_logits
from test_qwen3 import SHAPES as QWEN3_SHAPES
from test_qwen3 import _hf_qwen3

from shardlm.checkpoints import loader
from shardlm.checkpoints.convert import describe
from shardlm.checkpoints.gguf import CheckpointError, GGUFWeights, read_metadata
from shardlm.engine import SamplingParams
from shardlm.engine.cli import main
from shardlm.engine.llm import LLM
from shardlm.models.config import ModelConfig

_rng = np.random.default_rng(0)
PROMPTS = [[1, 5, 9, 33, 100, 7, 64]] + [_rng.integers(0, 128, n).tolist() for n in (19, 40)]  # ids < every V
NEW = 16


def _gemma(family, **changes):
    """test_gemma's random Gemma (random norms, sharp attention) of its config with `changes`."""
    with mock.patch.dict(test_gemma.CONFIGS, {family: dict(test_gemma.CONFIGS[family], **changes)}):
        return test_gemma._hf_gemma(family)


def _moe(name, **changes):
    """test_moe's random mixture of experts (routing that matters) of its config with `changes`."""
    arch, config, shape = test_moe.CASES[name]
    with mock.patch.dict(test_moe.CASES, {name: (arch, config, dict(shape, **changes))}):
        return test_moe._hf_model(name)


# gguf architecture -> the HF model, in what llama.cpp can represent: its loaders hard-code Gemma's
# attention scale (1/sqrt(head_dim) but for the 27Bs: query_pre_attn_scalar = head_dim = 16 here) and
# Gemma 3's window pattern (every sixth layer global: 6 layers), and its graphs renormalise Qwen3-MoE's
# top-k weights and never Qwen2-MoE's, with experts in every layer.
CASES = {
    "gemma2": ("gemma2", lambda: _gemma("gemma2", query_pre_attn_scalar=16)),  # soft caps 1.5 and 0.5, window 8
    # 5 sliding layers with their own RoPE base (100), 1 global with linear RoPE scaling
    "gemma3": ("gemma3", lambda: _gemma("gemma3", query_pre_attn_scalar=16, sliding_window_pattern=6,
                                        num_hidden_layers=6)),
    "qwen3": ("qwen3", lambda: _hf_qwen3(**dict(QWEN3_SHAPES["tied"], num_hidden_layers=2))),
    "mixtral": ("llama", lambda: _moe("mixtral")),  # 8 experts, top-2 renormalised
    "qwen2moe": ("qwen2moe", lambda: _moe("qwen2_moe", norm_topk_prob=False)),  # shared expert, q/k/v biases
    "qwen3moe": ("qwen3moe", lambda: _moe("qwen3_moe", norm_topk_prob=True, mlp_only_layers=[])),
}
TRANSFORMERS_READS = [name for name in CASES if name != "mixtral"]  # transformers' GGUF architectures


def _tokenizer_keys(w, vocab_size: int) -> None:
    """The embedded SmolLM2's byte-level BPE vocabulary cut to its first `vocab_size` tokens (17 control
    tokens, then single characters; merges kept where all three strings are in it), its chat template."""
    meta = read_metadata(loader.embedded_model_path())
    tokens = meta["tokenizer.ggml.tokens"][:vocab_size]
    kept = set(tokens)
    merges = [m for m in meta["tokenizer.ggml.merges"] if set(m.split(" ", 1)) <= kept and m.replace(" ", "") in kept]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(tokens)
    w.add_token_types(meta["tokenizer.ggml.token_type"][:vocab_size])
    w.add_token_merges(merges)
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(meta["tokenizer.chat_template"])


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute of W_q / W_k rows (interleaved RoPE pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: str, arch: str, older: bool = False, skip=(), keys=None) -> str:
    """The HF model's float32 weights as a GGUF of llama.cpp architecture `arch`, keys and tensors as
    convert_hf_to_gguf.py writes them (TextModel.set_gguf_parameters plus LlamaModel's, Qwen2MoeModel's,
    Gemma2Model's and Gemma3Model's own keys; tensor names from gguf's TensorNameMap, its map too):
    Gemma's "*norm.weight" tensors + 1 and no lm_head; llama's Q/K rows permuted; each layer's experts
    stacked ([E, F, D] gate and up, [E, D, F] down); Qwen2-MoE's shared-expert gate [1, D] as HF's. `older`:
    as older converters wrote them, Mixtral's experts one tensor each (blk.N.ffn_gate.E.weight) and the
    shared-expert gate squeezed to [D]. Less the tensors in `skip`; `keys` ({arch}.<key>: value) added or
    replacing those written."""
    import gguf

    c = model.config
    hf = c.to_dict()
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-random-{arch}")
    typed = {bool: w.add_bool, int: w.add_uint32, float: w.add_float32, str: w.add_string}
    extra = {f"{arch}.{k}": v for k, v in (keys or {}).items()}
    add = lambda method, key, *args: None if key in extra else getattr(w, method)(*args)  # noqa: E731
    head_dim = hf.get("head_dim")
    add("add_block_count", f"{arch}.block_count", c.num_hidden_layers)
    add("add_context_length", f"{arch}.context_length", c.max_position_embeddings)
    add("add_embedding_length", f"{arch}.embedding_length", c.hidden_size)
    add("add_feed_forward_length", f"{arch}.feed_forward_length", c.intermediate_size)
    add("add_head_count", f"{arch}.attention.head_count", c.num_attention_heads)
    add("add_head_count_kv", f"{arch}.attention.head_count_kv", c.num_key_value_heads)
    add("add_layer_norm_rms_eps", f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    if head_dim:
        add("add_key_length", f"{arch}.attention.key_length", head_dim)
        add("add_value_length", f"{arch}.attention.value_length", head_dim)
    rope = hf.get("rope_parameters") or {}
    full = rope.get("full_attention", rope)
    if arch != "gemma2":  # Gemma2Model writes no RoPE keys (llama.cpp's default base: 10000)
        add("add_rope_freq_base", f"{arch}.rope.freq_base", full["rope_theta"])
        if "sliding_attention" in rope:
            add("add_rope_freq_base_swa", f"{arch}.rope.freq_base_swa", rope["sliding_attention"]["rope_theta"])
        if full.get("rope_type") == "linear":
            add("add_rope_scaling_type", f"{arch}.rope.scaling.type", gguf.RopeScalingType.LINEAR)
            add("add_rope_scaling_factor", f"{arch}.rope.scaling.factor", full["factor"])
    n_experts = hf.get("num_local_experts") or hf.get("num_experts")
    if n_experts:
        add("add_expert_count", f"{arch}.expert_count", n_experts)
        add("add_expert_used_count", f"{arch}.expert_used_count", c.num_experts_per_tok)
    if arch == "llama":
        add("add_vocab_size", f"{arch}.vocab_size", c.vocab_size)
        add("add_rope_dimension_count", f"{arch}.rope.dimension_count",
            head_dim or c.hidden_size // c.num_attention_heads)
    if arch in ("qwen2moe", "qwen3moe"):
        add("add_expert_feed_forward_length", f"{arch}.expert_feed_forward_length", c.moe_intermediate_size)
        if hf.get("shared_expert_intermediate_size"):
            add("add_expert_shared_feed_forward_length", f"{arch}.expert_shared_feed_forward_length",
                c.shared_expert_intermediate_size)
    if arch == "gemma2":
        add("add_attn_logit_softcapping", f"{arch}.attn_logit_softcapping", c.attn_logit_softcapping)
        add("add_final_logit_softcapping", f"{arch}.final_logit_softcapping", c.final_logit_softcapping)
        add("add_sliding_window", f"{arch}.attention.sliding_window", c.sliding_window)
    if arch == "gemma3":
        if c.final_logit_softcapping:
            add("add_final_logit_softcapping", f"{arch}.final_logit_softcapping", c.final_logit_softcapping)
        if hf.get("sliding_window_pattern") != 1:
            add("add_sliding_window", f"{arch}.attention.sliding_window", c.sliding_window)
    for key, value in extra.items():
        typed[type(value)](key, value)
    _tokenizer_keys(w, c.vocab_size)

    gguf_arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(gguf_arch, c.num_hidden_layers)
    tensors = {}
    for hf_name, value in model.state_dict().items():
        value = value.detach().float().numpy()
        if hf_name == "lm_head.weight" and (arch.startswith("gemma") or c.tie_word_embeddings):
            continue  # Gemma's converter never writes it; a tied model's folder has none
        if ".mlp.experts." in hf_name:  # fused [E, 2F, D] gate_up_proj and [E, D, F] down_proj
            i = int(hf_name.split(".")[2])
            parts = {"down": value} if hf_name.endswith("down_proj") else \
                dict(zip(("gate", "up"), np.split(value, 2, axis=1)))
            for kind, stacked in parts.items():
                if older and arch == "llama":
                    tensors.update({f"blk.{i}.ffn_{kind}.{e}.weight": stacked[e] for e in range(len(stacked))})
                else:
                    tensors[names.get_name(f"model.layers.{i}.mlp.experts.{kind}_proj") + ".weight"] = stacked
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(stem)
        assert name is not None, hf_name
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            value = value + 1  # GemmaModel.modify_tensors: Gemma's RMSNorm is (1 + w)
        if arch == "llama" and stem.endswith("q_proj"):
            value = _permute(value, c.num_attention_heads)
        if arch == "llama" and stem.endswith("k_proj"):
            value = _permute(value, c.num_key_value_heads)
        if older and stem.endswith("shared_expert_gate"):
            value = value.reshape(-1)
        tensors[f"{name}.{suffix}"] = value
    for name, value in tensors.items():
        if name not in skip:
            w.add_tensor(name, np.ascontiguousarray(value, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(case name, gguf arch, HF model, HF folder, GGUF path, HF logits per prompt)."""
    arch, build = CASES[request.param]
    model = build()
    tmp = tmp_path_factory.mktemp(request.param)
    folder = str(tmp / "hf")
    model.save_pretrained(folder)
    path = write_gguf(model, str(tmp / "model.gguf"), arch)
    return request.param, arch, model, folder, path, [hf_logits(model, p) for p in PROMPTS]


def test_config_weights_and_counts_equal_hf_folder(case, capsys):
    """The GGUF's config is the HF folder's (but for the name, and eps held as float32) and its weights
    are the folder's (Gemma's norms back from 1 + w, Mixtral's Q/K un-permuted, experts unstacked);
    `shardlm inspect` counts the same parameters and, for the mixtures of experts, active ones."""
    name, arch, _, folder, path, _ = case
    config, hf_config = loader.read_config(path), loader.read_config(folder)
    assert config.replace(name="", norm_eps=0.0) == hf_config.replace(name="", norm_eps=0.0)
    assert config.family == {"gemma2": "gemma2", "gemma3": "gemma3", "qwen3": "llama"}.get(name, "moe")
    ours, theirs = describe(path), describe(folder)
    assert (ours["n_params"], ours["n_active_params"]) == (theirs["n_params"], theirs["n_active_params"])
    from_gguf, from_folder = loader.load(path), loader.load(folder)
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(from_gguf.model)),
                              nnx.to_flat_state(nnx.state(from_folder.model))):
        np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=0, atol=1e-6, err_msg=str(p))
    assert from_gguf.tokenizer.vocab_size == config.vocab_size
    assert main(["inspect", path]) == 0
    shown = re.search(r"^active parameters +(.*)$", capsys.readouterr().out, re.M)
    if config.family == "moe":
        assert ours["n_active_params"] < ours["n_params"]
        assert shown.group(1) == f"{config.n_active_params:,} per token"


def test_logits_equal_transformers_and_hf_folder(case):
    """float32 logits of every prompt within 1e-4 of HF's (and of shardlm's from the HF folder)."""
    name, _, _, folder, path, ref = case
    model = loader.load(path).model
    diffs = [float(np.abs(shardlm_logits(model, p) - r).max()) for p, r in zip(PROMPTS, ref)]
    folder_diff = float(np.abs(shardlm_logits(model, PROMPTS[2]) - shardlm_logits(loader.load(folder).model, PROMPTS[2])).max())
    print(f"{name}: max |GGUF logit - HF| per prompt {diffs}; - HF folder's {folder_diff:.2e}")
    assert max(diffs) < 1e-4 and folder_diff < 1e-4


@pytest.mark.parametrize("case", ["qwen2moe", "gemma2"], indirect=True)  # Gemma 3: sharp q/k norms amplify int8
def test_int8_from_gguf(case):
    """quantize="int8" on a GGUF: the experts (and projections) int8, the norms and router float (Gemma's
    norms after their - 1); logits close to HF's, not equal."""
    from shardlm.models import quant

    name, _, _, _, path, ref = case
    loaded = loader.load(path, quantize="int8")
    quantized = {"/".join(map(str, p)) for p in quant.quantized_weights(loaded.model)}
    assert "layers/0/attn/q" in quantized and not any("norm" in p or p.endswith("router") for p in quantized)
    assert ("layers/0/mlp/gate" in quantized) and (name != "qwen2moe" or "layers/0/mlp/shared/up" in quantized)
    diff = float(np.abs(shardlm_logits(loaded.model, PROMPTS[0]) - ref[0]).max())
    print(f"{name} int8 from GGUF: max |logit - HF| {diff:.2e}")
    assert 0 < diff < 0.1


@pytest.mark.parametrize("case", TRANSFORMERS_READS, indirect=True)
def test_transformers_reads_the_same_gguf(case, tmp_path):
    """transformers' GGUF reader (its own tensor map, Gemma's norms - 1, its split of stacked experts) loads
    the file to HF's logits. Given the HF config, since it maps only some keys (not Gemma's soft caps,
    window pattern or query scale, nor Qwen-MoE's expert widths): this checks the tensors' names and
    conventions. Its Qwen2-MoE reader takes the shared-expert gate as [D] only, as older converters
    squeezed it (today's write HF's [1, D]): that file is read instead."""
    import transformers

    name, arch, model, _, path, ref = case
    if name == "qwen2moe":
        path = write_gguf(model, str(tmp_path / "older.gguf"), arch, older=True)
    folder, file = path.rsplit("/", 1)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, config=model.config,
                                                               dtype=torch.float32).eval()
    diff = max(float(np.abs(hf_logits(theirs, p) - r).max()) for p, r in zip(PROMPTS, ref))
    print(f"{name}: max |transformers(GGUF) logit - HF| {diff:.2e}")
    assert diff < 1e-5


@pytest.mark.parametrize("case", ["mixtral"], indirect=True)
def test_transformers_reads_mixtral_attention(case):
    """transformers reads a llama GGUF as a dense Llama and skips the experts, but its reader's own
    un-permutation of the Q/K rows (and its names of the other tensors) gives the Mixtral's attention,
    norms, embedding and head exactly: an independent check of the permuted layout. (The stacked experts'
    layout is the Qwen-MoE files', which transformers reads in test_transformers_reads_the_same_gguf.)"""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    _, _, model, _, path, _ = case
    c = model.config
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, tie_word_embeddings=False))
    theirs = load_gguf_checkpoint(path, return_tensors=True, model_to_load=dense)["tensors"]
    ours = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    assert set(ours) == {k for k in theirs if ".mlp." not in k} and len(ours) == 3 + 6 * c.num_hidden_layers
    for name, value in ours.items():
        torch.testing.assert_close(theirs[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_greedy_tokens_equal_transformers(case):
    """16 greedy tokens of each prompt, in one batch through the default (paged) engine: HF's."""
    _, _, model, _, path, _ = case
    llm = LLM.load(path, max_num_seqs=len(PROMPTS), max_seq_len=128)
    out = llm.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    assert [c.token_ids for c in out] == [hf_greedy(model, p, NEW) for p in PROMPTS]


@pytest.mark.parametrize("case", ["mixtral", "qwen2moe"], indirect=True)
def test_older_converters_tensors_load_alike(case, tmp_path):
    """Mixtral GGUFs of older converters hold one tensor per expert (blk.N.ffn_gate.E.weight), Qwen2-MoE
    ones a [D] shared-expert gate: the same weights as today's stacked [E, ...] and [1, D] tensors."""
    name, arch, model, _, path, _ = case
    older = write_gguf(model, str(tmp_path / "older.gguf"), arch, older=True)
    tensors = GGUFWeights(older).tensors
    if name == "mixtral":
        assert "blk.0.ffn_gate.7.weight" in tensors and "blk.0.ffn_gate_exps.weight" not in tensors
    else:
        assert tensors["blk.0.ffn_gate_inp_shexp.weight"].shape == (64,)
        assert GGUFWeights(path).tensors["blk.0.ffn_gate_inp_shexp.weight"].shape == (64, 1)  # GGUF's order
    for a, b in zip(jax.tree.leaves(nnx.state(loader.load(path).model)),
                    jax.tree.leaves(nnx.state(loader.load(older).model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----- keys llama.cpp's loaders read or hard-code, refused keys, bad files -----

def _meta(arch, **keys):
    shape = {"block_count": 4, "context_length": 128, "embedding_length": 64, "feed_forward_length": 96,
             "attention.head_count": 4, "attention.head_count_kv": 2, "vocab_size": 128}
    return {"general.architecture": arch, **{f"{arch}.{k}": v for k, v in {**shape, **keys}.items()}}


def test_gemma_keys_as_llama_cpp_reads_them():
    """Gemma 2: window 4096, soft caps 50 / 30 where the keys are absent, every other layer sliding;
    Gemma 3: no window key, no sliding layers; a pattern key (a period or per-layer bools) wins; the
    27B models (46 / 62 layers) scale attention by d_model / n_heads, as llama.cpp does."""
    g2 = ModelConfig.from_gguf_metadata(_meta("gemma2"))
    assert (g2.sliding_window, g2.attn_softcap, g2.final_softcap, g2.query_pre_attn_scalar) == (4096, 50.0, 30.0, 16)
    assert g2.layer_types == ("sliding_attention", "full_attention") * 2 and g2.tie_embeddings
    g3 = ModelConfig.from_gguf_metadata(_meta("gemma3", **{"attention.key_length": 32}))
    assert g3.layer_types == ("full_attention",) * 4 and g3.final_softcap == 0.0 and g3.qk_norm
    assert g3.head_dim == g3.query_pre_attn_scalar == 32
    g3 = ModelConfig.from_gguf_metadata(_meta("gemma3", **{"attention.sliding_window": 8,
                                                           "attention.sliding_window_pattern": 2}))
    assert g3.layer_types == ("sliding_attention", "full_attention") * 2 and g3.rope_local_theta == 10000.0
    g3 = ModelConfig.from_gguf_metadata(_meta("gemma3", **{"attention.sliding_window": 8, "rope.freq_base_swa": 50.0,
                                                           "attention.sliding_window_pattern": [True, False] * 2}))
    assert g3.layer_types == ("sliding_attention", "full_attention") * 2 and g3.rope_local_theta == 50.0
    assert ModelConfig.from_gguf_metadata(_meta("gemma2", block_count=46)).query_pre_attn_scalar == 64 // 4
    big = _meta("gemma3", block_count=62, **{"attention.key_length": 32})
    assert ModelConfig.from_gguf_metadata(big).query_pre_attn_scalar == 64 // 4 != 32
    with pytest.raises(ValueError, match=r"gemma3.attention.scale=0.5 is not supported"):
        ModelConfig.from_gguf_metadata({**big, "gemma3.attention.scale": 0.5})


def test_moe_keys_as_llama_cpp_reads_them():
    """The expert width falls back to feed_forward_length (llama) or feed_forward_length / k (Qwen);
    Qwen2-MoE's shared expert to feed_forward_length; renormalised top-k but for qwen2moe."""
    experts = {"expert_count": 4, "expert_used_count": 2}
    mixtral = ModelConfig.from_gguf_metadata(_meta("llama", **experts))
    assert (mixtral.family, mixtral.expert_d_ff, mixtral.norm_topk_prob, mixtral.dense_layers) == ("moe", 96, True, ())
    qwen2 = ModelConfig.from_gguf_metadata(_meta("qwen2moe", **experts))
    assert (qwen2.expert_d_ff, qwen2.shared_expert_d_ff, qwen2.norm_topk_prob, qwen2.qkv_bias) == (48, 96, False, True)
    qwen3 = ModelConfig.from_gguf_metadata(_meta("qwen3moe", **experts, expert_feed_forward_length=40))
    assert (qwen3.expert_d_ff, qwen3.norm_topk_prob, qwen3.qk_norm, qwen3.shared_expert_d_ff) == (40, True, True, 0)
    assert ModelConfig.from_gguf_metadata(_meta("llama")).family == "llama"  # no experts: dense


REFUSED = {
    "sigmoid routing": ("qwen3moe", {"expert_gating_func": 2}, "qwen3moe.expert_gating_func=2 is not supported"),
    "top-k above the experts": ("qwen2moe", {"expert_used_count": 5}, "qwen2moe.expert_used_count=5 is not supported"),
    "scaled routing weights": ("llama", {"expert_weights_scale": 2.5}, "llama.expert_weights_scale=2.5 is not supported"),
    "experts in a dense arch": ("qwen3", {"expert_count": 4}, "qwen3.expert_count=4 is not supported"),
    "gemma partial rotary": ("gemma2", {"rope.dimension_count": 8}, "gemma2.rope.dimension_count=8 is not supported"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_refused_keys(name):
    arch, keys, message = REFUSED[name]
    experts = {"expert_count": 4, "expert_used_count": 2} if arch in ("llama", "qwen2moe", "qwen3moe") else {}
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        ModelConfig.from_gguf_metadata(_meta(arch, **{**experts, **keys}))


def test_missing_expert_tensor_and_unsupported_architecture(tmp_path):
    """A file without one layer's stacked up-projections names the tensor; an architecture shardlm does
    not read (deepseek2) is refused with the list of those it reads."""
    model = _moe("qwen3_moe", norm_topk_prob=True, mlp_only_layers=[], num_hidden_layers=1)
    path = write_gguf(model, str(tmp_path / "missing.gguf"), "qwen3moe", skip=("blk.0.ffn_up_exps.weight",))
    with pytest.raises(CheckpointError, match=r"tensor 'blk.0.ffn_up_exps.weight' is missing"):
        loader.load(path)
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "deepseek.gguf"), "deepseek2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    supported = "llama, qwen2, qwen3, qwen2moe, qwen3moe, gemma2, gemma3"
    with pytest.raises(CheckpointError, match=re.escape(f"unsupported GGUF architecture 'deepseek2'; supported: "
                                                        f"{supported}")):
        loader.load(str(tmp_path / "deepseek.gguf"))
