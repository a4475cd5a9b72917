"""Checkpoints: HF safetensors import equals HF transformers; convert + Orbax restore onto other meshes
and layouts gives the same tokens; bad input is a clear error that writes nothing at DST."""

import json
import os
import re
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from shardlm.checkpoints import loader, orbax_io
from shardlm.checkpoints.convert import convert, describe
from shardlm.checkpoints.gguf import CheckpointError
from shardlm.checkpoints.hf import HFWeights, load_tokenizer
from shardlm.checkpoints.hf import read_config as hf_read_config
from shardlm.checkpoints.tokenizer import tokenizer_from_file
from shardlm.engine import Engine, SamplingParams
from shardlm.engine.cli import main
from shardlm.engine.llm import LLM
from shardlm.models.config import RopeScaling
from shardlm.sharding.placement import Placement

PROMPT = [1, 5, 9, 33, 100, 7, 64]
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def _hf_model(family: str, sharpen: float = 1.0, **config):
    """A random HF model of SMALL's shapes (with `config` over them); `sharpen` scales q/k/v/o so that
    attention, and so positions, decide the tokens (at 1, the logits hardly depend on RoPE)."""
    import transformers

    torch.manual_seed(0)
    kw = dict(SMALL, **config)
    if family == "llama":  # tied embeddings, GQA
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, tie_word_embeddings=True))
    elif family == "mistral":  # untied lm_head
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**kw, tie_word_embeddings=False))
    else:  # qwen2: attention biases, untied
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw, tie_word_embeddings=False))
    with torch.no_grad():  # non-zero norms and biases, so every tensor's mapping is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
        if sharpen != 1.0:
            for layer in model.model.layers:
                a = layer.self_attn
                for proj in (a.q_proj, a.k_proj, a.v_proj, a.o_proj):
                    proj.weight.mul_(sharpen)
    return model.eval()


def _save_hf(model, folder, dtype=torch.float32):
    model.to(dtype).save_pretrained(folder, max_shard_size="40KB", safe_serialization=True)
    model.float()
    return str(folder)


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def hf_case(request, tmp_path_factory):
    model = _hf_model(request.param)
    folder = _save_hf(model, tmp_path_factory.mktemp(request.param) / "hf")
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0].numpy()
        greedy = model.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False,
                                attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long))[0, len(PROMPT):].tolist()
    return request.param, folder, logits, greedy


def _logits(model, prompt=PROMPT):
    engine = Engine(model, batch_size=1, max_seq_len=model.cfg.max_seq_len)
    return np.asarray(engine.forward(engine.params, [prompt])[0])


def _greedy(llm, prompt=PROMPT):
    return llm.generate([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].token_ids


def _hf_greedy(model, prompt=PROMPT):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


@pytest.mark.slow
def test_hf_import_and_convert_equal_transformers(hf_case, tmp_path):
    family, folder, ref_logits, ref_greedy = hf_case
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 2  # really sharded
    np.testing.assert_allclose(_logits(loader.load(folder).model), ref_logits, atol=1e-5, rtol=1e-5)
    assert _greedy(LLM.load(folder, batch_size=1, max_seq_len=32)) == ref_greedy

    dst = convert(folder, str(tmp_path / "ck"))
    restored = loader.load(dst, dtype=None)
    assert restored.config == loader.load(folder).config
    np.testing.assert_allclose(_logits(restored.model), ref_logits, atol=1e-5, rtol=1e-5)
    assert _greedy(LLM.load(dst, batch_size=1, max_seq_len=32)) == ref_greedy


def _placed_llm(path, devices, layout):
    """A model restored straight into the shardings of `layout` over `devices` (a mesh on some of the 8)."""
    placement = Placement.make(loader.read_config(path), mesh_shape={"x": len(devices)}, layout=layout, batch_size=1,
                               devices=devices)
    loaded = loader.load(path, placement=placement, dtype=None)
    engine = Engine(loaded.model, batch_size=1, max_seq_len=32, placement=placement)
    prefix = engine.prefill(engine.params, PROMPT)
    state = engine.insert(prefix, engine.init_decode_state(), 0)
    tokens = [int(prefix.token)]
    for _ in range(7):
        state, out = engine.generate(engine.params, state)
        tokens.append(int(out[0]))
    return loaded.model, tokens


@pytest.mark.slow
def test_save_on_one_mesh_restore_on_others(tmp_path):
    """Saved from 2D weight-stationary on x=2,y=2,z=2; restored to 1D weight-stationary on x=4 and to one
    device: same greedy tokens as HF, each array in the target's sharding."""
    model = _hf_model("qwen2")
    folder = _save_hf(model, tmp_path / "hf")
    with torch.no_grad():
        ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False,
                             attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long))[0, len(PROMPT):].tolist()
    reads = []  # (tensor, elements read): each device's slice is read, never a whole projection
    real_read = HFWeights.read
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HFWeights, "read", lambda self, name, index: reads.append(real_read(self, name, index)) or reads[-1])
        src = LLM.load(folder, mesh_shape={"x": 2, "y": 2, "z": 2}, layout="2d_weight_stationary", batch_size=1,
                       max_seq_len=32)
    assert max(r.size for r in reads) < 96 * 64  # the largest projection is [96, 64] (F x D)
    assert _greedy(src) == ref
    gate = src.params["layers"][0]["mlp"]["gate"][...]
    assert len(gate.sharding.device_set) == 8 and gate.addressable_shards[0].data.shape == (32, 24)
    orbax_io.save(str(tmp_path / "ck"), src.engine.model(), src.config)
    del src

    x4, tokens = _placed_llm(str(tmp_path / "ck"), jax.devices()[:4], "1d_weight_stationary")
    assert tokens == ref
    gate = x4.layers[0].mlp.gate[...]  # E F_x: [64, 96] split 4 ways on F
    assert len(gate.sharding.device_set) == 4 and gate.addressable_shards[0].data.shape == (64, 24)
    one, tokens = _placed_llm(str(tmp_path / "ck"), jax.devices()[5:6], "replicated")
    assert tokens == ref and one.layers[0].mlp.gate[...].sharding.device_set == {jax.devices()[5]}


def test_bf16_source_and_dtype_cast(tmp_path):
    """A bf16 HF folder converts to bf16 by default; restore can cast to float32; values survive exactly."""
    model = _hf_model("llama")
    folder = _save_hf(model, tmp_path / "hf", dtype=torch.bfloat16)
    dst = convert(folder, str(tmp_path / "ck"))
    assert describe(dst)["dtypes"] == {"bfloat16": describe(folder)["n_params"]}
    bf16 = loader.load(dst, dtype=None).model
    f32 = loader.load(dst, dtype=jnp.float32).model
    assert bf16.embed[...].dtype == jnp.bfloat16 and f32.embed[...].dtype == jnp.float32
    expected = model.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(f32.embed[...]), expected)
    q = model.model.layers[1].self_attn.q_proj.weight.detach().to(torch.bfloat16).float().numpy()  # [N*H, D]
    np.testing.assert_array_equal(np.asarray(f32.layers[1].attn.q[...]).reshape(64, 64), q.T)


def test_cli_convert_inspect_and_force(tmp_path, capsys):
    folder = _save_hf(_hf_model("llama"), tmp_path / "hf")
    dst = str(tmp_path / "ck")
    assert main(["convert", folder, dst, "--dtype", "f32"]) == 0
    assert main(["inspect", dst, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "shardlm" and info["dtypes"] == {"float32": info["n_params"]}
    assert info["n_params"] == describe(folder)["n_params"] == loader.load(folder).config.n_params
    assert main(["convert", folder, dst]) == 2
    assert "already exists" in capsys.readouterr().err
    before = os.stat(os.path.join(dst, orbax_io.FORMAT_FILE)).st_mtime_ns
    assert main(["convert", folder, dst, "--dtype", "bf16", "--force"]) == 0
    assert describe(dst)["dtypes"] == {"bfloat16": info["n_params"]}
    assert os.stat(os.path.join(dst, orbax_io.FORMAT_FILE)).st_mtime_ns != before
    assert sorted(os.listdir(tmp_path)) == ["ck", "hf"]  # no .partial / .old left behind


@pytest.mark.slow
def test_gguf_tokenizer_travels_into_checkpoint(llm, gguf_path, tmp_path):
    """The tokenizer built from GGUF metadata, written into a checkpoint and read back: same ids, chat
    prompt and stop tokens (`shardlm convert` of a GGUF writes it this way)."""
    orbax_io.save_tokenizer(llm.tokenizer, str(tmp_path))
    back = tokenizer_from_file(str(tmp_path / "tokenizer.json"))
    messages = [{"role": "user", "content": "What is the capital of France? Ünïcödé, 12345 <|im_end|>"}]
    text = llm.tokenizer.apply_chat_template(messages)
    assert back.apply_chat_template(messages) == text
    assert back.encode(text) == llm.tokenizer.encode(text) and back.encode("x", add_bos=True)[0] == llm.tokenizer.bos_token_id
    assert back.stop_token_ids == llm.tokenizer.stop_token_ids and back.add_bos == llm.tokenizer.add_bos
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 11]}))
    assert load_tokenizer(str(tmp_path)).stop_token_ids == llm.tokenizer.stop_token_ids + [7, 11]
    info = describe(gguf_path)  # `shardlm inspect` of a GGUF
    assert info["format"] == "gguf" and info["n_params"] == llm.config.n_params and "Q4_1" in info["dtypes"]


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = loader.load(_save_hf(_hf_model("llama"), tmp_path / "hf"))
    dst = orbax_io.save(str(tmp_path / "ck"), model.model, model.config)
    saved = _logits(loader.load(dst, dtype=None).model)

    def fail(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(orbax_io, "save_tokenizer", fail)  # dies after the params are written
    with pytest.raises(KeyboardInterrupt):
        orbax_io.save(dst, model.model, model.config, tokenizer=object(), force=True)
    with pytest.raises(KeyboardInterrupt):
        orbax_io.save(str(tmp_path / "new"), model.model, model.config, tokenizer=object())
    assert sorted(os.listdir(tmp_path)) == ["ck", "hf"]
    np.testing.assert_array_equal(_logits(loader.load(dst, dtype=None).model), saved)
    # a half-written folder (no shardlm.json) is not taken for a checkpoint
    shutil.copytree(os.path.join(dst, orbax_io.PARAMS_DIR), tmp_path / "half" / orbax_io.PARAMS_DIR)
    with pytest.raises(CheckpointError, match="neither a shardlm checkpoint"):
        loader.load(str(tmp_path / "half"))


@pytest.fixture(scope="module")
def good_hf(tmp_path_factory):
    return _save_hf(_hf_model("mistral"), tmp_path_factory.mktemp("good") / "hf")


def _broken(good, tmp_path, edit):
    folder = tmp_path / "bad"
    shutil.copytree(good, folder)
    edit(folder)
    return str(folder)


def _shard_holding(folder, tensor):
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"][tensor]


def _rewrite_tensor(folder, tensor, value):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(folder, _shard_holding(folder, tensor))
    tensors = load_file(path)
    if value is None:
        del tensors[tensor]
    else:
        tensors[tensor] = value
    save_file(tensors, path, metadata={"format": "pt"})


def _corrupt_header(folder):
    path = os.path.join(folder, _shard_holding(folder, "model.layers.1.mlp.up_proj.weight"))
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8)
        f.write(b"{not json" + b" " * (n - 9))


def _unknown_arch(folder):
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    cfg["model_type"], cfg["architectures"] = "gpt_neox", ["GPTNeoXForCausalLM"]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)


BAD = {
    "missing shard": (lambda d: os.remove(os.path.join(d, _shard_holding(d, "lm_head.weight"))),
                      r"model.safetensors.index.json lists 'model-000\d\d-of-000\d\d.safetensors', which is missing"),
    "wrong shape": (lambda d: _rewrite_tensor(d, "model.layers.1.self_attn.k_proj.weight",
                                              np.zeros((16, 64), np.float32)),
                    r"model-000\d\d-of-000\d\d.safetensors: tensor 'model.layers.1.self_attn.k_proj.weight' has "
                    r"shape \[16, 64\], expected \[32, 64\]"),
    "missing tensor": (lambda d: _rewrite_tensor(d, "model.layers.0.mlp.down_proj.weight", None),
                       r"tensor 'model.layers.0.mlp.down_proj.weight' is missing"),
    "unknown architecture": (_unknown_arch, r"config.json: unsupported architecture 'gpt_neox'"),
    "corrupt header": (_corrupt_header, r"corrupt safetensors file .*model-000\d\d-of-000\d\d.safetensors"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_clear_error_and_nothing_written(case, good_hf, tmp_path, capsys):
    edit, message = BAD[case]
    folder = _broken(good_hf, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        loader.load(folder)
    dst = tmp_path / "out"
    assert main(["convert", folder, str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert not os.path.exists(dst) and not os.path.exists(f"{dst}.partial")


def test_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a shardlm checkpoint"):
        loader.load(str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="does not exist"):
        convert(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


# ----- RoPE and the other config fields, in both config.json layouts -----

# Past 1,024 positions, where RoPE's theta and llama3 scaling (original context 256) decide the tokens.
LONG_PROMPT = np.random.default_rng(0).integers(0, SMALL["vocab_size"], 1100).tolist()
LONG_ROPE = {
    "llama": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=256),
    "mistral": dict(rope_type="default", rope_theta=1e6),
    "qwen2": dict(rope_type="default", rope_theta=1e6),
}


DROP = object()


def _edit_config(folder, **changes):
    """Set config.json fields (None writes null; DROP deletes the field)."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    for key, value in changes.items():
        if value is DROP:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    with open(path, "w") as f:
        json.dump(cfg, f)


def _legacy_copy(folder, dst):
    """`folder` with config.json in the layout before transformers 5: top-level rope_theta and rope_scaling."""
    shutil.copytree(folder, dst)
    with open(os.path.join(folder, "config.json")) as f:
        rope = dict(json.load(f)["rope_parameters"])
    theta = rope.pop("rope_theta")
    _edit_config(dst, rope_parameters=DROP, rope_theta=theta,
                 rope_scaling=rope if rope["rope_type"] != "default" else None)
    return str(dst)


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def long_case(request, tmp_path_factory):
    """A random model saved by transformers' save_pretrained (rope_parameters; Mistral keeps its default
    sliding_window 4096, above max_position_embeddings 2048), a legacy-layout copy, and HF's logits and
    greedy tokens for LONG_PROMPT."""
    import transformers

    family = request.param
    model = _hf_model(family, sharpen=6.0, max_position_embeddings=2048, rope_parameters=dict(LONG_ROPE[family]))
    root = tmp_path_factory.mktemp(f"long-{family}")
    folders = {"rope_parameters": _save_hf(model, root / "hf")}
    with open(os.path.join(folders["rope_parameters"], "config.json")) as f:
        written = json.load(f)
    assert "rope_theta" not in written and written["rope_parameters"]["rope_theta"] == LONG_ROPE[family]["rope_theta"]
    folders["legacy"] = _legacy_copy(folders["rope_parameters"], root / "legacy")
    # transformers reads the legacy copy as the same RoPE
    assert (transformers.AutoConfig.from_pretrained(folders["legacy"]).rope_parameters
            == transformers.AutoConfig.from_pretrained(folders["rope_parameters"]).rope_parameters)
    with torch.no_grad():
        logits = model(torch.tensor([LONG_PROMPT])).logits[0].numpy()
    return family, folders, logits, _hf_greedy(model, LONG_PROMPT)


@pytest.mark.parametrize("layout", ["rope_parameters", "legacy"])
@pytest.mark.slow
def test_long_prompt_rope_equals_transformers(long_case, layout):
    """Llama 3 (llama3 scaling, theta 500000), Mistral and Qwen2 (theta 1e6), both config layouts: logits
    within 1e-5 of HF over 1,100 positions and the same greedy tokens."""
    family, folders, ref_logits, ref_greedy = long_case
    loaded = loader.load(folders[layout])
    rope = LONG_ROPE[family]
    assert loaded.config.rope_theta == rope["rope_theta"]
    assert loaded.config.rope_scaling.kind == ("llama3" if family == "llama" else "none")
    np.testing.assert_allclose(_logits(loaded.model, LONG_PROMPT), ref_logits, atol=1e-5, rtol=1e-5)
    assert _greedy(LLM.load(folders[layout], batch_size=1, max_seq_len=1152), LONG_PROMPT) == ref_greedy


def test_long_prompt_depends_on_rope(long_case, tmp_path):
    """The test above can fail: the same weights with the RoPE fields dropped (theta 10000, no scaling:
    what shardlm read from these folders before) are far from HF's logits and change the argmax at
    over a tenth of the positions."""
    _, folders, ref_logits, _ = long_case
    folder = shutil.copytree(folders["rope_parameters"], tmp_path / "no-rope")
    _edit_config(folder, rope_parameters=DROP)
    loaded = loader.load(str(folder))
    assert loaded.config.rope_theta == 10000.0 and loaded.config.rope_scaling.kind == "none"
    logits = _logits(loaded.model, LONG_PROMPT)
    assert np.abs(logits - ref_logits).max() > 0.05
    assert (logits.argmax(-1) != ref_logits.argmax(-1)).mean() > 0.1


def _rope_of(hf_rope: dict):
    """(theta, RopeScaling) from transformers' standardized rope_parameters."""
    kind = hf_rope["rope_type"]
    scaling = RopeScaling()
    if kind == "linear":
        scaling = RopeScaling("linear", factor=hf_rope["factor"])
    elif kind == "llama3":
        scaling = RopeScaling("llama3", factor=hf_rope["factor"], low_freq_factor=hf_rope["low_freq_factor"],
                              high_freq_factor=hf_rope["high_freq_factor"],
                              original_max_position=hf_rope["original_max_position_embeddings"])
    return hf_rope["rope_theta"], scaling


LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
# config.json RoPE fields (over a Mistral config without any): each read as transformers reads it.
ROPE_LAYOUTS = {
    "nothing": {},
    "top-level theta": dict(rope_theta=1e6),
    "rope_parameters": dict(rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    "rope_parameters without theta": dict(rope_theta=5e5, rope_parameters=dict(rope_type="linear", factor=2.0)),
    "theta in both": dict(rope_theta=5e5, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    "legacy rope_scaling wins": dict(rope_theta=5e5, rope_scaling=dict(type="linear", factor=4.0),
                                     rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    "legacy llama3": dict(rope_theta=5e5, rope_scaling=dict(rope_type="llama3", **LLAMA3,
                                                            original_max_position_embeddings=64)),
    "llama3 without original": dict(rope_parameters=dict(rope_type="llama3", rope_theta=5e5, **LLAMA3)),
    "top-level original wins": dict(original_max_position_embeddings=32, rope_parameters=dict(
        rope_type="llama3", rope_theta=5e5, **LLAMA3, original_max_position_embeddings=64)),
    "unused keys": dict(rope_parameters=dict(rope_type="default", rope_theta=1e6, factor=3.0,
                                             partial_rotary_factor=1.0)),
}


@pytest.mark.parametrize("case", ROPE_LAYOUTS)
def test_rope_fields_read_as_transformers_reads_them(case, good_hf, tmp_path):
    import transformers

    folder = shutil.copytree(good_hf, tmp_path / "hf")
    _edit_config(folder, rope_parameters=DROP, rope_theta=DROP, rope_scaling=DROP)
    _edit_config(folder, **ROPE_LAYOUTS[case])
    hf_config = transformers.AutoConfig.from_pretrained(folder)
    hf_config.standardize_rope_params()  # as transformers' RoPE init functions do before reading it
    config = hf_read_config(str(folder))
    assert (config.rope_theta, config.rope_scaling) == _rope_of(hf_config.rope_parameters)


def _per_layer_rope(full_theta, sliding_theta):
    rope = {"full_attention": dict(rope_type="default", rope_theta=full_theta),
            "sliding_attention": dict(rope_type="default", rope_theta=sliding_theta)}
    # a window as long as the context: sliding_attention layers that attend like full ones
    return dict(rope_parameters=rope, use_sliding_window=True, sliding_window=128,
                layer_types=["full_attention", "sliding_attention"])


# config.json fields that shardlm implements, or that do not change the math: (family, fields, check).
ACCEPTED = {
    "mistral window null": ("mistral", dict(sliding_window=None), None),
    "mistral window = context": ("mistral", dict(sliding_window=128), None),
    "qwen2 window unused": ("qwen2", dict(use_sliding_window=False, sliding_window=64), None),
    "llama window (not a llama field)": ("llama", dict(sliding_window=64), None),
    "mistral attention_bias (ignored by transformers)": ("mistral", dict(attention_bias=True), None),
    "swish": ("llama", dict(hidden_act="swish"), None),
    "no rms_norm_eps": ("llama", dict(rms_norm_eps=DROP), lambda c: c.norm_eps == 1e-6),
    "same RoPE per layer type": ("qwen2", _per_layer_rope(1e6, 1e6), lambda c: c.rope_theta == 1e6),
    "ignored fields": ("llama", dict(attention_dropout=0.1, pretraining_tp=2, use_cache=False, pad_token_id=0,
                                     dtype="bfloat16", initializer_range=0.5), None),
}


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory):
    """family -> a saved random model of SMALL's shapes, written once."""
    folders = {}

    def folder(family):
        if family not in folders:
            folders[family] = _save_hf(_hf_model(family), tmp_path_factory.mktemp(f"small-{family}") / "hf")
        return folders[family]

    return folder


@pytest.mark.parametrize("case", ACCEPTED)
def test_accepted_config_fields(case, small_hf, tmp_path):
    family, fields, check = ACCEPTED[case]
    folder = shutil.copytree(small_hf(family), tmp_path / "hf")
    _edit_config(folder, **fields)
    config = loader.load(str(folder)).config
    assert check is None or check(config)


# config.json fields that change the math and that shardlm does not implement: (family, fields, the
# one line's text). Each is exit 2 through the CLI, naming the field and its value.
REFUSED = {
    "yarn": ("mistral", dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
                                                  original_max_position_embeddings=32)),
             "rope_parameters.rope_type='yarn' is not supported"),
    "dynamic (legacy layout)": ("llama", dict(rope_scaling=dict(type="dynamic", factor=2.0)),
                                "rope_scaling.type='dynamic' is not supported"),
    "longrope": ("mistral", dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0] * 8,
                                                      long_factor=[2.0] * 8, original_max_position_embeddings=32)),
                 "rope_parameters.rope_type='longrope' is not supported"),
    "partial rotary": ("qwen2", dict(rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                                          partial_rotary_factor=0.5)),
                       "rope_parameters.partial_rotary_factor=0.5 is not supported"),
    "partial rotary (top level)": ("llama", dict(partial_rotary_factor=0.25),
                                   "partial_rotary_factor=0.25 is not supported"),
    "llama3 incomplete": ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0)),
                          "rope_type 'llama3' needs low_freq_factor, high_freq_factor"),
    "mlp_bias": ("llama", dict(mlp_bias=True), "mlp_bias=True is not supported"),
    "attention_bias": ("llama", dict(attention_bias=True), "attention_bias=True is not supported"),
    "mistral window": ("mistral", dict(sliding_window=64), "sliding_window=64 is not supported"),
    "mistral default window": ("mistral", dict(sliding_window=DROP, max_position_embeddings=8192),
                               "sliding_window=4096 is not supported"),
    "qwen2 window": ("qwen2", dict(use_sliding_window=True, sliding_window=64, max_window_layers=1, layer_types=DROP),
                     "sliding_window=64 is not supported"),
    "RoPE differs per layer type": ("qwen2", _per_layer_rope(1e6, 1e4), "the layer types differ"),
    "head_dim": ("mistral", dict(head_dim=32), "head_dim=32 with num_attention_heads=4 needs"),
    "hidden_act": ("mistral", dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    "quantized": ("llama", dict(quantization_config=dict(quant_method="gptq", bits=4)),
                  "quantization_config.quant_method='gptq' is not supported"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_config_fields_exit_2(case, small_hf, tmp_path, capsys):
    family, fields, message = REFUSED[case]
    folder = shutil.copytree(small_hf(family), tmp_path / "hf")
    _edit_config(folder, **fields)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        loader.load(str(folder))
    argv = ["generate", "--model", str(folder), "hi"] if case == "yarn" else ["inspect", str(folder)]
    assert main(argv) == 2
    err = capsys.readouterr().err  # generate's "loading model ..." status line comes first
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


# ----- the same audit for GGUF metadata (read as llama.cpp reads it) -----

GGUF_SHAPE = {"block_count": 1, "context_length": 128, "embedding_length": 64, "feed_forward_length": 96,
              "attention.head_count": 4, "attention.head_count_kv": 2, "vocab_size": 128}  # head_dim 16
# llama.<key> values -> (rope_theta, RopeScaling) shardlm reads
GGUF_ROPE = {
    "nothing": ({}, (10000.0, RopeScaling())),
    "freq_base": ({"rope.freq_base": 5e5}, (5e5, RopeScaling())),
    "linear": ({"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}, (1e4, RopeScaling("linear", 4.0))),
    "factor without a type (linear)": ({"rope.scaling.factor": 2.0}, (1e4, RopeScaling("linear", 2.0))),
    "older scale_linear key": ({"rope.scale_linear": 3.0}, (1e4, RopeScaling("linear", 3.0))),
    "type none never scales": ({"rope.scaling.type": "none", "rope.scaling.factor": 4.0}, (1e4, RopeScaling())),
    "factor 0 means 1": ({"rope.scaling.factor": 0.0}, (1e4, RopeScaling())),
    "window as long as the context": ({"attention.sliding_window": 128}, (1e4, RopeScaling())),
    "rope dims = head_dim": ({"rope.dimension_count": 16, "attention.value_length": 16}, (1e4, RopeScaling())),
    "attention.scale 1/sqrt(head_dim)": ({"attention.scale": 0.25}, (1e4, RopeScaling())),
}


@pytest.mark.parametrize("case", GGUF_ROPE)
def test_gguf_rope_keys(case):
    from shardlm.models.config import ModelConfig

    keys, expected = GGUF_ROPE[case]
    meta = {"general.architecture": "llama", **{f"llama.{k}": v for k, v in {**GGUF_SHAPE, **keys}.items()}}
    config = ModelConfig.from_gguf_metadata(meta, ["output.weight"])
    assert (config.rope_theta, config.rope_scaling) == expected


def _tiny_gguf(path, tensors=(), **keys):
    """A GGUF with the shape keys, `keys` (llama.<key> -> value) and a few tensors: enough for inspect."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    typed = {bool: w.add_bool, int: w.add_uint32, float: w.add_float32, str: w.add_string}
    for key, value in {**GGUF_SHAPE, **keys}.items():
        typed[type(value)](f"llama.{key}", value)
    w.add_tensor("token_embd.weight", np.zeros((128, 64), np.float32))
    w.add_tensor("output_norm.weight", np.ones(64, np.float32))
    for name in tensors:
        w.add_tensor(name, np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


GGUF_REFUSED = {
    "yarn": ({"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}, "llama.rope.scaling.type='yarn'"),
    "longrope": ({"rope.scaling.type": "longrope"}, "llama.rope.scaling.type='longrope'"),
    "sliding window": ({"attention.sliding_window": 64}, "llama.attention.sliding_window=64"),
    "partial rotary": ({"rope.dimension_count": 8}, "llama.rope.dimension_count=8"),
    "value length": ({"attention.value_length": 32}, "llama.attention.value_length=32"),
    "attention scale": ({"attention.scale": 0.5}, "llama.attention.scale=0.5"),
    "sigmoid expert routing": ({"expert_count": 8, "expert_used_count": 2, "expert_gating_func": 2},
                               "llama.expert_gating_func=2"),
    "logit softcapping": ({"final_logit_softcapping": 30.0}, "llama.final_logit_softcapping=30.0"),
    "not causal": ({"attention.causal": False}, "llama.attention.causal=False"),
    "rope_freqs tensor": ({"tensors": ["rope_freqs.weight"]}, "tensor rope_freqs.weight"),
}


@pytest.mark.parametrize("case", GGUF_REFUSED)
def test_gguf_refused_keys_exit_2(case, tmp_path, capsys):
    keys, message = GGUF_REFUSED[case]
    assert main(["inspect", _tiny_gguf(tmp_path / "ok.gguf")]) == 0  # the same file without the key loads
    capsys.readouterr()
    path = _tiny_gguf(tmp_path / "bad.gguf", **keys)
    assert main(["inspect", path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: ") and message in err, err


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_block_dequantize_equals_gguf_package(kind):
    import gguf

    from shardlm.checkpoints.gguf import dequantize

    rng = np.random.default_rng(0)
    tensor_type = gguf.GGMLQuantizationType[kind]
    byte_shape = gguf.quants.quant_shape_to_byte_shape((6, 96), tensor_type)
    data = rng.integers(0, 256, byte_shape, dtype=np.uint8)
    # finite f16 scale (and minimum) at the start of every block of 32 values
    blocks = data.reshape(-1, byte_shape[-1] // 3)
    n_halves = 2 if kind == "Q4_1" else 1
    blocks[:, :2 * n_halves] = rng.normal(size=(len(blocks), n_halves)).astype(np.float16).view(np.uint8)
    ours, theirs = dequantize(data, tensor_type), gguf.quants.dequantize(data, tensor_type)
    assert ours.shape == theirs.shape == (6, 96) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)
