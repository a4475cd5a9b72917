"""Mixture of experts (MixtralForCausalLM, Qwen3MoeForCausalLM, Qwen2MoeForCausalLM): random transformers models saved with
save_pretrained load with HF's logits and greedy tokens, on one device and under the weight-stationary
layouts (experts split inside, as the dense MLP); prefill plus decode equals one full forward; the
dispatch is ragged (no dense tokens x experts product); int8 quantizes the experts; checkpoints with
fused expert tensors load alike; the config fields shardlm does not implement are errors naming them."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import hf_greedy, hf_logits, shardlm_logits
from test_checkpoints import DROP, _edit_config
from test_engine import stepwise_logits

from shardlm.checkpoints import loader
from shardlm.checkpoints.convert import describe
from shardlm.checkpoints.gguf import CheckpointError
from shardlm.engine import Engine, SamplingParams
from shardlm.engine.cli import main
from shardlm.engine.llm import LLM
from shardlm.models import moe, quant
from shardlm.models.config import ModelConfig
from shardlm.models.moe import MoE, SparseMoE, route

BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, num_experts_per_tok=2, tie_word_embeddings=False)
CASES = {
    # Mixtral: 8 experts of intermediate_size, renormalised top-2, every layer sparse.
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(BASE, num_local_experts=8, intermediate_size=96)),
    # Qwen3-MoE: 4 experts of moe_intermediate_size, top-2 not renormalised, QK-norm, layer 1 dense.
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                  dict(BASE, num_experts=4, moe_intermediate_size=48, intermediate_size=96, head_dim=16,
                       mlp_only_layers=[1], norm_topk_prob=False)),
    # Qwen2-MoE: 4 experts, renormalised top-2, a gated shared expert, q/k/v biases.
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig",
                  dict(BASE, num_experts=4, moe_intermediate_size=48, intermediate_size=96,
                       shared_expert_intermediate_size=80, norm_topk_prob=True)),
}
_rng = np.random.default_rng(0)
PROMPTS = [[1, 5, 9, 33, 100, 7, 64]] + [_rng.integers(0, 128, n).tolist() for n in (19, 40)]
NEW = 32
MESH = {"x": 2, "y": 2, "z": 2}


def _hf_model(name, seed=0):
    """A random model whose routing and experts matter: router weights N(0, 1) (clear top-k margins,
    so float rounding never flips a choice), expert weights 5x transformers' init, random norms."""
    import transformers

    arch, config, shape = CASES[name]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(getattr(transformers, config)(**shape))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("mlp.gate.weight"):  # the router [E, D]
                p.normal_(0.0, 1.0)
            elif "experts" in pname or "shared_expert." in pname:
                p.mul_(5.0)
            elif pname.endswith("bias") or pname.endswith("shared_expert_gate.weight"):
                p.normal_(0.0, 0.5)
            elif "norm" in pname:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def _save(model, folder) -> str:
    model.save_pretrained(folder, max_shard_size="200KB", safe_serialization=True)
    return str(folder)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(case name, HF model, saved folder)."""
    model = _hf_model(request.param)
    return request.param, model, _save(model, tmp_path_factory.mktemp(request.param) / "hf")


@pytest.fixture(scope="module")
def reference(case):
    """(folder, HF logits per prompt, HF greedy tokens per prompt)."""
    _, model, folder = case
    logits = [hf_logits(model, p) for p in PROMPTS]
    greedy = [hf_greedy(model, p, NEW) for p in PROMPTS]
    assert len({tuple(g) for g in greedy}) == len(PROMPTS)  # the prompts lead to different continuations
    return folder, logits, greedy


def test_config_and_parameter_counts(case, capsys):
    """The MoE fields as transformers reads them (the routing, a dense layer, a shared expert); all parameters and the active ones per token counted
    from HF's own tensors (and shown by `shardlm inspect`); the per-expert tensor names save_pretrained writes."""
    name, model, folder = case
    config = loader.read_config(folder)
    assert config.family == "moe" and config.experts_per_token == 2
    assert config.n_experts == (8 if name == "mixtral" else 4)
    assert config.shared_expert_d_ff == (80 if name == "qwen2_moe" else 0)
    assert config.qkv_bias == (name == "qwen2_moe")
    if name == "mixtral":
        assert (config.expert_d_ff, config.norm_topk_prob, config.dense_layers) == (96, True, ())
        assert config.rope_theta == 1e6 and not config.qk_norm
    elif name == "qwen2_moe":
        assert (config.expert_d_ff, config.norm_topk_prob, config.dense_layers, config.qk_norm) == (48, True, (), False)
    else:
        assert (config.expert_d_ff, config.d_ff, config.norm_topk_prob, config.dense_layers) == (48, 96, False, (1,))
        assert config.qk_norm and config.head_dim == 16
    n_hf = sum(p.numel() for p in model.parameters())
    per_expert = sum(p[0].numel() for n, p in model.named_parameters() if n.endswith("layers.0.mlp.experts.gate_up_proj")
                     or n.endswith("layers.0.mlp.experts.down_proj"))
    moe_layers = sum(hasattr(layer.mlp, "experts") for layer in model.model.layers)
    assert config.n_params == n_hf == describe(folder)["n_params"]
    assert config.n_active_params == n_hf - moe_layers * (config.n_experts - 2) * per_expert
    assert describe(folder)["n_active_params"] == config.n_active_params < config.n_params
    assert main(["inspect", folder]) == 0
    shown = re.search(r"^active parameters +(.*)$", capsys.readouterr().out, re.M).group(1)
    assert shown == f"{config.n_active_params:,} per token"
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        names = json.load(f)["weight_map"]
    expert = "block_sparse_moe.experts.7.w2.weight" if name == "mixtral" else "mlp.experts.3.down_proj.weight"
    assert f"model.layers.2.{expert}" in names


@pytest.mark.slow
def test_logits_equal_transformers(reference, case):
    """float32 logits of every prompt within 1e-4 of HF's; the routing normalisation matters (flipped,
    the logits are far off)."""
    folder, ref, _ = reference
    loaded = loader.load(folder)
    diffs = [np.abs(shardlm_logits(loaded.model, p) - r).max() for p, r in zip(PROMPTS, ref)]
    print(f"{case[0]}: max |logit - HF| per prompt: {diffs}")
    assert max(diffs) < 1e-4
    flipped = loader.load(folder)
    for layer in flipped.model.layers:
        if isinstance(layer.mlp, SparseMoE):
            layer.mlp.renormalise = not layer.mlp.renormalise
    assert np.abs(shardlm_logits(flipped.model, PROMPTS[2]) - ref[2]).max() > 1e-2


@pytest.mark.slow
def test_greedy_tokens_equal_transformers(reference):
    """32 greedy tokens of each prompt, all in one batch through the default (paged) engine,
    identical to HF generate(do_sample=False)."""
    folder, _, greedy = reference
    llm = LLM.load(folder, batch_size=len(PROMPTS), max_seq_len=128)
    out = llm.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    assert [c.token_ids for c in out] == greedy


@pytest.mark.slow
@pytest.mark.parametrize("case", ["qwen3_moe"], indirect=True)  # one case: the cache path is MLP-blind
def test_prefill_then_decode_equals_full_forward(case):
    """Through the model's dense cache (prefill 10, then one token at a time) and through the engine's
    steps (prefill, insert, generate): the logits of one full forward. Tokens routed one at a time meet
    other tokens in the experts than in the full forward, so this also checks the dispatch per token."""
    model = loader.load(case[2]).model
    seq = np.asarray([PROMPTS[2][:24], PROMPTS[1] + PROMPTS[0][:5]], np.int32)  # [2, 24]
    one = Engine(model, batch_size=1, max_seq_len=model.cfg.max_seq_len)
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


# Where each layout stores an expert weight [E, D, F]: E whole, D and F as the dense MLP's (TP inside experts).
EXPERT_SPECS = {"1d_weight_stationary": (None, None, ("x", "y", "z")), "2d_weight_stationary": (None, "x", ("z", "y"))}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe"], indirect=True)  # Qwen3's QK-norm: test_qwen3.py
@pytest.mark.parametrize("layout", list(EXPERT_SPECS))
def test_layouts_equal_one_device(reference, layout):
    """On 8 virtual devices (x=2, y=2, z=2): the experts' F split over the layout's F axes, every
    expert on every device group; logits within 1e-4 of HF's and HF's greedy tokens."""
    folder, ref, greedy = reference
    llm = LLM.load(folder, mesh_shape=MESH, layout=layout, batch_size=len(PROMPTS), max_seq_len=128)
    assert llm.layouts == (layout, layout)
    mlp = llm.params["layers"][0]["mlp"]
    for name in ("gate", "up"):
        assert tuple(mlp[name][...].sharding.spec) == EXPERT_SPECS[layout]
    assert mlp["down"][...].sharding.spec[0] is None and len(mlp["down"][...].sharding.device_set) == 8
    logits = np.asarray(llm.engine.forward(llm.params, [PROMPTS[2]])[0])
    assert np.abs(logits - ref[2]).max() < 1e-4
    out = llm.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    assert [c.token_ids for c in out] == greedy


@pytest.mark.parametrize("grouped", [True, False], ids=["ragged_dot", "cpu_scan"])
def test_dispatch_is_ragged_not_dense(grouped, monkeypatch):
    """The traced MoE block runs its three expert matmuls over the sorted token-slots [T*k, ...]: as
    ragged_dot where the backend has a grouped matmul, as a scan over the experts on CPU; no
    intermediate has both an experts and an expert-F dimension (a dense [T, E, F] product), and
    the result equals a per-token reference of the same weights."""
    monkeypatch.setattr(moe, "_on_cpu", lambda: not grouped)
    cfg = ModelConfig("tiny-moe", vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                      d_ff=24, family="moe", n_experts=6, experts_per_token=2, expert_d_ff=40)
    block = SparseMoE(cfg, jnp.float32, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    jaxpr = jax.make_jaxpr(lambda x: block(x))(x)
    eqns = [e for e in jaxpr.jaxpr.eqns]
    products = [e for e in eqns if e.primitive.name == ("ragged_dot_general" if grouped else "scan")]
    assert [e.outvars[0].aval.shape for e in products] == [(20, 40), (20, 40), (20, 16)]
    for e in eqns:
        for v in e.outvars:
            assert not (6 in v.aval.shape and 40 in v.aval.shape), (e.primitive, v.aval.shape)
    # and against a per-token reference of the same weights (Mixtral's routing)
    w = {n: np.asarray(getattr(block, n)[...]) for n in ("router", "gate", "up", "down")}
    tokens = np.asarray(x).reshape(10, 16)
    weights, experts = (np.asarray(a) for a in route(tokens @ w["router"], 2, True))
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    ref = np.stack([sum(weights[t, j] * (silu(tokens[t] @ w["gate"][e]) * (tokens[t] @ w["up"][e])) @ w["down"][e]
                        for j, e in enumerate(experts[t])) for t in range(10)])
    np.testing.assert_allclose(np.asarray(block(x)).reshape(10, 16), ref, atol=1e-5, rtol=1e-5)
    assert np.allclose(weights.sum(-1), 1.0) and not np.allclose(np.asarray(route(tokens @ w["router"], 2, False)[0])
                                                                 .sum(-1), 1.0)


def _dequantized(w) -> np.ndarray:
    """An expert weight [E, in, out] (or the router) as float: an int8 QArray's values times its scales [E, out]."""
    if isinstance(w, quant.QArray):
        return np.asarray(w.values, np.float32) * np.asarray(w.scale, np.float32)[:, None, :]
    return np.asarray(w)


def test_decode_sized_dispatch_gathers_each_slots_expert():
    """On CPU, with fewer token-slots than half the experts (decode at batch 1), each slot's expert
    weights are gathered instead of a ragged_dot (which XLA:CPU runs masked over all experts); the
    result equals the per-token reference, float and int8."""
    cfg = ModelConfig("tiny-moe", vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                      d_ff=24, family="moe", n_experts=6, experts_per_token=2, expert_d_ff=40, norm_topk_prob=True)
    x = jax.random.normal(jax.random.key(2), (1, 1, 16))
    for quantize in (None, "int8"):
        block = SparseMoE(cfg, jnp.float32, nnx.Rngs(0), quantize)
        jaxpr = jax.make_jaxpr(lambda x: block(x))(x)
        assert not any(e.primitive.name == "ragged_dot_general" for e in jaxpr.jaxpr.eqns)
        w = {n: _dequantized(getattr(block, n)[...]) for n in ("router", "gate", "up", "down")}
        token = np.asarray(x).reshape(16)
        weights, experts = (np.asarray(a)[0] for a in route(token[None] @ w["router"], 2, True))
        silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
        ref = sum(weights[j] * (silu(token @ w["gate"][e]) * (token @ w["up"][e])) @ w["down"][e]
                  for j, e in enumerate(experts))
        np.testing.assert_allclose(np.asarray(block(x)).reshape(16), ref, atol=1e-5, rtol=1e-5)


def test_int8_quantizes_the_experts(case):
    """int8 quantizes the experts (one scale per expert and output channel) and keeps the router float."""
    name, model, folder = case
    loaded = loader.load(folder, quantize="int8")
    assert isinstance(loaded.model, MoE)
    quantized = {"/".join(map(str, path)) for path in quant.quantized_weights(loaded.model)}
    assert {"layers/0/mlp/gate", "layers/0/mlp/up", "layers/0/mlp/down"} <= quantized
    assert not any(p.endswith("router") for p in quantized)
    gate = loaded.model.layers[0].mlp.gate
    assert gate.values[...].dtype == jnp.int8 and gate.scale[...].shape == (loaded.config.n_experts, loaded.config.expert_d_ff)
    diff = np.abs(shardlm_logits(loaded.model, PROMPTS[0]) - hf_logits(model, PROMPTS[0])).max()
    print(f"{name} int8: max |logit - HF| {diff:.2e}")
    assert 0 < diff < 0.1  # int8 weights: close, not equal


@pytest.mark.parametrize("case", ["mixtral"], indirect=True)
def test_fused_expert_tensors_load_alike(case, tmp_path):
    """A checkpoint holding transformers 5's fused module tensors (mlp.gate, mlp.experts.gate_up_proj
    [E, 2F, D], mlp.experts.down_proj [E, D, F]) instead of per-expert ones loads the same weights."""
    from safetensors.torch import save_file

    _, model, folder = case
    fused = str(tmp_path / "fused")
    os.makedirs(fused)
    shutil.copy(os.path.join(folder, "config.json"), fused)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(fused, "model.safetensors"),
              metadata={"format": "pt"})
    per_expert, from_fused = loader.load(folder).model, loader.load(fused).model
    for a, b in zip(jax.tree.leaves(nnx.state(per_expert)), jax.tree.leaves(nnx.state(from_fused))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----- config.json fields -----


def _edited(folder, tmp_path, **changes):
    dst = str(shutil.copytree(folder, tmp_path / "edited"))
    _edit_config(dst, **{k: DROP if v is None else v for k, v in changes.items()})
    return dst


REFUSED = {
    ("mixtral", "sliding window"): (dict(sliding_window=64), "sliding_window=64 is not supported"),
    ("mixtral", "top-k above the experts"): (dict(num_experts_per_tok=9), "num_experts_per_tok=9 is not supported"),
    ("qwen3_moe", "attention_bias"): (dict(attention_bias=True), "attention_bias=True is not supported"),
    ("qwen3_moe", "decoder_sparse_step"): (dict(decoder_sparse_step=0), "decoder_sparse_step=0 is not supported"),
    ("qwen3_moe", "no experts"): (dict(num_local_experts=0), "num_experts=0 is not supported"),
}


@pytest.mark.parametrize("key", REFUSED, ids=[" ".join(k) for k in REFUSED])
def test_refused_fields(key, tmp_path_factory, tmp_path):
    name, _ = key
    folder = _save(_hf_model(name), tmp_path_factory.mktemp(name) / "hf")
    changes, message = REFUSED[key]
    with pytest.raises(CheckpointError, match=re.escape(message)):  # the loader's error names config.json
        loader.load(_edited(folder, tmp_path, **changes))


def test_qwen3_moe_sparse_step_and_defaults():
    """decoder_sparse_step 2 makes the even layers dense (with mlp_only_layers); the expert count under
    either name; fields left out are transformers' defaults (Mixtral: RoPE base 1e6, 8 experts top-2)."""
    import transformers

    qwen = dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
                num_attention_heads=4, num_experts=8, decoder_sparse_step=2, mlp_only_layers=[3])
    config = ModelConfig.from_hf_config(qwen)
    ref = transformers.Qwen3MoeConfig(**{k: v for k, v in qwen.items() if k != "model_type"})
    dense = tuple(i for i in range(6) if i in ref.mlp_only_layers or (i + 1) % ref.decoder_sparse_step)
    assert config.dense_layers == dense == (0, 2, 3, 4)
    assert (config.n_experts, config.experts_per_token, config.expert_d_ff, config.norm_topk_prob, config.n_kv_heads) \
        == (ref.num_experts, ref.num_experts_per_tok, ref.moe_intermediate_size, ref.norm_topk_prob,
            ref.num_key_value_heads)
    assert config.head_dim == 32 // 4 and config.rope_theta == ref.rope_parameters["rope_theta"]
    mixtral = dict(model_type="mixtral", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=8)
    config = ModelConfig.from_hf_config(mixtral)
    ref = transformers.MixtralConfig(**{k: v for k, v in mixtral.items() if k != "model_type"})
    assert (config.n_experts, config.experts_per_token, config.rope_theta, config.n_kv_heads, config.max_seq_len) == \
        (ref.num_local_experts, ref.num_experts_per_tok, ref.rope_parameters["rope_theta"], ref.num_key_value_heads,
         ref.max_position_embeddings) == (8, 2, 1e6, 8, 131072)


def test_unsupported_architectures_list_the_moe_ones(tmp_path):
    folder = _save(_hf_model("qwen3_moe"), tmp_path / "hf")
    _edit_config(folder, model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"])
    with pytest.raises(CheckpointError, match=r"unsupported architecture 'deepseek_v3'.*supported model_type: "
                                              r"llama, mistral, qwen2, qwen3.*mixtral, qwen3_moe"):
        loader.load(folder)
