"""Pope et al.'s layouts on 8 virtual CPU devices: same tokens as one device, the shardings and
per-device memory each layout implies, and the collectives of the paper in the compiled program."""

import gc

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from shardlm.engine import Engine, SamplingParams, batching
from shardlm.engine.llm import Placement
from shardlm.models.config import ModelConfig
from shardlm.models.llama import Llama
from shardlm.sharding import planner
from shardlm.sharding.collectives import compiled_collectives, per_layer
from shardlm.sharding.layouts import LAYOUTS

MESH = {"x": 2, "y": 2, "z": 2}
# Chat prompts of 34-45 tokens: mixed lengths in one prefill bucket (one prefill compile per layout).
PROMPTS = ["What is the capital of France?", "Hi, who are you?", "Tell me a story about a dragon who learned to fly.",
           "1 2 3 4", "Name a colour.", "Why is the sky blue? Answer briefly, please, in one line.",
           "Bonjour, comment allez-vous ?", "List three prime numbers between ten and thirty."]
NEW = SamplingParams(max_new_tokens=32, ignore_eos=True)
LOGIT_TOL = 1e-3  # float32 logits of one prompt, sharded vs one device (reduction order differs)


@pytest.fixture(autouse=True)
def _free_device_memory():
    """Each layout holds its own copy of the weights on 8 devices (replicated: 8 x 540 MB); drop the
    last test's engines and their compiled steps before the next, or the suite outgrows 24 GiB."""
    yield
    gc.collect()
    jax.clear_caches()


SMOLLM2_LAYERS = 2


@pytest.fixture(scope="module")
def base(llm):
    """SmolLM2 cut to its first 2 layers: its weights, tokenizer and shapes (9 query heads, 3 kv
    heads, a 49152-token vocabulary), every layer placed as the others are; a 30-layer program takes
    far longer to compile and run here and shows no layout anything the 2 do not."""
    return llm.relayout(batch_size=8, max_seq_len=128).first_layers(SMOLLM2_LAYERS)


@pytest.fixture(scope="module")
def reference(base):
    """Unsharded greedy tokens of all prompts, and the last-position logits of the first."""
    tokens = [c.token_ids for c in base.generate(PROMPTS, NEW, chat=True)]
    return tokens, _prompt_logits(base)


def _prompt_logits(llm):
    return np.asarray(llm.engine.prompt_logits(llm.params, llm.encode(PROMPTS[0], chat=True)))


def _dense_cache(llm):
    """Layer 0's dense KV cache [B=8, S, K, H] of a dense Engine on llm's placement (the paged
    engine's pool is checked in tests/test_paged_engine.py)."""
    engine = Engine(llm.engine.model(), batch_size=8, max_seq_len=128, placement=llm.placement)
    return engine.init_decode_state().cache.k[0]


def _check_equal(llm, reference, n_prompts):
    tokens, logits = reference
    out = [c.token_ids for c in llm.generate(PROMPTS[:n_prompts], NEW, chat=True)]
    assert out == tokens[:n_prompts]
    assert np.abs(_prompt_logits(llm) - logits).max() < LOGIT_TOL


# The layouts a dense model runs (expert-parallel ones are for mixtures of experts: test_expert_parallel.py).
DENSE_SHARDED = [name for name, layout in LAYOUTS.items() if name != "replicated" and not layout.expert_axes]


@pytest.mark.slow
@pytest.mark.parametrize("layout", DENSE_SHARDED)
def test_layout_gives_unsharded_tokens(base, reference, layout):
    """Batch 1 (4 prompts) under the layout in both phases, then a batch of 8 mixed-length prompts.

    At batch 1 a weight-gathered decode runs as 2D (Layout.effective) while its prefill is truly
    weight-gathered (the prompt's positions split). Its truly weight-gathered decode (batch 8) runs on
    the random model of test_grouped_query_layouts_at_batch_8: on SmolLM2, XLA:CPU's all-gathers of
    every weight take ~2 s a step (the layouts notebook runs it on SmolLM2 for a few steps).
    """
    llm = base.relayout(mesh_shape=MESH, layout=layout, batch_size=1)
    assert llm.layouts[0] == layout
    _check_equal(llm, reference, 4)
    if not layout.startswith("weight_gathered"):
        llm = base.relayout(mesh_shape=MESH, batch_size=8, layout=layout)
        assert llm.layouts == (layout, layout)
        _check_equal(llm, reference, 8)


# A random model whose heads, d_model and d_ff all divide over 8 devices (SmolLM2's 9/3 heads do not).
CFG = ModelConfig("divisible", vocab_size=512, d_model=256, n_layers=2, n_heads=8, n_kv_heads=8, head_dim=32,
                  d_ff=1024, max_seq_len=256)
TOKEN_PROMPTS = [[(7 * i + 3 * j) % CFG.vocab_size for j in range(5 + 3 * i)] for i in range(8)]


def _greedy(engine, n_new=32):
    requests = [batching.Request(p, SamplingParams(max_new_tokens=n_new, ignore_eos=True), key=i)
                for i, p in enumerate(TOKEN_PROMPTS)]
    return [r.token_ids for r in batching.run(engine, engine.params, requests)]


def _random_model(cfg, seed):
    """A random model whose q/k/v biases are random too (they start at zero), so that any
    misalignment between a query head, its kv head and its bias changes the output."""
    model = Llama(cfg, rngs=nnx.Rngs(seed))
    if cfg.qkv_bias:
        keys = iter(jax.random.split(jax.random.key(seed), 3 * cfg.n_layers))
        for block in model.layers:
            for name in ("q_bias", "k_bias", "v_bias"):
                bias = getattr(block.attn, name)
                bias[...] = jax.random.normal(next(keys), bias.shape)
    return model


def _equal_to_one_device(cfg, model, mesh, layout, batch):
    """Prefill logits within 1e-4 and greedy tokens of 8 mixed-length prompts x 32 identical."""
    one = Engine(model, batch_size=batch, max_seq_len=64)
    placement = Placement.make(cfg, mesh_shape=mesh, layout=layout, batch_size=batch)
    sharded = Engine(model, batch_size=batch, max_seq_len=64, placement=placement)
    logits = [np.asarray(e.prefill(e.params, TOKEN_PROMPTS[-1]).logits) for e in (one, sharded)]
    assert np.abs(logits[0] - logits[1]).max() < 1e-4
    reference = _greedy(one)
    assert _greedy(sharded) == reference
    assert len({tuple(t) for t in reference}) > 1  # the prompts lead to different continuations
    return placement


@pytest.mark.parametrize("layout", DENSE_SHARDED)
@pytest.mark.slow
def test_grouped_query_layouts_at_batch_8(layout):
    """Batch 8, so weight-gathered decode runs truly weight-gathered (on SmolLM2, XLA:CPU's weight
    all-gathers take ~2 s a step; the layouts notebook runs them for a few steps). 2 kv heads for 8
    query heads: kv heads are split over fewer mesh axes than query heads (partial replication)."""
    cfg = CFG.replace(n_kv_heads=2, qkv_bias=True)
    placement = _equal_to_one_device(cfg, _random_model(cfg, 2), MESH, layout, batch=8)
    assert (placement.prefill_layout, placement.decode_layout) == (layout, layout)


@pytest.mark.slow
def test_weight_gathered_prefill_with_2d_decode(base, reference):
    """The pair at batch 8 (8 mixed-length prompts); at batch 1, weight_gathered_xyz above runs as
    this same pair (its decode runs as 2D)."""
    llm = base.relayout(mesh_shape=MESH, prefill_layout="weight_gathered_xyz", decode_layout="2d_weight_stationary",
                        batch_size=8)
    assert llm.layouts == ("weight_gathered_xyz", "2d_weight_stationary")
    _check_equal(llm, reference, 8)


# SmolLM2's awkward head counts (9 query, 3 kv heads) on a random 2-layer model: compiles in seconds.
ODD_HEADS = ModelConfig("odd-heads", vocab_size=512, d_model=576, n_layers=2, n_heads=9, n_kv_heads=3, head_dim=64,
                        d_ff=1536, max_seq_len=256)


@pytest.mark.parametrize("mesh,layout", [({"x": 8}, "1d_weight_stationary"), ({"x": 2, "y": 4}, "2d_weight_stationary"),
                                         ({"x": 4, "y": 2}, "2d_weight_stationary"), ({"z": 8}, "1d_weight_stationary")])
@pytest.mark.slow
def test_other_mesh_shapes(mesh, layout):
    _equal_to_one_device(ODD_HEADS, _random_model(ODD_HEADS, 4), mesh, layout, batch=4)


def _spec(array):
    """The array's PartitionSpec with one entry per dimension (trailing replicated dims spelled out)."""
    spec = array.sharding.spec
    return P(*spec, *([None] * (array.ndim - len(spec))))


def test_weights_and_cache_carry_their_layout(base):
    """Read from the arrays: each parameter and the KV cache sharded as the layout says."""
    xyz = ("x", "y", "z")
    expected = {  # layout -> (gate [D,F], down [F,D], q [D,9,64], embed [V,D], cache [B,S,3,64])
        "1d_weight_stationary": (P(None, xyz), P(xyz, None), P(None, None, None), P(xyz, None), P(xyz, None, None, None)),
        # F stored z-major (layouts.F_AXES), so that a gather over y leaves contiguous F_z blocks
        "2d_weight_stationary": (P("x", ("z", "y")), P(("z", "y"), "x"), P("x", None, None), P(("z", "y"), "x"),
                                 P(xyz, None, None, None)),
        "weight_gathered_xy": (P("x", ("z", "y")), P(("z", "y"), "x"), P("x", None, None), P(("z", "y"), "x"),
                               P(xyz, None, None, None)),
        "replicated": (P(None, None), P(None, None), P(None, None, None), P(None, None), P(None, None, None, None)),
    }
    for name, (gate, down, q, embed, cache) in expected.items():
        llm = base.relayout(mesh_shape=MESH, layout=name, batch_size=8)
        layer = llm.params["layers"][0]
        got = (_spec(layer["mlp"]["gate"][...]), _spec(layer["mlp"]["down"][...]), _spec(layer["attn"]["q"][...]),
               _spec(llm.params["embed"][...]), _spec(_dense_cache(llm)))
        # SmolLM2's 9 query / 3 kv heads do not divide over 2+ devices: heads stay whole (partial
        # replication), and decode uses the batch-sharded KV cache of Pope et al. Fig. 4c.
        assert got == (gate, down, q, embed, cache), name


def test_per_device_memory(base):
    llm = base.relayout(mesh_shape=MESH, layout="1d_weight_stationary", batch_size=8)
    mlp = [llm.params["layers"][i]["mlp"][w][...] for i in range(llm.config.n_layers) for w in ("gate", "up", "down")]
    total = sum(a.nbytes for a in mlp)
    for device_index in range(8):
        held = sum(a.addressable_shards[device_index].data.nbytes for a in mlp)
        assert held == total // 8
    cache = _dense_cache(llm)  # [B=8, S, K, H] split by batch over 8 devices
    assert {s.data.shape[0] for s in cache.addressable_shards} == {1}
    heads = base.relayout(mesh_shape=MESH, layout="1d_weight_stationary", batch_size=8, attention="heads")
    replica = _dense_cache(heads)  # 3 kv heads over 8 devices: replicated
    assert {s.data.shape for s in replica.addressable_shards} == {replica.shape}


# ----- collectives in the compiled program, against Pope et al.'s per-layer data flow -----

def _engine(cfg, layout, batch=8, **kw):
    placement = Placement.make(cfg, mesh_shape=MESH, layout=layout, batch_size=batch, **kw)
    return Engine(Llama(cfg, rngs=nnx.Rngs(0)), batch_size=batch, max_seq_len=256, placement=placement)


def _pope_mlp(layout, tokens, E, F, f32=4):
    """Per-layer feed-forward collectives {kind: sorted per-device operand bytes} on X=Y=Z=2, from
    Pope et al. sec. 3.2 / Fig. 2 / Fig. A.2, for a SwiGLU block (two input matrices).

    all-gather bytes are its per-device input, reduce-scatter bytes its per-device input; the
    RMSNorm over an E-sharded residual adds one small all-reduce of the per-token sums.
    """
    if layout == "1d_weight_stationary":  # BLE_xyz -AG(xyz)-> BLE ... BLE partial -RS(xyz)-> BLE_xyz
        return {"all-gather": [tokens * E // 8 * f32], "reduce-scatter": [tokens * E * f32],
                "all-reduce": [tokens * f32]}
    if layout == "2d_weight_stationary":  # AG(yz) to BLE_x; RS(x) into F (x2); AG(x) F; RS(yz) into E
        return {"all-gather": sorted([tokens * E // 8 * f32, tokens * F // 8 * f32]),
                "reduce-scatter": sorted([tokens * F // 4 * f32] * 2 + [tokens * E // 2 * f32]),
                "all-reduce": [tokens * f32]}
    gathered = {"weight_gathered_x": 2, "weight_gathered_xy": 4, "weight_gathered_xyz": 8}[layout]
    local = tokens // gathered  # tokens split over the gathered axes
    w = E * F // 8 * f32  # one stored weight shard (E_x F_yz)
    # Each weight is all-gathered dimension by dimension in storage order: W_in E(x) then F, W_out F
    # then E(x); the per-chip result is the weight's EF/(devices left), as in Pope et al. A.2.2.
    weights = {2: [w] * 3, 4: [w, 2 * w] * 3, 8: [w, 2 * w] * 2 + [w, 4 * w]}[gathered]
    if gathered == 8:  # XYZ: fully stationary activations
        return {"all-gather": sorted(weights)}
    rest = 8 // gathered  # devices E is split over in the residual
    return {"all-gather": sorted(weights + [local * E // rest * f32]), "reduce-scatter": [local * E * f32],
            "all-reduce": [local * f32]}


def planner_and_compiled(cfg, layout, phase, batch, seq, compiled) -> list:
    """(block, the compiled step's per-layer collectives {kind: [bytes]}, the planner's) for the
    feed-forward and attention blocks; `compiled` is per_layer(compiled_collectives(...))."""
    est = planner.estimate(cfg, "tpu-v4", MESH, phase, batch, seq, layout, "heads", weight_bytes=4, act_bytes=4)
    out = []
    for block in ("mlp", "attention"):
        want = {}
        for c in est.layer_collectives:
            if c.block == block:
                want.setdefault(c.kind, []).append(c.operand_bytes)
        got = {kind: sizes for (b, kind), sizes in compiled.items() if b == block}
        out.append((block, got, {k: sorted(v) for k, v in want.items()}))
    return out


@pytest.mark.parametrize("layout", ["1d_weight_stationary", "2d_weight_stationary", "weight_gathered_x",
                                    "weight_gathered_xy", "weight_gathered_xyz"])
@pytest.mark.slow
def test_compiled_collectives_match_pope_and_planner(layout):
    """Per layer, decode (batch 8 x 1) and prefill (1 x 32 positions): the feed-forward collectives
    equal Pope et al.'s data flow, and the feed-forward and attention ones the planner's prediction."""
    engine = _engine(CFG, layout)
    for phase, batch, seq in (("decode", 8, 1), ("prefill", 1, engine.buckets[0])):
        compiled = per_layer(compiled_collectives(engine, phase))
        mlp = {kind: sizes for (block, kind), sizes in compiled.items() if block == "mlp"}
        assert mlp == _pope_mlp(layout, batch * seq, CFG.d_model, CFG.d_ff), phase
        for block, got, want in planner_and_compiled(CFG, layout, phase, batch, seq, compiled):
            assert got == want, (phase, block)


@pytest.mark.slow
def test_multiquery_decode_uses_batch_sharded_cache_and_all_to_all():
    mqa = CFG.replace(n_kv_heads=1)
    engine = _engine(mqa, "2d_weight_stationary")
    kinds = {c.kind for c in compiled_collectives(engine, "decode") if c.layer == 0 and c.block == "attention"}
    assert "all-to-all" in kinds
    assert _spec(engine.init_decode_state().cache.k[0]) == P(("x", "y", "z"), None, None, None)
    heads = _engine(mqa, "2d_weight_stationary", attention="heads")
    kinds = {c.kind for c in compiled_collectives(heads, "decode") if c.layer == 0 and c.block == "attention"}
    assert "all-to-all" not in kinds


@pytest.mark.slow
def test_engines_share_the_jitted_steps_but_each_runs_its_own_layout():
    """The step functions are module-level and shared; the Step (mesh, rules) is a static argument,
    so an engine never runs a program traced under another engine's rules."""
    from shardlm.engine import engine as engine_module

    cfg = CFG.replace(name="shared-steps")  # a config no other test compiles, so the counts start here

    def step(engine):  # one decode step through the shared jitted function
        state, _ = engine.generate(engine.params, engine.init_decode_state())
        return jax.block_until_ready(state)

    before = engine_module.generate_step._cache_size()
    one_d, two_d = _engine(cfg, "1d_weight_stationary"), _engine(cfg, "2d_weight_stationary")
    step(one_d), step(two_d)
    assert engine_module.generate_step._cache_size() == before + 2
    assert one_d.compiled_count()["generate"] == two_d.compiled_count()["generate"] == 1
    first = per_layer(compiled_collectives(one_d, "decode"))
    second = per_layer(compiled_collectives(two_d, "decode"))
    assert first != second
    step(one_d)
    assert per_layer(compiled_collectives(one_d, "decode")) == first  # still its own program
    # An equal engine (same model graph, mesh and rules) reuses the program: nothing new compiled.
    again = _engine(cfg, "1d_weight_stationary")
    step(again)
    assert engine_module.generate_step._cache_size() == before + 2
    assert per_layer(compiled_collectives(again, "decode")) == first
