"""Checkpoints: HF safetensors import equals HF transformers; convert + Orbax restore onto other meshes
and layouts gives the same tokens; bad input is a clear error that writes nothing at DST."""

import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from shardlm.checkpoints import loader, orbax_io
from shardlm.checkpoints.convert import convert, describe
from shardlm.checkpoints.gguf import CheckpointError
from shardlm.checkpoints.hf import HFWeights, load_tokenizer
from shardlm.checkpoints.tokenizer import tokenizer_from_file
from shardlm.engine import Engine, SamplingParams
from shardlm.engine.cli import main
from shardlm.engine.llm import LLM
from shardlm.sharding.placement import Placement

PROMPT = [1, 5, 9, 33, 100, 7, 64]
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def _hf_model(family: str):
    import transformers

    torch.manual_seed(0)
    if family == "llama":  # tied embeddings, GQA
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, tie_word_embeddings=True))
    elif family == "mistral":  # untied lm_head
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, tie_word_embeddings=False))
    else:  # qwen2: attention biases, untied
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, tie_word_embeddings=False))
    with torch.no_grad():  # non-zero norms and biases, so every tensor's mapping is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
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


def _logits(model):
    engine = Engine(model, batch_size=1, max_seq_len=model.cfg.max_seq_len)
    return np.asarray(engine.forward(engine.params, [PROMPT])[0])


def _greedy(llm):
    return llm.generate([PROMPT], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].token_ids


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
