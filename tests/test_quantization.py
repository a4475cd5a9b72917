"""int8 weights and int8 KV cache: quality (perplexity against float32 on real English text),
every layout against one device, bytes per device from the arrays, checkpoints, CLI and bad input."""

import gc
import json
import math
import pydoc_data.topics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shardlm.checkpoints import loader, orbax_io
from shardlm.checkpoints.gguf import CheckpointError
from shardlm.engine import LLM, Engine, SamplingParams, batching
from shardlm.engine.cli import main
from shardlm.engine.llm import Placement
from shardlm.engine.perplexity import perplexity, perplexity_of_ids
from shardlm.models import quant
from shardlm.models.config import ModelConfig
from shardlm.models.llama import Llama

MESH = {"x": 2, "y": 2, "z": 2}
# Python's own documentation: real English text that ships with every Python.
TEXT = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
PPL_TOKENS = 1024
# A random model whose heads, d_model and d_ff divide over 8 devices; 4 kv heads, so decode
# attention runs batch-sharded (Q/K/V all-to-all) and the int8 cache and its scales split by rows.
# (With 2 kv heads, weight_gathered_xy prefill differs from one device in float32 too: left to #7/layouts.)
CFG = ModelConfig("divisible-gqa", vocab_size=512, d_model=256, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=32,
                  d_ff=1024, max_seq_len=128)
TOKEN_PROMPTS = [[(7 * i + 3 * j) % CFG.vocab_size for j in range(5 + 3 * i)] for i in range(8)]


def _with_model(llm, model, cache_dtype=None):
    """`llm` with another model (same placement and tokenizer) and cache dtype."""
    loaded = loader.LoadedModel(config=llm.config, model=model, tokenizer=llm.tokenizer, source=llm.source)
    return LLM._build(loaded, llm.placement, llm.engine.max_seq_len, cache_dtype, {"max_num_seqs": llm.engine.batch_size})


@pytest.fixture(scope="module")
def int8_model(llm):
    return quant.quantize_model(llm.engine.model(), "int8")


@pytest.mark.slow
def test_perplexity_int8_within_bounds_of_float32(llm, int8_model):
    """1024 tokens of Python's docs, windows of 256 tokens (the fixture's context) every 224, each
    variant computed here; run with -s to see the figures."""
    ids = llm.tokenizer.encode(TEXT)[:PPL_TOKENS]
    kw = dict(window=256, stride=224)
    f32 = perplexity_of_ids(llm, ids, **kw)["perplexity"]
    int8 = perplexity_of_ids(_with_model(llm, int8_model), ids, **kw)["perplexity"]
    int8_kv = perplexity_of_ids(_with_model(llm, int8_model, jnp.int8), ids, **kw)["perplexity"]
    print(f"perplexity over {PPL_TOKENS} tokens: f32 {f32:.4f}, int8 {int8:.4f} ({int8 / f32 - 1:+.2%}), "
          f"int8 + int8 KV {int8_kv:.4f} ({int8_kv / f32 - 1:+.2%})")
    assert 3 < f32 < 50  # an instruct model of 135M parameters on technical English
    assert abs(int8 / f32 - 1) < 0.02
    assert abs(int8_kv / f32 - 1) < 0.03
    assert int8 != f32 and int8_kv != int8  # the quantized paths really ran


def test_perplexity_equals_a_full_forward_without_cache(llm):
    """One window: the sliding-window scorer equals log-softmax of a plain forward over the tokens."""
    ids = llm.tokenizer.encode(TEXT)[:100]
    got = perplexity_of_ids(llm, ids)
    tokens = jnp.asarray([ids])
    logits = llm.engine.forward(llm.params, tokens)
    logp = jax.nn.log_softmax(logits[0, :-1], axis=-1)
    nll = -float(jnp.mean(jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1)))
    assert got["tokens"] == len(ids) - 1
    assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)


@pytest.mark.slow
def test_sliding_window_scores_every_token_once(llm):
    ids = llm.tokenizer.encode(TEXT)[:300]
    out = perplexity_of_ids(llm, ids, window=96, stride=64)
    assert out["tokens"] == 299
    one = perplexity_of_ids(llm, ids, window=160, stride=140)  # more context per token
    assert abs(math.log(out["perplexity"]) - math.log(one["perplexity"])) < 0.2


def test_quantized_weights_and_bytes_on_one_device(llm, int8_model):
    """Every projection, the (tied) embedding: int8 with per-output-channel scales; a quarter of f32."""
    flat = dict(nnx.to_flat_state(nnx.state(int8_model)))
    assert flat[("layers", 0, "attn", "q", "values")][...].dtype == jnp.int8
    assert flat[("layers", 0, "attn", "q", "scale")][...].shape == (llm.config.n_heads, llm.config.head_dim)
    assert flat[("layers", 0, "mlp", "down", "scale")][...].shape == (llm.config.d_model,)
    assert flat[("embed", "values")][...].dtype == jnp.int8
    assert flat[("embed", "scale")][...].shape == (llm.config.vocab_size,)
    assert flat[("final_norm", "scale")][...].dtype == jnp.float32
    # Dequantized weights are close to the float ones (half a step of each channel's scale).
    w = np.asarray(nnx.state(llm.engine.model())["layers"][0]["mlp"]["gate"][...])
    q = np.asarray(flat[("layers", 0, "mlp", "gate", "values")][...]).astype(np.float32)
    s = np.asarray(flat[("layers", 0, "mlp", "gate", "scale")][...])
    assert np.all(np.abs(q * s - w) <= s / 2 + 1e-7)
    f32_bytes = sum(quant.weight_bytes(llm.engine.model()).values())
    int8_bytes = sum(quant.weight_bytes(int8_model).values())
    assert abs(int8_bytes / (f32_bytes / 4) - 1) < 0.05, (int8_bytes, f32_bytes)


@pytest.mark.slow
def test_a_quantized_weight_is_one_typed_value_through_jit_and_the_blocks():
    """A QArray is one pytree (values, scale; `contract` static) that jit passes through whole, and the
    projection blocks take it in place of the float weight: the result is the float matmul within
    half a quantization step per channel (and the dequantized matmul up to rounding)."""
    from shardlm.sharding.blocks import project_in, project_out

    kw, kx, ko, kh = jax.random.split(jax.random.key(0), 4)
    w = jax.random.normal(kw, (64, 4, 8))  # [D, N, H]
    q = quant.quantize(w, (0,), jnp.float32)
    leaves, treedef = jax.tree.flatten(q)
    assert [a.dtype for a in leaves] == [jnp.int8, jnp.float32] and leaves[1].shape == (4, 8)
    assert jax.tree.unflatten(treedef, leaves).contract == (0,)
    through = jax.jit(lambda q: q)(q)
    assert isinstance(through, quant.QArray) and through.contract == (0,)

    x = jax.random.normal(kx, (2, 3, 64))  # [B, T, D]
    (y,) = jax.jit(lambda x, q: project_in(x, [q], [("embed", "q_heads", "head_dim")]))(x, q)
    exact = jnp.einsum("btd,dnh->btnh", x, w)
    bound = jnp.einsum("btd,nh->btnh", jnp.abs(x), q.scale / 2)  # sum over D of |x| * half a step
    assert bool(jnp.all(jnp.abs(y - exact) <= bound + 1e-5)) and not bool(jnp.allclose(y, exact))
    np.testing.assert_allclose(y, jnp.einsum("btd,dnh->btnh", x, q.dequantize()), rtol=1e-5, atol=1e-5)

    wo = jax.random.normal(ko, (4, 8, 64))  # [N, H, D]: the contracted dims are N and H
    qo = quant.quantize(wo, (0, 1), jnp.float32)
    h = jax.random.normal(kh, (2, 3, 4, 8))
    out = jax.jit(lambda h, q: project_out(h, q, ("q_heads", "head_dim", "embed")))(h, qo)
    bound = jnp.einsum("btnh,d->btd", jnp.abs(h), qo.scale / 2)
    assert bool(jnp.all(jnp.abs(out - jnp.einsum("btnh,nhd->btd", h, wo)) <= bound + 1e-5))


def test_no_module_attribute_is_a_scale_found_by_name(int8_model):
    """Quantized weights are QuantizedWeight modules (values and scale), not `<name>_scale` siblings."""
    names = {k for path, _ in nnx.iter_graph(int8_model) for k in path if isinstance(k, str)}
    assert not [n for n in names if n.endswith("_scale")]
    attn = int8_model.layers[0].attn
    assert isinstance(attn.q, quant.QuantizedWeight) and isinstance(int8_model.embed, quant.QuantizedWeight)
    assert isinstance(attn.q[...], quant.QArray) and attn.q.axes == ("embed", "q_heads", "head_dim")
    assert attn.q.scale.axes == ("q_heads", "head_dim") and attn.o.scale.axes == ("embed",)


def _greedy(engine, n_new=12):
    requests = [batching.Request(p, SamplingParams(max_new_tokens=n_new, ignore_eos=True), key=i)
                for i, p in enumerate(TOKEN_PROMPTS)]
    return [r.token_ids for r in batching.run(engine, engine.params, requests)]


@pytest.fixture(scope="module")
def random_int8():
    model = quant.quantize_model(Llama(CFG, rngs=nnx.Rngs(1)), "int8")
    reference = {kv: _greedy(Engine(model, batch_size=8, max_seq_len=64, cache_dtype=kv)) for kv in (None, jnp.int8)}
    assert len({tuple(t) for t in reference[None]}) > 1  # the prompts lead to different continuations
    return model, reference


@pytest.mark.parametrize("layout,kv", [("1d_weight_stationary", None),
                                       ("2d_weight_stationary", jnp.int8), ("weight_gathered_x", None),
                                       ("weight_gathered_xy", None), ("weight_gathered_xyz", jnp.int8)])
@pytest.mark.slow
def test_int8_layouts_give_unsharded_tokens(random_int8, layout, kv):
    """8 mixed-length prompts x 12 tokens at batch 8 (weight-gathered decode truly gathered) vs one device."""
    model, reference = random_int8
    placement = Placement.make(CFG, mesh_shape=MESH, layout=layout, batch_size=8)
    assert (placement.prefill_layout, placement.decode_layout) == (layout, layout)
    engine = Engine(model, batch_size=8, max_seq_len=64, placement=placement, cache_dtype=kv)
    assert _greedy(engine) == reference[kv]
    flat = dict(nnx.to_flat_state(engine.params))
    w, s = flat[("layers", 0, "mlp", "gate", "values")][...], flat[("layers", 0, "mlp", "gate", "scale")][...]
    assert w.dtype == jnp.int8
    # The scale is split over F exactly as its weight's F dimension.
    assert s.sharding.shard_shape(s.shape) == w.sharding.shard_shape(w.shape)[1:]
    del engine
    gc.collect()


def test_int8_bytes_per_device_are_a_quarter_of_float32():
    model = Llama(CFG, rngs=nnx.Rngs(1))
    placement = Placement.make(CFG, mesh_shape=MESH, layout="2d_weight_stationary", batch_size=8)
    f32 = quant.weight_bytes(placement.place(model))
    int8 = quant.weight_bytes(placement.place(quant.quantize_model(model, "int8")))
    assert len(int8) == 8
    for device, n in int8.items():
        assert abs(n / (f32[device] / 4) - 1) < 0.05, (device, n, f32[device])


def test_int8_kv_cache_holds_int8_and_per_token_head_scales():
    model = Llama(CFG.replace(n_kv_heads=8), rngs=nnx.Rngs(2))
    placement = Placement.make(model.cfg, mesh_shape=MESH, layout="2d_weight_stationary", batch_size=8)
    engine = Engine(model, batch_size=8, max_seq_len=64, placement=placement, cache_dtype=jnp.int8)
    state = engine.init_decode_state()
    k = state.cache.k[0]
    assert isinstance(k, quant.QuantizedKV)
    values, scale = k.values, k.scale
    assert values.dtype == jnp.int8 and values.shape == (8, 64, 8, 32)
    assert scale.shape == (8, 64, 8, 1)
    assert values.sharding.shard_shape(values.shape)[:3] == scale.sharding.shard_shape(scale.shape)[:3]


def test_int8_checkpoint_restores_onto_a_mesh_and_refuses_requantizing(tmp_path):
    model = quant.quantize_model(Llama(CFG, rngs=nnx.Rngs(1)), "int8")
    path = str(tmp_path / "ckpt")
    orbax_io.save(path, model, CFG)
    placement = Placement.make(CFG, mesh_shape=MESH, layout="1d_weight_stationary", batch_size=8)
    loaded = loader.load(path, placement=placement)
    saved = dict(nnx.to_flat_state(nnx.state(model)))
    for path_, var in nnx.to_flat_state(nnx.state(loaded.model)):
        assert var[...].dtype == saved[path_][...].dtype
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(saved[path_][...]))
    assert len(loaded.model.layers[0].mlp.gate.values[...].sharding.device_set) == 8
    with pytest.raises(CheckpointError, match="already quantized"):
        loader.load(path, quantize="int8")


def test_hf_import_quantized_while_reading_equals_quantizing_in_memory(tmp_path):
    """Qwen2 (untied lm_head, attention biases): each float tensor is read whole and quantized on the
    host into its QuantizedWeight's values and scale, straight into their shards on a mesh."""
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False))
    hf.save_pretrained(tmp_path, max_shard_size="40KB", safe_serialization=True)

    placement = Placement.make(loader.read_config(str(tmp_path)), mesh_shape=MESH, layout="2d_weight_stationary",
                               batch_size=8)
    loaded = loader.load(str(tmp_path), placement=placement, quantize="int8")
    assert len(loaded.model.layers[0].mlp.up.values[...].sharding.device_set) == 8
    expected = dict(nnx.to_flat_state(nnx.state(quant.quantize_model(loader.load(str(tmp_path)).model, "int8"))))
    got = nnx.to_flat_state(nnx.state(loaded.model))
    assert {p for p, _ in got} == set(expected) and ("lm_head", "scale") in expected
    for path, var in got:  # numpy's float32 division on the host rounds some scales an ulp from XLA's
        a, b = np.asarray(var[...]), np.asarray(expected[path][...])
        assert a.dtype == b.dtype, path
        np.testing.assert_allclose(a, b, rtol=0 if a.dtype == np.int8 else 1e-6, err_msg=str(path))


@pytest.mark.parametrize("kw,match", [({"quantize": "int4"}, "unknown quantization 'int4'"),
                                      ({"kv_cache": "fp8"}, "unknown KV cache quantization 'fp8'")])
def test_unknown_quantization_is_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        LLM.load(**kw)


@pytest.mark.parametrize("argv", [["generate", "--quantize", "int4", "Hi"], ["generate", "--kv-cache", "int4", "Hi"],
                                  ["convert", "a.gguf", "out", "--quantize", "nf4"]])
def test_cli_unknown_quantization_exits_2(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown" in err[0] and "allowed: int8" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_chat_with_int8_weights_answers_paris(capsys):
    rc = main(["generate", "--chat", "--quantize", "int8", "--max-new-tokens", "16", "--batch-size", "1",
               "--max-seq-len", "64", "What is the capital of France?"])
    assert rc == 0
    assert "Paris" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_perplexity_json_equals_the_api(llm, tmp_path, capsys):
    file = tmp_path / "text.txt"
    file.write_text(TEXT[:5000], encoding="utf-8")
    rc = main(["perplexity", "--json", "--max-tokens", "200", "--max-seq-len", "256", str(file)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) == {"perplexity", "tokens"}
    expected = perplexity(llm, TEXT[:5000], max_tokens=200)
    assert out["tokens"] == expected["tokens"] == 199
    assert out["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4)


def test_cli_perplexity_bad_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    assert main(["perplexity", str(bad)]) == 2
    assert main(["perplexity", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("cannot read" in line for line in err)


def test_planner_int8_kv_context_factor():
    """Pope et al. Table 1: the context that fits, llama3-70b on TPU v5e-16, int8 weights, batch 64."""
    from shardlm.models.config import preset
    from shardlm.sharding import planner

    cfg = preset("llama3-70b")
    mesh = planner.default_mesh(16)
    int8_kv = 1 + 4 / cfg.head_dim  # int8 values and one float32 scale per token and head
    ctx = {(att, kv): planner.max_context(cfg, "tpu-v5e", mesh, 64, attention=att, weight_bytes=1, kv_bytes=kv)
           for att in ("heads", "batch") for kv in (2, int8_kv)}
    assert ctx["batch", int8_kv] / ctx["batch", 2] == pytest.approx(2 / int8_kv, rel=0.01)
    # 8 kv heads over 16 chips: a heads-sharded cache is replicated twice; a batch-sharded one is not.
    assert ctx["batch", 2] / ctx["heads", 2] == pytest.approx(2, rel=0.01)


def test_convert_quantize_int8_saves_int8_that_restores_like_quantizing_in_memory(tmp_path, capsys):
    """`shardlm convert SRC DST --quantize int8` from a float shardlm checkpoint (quantized tensor by
    tensor after the restore): the saved int8 weights and scales equal quantize_model's."""
    model = Llama(CFG, rngs=nnx.Rngs(4))
    src, dst = str(tmp_path / "f32"), str(tmp_path / "int8")
    orbax_io.save(src, model, CFG)
    assert main(["convert", src, dst, "--quantize", "int8"]) == 0
    assert loader.checkpoint_quantization(orbax_io.read_metadata(dst)) == "int8"
    expected = dict(nnx.to_flat_state(nnx.state(quant.quantize_model(model, "int8"))))
    restored = nnx.to_flat_state(nnx.state(loader.load(dst).model))
    assert {p for p, _ in restored} == set(expected)
    for path, var in restored:
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(expected[path][...]))
    assert main(["convert", dst, str(tmp_path / "again"), "--quantize", "int8"]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
