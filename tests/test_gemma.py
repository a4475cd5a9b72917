"""Gemma 2 and Gemma 3 (text) against HF transformers on the same random weights (save_pretrained of
tiny configs): logits, greedy tokens through the default (paged) engine, prefill plus decode, the
weight-stationary layouts on 8 devices; the sliding window (smaller than the prompts, pages smaller
than the window) and the soft caps checked to matter; the window and soft cap in paged attention
(decode, packed prefill, the shared-prefix read) against a float64 reference; refused fields."""

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
from test_paged_attention import _layout, _max_err, _pool, _slots

from shardlm.checkpoints import loader
from shardlm.checkpoints.convert import convert, describe
from shardlm.checkpoints.gguf import CheckpointError
from shardlm.engine import Engine, SamplingParams
from shardlm.engine.llm import LLM
from shardlm.models import quant
from shardlm.models.config import ModelConfig
from shardlm.models.gemma import Gemma
from shardlm.models.paged_attention import paged_attention, write_kv

WINDOW, PAGE, NEW = 8, 4, 32
BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=WINDOW,
            query_pre_attn_scalar=24)
CONFIGS = {
    # layers: sliding, full, sliding, full
    "gemma2": dict(BASE, attn_logit_softcapping=1.5, final_logit_softcapping=0.5),
    # layers: sliding, sliding, full, sliding; the full layers' RoPE linearly scaled, the sliding ones' own base
    "gemma3": dict(BASE, sliding_window_pattern=3, final_logit_softcapping=None,
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
}
_rng = np.random.default_rng(0)
PROMPTS = [[2, 5, 9, 33, 100, 7, 64]] + [_rng.integers(0, 256, n).tolist() for n in (19, 41)]
MESH = {"x": 2, "y": 2, "z": 2}


def _hf_gemma(family: str, seed: int = 0):
    """A random Gemma2ForCausalLM / Gemma3ForCausalLM with random norms and sharp attention (q and k
    scaled up), so that the window, positions and caps decide the tokens."""
    import transformers

    torch.manual_seed(seed)
    if family == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**CONFIGS[family]))
    else:
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**CONFIGS[family]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
            if "q_proj" in name or "k_proj" in name:
                p.mul_(10.0)
            if "q_norm" in name or "k_norm" in name:  # Gemma 3 normalizes q and k: sharpen by their (1 + w)
                p.copy_((1.0 + p) * 3.0 - 1.0)
    model.generation_config.eos_token_id = None  # 32 tokens, as ignore_eos
    return model.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    """(family, HF model, saved folder, HF logits per prompt, HF greedy tokens per prompt)."""
    model = _hf_gemma(request.param)
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(folder, max_shard_size="100KB")
    logits = [hf_logits(model, p) for p in PROMPTS]
    greedy = [hf_greedy(model, p, NEW) for p in PROMPTS]
    assert len({tuple(g) for g in greedy}) == len(PROMPTS)  # the prompts lead to different continuations
    return request.param, model, str(folder), logits, greedy


def test_config_and_parameter_count(case):
    family, model, folder, _, _ = case
    config = loader.read_config(folder)
    assert config.family == family and config.activation == "gelu_tanh" and config.tie_embeddings
    assert config.sliding_window == WINDOW and config.query_pre_attn_scalar == 24
    assert [config.layer_window(i) for i in range(4)] == [WINDOW if t == "sliding_attention" else 0
                                                          for t in model.config.layer_types]
    if family == "gemma2":
        assert config.layer_types == ("sliding_attention", "full_attention") * 2 and not config.qk_norm
        assert (config.attn_softcap, config.final_softcap, config.rope_theta) == (1.5, 0.5, 10000.0)
    else:
        assert config.layer_types.count("full_attention") == 1 and config.qk_norm
        assert (config.attn_softcap, config.final_softcap) == (0.0, 0.0)
        assert (config.rope_theta, config.rope_scaling.kind, config.rope_scaling.factor) == (1e4, "linear", 2.0)
        assert config.rope_local_theta == 100.0
    assert config.n_params == sum(p.numel() for p in model.parameters()) == describe(folder)["n_params"]


def test_logits_equal_transformers(case):
    """float32 logits within 1e-4 of HF's on every prompt (two of them longer than the window); with
    the window, the soft caps or the sliding layers' RoPE base taken away they are far off."""
    family, _, folder, ref, _ = case
    model = loader.load(folder).model
    diffs = [np.abs(shardlm_logits(model, p) - r).max() for p, r in zip(PROMPTS, ref)]
    print(f"{family}: max |logit - HF| per prompt: {diffs}")
    assert max(diffs) < 1e-4
    changes = [dict(sliding_window=1000)]
    changes += [dict(attn_softcap=0.0), dict(final_softcap=0.0)] if family == "gemma2" else [dict(rope_local_theta=0.0)]
    for change in changes:
        other = Gemma(model.cfg.replace(**change), rngs=None)
        nnx.update(other, nnx.state(model))
        assert np.abs(shardlm_logits(other, PROMPTS[2]) - ref[2]).max() > 0.05, change


@pytest.mark.parametrize("case", ["gemma3"], indirect=True)  # its config has every Gemma field set
def test_shardlm_checkpoint_restores_config_and_logits(case, tmp_path):
    _, _, folder, ref, _ = case
    restored = loader.load(convert(folder, str(tmp_path / "ck")), dtype=None)
    assert restored.config == loader.read_config(folder)
    assert np.abs(shardlm_logits(restored.model, PROMPTS[2]) - ref[2]).max() < 1e-4


# gemma2: Gemma 3's test weights (q/k norms x 3: very sharp attention) amplify int8's error ~10x
@pytest.mark.parametrize("case", ["gemma2"], indirect=True)
def test_int8_quantizes_projections_not_norms(case):
    """int8 weights (projections and embedding, not the norms) give logits close to HF's, not equal."""
    _, _, folder, ref, _ = case
    loaded = loader.load(folder, quantize="int8")
    quantized = {"/".join(map(str, path)) for path in quant.quantized_weights(loaded.model)}
    assert "layers/0/attn/q" in quantized and "embed" in quantized and not any("norm" in p for p in quantized)
    diff = np.abs(shardlm_logits(loaded.model, PROMPTS[2]) - ref[2]).max()
    print(f"int8: max |logit - HF| {diff:.2e}")
    assert 0 < diff < 0.05


@pytest.mark.slow
def test_greedy_tokens_equal_transformers(case):
    """32 greedy tokens of each prompt, all in one batch, through the default engine (paged, pages of
    4 tokens < the window of 8), identical to HF generate(do_sample=False); and two samples of one
    prompt, decoded over the pages they share (the shared-prefix read is skipped under a window)."""
    _, _, folder, _, greedy = case
    llm = LLM.load(folder, max_num_seqs=len(PROMPTS), max_seq_len=128, page_size=PAGE)
    out = llm.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    assert [c.token_ids for c in out] == greedy
    forked = llm.generate([PROMPTS[2]], SamplingParams(max_new_tokens=12, ignore_eos=True, n=2))[0]
    assert [s.token_ids for s in forked.outputs] == [greedy[2][:12]] * 2


@pytest.mark.slow
def test_prefill_then_decode_equals_full_forward(case):
    """Through the model's dense cache (prefill 10, then one token at a time, past the window): the
    logits of one full forward."""
    model = loader.load(case[2]).model
    seq = np.asarray([PROMPTS[2][:24], PROMPTS[1] + PROMPTS[0][:5]], np.int32)  # [2, 24]
    one = Engine(model, batch_size=1, max_seq_len=model.cfg.max_seq_len)
    full = np.asarray(one.forward(one.params, seq))
    np.testing.assert_allclose(stepwise_logits(model, seq), full, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["1d_weight_stationary", "2d_weight_stationary"])
def test_layouts_equal_one_device(case, layout):
    """On 8 virtual devices (x=2, y=2, z=2), the paged engine: the greedy tokens of one device (HF's)."""
    _, _, folder, _, greedy = case
    llm = LLM.load(folder, mesh_shape=MESH, layout=layout, max_num_seqs=len(PROMPTS), max_seq_len=128,
                   page_size=PAGE)
    assert llm.layouts == (layout, layout)
    assert not llm.params["layers"][0]["attn"]["q"][...].sharding.is_fully_replicated
    out = llm.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    assert [c.token_ids for c in out] == greedy


@pytest.mark.slow
def test_weight_gathered_layout_with_windows_equals_hf(case):
    """weight_gathered_xyz on 8 virtual devices, 8 sequences (so decode too runs truly weight-gathered,
    tokens split over every device): the sliding-window and global layers give HF's greedy tokens."""
    _, _, folder, _, greedy = case
    llm = LLM.load(folder, mesh_shape=MESH, layout="weight_gathered_xyz", max_num_seqs=8, max_seq_len=128,
                   page_size=PAGE)
    assert llm.layouts == ("weight_gathered_xyz", "weight_gathered_xyz")
    out = llm.generate(PROMPTS + PROMPTS[:1] * 5, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    assert [c.token_ids for c in out] == greedy + greedy[:1] * 5


def test_pipeline_stages_refuse_mixed_layers(case):
    with pytest.raises(ValueError, match=r"pipeline stages need layers of one structure; layers \[\d"):
        LLM.load(case[2], mesh_shape={"stage": 2, "x": 4}, batch_size=1, max_seq_len=64)


def test_gemma3_for_conditional_generation_loads_its_language_model(tmp_path):
    """A Gemma3ForConditionalGeneration folder (config.json's text_config, the language model's tensors
    beside a vision tower's): the text model's logits, as HF's for text-only input."""
    import transformers

    torch.manual_seed(1)
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=CONFIGS["gemma3"], vision_config=vision, mm_tokens_per_image=4)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(tmp_path)
    loaded = loader.load(str(tmp_path))
    assert loaded.config.family == "gemma3" and loaded.config.layer_types[2] == "full_attention"
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([PROMPTS[2]])).logits[0].numpy()
    assert np.abs(shardlm_logits(loaded.model, PROMPTS[2]) - ref).max() < 1e-4


# ----- the window and the soft cap in paged attention -----

attend = jax.jit(paged_attention, static_argnames=("scale", "pages_per_block", "query_block", "window", "softcap"))


def _reference(q, k, v, pos, lens, window, softcap, scale=0.3):
    """q [T, N, H] at positions pos [T] over contiguous k, v [S, K, H] (float64): query t sees keys
    pos[t] - window < j <= pos[t], j < lens."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    G = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    out = np.zeros_like(q)
    for t, p in enumerate(pos):
        lo, hi = max(p - window + 1, 0), min(p + 1, lens)
        if p < 0 or hi <= lo:
            continue
        s = np.einsum("nh,snh->ns", q[t], k[lo:hi]) * scale
        s = softcap * np.tanh(s / softcap)
        e = np.exp(s - s.max(-1, keepdims=True))
        out[t] = np.einsum("ns,snh->nh", e / e.sum(-1, keepdims=True), v[lo:hi])
    return out


@pytest.mark.parametrize("P,window,pages_per_block", [(4, 8, 1), (4, 6, 3), (16, 5, None), (1, 3, 4)])
def test_paged_window_and_softcap_equal_reference(P, window, pages_per_block):
    """Decode rows (a window inside one page, across pages, longer than some sequences) and rows of
    several queries: each equals the float64 reference with its window and cap."""
    rng = np.random.default_rng(P + window)
    N, K, H, cap = 4, 2, 8, 2.0
    lens = [1, 3, window, window + 1, 3 * P + 5, 40]
    k_pages, v_pages, tables, k, v = _pool(rng, lens, P, K, H)
    q = rng.standard_normal((len(lens), 1, N, H)).astype(np.float32) * 3
    kw = dict(scale=0.3, window=window, softcap=cap, pages_per_block=pages_per_block)
    out = attend(jnp.asarray(q), k_pages, v_pages, tables, jnp.asarray(lens, jnp.int32), **kw)
    for b, n in enumerate(lens):
        assert _max_err(out[b], _reference(q[b], k[b], v[b], [n - 1], n, window, cap)) < 1e-5
    T = 5  # the last T tokens of each long sequence, causal and windowed
    pos = np.array([[n - T + t for t in range(T)] for n in lens[3:]], np.int32)
    q = rng.standard_normal((3, T, N, H)).astype(np.float32) * 3
    out = attend(jnp.asarray(q), k_pages, v_pages, tables[3:], jnp.asarray(lens[3:], jnp.int32), jnp.asarray(pos),
                 **kw)
    for b, n in enumerate(lens[3:]):
        assert _max_err(out[b], _reference(q[b], k[3 + b], v[3 + b], pos[b], n, window, cap)) < 1e-5


def test_paged_window_with_shared_prefix_and_packed_prefill():
    """Decode rows that share their first pages (the cascade read) and a packed prefill row of two
    prompts, each under a window: the reference's outputs."""
    rng = np.random.default_rng(7)
    N, K, H, P, shared, window, cap = 4, 2, 8, 4, 5, 6, 50.0
    S0 = shared * P
    lens = [S0 + 3, S0 + P, S0 + 2 * P + 1, S0 + 1]
    tables, num_pages = _layout(rng, lens, P)
    tables[:, :shared] = tables[0, :shared]
    k, v = (rng.standard_normal((len(lens), max(lens), K, H)).astype(np.float32) for _ in range(2))
    k[:, :S0], v[:, :S0] = k[0, :S0], v[0, :S0]
    rows = [(b, np.arange(0 if b == 0 else S0, n)) for b, n in enumerate(lens)]
    slots = np.concatenate([_slots(tables, P, b, pos) for b, pos in rows]).astype(np.int32)
    pool = lambda: jnp.asarray(1e3 * rng.standard_normal((num_pages, P, K, H)), jnp.float32)  # noqa: E731
    k_pages, v_pages = write_kv(pool(), pool(), jnp.asarray(np.concatenate([k[b, p] for b, p in rows])),
                                jnp.asarray(np.concatenate([v[b, p] for b, p in rows])), jnp.asarray(slots))
    q = rng.standard_normal((len(lens), 1, N, H)).astype(np.float32)
    kv_lens = jnp.asarray(lens, jnp.int32)
    out = attend(jnp.asarray(q), k_pages, v_pages, jnp.asarray(tables), kv_lens, shared_pages=jnp.int32(shared),
                 scale=0.3, window=window, softcap=cap)
    for b, n in enumerate(lens):
        assert _max_err(out[b], _reference(q[b], k[b], v[b], [n - 1], n, window, cap)) < 1e-5
    # packed: sequence 1's last 9 tokens, then sequence 2's last 4, then padding
    seq_ids = np.array([1] * 9 + [2] * 4 + [-1] * 3, np.int32)
    pos = np.concatenate([np.arange(lens[1] - 9, lens[1]), np.arange(lens[2] - 4, lens[2]), [-1] * 3]).astype(np.int32)
    q = rng.standard_normal((len(seq_ids), N, H)).astype(np.float32)
    out = np.asarray(attend(jnp.asarray(q), k_pages, v_pages, jnp.asarray(tables), kv_lens, jnp.asarray(pos),
                            jnp.asarray(seq_ids), scale=0.3, window=window, softcap=cap))
    assert not out[-3:].any()
    for b in (1, 2):
        mine = seq_ids == b
        assert _max_err(out[mine], _reference(q[mine], k[b], v[b], pos[mine], lens[b], window, cap)) < 1e-5


# ----- config.json fields -----


def _edited(folder, tmp_path, **changes):
    dst = str(shutil.copytree(folder, tmp_path / "edited"))
    _edit_config(dst, **{k: DROP if v is None else v for k, v in changes.items()})
    return dst


REFUSED = {
    "hidden_activation": (dict(hidden_activation="relu"), "hidden_activation='relu' is not supported"),
    "attention_bias": (dict(attention_bias=True), "attention_bias=True is not supported"),
    "bidirectional": (dict(use_bidirectional_attention=True), "use_bidirectional_attention=True is not supported"),
    "no window": (dict(sliding_window=0), "sliding_window=0 is not supported"),
    "layer type": (dict(layer_types=["chunked_attention"] * 4), "layer_types='chunked_attention' is not supported"),
    "yarn": (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)),
             "rope_parameters.rope_type='yarn' is not supported"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_refused_fields(name, case, tmp_path):
    changes, message = REFUSED[name]
    if case[0] == "gemma3" and name == "yarn":
        changes = dict(rope_parameters=dict(CONFIGS["gemma3"]["rope_parameters"],
                                            sliding_attention=dict(rope_type="linear", factor=2.0)))
        message = "rope_parameters.sliding_attention={'rope_type': 'linear'"
    folder = _edited(case[2], tmp_path, **changes)
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        ModelConfig.from_hf_config(hf)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        loader.load(folder)


def test_defaults_and_legacy_fields_as_transformers(case):
    """Fields left out are transformers' defaults (window, pattern, caps, scalar, RoPE bases); Gemma 3's
    legacy top-level rope_theta / rope_local_base_freq / rope_scaling are read as transformers reads them."""
    import transformers

    family = case[0]
    hf = {k: BASE[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads")}
    hf["num_hidden_layers"] = 12
    model_type, cls = ("gemma2", transformers.Gemma2Config) if family == "gemma2" else \
        ("gemma3_text", transformers.Gemma3TextConfig)
    ref = cls(**hf)
    config = ModelConfig.from_hf_config(dict(hf, model_type=model_type))
    assert config.layer_types == tuple(ref.layer_types) and config.sliding_window == ref.sliding_window
    assert (config.head_dim, config.n_kv_heads, config.max_seq_len, config.tie_embeddings) == \
        (ref.head_dim, ref.num_key_value_heads, ref.max_position_embeddings, ref.tie_word_embeddings)
    assert config.attn_softcap == (ref.attn_logit_softcapping if family == "gemma2" else 0.0)
    assert config.final_softcap == (ref.final_logit_softcapping or 0.0)
    assert config.query_pre_attn_scalar == ref.query_pre_attn_scalar
    if family == "gemma2":
        assert config.rope_theta == ref.rope_parameters["rope_theta"]
        return
    assert (config.rope_theta, config.rope_local_theta) == (ref.rope_parameters["full_attention"]["rope_theta"],
                                                            ref.rope_parameters["sliding_attention"]["rope_theta"])
    legacy = dict(hf, rope_theta=5e5, rope_local_base_freq=2e3, rope_scaling=dict(rope_type="linear", factor=8.0))
    ref = cls(**legacy)
    config = ModelConfig.from_hf_config(dict(legacy, model_type=model_type))
    assert (config.rope_theta, config.rope_local_theta, config.rope_scaling.factor) == \
        (ref.rope_parameters["full_attention"]["rope_theta"], ref.rope_parameters["sliding_attention"]["rope_theta"],
         ref.rope_parameters["full_attention"]["factor"])
    nested = ModelConfig.from_hf_config({"model_type": "gemma3", "text_config": dict(hf), "tie_word_embeddings": True})
    assert nested.replace(name="") == ModelConfig.from_hf_config(dict(hf, model_type=model_type)).replace(name="")
