"""Qwen3 (dense, Qwen3ForCausalLM): the Llama family with QK-norm and an explicit head_dim. A random
transformers model saved with save_pretrained loads with HF's logits and greedy tokens, on one device
and under the weight-stationary layouts; GGUF files of llama.cpp's qwen3 (and qwen2) architecture
load as the same weights; int8 keeps the norms in float; the fields shardlm does not implement are
errors naming them."""

import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import hf_greedy, hf_logits, shardlm_logits
from test_checkpoints import DROP, _edit_config
from test_engine import stepwise_logits

from shardlm.checkpoints import loader
from shardlm.checkpoints.convert import convert, describe
from shardlm.checkpoints.gguf import CheckpointError
from shardlm.engine import Engine, SamplingParams
from shardlm.engine.llm import LLM
from shardlm.models import quant
from shardlm.models.config import ModelConfig

# head_dim is never hidden_size / num_attention_heads here (64 / 8 = 8, 64 / 4 = 16); GQA in both.
BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, max_position_embeddings=128,
            rope_parameters=dict(rope_type="default", rope_theta=1e6))
SHAPES = {
    "tied": dict(BASE, intermediate_size=128, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                 tie_word_embeddings=True),
    "untied": dict(BASE, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                   tie_word_embeddings=False),
}
_rng = np.random.default_rng(0)
PROMPTS = [[1, 5, 9, 33, 100, 7, 64]] + [_rng.integers(0, 128, n).tolist() for n in (19, 40)]
NEW = 32
MESH = {"x": 2, "y": 2, "z": 2}


def _hf_qwen3(sharpen: float = 3.0, seed: int = 0, **shape):
    """A random Qwen3ForCausalLM with random norms; `sharpen` scales the q/k norms, which (after
    QK-norm) set how sharp attention is, so that positions and every head decide the tokens."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
                if "q_norm" in name or "k_norm" in name:
                    p.mul_(sharpen)
    return model.eval()


def _save(model, folder) -> str:
    model.save_pretrained(folder, max_shard_size="40KB", safe_serialization=True)
    return str(folder)


@pytest.fixture(scope="module", params=list(SHAPES))
def case(request, tmp_path_factory):
    """(shape name, model, saved folder)."""
    model = _hf_qwen3(**SHAPES[request.param])
    return request.param, model, _save(model, tmp_path_factory.mktemp(f"qwen3-{request.param}") / "hf")


@pytest.fixture(scope="module")
def reference(case):
    """(folder, HF logits per prompt, HF greedy tokens per prompt)."""
    _, model, folder = case
    logits = [hf_logits(model, p) for p in PROMPTS]
    greedy = [hf_greedy(model, p, NEW) for p in PROMPTS]
    assert len({tuple(g) for g in greedy}) == len(PROMPTS)  # the prompts lead to different continuations
    return folder, logits, greedy


def test_config_and_parameter_count(case):
    name, model, folder = case
    config = loader.read_config(folder)
    shape = SHAPES[name]
    assert config.qk_norm and not config.qkv_bias
    assert (config.head_dim, config.n_heads, config.n_kv_heads) == (shape["head_dim"], shape["num_attention_heads"],
                                                                    shape["num_key_value_heads"])
    assert config.tie_embeddings == shape["tie_word_embeddings"] and config.rope_theta == 1e6
    assert config.norm_eps == 1e-6  # transformers' default, written by save_pretrained
    n_hf = sum(p.numel() for p in model.parameters())  # a tied lm_head is counted once
    assert config.n_params == n_hf == describe(folder)["n_params"]


@pytest.mark.slow
def test_logits_equal_transformers(reference, tmp_path):
    """float32 logits of every prompt within 1e-4 of HF's (as read from the folder, and restored from a
    shardlm checkpoint converted from it); the q/k norms' weights matter: set to ones, the logits are far off."""
    folder, ref, _ = reference
    loaded = loader.load(folder)
    diffs = [np.abs(shardlm_logits(loaded.model, p) - r).max() for p, r in zip(PROMPTS, ref)]
    print(f"max |logit - HF| per prompt: {diffs}")
    assert max(diffs) < 1e-4

    restored = loader.load(convert(folder, str(tmp_path / "ck")), dtype=None)
    assert restored.config == loaded.config and restored.config.qk_norm
    np.testing.assert_allclose(shardlm_logits(restored.model, PROMPTS[2]), ref[2], atol=1e-4, rtol=0)

    for layer in loaded.model.layers:
        for norm in (layer.attn.q_norm, layer.attn.k_norm):
            norm.scale[...] = jnp.ones_like(norm.scale[...])
    assert np.abs(shardlm_logits(loaded.model, PROMPTS[2]) - ref[2]).max() > 0.05


@pytest.mark.slow
def test_greedy_tokens_equal_transformers(reference):
    """32 greedy tokens of each prompt, all in one batch, identical to HF generate(do_sample=False)."""
    folder, _, greedy = reference
    llm = LLM.load(folder, batch_size=len(PROMPTS), max_seq_len=128)
    out = llm.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    assert [c.token_ids for c in out] == greedy


@pytest.mark.slow
@pytest.mark.parametrize("case", ["untied"], indirect=True)  # one shape: the cache path is shape-blind
def test_prefill_then_decode_equals_full_forward(case):
    """Through the model's dense cache (prefill 10, then one token at a time) and through the engine's
    steps (prefill, insert, generate): the logits of one full forward."""
    model = loader.load(case[2]).model
    cfg = model.cfg
    seq = np.asarray([PROMPTS[2][:24], PROMPTS[1] + PROMPTS[0][:5]], np.int32)  # [2, 24]
    one = Engine(model, batch_size=1, max_seq_len=cfg.max_seq_len)
    full = np.asarray(one.forward(one.params, seq))
    np.testing.assert_allclose(stepwise_logits(model, seq), full, atol=2e-5, rtol=1e-5)

    engine = Engine(model, batch_size=3, max_seq_len=64)
    prompt = PROMPTS[0]
    prefix = engine.prefill(engine.params, prompt)
    state = engine.insert(prefix, engine.init_decode_state(), 1)
    tokens = prompt + [int(prefix.token)]
    for _ in range(10):
        state, out = engine.generate(engine.params, state)
        tokens.append(int(out[1]))
    full = shardlm_logits(model, tokens)
    assert tokens[len(prompt):] == [int(t) for t in full[len(prompt) - 1:-1].argmax(-1)]
    np.testing.assert_allclose(np.asarray(prefix.logits), full[len(prompt) - 1], atol=2e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tied"], indirect=True)  # 8 query heads: every layout splits them
@pytest.mark.parametrize("layout", ["1d_weight_stationary", "2d_weight_stationary"])
def test_layouts_equal_one_device(reference, layout):
    """On 8 virtual devices (x=2, y=2, z=2): the q/k norms replicated on every device, logits within
    1e-4 of HF's and the greedy tokens of one device (HF's)."""
    folder, ref, greedy = reference
    llm = LLM.load(folder, mesh_shape=MESH, layout=layout, batch_size=len(PROMPTS), max_seq_len=128)
    assert llm.layouts == (layout, layout)
    attn = llm.params["layers"][0]["attn"]
    for name in ("q_norm", "k_norm"):
        scale = attn[name]["scale"][...]
        assert scale.sharding.is_fully_replicated and len(scale.sharding.device_set) == 8
    assert len(attn["q"][...].sharding.device_set) == 8 and not attn["q"][...].sharding.is_fully_replicated
    logits = np.asarray(llm.engine.forward(llm.params, [PROMPTS[2]])[0])
    assert np.abs(logits - ref[2]).max() < 1e-4
    out = llm.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    assert [c.token_ids for c in out] == greedy


def test_int8_keeps_the_qk_norms_float(case):
    """int8 quantizes the projections (q, k, ...) and leaves the q/k norms float32, equal to HF's."""
    _, model, folder = case
    loaded = loader.load(folder, quantize="int8")
    quantized = {"/".join(map(str, path)) for path in quant.quantized_weights(loaded.model)}
    assert "layers/0/attn/q" in quantized and not any("norm" in p for p in quantized)
    norm = loaded.model.layers[1].attn.k_norm.scale
    assert isinstance(norm, nnx.Param) and norm[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(norm[...]), model.model.layers[1].self_attn.k_norm.weight.detach().numpy())
    diff = np.abs(shardlm_logits(loaded.model, PROMPTS[0]) - hf_logits(model, PROMPTS[0])).max()
    print(f"int8: max |logit - HF| {diff:.2e}")
    assert 0 < diff < 0.1  # int8 weights: close, not equal


# ----- GGUF: llama.cpp's qwen3 (and qwen2) tensors, stored as HF has them (not permuted) -----

# The tensors' llama.cpp names (gguf.TENSOR_NAMES) of each HF layer tensor.
_GGUF_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
               "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
               "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
               "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
               "self_attn.v_proj.bias": "attn_v.bias",
               "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
               "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
               "mlp.down_proj.weight": "ffn_down.weight"}


def write_gguf(model, path: str, arch: str, skip=()) -> str:
    """The HF model's float32 weights as a GGUF file of llama.cpp architecture `arch` (qwen2 or qwen3),
    as convert_hf_to_gguf.py writes them: the same keys, names, and Q/K rows unpermuted (its Qwen2Model
    and Qwen3Model do not permute; only LlamaModel does), less the tensors named in `skip`. A byte-level
    BPE vocabulary of 128 tokens."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-random-{arch}")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None)
    if head_dim:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list([chr(0x100 + i) for i in range(c.vocab_size)])
    w.add_token_types([1] * c.vocab_size)
    w.add_token_merges([])
    w.add_eos_token_id(c.vocab_size - 1)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    if not c.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        for hf_name, gguf_name in _GGUF_LAYER.items():
            if f"model.layers.{i}.{hf_name}" in state:
                tensors[f"blk.{i}.{gguf_name}"] = state[f"model.layers.{i}.{hf_name}"]
    for name, value in tensors.items():
        if name not in skip:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _hf_qwen2(**shape):
    import transformers

    torch.manual_seed(1)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
            if "self_attn" in name and "o_proj" not in name:
                p.mul_(4.0)  # sharp attention, so that positions (RoPE) decide the tokens
    return model.eval()


# transformers reads a qwen3 GGUF's head_dim as its default, 128 (it ignores attention.key_length):
# 128 here too, which is again not hidden_size / num_attention_heads (64 / 4).
GGUF_CASES = {
    "qwen3": lambda: _hf_qwen3(**dict(SHAPES["untied"], num_hidden_layers=2, head_dim=128)),
    "qwen3 tied": lambda: _hf_qwen3(**dict(SHAPES["tied"], num_hidden_layers=2, head_dim=128)),
    "qwen2": lambda: _hf_qwen2(**dict(BASE, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=False)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case_name", GGUF_CASES)
def test_gguf_equals_hf_folder_and_transformers(case_name, tmp_path):
    """A GGUF of the HF model's weights: its config is the HF folder's, and its logits and greedy tokens
    equal HF's, as does transformers' own reading of the file (gguf_file=), which does not permute
    qwen2/qwen3 Q/K either."""
    import transformers

    arch = case_name.split()[0]
    model = GGUF_CASES[case_name]()
    folder = _save(model, tmp_path / "hf")
    path = write_gguf(model, str(tmp_path / "model.gguf"), arch)
    config = loader.read_config(path)
    hf_config = loader.read_config(folder)
    assert config.qk_norm == (arch == "qwen3") and config.qkv_bias == (arch == "qwen2")
    # the same model but for the name and eps (GGUF holds it as float32)
    assert config.replace(name="", norm_eps=0.0) == hf_config.replace(name="", norm_eps=0.0)
    assert describe(path)["n_params"] == config.n_params == sum(p.numel() for p in model.parameters())
    ref = hf_logits(model, PROMPTS[2])
    ours = shardlm_logits(loader.load(path).model, PROMPTS[2])
    print(f"{case_name}: max |GGUF logit - HF| {np.abs(ours - ref).max():.2e}")
    assert np.abs(ours - ref).max() < 1e-4
    from_gguf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf",
                                                                  dtype=torch.float32).eval()
    assert np.abs(hf_logits(from_gguf, PROMPTS[2]) - ref).max() < 1e-5
    llm = LLM.load(path, batch_size=1, max_seq_len=128)
    assert llm.generate([PROMPTS[1]], SamplingParams(max_new_tokens=16, ignore_eos=True))[0].token_ids == \
        hf_greedy(model, PROMPTS[1], 16)


def test_gguf_missing_qk_norm_tensor(tmp_path):
    model = _hf_qwen3(**dict(SHAPES["untied"], num_hidden_layers=1))
    path = write_gguf(model, str(tmp_path / "model.gguf"), "qwen3", skip=("blk.0.attn_k_norm.weight",))
    with pytest.raises(CheckpointError, match=r"tensor 'blk.0.attn_k_norm.weight' is missing"):
        loader.load(path)


# ----- config.json fields -----


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _save(_hf_qwen3(**dict(SHAPES["untied"], num_hidden_layers=1)), tmp_path_factory.mktemp("small") / "hf")


def _edited(folder, tmp_path, **changes):
    """A copy of the folder with config.json fields set (None deletes one)."""
    dst = str(shutil.copytree(folder, tmp_path / "edited"))
    _edit_config(dst, **{k: DROP if v is None else v for k, v in changes.items()})
    return dst


REFUSED = {
    "attention_bias": (dict(attention_bias=True), "attention_bias=True is not supported"),
    "sliding window": (dict(use_sliding_window=True, sliding_window=64, max_window_layers=0, layer_types=None),
                       "sliding_window=64 is not supported"),
    "yarn": (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
                                       original_max_position_embeddings=32)),
             "rope_parameters.rope_type='yarn' is not supported"),
    "hidden_act": (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_refused_fields(name, small, tmp_path):
    changes, message = REFUSED[name]
    folder = _edited(small, tmp_path, **changes)
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        ModelConfig.from_hf_config(hf)
    with pytest.raises(CheckpointError, match=re.escape(message)):  # the loader's error names config.json
        loader.load(folder)


ACCEPTED = {
    "window unused": dict(use_sliding_window=False, sliding_window=64),
    "window as long as the context": dict(use_sliding_window=True, sliding_window=128, max_window_layers=0,
                                          layer_types=None),
    "attention_bias false": dict(attention_bias=False),
    "mlp_bias (not a Qwen3 field)": dict(mlp_bias=True),
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_fields(name, small, tmp_path):
    config = loader.read_config(_edited(small, tmp_path, **ACCEPTED[name]))
    assert config.qk_norm and not config.qkv_bias and config.head_dim == 24


def test_defaults_as_transformers(small, tmp_path):
    """Fields left out of config.json are transformers' Qwen3Config defaults: head_dim 128 (not hidden / heads),
    32 kv heads, context 32768, eps 1e-6, untied, no window."""
    import transformers

    keep = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads")
    with open(os.path.join(small, "config.json")) as f:
        full = json.load(f)
    hf = {k: full[k] for k in keep}
    hf["num_attention_heads"] = 32  # transformers' default kv heads (32) must divide it
    config = ModelConfig.from_hf_config(hf)
    ref = transformers.Qwen3Config(**{k: v for k, v in hf.items() if k != "model_type"})
    assert (config.head_dim, config.n_kv_heads, config.max_seq_len, config.norm_eps, config.tie_embeddings) == \
        (ref.head_dim, ref.num_key_value_heads, ref.max_position_embeddings, ref.rms_norm_eps, ref.tie_word_embeddings)
    assert config.head_dim == 128 and config.rope_theta == ref.rope_parameters["rope_theta"]


def test_unsupported_architectures_list_qwen3(small, tmp_path):
    folder = _edited(small, tmp_path, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(CheckpointError, match=r"unsupported architecture 'gpt_neox'.*supported model_type: "
                                              r"llama, mistral, qwen2, qwen3"):
        loader.load(folder)
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'deepseek2'; supported: llama, qwen2, qwen3"):
        ModelConfig.from_gguf_metadata({"general.architecture": "deepseek2"})


def test_missing_qk_norm_tensor(small, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = shutil.copytree(small, tmp_path / "bad")
    name = "model.layers.0.self_attn.q_norm.weight"
    with open(folder / "model.safetensors.index.json") as f:
        shard = folder / json.load(f)["weight_map"][name]
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is missing"):
        loader.load(str(folder))
