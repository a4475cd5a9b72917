"""Expert parallelism (sharding/experts.py, the expert_parallel_* layouts) on 8 virtual CPU devices:
HF's logits and greedy tokens under each EP layout; expert weights stored where the layout says; the
compiled program's dispatch and combine all-to-alls (two per sparse layer, none in a dense layer)
with experts.dispatch_bytes' operand bytes; int8 experts; a capacity factor below dropless shrinks
the buffers; E that does not divide over the EP size, or a dense model, is refused."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import shardlm_logits
from jax.sharding import PartitionSpec as P
from test_moe import NEW, PROMPTS, case, reference  # noqa: F401  (module-scoped HF fixtures)

from shardlm.checkpoints import loader
from shardlm.engine import Engine, SamplingParams
from shardlm.engine.cli import main
from shardlm.engine.llm import LLM
from shardlm.models.config import ModelConfig
from shardlm.models.moe import MoE, SparseMoE
from shardlm.sharding import experts
from shardlm.sharding.collectives import compiled_collectives, per_layer
from shardlm.sharding.layouts import LAYOUTS
from shardlm.sharding.placement import Placement
from shardlm.sharding.rules import use_rules

MESH = {"x": 2, "y": 2, "z": 2}
XYZ = ("x", "y", "z")
# Where each (layout, mesh) stores gate/up [E, D, F] and down [E, F, D]: E over the EP axes, F over TP.
EXPERT_SPECS = {
    ("expert_parallel_xyz", "2x2x2"): (P(XYZ, None, None), P(XYZ, None, None)),
    ("expert_parallel_x", "2x2x2"): (P("x", None, ("y", "z")), P("x", ("y", "z"), None)),
    ("expert_parallel_x", "4x2x1"): (P("x", None, "y"), P("x", "y", None)),
}
MESHES = {"2x2x2": MESH, "4x2x1": {"x": 4, "y": 2, "z": 1}}

# A random MoE whose d_model divides over 8 devices: layer 1 dense, a shared expert, 8 experts top-2.
CFG = ModelConfig("ep-moe", vocab_size=64, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96,
                  family="moe", n_experts=8, experts_per_token=2, expert_d_ff=48, dense_layers=(1,),
                  shared_expert_d_ff=40, max_seq_len=64)


def _spec(array):
    spec = array.sharding.spec
    return P(*spec, *([None] * (array.ndim - len(spec))))


def _engine(model, layout, mesh=MESH, batch=4):
    placement = Placement.make(model.cfg, mesh_shape=mesh, layout=layout, batch_size=batch)
    return Engine(model, batch_size=batch, max_seq_len=model.cfg.max_seq_len, placement=placement)


def _all_to_alls(engine, phase):
    """{layer: sorted operand bytes of the MLP block's all-to-alls}."""
    return {i: sizes for i in range(engine.cfg.n_layers)
            if (sizes := per_layer(compiled_collectives(engine, phase), i).get(("mlp", "all-to-all")))}


def test_layouts_are_listed_and_map_experts(capsys):
    """The two layouts, their rules (E over the EP axes, F over TP, the rest 1D's), the dense
    layouts' expert F split as their MLP's F, and `shardlm layouts` shows them."""
    mesh = Placement.make(CFG, mesh_shape=MESH, layout="expert_parallel_x").mesh
    for name, ep, tp in (("expert_parallel_xyz", XYZ, ()), ("expert_parallel_x", ("x",), ("y", "z"))):
        layout = LAYOUTS[name]
        assert layout.expert_axes == ep
        for phase, batch in (("prefill", 1), ("decode", 4)):
            rules = layout.rules(mesh, phase, batch, CFG.n_kv_heads)
            one_d = LAYOUTS["1d_weight_stationary"].rules(mesh, phase, batch, CFG.n_kv_heads)
            assert rules.mesh_axes("expert") == ep and rules.mesh_axes("expert_mlp") == tp
            for logical in ("mlp", "q_heads", "kv_heads", "vocab", "act_embed", "act_vocab", "attn_batch", "embed"):
                assert rules.mesh_axes(logical) == one_d.mesh_axes(logical), (name, logical)
    for name, layout in LAYOUTS.items():
        if not layout.expert_axes:
            rules = layout.rules(mesh, "decode", 8, CFG.n_kv_heads)
            assert rules.mesh_axes("expert") == () and rules.mesh_axes("expert_mlp") == rules.mesh_axes("mlp"), name
    assert main(["layouts"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^expert_parallel_xyz +mixture of experts: experts over x/y/z, whole experts", out, re.M)
    assert re.search(r"^expert_parallel_x +mixture of experts: experts over x, each expert's F over y/z", out, re.M)


def test_experts_that_do_not_divide_and_dense_models_are_refused():
    four = CFG.replace(n_experts=4)
    with pytest.raises(ValueError, match=r"expert_parallel_xyz: E=4 experts do not divide over the EP size 8 "
                                         r"\(mesh axes x/y/z"):
        Placement.make(four, mesh_shape=MESH, layout="expert_parallel_xyz")
    with pytest.raises(ValueError, match=r"E=4 experts do not divide over the EP size 8"):
        Placement.make(four, mesh_shape={"x": 8}, layout="expert_parallel_x")
    Placement.make(four, mesh_shape={"x": 4, "y": 2}, layout="expert_parallel_x")  # 4 over x=4: fine
    dense = ModelConfig("dense", vocab_size=64, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96)
    with pytest.raises(ValueError, match=r"expert_parallel_x splits a mixture of experts' experts; dense has "
                                         r"none \(dense\): use 1d_weight_stationary"):
        Placement.make(dense, mesh_shape=MESH, layout="expert_parallel_x")
    with pytest.raises(ValueError, match=r"each expert's F=42 must divide over the TP size 4"):
        Placement.make(CFG.replace(expert_d_ff=42), mesh_shape=MESH, layout="expert_parallel_x")
    # The dispatch itself checks too (a caller with its own rules).
    placement = Placement.make(CFG, mesh_shape=MESH, layout="expert_parallel_xyz")
    block = SparseMoE(four, jnp.float32, nnx.Rngs(0))
    with use_rules(placement.mesh, placement.decode_rules), pytest.raises(ValueError, match=r"E=4 experts, EP size 8"):
        jax.eval_shape(block, jnp.zeros((1, 3, 64)))


@pytest.mark.slow
@pytest.mark.parametrize("case,layout,mesh", [("mixtral", "expert_parallel_xyz", "2x2x2"),
                                              ("mixtral", "expert_parallel_x", "2x2x2"),
                                              ("qwen2_moe", "expert_parallel_x", "4x2x1"),
                                              ("qwen3_moe", "expert_parallel_x", "2x2x2")], indirect=["case"])
def test_ep_layouts_equal_transformers(reference, case, layout, mesh):  # noqa: F811
    """Mixtral's 8 experts over 8 devices (one each) and 4 per x group (F over y/z); Qwen2-MoE's 4
    experts (and its shared expert, a dense MLP) over x=4, F over y=2; Qwen3-MoE with its dense layer:
    expert weights where the layout says, logits within 1e-4 of HF's and of one device's, and 32
    greedy tokens of each prompt, all in one batch, HF's."""
    folder, ref, greedy = reference
    llm = LLM.load(folder, mesh_shape=MESHES[mesh], layout=layout, batch_size=len(PROMPTS), max_seq_len=128)
    assert llm.layouts == (layout, layout)
    sparse = next(i for i in range(llm.config.n_layers) if i not in llm.config.dense_layers)
    mlp = llm.params["layers"][sparse]["mlp"]
    gate, down = EXPERT_SPECS[layout, mesh]
    assert (_spec(mlp["gate"][...]), _spec(mlp["up"][...]), _spec(mlp["down"][...])) == (gate, gate, down)
    assert _spec(mlp["router"][...]) == P(None, None)
    logits = np.asarray(llm.engine.forward(llm.params, [PROMPTS[2]])[0])
    one = shardlm_logits(loader.load(folder).model, PROMPTS[2])
    print(f"{case[0]} {layout} {mesh}: max |logit - HF| {np.abs(logits - ref[2]).max():.2e}, "
          f"- one device {np.abs(logits - one).max():.2e}")
    assert np.abs(logits - ref[2]).max() < 1e-4 and np.abs(logits - one).max() < 1e-4
    out = llm.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    assert [c.token_ids for c in out] == greedy


@pytest.mark.parametrize("layout,mesh", [("expert_parallel_xyz", "2x2x2"), ("expert_parallel_x", "2x2x2"),
                                         ("expert_parallel_x", "4x2x1")])
def test_compiled_all_to_alls_are_dispatch_and_combine(layout, mesh):
    """Decode (batch 4 x 1) and prefill (1 x the smallest bucket): each sparse layer's MLP block has
    exactly two all-to-alls, the dispatch and the combine, each of experts.dispatch_bytes (tokens per
    device = ceil(B*T / 8), k=2, D, the EP size, float32); the dense layer and the rest of the step
    have none. Besides them a sparse layer has the dense layer's 1D all-gather and reduce-scatter
    (here its shared expert's) and, under EP x TP, the received buffer's all-gather over TP (the
    dispatch's bytes) and the down projection's reduce-scatter over TP (tp times them)."""
    model = MoE(CFG, rngs=nnx.Rngs(0))
    engine = _engine(model, layout, MESHES[mesh])
    ep = {"expert_parallel_xyz": 8, "expert_parallel_x": MESHES[mesh]["x"]}[layout]
    tp = 8 // ep
    for phase, tokens in (("decode", 4), ("prefill", engine.buckets[0])):
        colls = compiled_collectives(engine, phase)
        mlp = {i: {kind: sizes for (block, kind), sizes in per_layer(colls, i).items()
                   if block == "mlp" and kind != "all-reduce"} for i in range(CFG.n_layers)}
        want = experts.dispatch_bytes(-(-tokens // 8), 2, CFG.d_model, ep, 4)
        print(f"{layout} {mesh} {phase}: sparse layer {mlp[0]}, dense layer {mlp[1]}, dispatch_bytes {want}")
        dense = mlp[1]
        assert "all-to-all" not in dense and dense == {"all-gather": [tokens * CFG.d_model // 8 * 4],
                                                        "reduce-scatter": [tokens * CFG.d_model * 4]}
        sparse = {"all-to-all": [want, want],
                  "all-gather": sorted(dense["all-gather"] + ([want] if tp > 1 else [])),
                  "reduce-scatter": sorted(dense["reduce-scatter"] + ([tp * want] if tp > 1 else []))}
        assert mlp[0] == mlp[2] == sparse, phase
        assert [c for c in colls if c.kind == "all-to-all" and c.block != "mlp"] == []
    # and the same tokens as one device
    one = Engine(model, batch_size=4, max_seq_len=CFG.max_seq_len)
    prompt = [(5 * i + 3) % CFG.vocab_size for i in range(13)]
    np.testing.assert_allclose(np.asarray(engine.forward(engine.params, [prompt])),
                               np.asarray(one.forward(one.params, [prompt])), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["mixtral"], indirect=True)
def test_int8_experts_under_ep(case):  # noqa: F811
    """int8 experts (QArray values and per expert and channel scales) split over the EP axes give
    one device's int8 logits."""
    folder = case[2]
    model = loader.load(folder, quantize="int8").model
    prompt = PROMPTS[1]
    one = shardlm_logits(model, prompt)
    for layout in ("expert_parallel_xyz", "expert_parallel_x"):
        engine = _engine(model, layout, batch=1)
        mlp = engine.params["layers"][0]["mlp"]
        values, scale = mlp["up"]["values"][...], mlp["up"]["scale"][...]
        assert values.dtype == jnp.int8
        assert _spec(scale) == {"expert_parallel_xyz": P(XYZ, None), "expert_parallel_x": P("x", ("y", "z"))}[layout]
        got = np.asarray(engine.forward(engine.params, [prompt])[0])
        assert np.abs(got - one).max() < 1e-4, layout


def test_capacity_factor_shrinks_the_buffers():
    """A capacity factor of 0.5 (C = ceil(0.5 x slots / ep) per destination, slots past it dropped)
    compiles all-to-alls of dispatch_bytes(..., 0.5), smaller than dropless, and runs; a factor of
    ep or more is dropless (C = all slots) and exact."""
    model = MoE(CFG, rngs=nnx.Rngs(0))
    prompt = [(7 * i + 1) % CFG.vocab_size for i in range(60)]  # 120 slots: ~15 per destination, C*8 = 8 rows
    engine = _engine(model, "expert_parallel_xyz")
    dropless = np.asarray(engine.forward(engine.params, [prompt])[0])
    sizes = {}
    for factor in (0.5, 8.0):
        for layer in model.layers:
            if isinstance(layer.mlp, SparseMoE):
                layer.mlp.capacity_factor = factor
        engine = _engine(model, "expert_parallel_xyz")
        mlp = _all_to_alls(engine, "decode")
        sizes[factor] = mlp[0]
        assert mlp[0] == [experts.dispatch_bytes(1, 2, CFG.d_model, 8, 4, factor)] * 2
        logits = np.asarray(engine.forward(engine.params, [prompt])[0])
        assert np.isfinite(logits).all()
        if factor == 8.0:
            np.testing.assert_allclose(logits, dropless, atol=1e-6)
        else:
            assert np.abs(logits - dropless).max() > 1e-3  # slots were dropped
    assert sizes[0.5][0] < experts.dispatch_bytes(1, 2, CFG.d_model, 8, 4) == sizes[8.0][0]


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_at_batches_that_do_not_divide(batch):
    """Decode batch 1 (one token a step: 2 slots over 8 devices) and 3: greedy tokens of a prefill
    and 12 decode steps per row equal one device's, under expert_parallel_x on 4x2x1."""
    model = MoE(CFG, rngs=nnx.Rngs(1))
    engines = [Engine(model, batch_size=batch, max_seq_len=CFG.max_seq_len),
               _engine(model, "expert_parallel_x", MESHES["4x2x1"], batch=batch)]
    tokens = []
    for engine in engines:
        state, rows = engine.init_decode_state(), []
        for slot in range(batch):
            prefix = engine.prefill(engine.params, [(11 * slot + 3 * j) % CFG.vocab_size for j in range(5 + 4 * slot)])
            state = engine.insert(prefix, state, slot)
            rows.append([int(prefix.token)])
        for _ in range(12):
            state, out = engine.generate(engine.params, state)
            for slot in range(batch):
                rows[slot].append(int(out[slot]))
        tokens.append(rows)
    assert tokens[0] == tokens[1]
    assert len({tuple(r) for r in tokens[0]}) == batch
