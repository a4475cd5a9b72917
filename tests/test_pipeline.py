"""Pipeline stages over the `stage` mesh axis (sharding/pipeline.py) on 8 virtual CPU devices: the
schedule itself, greedy tokens and logits equal to the unsharded model, each device holding only its
stage's layers and cache, and stages talking through collective-permutes only."""

import gc
import math

import jax
import numpy as np
import pytest
from flax import nnx

from shardlm.engine import Engine, SamplingParams, batching
from shardlm.engine.llm import Placement
from shardlm.models.config import ModelConfig
from shardlm.models.llama import Llama
from shardlm.sharding.collectives import compiled_collectives
from shardlm.sharding.pipeline import Pipeline, bubble_fraction, check_stages, schedule, stage_sizes

# 8 layers so that 2, 4 and 8 stages all split evenly.
DEEP = ModelConfig("tiny-deep", vocab_size=101, d_model=64, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=16,
                   d_ff=128, max_seq_len=128, rope_theta=10000.0)
PROMPTS = [[5, 17, 99, 3, 42, 8, 1], [7] * 30, list(range(10, 60, 3)), [2, 100]]  # one prefill bucket (32)
NEW = SamplingParams(max_new_tokens=32, ignore_eos=True)
MAX_LEN = 96
LOGIT_TOL = 1e-4


@pytest.fixture(autouse=True)
def _free():
    yield
    gc.collect()
    jax.clear_caches()


@pytest.fixture(scope="module")
def model():
    return Llama(DEEP, rngs=nnx.Rngs(0))


def _generate(engine, prompts):
    requests = [batching.Request(p, NEW, frozenset(), key=i) for i, p in enumerate(prompts)]
    return [r.token_ids for r in batching.run(engine, engine.params, requests)]


def _run(model, mesh_shape, layout, batch, microbatches=None):
    placement = Placement.make(DEEP, mesh_shape=mesh_shape, layout=layout, batch_size=batch, microbatches=microbatches)
    engine = Engine(model, batch_size=batch, max_seq_len=MAX_LEN, placement=placement)
    logits = [np.asarray(engine.prefill(engine.params, p).logits) for p in PROMPTS]
    return _generate(engine, PROMPTS), np.stack(logits), engine


@pytest.fixture(scope="module")
def reference(model):
    tokens, logits, _ = _run(model, None, None, 1)
    # Random weights: greedy tokens are a fair comparison only if the top two logits are apart.
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 10 * LOGIT_TOL
    return tokens, logits


# ----- the schedule -----

@pytest.mark.parametrize("stages,micro", [(2, 2), (2, 5), (4, 4), (4, 8), (8, 8), (3, 1)])
def test_schedule_keeps_every_stage_busy(stages, micro):
    ticks = schedule(stages, micro)
    assert len(ticks) == micro + stages - 1
    for s in range(stages):  # each stage runs every microbatch once, in order, one tick after the stage before
        runs = [(t, m) for t, row in enumerate(ticks) for m in [row[s]] if m is not None]
        assert [m for _, m in runs] == list(range(micro))
        assert [t for t, _ in runs] == list(range(s, s + micro))
    # Steady state (after the fill, before the drain): no stage idle.
    for t in range(stages - 1, micro):
        assert None not in ticks[t]
    idle = sum(m is None for row in ticks for m in row)
    assert idle == stages * (stages - 1)
    assert idle / (stages * len(ticks)) == pytest.approx(bubble_fraction(stages, micro))


def test_stage_sizes_split_like_vllm_and_bad_counts_are_rejected():
    assert stage_sizes(30, 4) == [8, 8, 7, 7]
    assert stage_sizes(8, 3) == [3, 3, 2]
    assert stage_sizes(8, 8) == [1] * 8
    pipe = Pipeline(4, 4, 30)
    assert pipe.per_stage == 8 and pipe.cache_layers == 32
    assert pipe.slots() == list(range(16)) + list(range(16, 23)) + list(range(24, 31))
    with pytest.raises(ValueError, match="8 layers cannot be split into 9"):
        check_stages(8, 9)
    with pytest.raises(ValueError, match="cannot be split into"):
        Placement.make(DEEP.replace(n_layers=3), mesh_shape={"stage": 4, "x": 2})
    with pytest.raises(ValueError, match="microbatches must be"):
        Pipeline(2, 0, 8)
    with pytest.raises(ValueError, match="needs a pipeline"):
        Placement.make(DEEP, mesh_shape={"x": 8}, microbatches=4)


@pytest.mark.slow
def test_uneven_stages_equal_unsharded():
    """6 layers over 4 stages (2, 2, 1, 1; two padding slots), 8 layers over 3 (3, 3, 2): tokens and
    logits of one device, at batch 1 and 8."""
    for n_layers, mesh_shape in ((6, {"stage": 4, "x": 2}), (8, {"stage": 3})):
        cfg = DEEP.replace(n_layers=n_layers)
        model = Llama(cfg, rngs=nnx.Rngs(5))
        devices = None if math.prod(mesh_shape.values()) == 8 else jax.devices()[:3]
        one = Engine(model, batch_size=8, max_seq_len=MAX_LEN)
        want = _generate(one, PROMPTS), np.stack([np.asarray(one.prefill(one.params, p).logits) for p in PROMPTS])
        for batch in (1, 8):
            placement = Placement.make(cfg, mesh_shape=mesh_shape, layout="replicated" if devices else None,
                                       batch_size=batch, devices=devices)
            engine = Engine(model, batch_size=batch, max_seq_len=MAX_LEN, placement=placement)
            logits = np.stack([np.asarray(engine.prefill(engine.params, p).logits) for p in PROMPTS])
            assert np.abs(logits - want[1]).max() < LOGIT_TOL
            assert _generate(engine, PROMPTS) == want[0]
        assert engine.model().layers[n_layers - 1].mlp.up[...].shape == model.layers[-1].mlp.up[...].shape
        assert len(engine.model().layers) == n_layers


# ----- the same tokens and logits as one device -----

CASES = [  # mesh, layout, microbatches (None: as many as stages)
    ({"stage": 2, "x": 2, "y": 2}, "1d_weight_stationary", None),
    ({"stage": 2, "x": 2, "y": 2}, "2d_weight_stationary", 4),
    ({"stage": 4, "x": 2}, "1d_weight_stationary", None),
    ({"stage": 8}, "replicated", None),
]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("mesh_shape,layout,microbatches", CASES, ids=lambda c: str(c))
@pytest.mark.slow
def test_pipeline_equals_unsharded(model, reference, mesh_shape, layout, microbatches, batch):
    tokens, logits, engine = _run(model, mesh_shape, layout, batch, microbatches)
    assert engine.strategy.stages == mesh_shape["stage"]
    assert engine.strategy.microbatches == (microbatches or mesh_shape["stage"])
    assert tokens == reference[0]
    assert np.abs(logits - reference[1]).max() < LOGIT_TOL


# ----- where layers and cache live, and what the stages exchange -----

@pytest.mark.slow
def test_each_device_holds_only_its_stages_layers_and_cache(model):
    mesh_shape = {"stage": 4, "x": 2}
    placement = Placement.make(DEEP, mesh_shape=mesh_shape, layout="1d_weight_stationary", batch_size=8)
    engine = Engine(model, batch_size=8, max_seq_len=MAX_LEN, placement=placement)
    stage_of = {d.id: s for s, row in enumerate(placement.mesh.devices) for d in row.flat}
    placed = placement.place(model)  # before stacking: layer i already only on its stage's devices
    for i, layer in enumerate(placed.layers):
        assert {stage_of[d.id] for d in layer.mlp.up[...].sharding.device_set} == {i // 2}
    state = engine.init_decode_state()
    arrays = {"cache k": state.cache.k, "cache v": state.cache.v,
              **{f"weight {i}": a for i, a in enumerate(jax.tree.leaves(engine.params["layers"]))}}
    for name, a in arrays.items():
        assert a.shape[0] == DEEP.n_layers, name
        for shard in a.addressable_shards:
            s = stage_of[shard.device.id]
            assert shard.data.shape[0] == 2, name  # 8 layers / 4 stages
            assert shard.index[0] == slice(2 * s, 2 * s + 2), name
    # The decode step keeps them there: its donated state comes back with the same shardings.
    state, _ = engine.generate(engine.params, state)
    assert state.cache.k.sharding == arrays["cache k"].sharding


def test_stages_exchange_activations_by_collective_permute_only(model):
    placement = Placement.make(DEEP, mesh_shape={"stage": 8}, layout="replicated", batch_size=8)
    engine = Engine(model, batch_size=8, max_seq_len=MAX_LEN, placement=placement)
    collectives = compiled_collectives(engine, "decode")
    kinds = {c.kind for c in collectives}
    assert "collective-permute" in kinds
    assert "all-gather" not in kinds  # no layer weights (or cache) gathered across stages
    activation_bytes = 1 * 1 * DEEP.d_model * 4  # one microbatch of 1 row, [1, 1, D] float32
    assert max(c.result_bytes for c in collectives) <= activation_bytes


# ----- the planner and the CLI account for the stage axis -----

def test_pipeline_estimate_counts_ticks_bubble_and_stage_bytes():
    from shardlm.models.config import preset
    from shardlm.sharding import planner
    from shardlm.sharding.pipeline import pipeline_estimate

    palm = preset("palm-540b")
    e = pipeline_estimate(palm, "tpu-v4", {"stage": 2, "x": 4, "y": 4, "z": 4}, "decode", 64, 2048,
                          "2d_weight_stationary", microbatches=4)
    assert (e.stages, e.microbatches) == (2, 4)
    assert e.bubble_fraction == pytest.approx(1 / 5)
    assert e.stage_bytes == 1 * 64 * palm.d_model * 2  # one boundary, B x T x D bf16 activations
    # One tick: half the layers on a quarter of the batch over the 64-chip x/y/z group.
    tick = planner.estimate(palm.replace(n_layers=palm.n_layers // 2), "tpu-v4", {"x": 4, "y": 4, "z": 4},
                            "decode", 16, 2048, "2d_weight_stationary")
    assert e.tick.step_time_s == pytest.approx(tick.step_time_s)
    assert e.step_time_s >= 5 * tick.step_time_s  # M + stages - 1 ticks
    assert e.tick.weight_bytes_per_chip == pytest.approx(tick.weight_bytes_per_chip)


def test_cli_layouts_and_plan_with_stages(capsys):
    from shardlm.engine.cli import main

    assert main(["layouts", "--mesh", "stage=2,x=2,y=2", "--batch", "8", "--microbatches", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 stages of 15 layers, decode batch 8 in 2 microbatches: bubble 33%, 9,216 bytes" in out
    assert main(["plan", "--model", "palm-540b", "--chip", "tpu-v4", "--chips", "128", "--mesh",
                 "stage=2,x=4,y=4,z=4", "--batch", "64", "--phase", "decode", "--json"]) == 0
    best = __import__("json").loads(capsys.readouterr().out)["pipelines"][0]
    assert (best["stages"], best["microbatches"], best["bubble_fraction"]) == (2, 2, pytest.approx(1 / 3))
    assert main(["layouts", "--mesh", "stage=4"]) == 0  # 30 layers into 4 stages: 8, 8, 7, 7
    assert "4 stages of 8 or 7 layers" in capsys.readouterr().out
    assert main(["layouts", "--mesh", "stage=31"]) == 2
    assert "30 layers cannot be split into 31" in capsys.readouterr().err
