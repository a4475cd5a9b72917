"""The planner's mixture-of-experts cost (sharding/planner.py `_estimate_moe`): parameter counts
against the published ones, FLOPs and weight bytes against a hand computation, the expert-parallel
dispatch bytes against sharding/experts.py and the compiled program, the ranking's EP win that
benchmarks/results/planner_moe.md and notebooks/planning.ipynb document, imbalance, the CLI."""

import math

import pytest

from shardlm.engine.cli import main
from shardlm.models.config import ModelConfig, preset
from shardlm.sharding import experts, planner
from shardlm.sharding.layouts import LAYOUTS

MESH = {"x": 2, "y": 2, "z": 2}
EP_LAYOUTS = [name for name, lay in LAYOUTS.items() if planner.is_expert_parallel(lay)]
# Small enough to compute by hand: 8 experts of width 32, top 2, over 2 layers.
TINY = ModelConfig("tiny-moe", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                   d_ff=128, max_seq_len=64, family="moe", n_experts=8, experts_per_token=2, expert_d_ff=32)


@pytest.mark.parametrize("name,total,active,rel", [
    ("mixtral-8x7b", 46.7e9, 12.9e9, 0.01),  # Mistral AI, "Mixtral of experts" (2023): 46.7B, 12.9B per token
    ("qwen3-30b-a3b", 30.5e9, 3.3e9, 0.03),  # the Qwen3-30B-A3B model card: 30.5B, 3.3B activated
])
def test_parameter_counts_match_published(name, total, active, rel):
    cfg = preset(name)
    assert cfg.n_params == pytest.approx(total, rel=rel)
    assert cfg.n_active_params == pytest.approx(active, rel=rel)


def test_deepseek_v3_like_counts_match_the_report_once_mla_is_put_back():
    """DeepSeek-V3 (arXiv 2412.19437): 671B parameters, 37B activated. The preset's grouped-query
    attention has more parameters than the report's MLA (config.json: q_lora_rank 1536,
    kv_lora_rank 512, rope/nope/v head dims 64/128/128, two latent norms); with the difference taken
    out the counts are the report's."""
    cfg = preset("deepseek-v3-like")
    D, N = cfg.d_model, cfg.n_heads
    mla = D * 1536 + 1536 + 1536 * N * 192 + D * 576 + 512 + 512 * N * 256 + N * 128 * D
    gqa = D * (N + 2 * cfg.n_kv_heads) * cfg.head_dim + N * cfg.head_dim * D
    extra = cfg.n_layers * (gqa - mla)
    assert 3e9 < extra < 4.5e9
    assert cfg.n_params - extra == pytest.approx(671e9, rel=0.01)
    assert cfg.n_active_params - extra == pytest.approx(37e9, rel=0.02)
    assert cfg.dense_layers == (0, 1, 2) and cfg.n_experts == 256 and cfg.shared_expert_d_ff == 2048


def test_flops_and_weight_bytes_by_hand():
    """1D weight-stationary (TP inside every expert), decode batch 8 at context 16 on 8 chips."""
    e = planner.estimate(TINY, "tpu-v4", MESH, "decode", 8, 16, "1d_weight_stationary", "heads")
    D, N, K, H, V, L, E, k, Fe, T = 64, 4, 2, 16, 256, 2, 8, 2, 32, 8
    attn = D * (N + 2 * K) * H + N * H * D + 2 * D  # q, k, v, o and the two norms
    router, expert, vocab = D * E, 3 * D * Fe, 2 * V * D
    flops = (L * (2 * T * (attn + router) + 4 * T * 16 * N * H) + 2 * T * D * V) / 8 + L * 2 * T * k * expert / 8
    assert e.flops == pytest.approx(flops)
    assert e.weight_bytes_per_chip == pytest.approx((L * (attn + router + E * expert) + vocab) * 2 / 8)
    hit = E * (1 - (1 - 1 / E) ** (T * k))  # experts that 16 uniformly routed slots touch
    assert e.moe["experts_hit_per_layer"] == pytest.approx(hit)
    assert e.hbm_bytes - e.kv_bytes_per_chip == pytest.approx((L * (attn + router + hit * expert) + vocab) * 2 / 8)
    active = L * (attn + router + k * expert) + vocab + D
    assert TINY.n_active_params == active
    assert e.mfu == pytest.approx(2 * active * T / (8 * planner.get_chip("tpu-v4").bf16_flops * e.step_time_s))
    assert e.moe["all_to_all_bytes"] == 0  # no dispatch: every expert on every device group


@pytest.mark.skipif(not EP_LAYOUTS, reason="sharding/layouts.py lists no expert-parallel layout")
def test_expert_parallel_compute_follows_the_busiest_group():
    """EP over 8 groups, one expert each: at imbalance 1 the expert FLOPs per chip are the dense
    layouts' (every slot computed once, split 8 ways); imbalance m gives the busiest group m x."""
    dense = planner.estimate(TINY, "tpu-v4", MESH, "decode", 8, 16, "1d_weight_stationary", "heads")
    even = planner.estimate(TINY, "tpu-v4", MESH, "decode", 8, 16, "expert_parallel_xyz", "heads")
    skew = planner.estimate(TINY, "tpu-v4", MESH, "decode", 8, 16, "expert_parallel_xyz", "heads", imbalance=2.0)
    assert (even.moe["ep"], even.moe["tp"]) == (8, 1)
    assert even.moe["expert_compute_s"] == pytest.approx(dense.moe["expert_compute_s"])
    assert skew.moe["expert_compute_s"] == pytest.approx(2 * even.moe["expert_compute_s"])
    assert skew.flops > even.flops and skew.moe["experts_hit_per_layer"] > even.moe["experts_hit_per_layer"]
    assert planner.estimate(TINY, "tpu-v4", MESH, "decode", 8, 16, "1d_weight_stationary", "heads",
                            imbalance=2.0).step_time_s == dense.step_time_s  # TP inside experts: immune


@pytest.mark.skipif(not EP_LAYOUTS, reason="sharding/layouts.py lists no expert-parallel layout")
@pytest.mark.parametrize("layout", EP_LAYOUTS)
@pytest.mark.parametrize("cf", [None, 1.0, 1.25])
def test_all_to_all_bytes_are_experts_dispatch_bytes(layout, cf):
    cfg = preset("mixtral-8x7b")
    for phase, batch, context in (("decode", 64, 2048), ("prefill", 1, 2048)):
        e = planner.estimate(cfg, "tpu-v5p", MESH, phase, batch, context, layout, "heads", capacity_factor=cf)
        ep, tp = planner.expert_split(cfg, LAYOUTS[layout], MESH)
        tokens = batch * (1 if phase == "decode" else context)
        want = experts.dispatch_bytes(-(-tokens // (ep * tp)), cfg.experts_per_token, cfg.d_model, ep, 2, cf)
        a2a = [c for c in e.layer_collectives if c.kind == "all-to-all" and c.block == "mlp"]
        assert [c.what for c in a2a] == ["expert dispatch", "expert combine"]
        assert [c.operand_bytes for c in a2a] == [want, want] and all(c.group == ep for c in a2a)
        assert e.moe["all_to_all_bytes"] == cfg.n_layers * 2 * want


@pytest.mark.skipif(not EP_LAYOUTS, reason="sharding/layouts.py lists no expert-parallel layout")
def test_ranking_picks_expert_parallel_where_the_notebook_says():
    """The cases benchmarks/results/planner_moe.md and notebooks/planning.ipynb document, on TPU v5p
    with capacity factor 1.25. deepseek-v3-like on 64 chips: at decode batch 512 EP xyz (4 experts
    a chip) beats 2D weight-stationary, whose TP inside experts all-reduces k = 8 partial sums a
    token each layer; at batch 8 (HBM-bound, EP's buffer floor of a slot row per destination) and
    dropless (buffers of ep x the slots) 2D wins. Mixtral on 8 chips (an expert a chip): EP xyz
    for a 2048-token prefill."""
    ds = preset("deepseek-v3-like")
    ranked = planner.plan(ds, "tpu-v5p", 64, "decode", 512, 2048, capacity_factor=1.25)
    assert {e.layout for e in ranked} >= {"1d_weight_stationary", "2d_weight_stationary", *EP_LAYOUTS}
    assert (ranked[0].layout, ranked[0].attention) == ("expert_parallel_xyz", "batch")
    dense = next(e for e in ranked if e.moe["ep"] == 1)
    assert dense.layout == "2d_weight_stationary" and dense.step_time_s > 1.1 * ranked[0].step_time_s
    assert planner.best(ds, "tpu-v5p", 64, "decode", 8, 2048, capacity_factor=1.25).layout == "2d_weight_stationary"
    assert planner.best(ds, "tpu-v5p", 64, "decode", 512, 2048).layout == "2d_weight_stationary"  # dropless
    mixtral = planner.plan(preset("mixtral-8x7b"), "tpu-v5p", 8, "prefill", 1, 2048, capacity_factor=1.25)
    assert mixtral[0].layout == "expert_parallel_xyz"
    assert next(e for e in mixtral if e.moe["ep"] == 1).step_time_s > 1.3 * mixtral[0].step_time_s


@pytest.mark.skipif(not EP_LAYOUTS, reason="sharding/layouts.py lists no expert-parallel layout")
def test_imbalance_slows_expert_parallel_steps():
    cfg = preset("mixtral-8x7b")
    times = [planner.estimate(cfg, "tpu-v5p", MESH, "prefill", 1, 2048, "expert_parallel_xyz", "heads",
                              capacity_factor=1.25, imbalance=m).step_time_s for m in (1.0, 1.5, 2.0)]
    assert times[0] < times[1] < times[2]
    skewed = planner.estimate(cfg, "tpu-v5p", MESH, "prefill", 1, 2048, "expert_parallel_xyz", "heads",
                              capacity_factor=1.25, imbalance=2.0)
    assert skewed.moe["capacity"] == experts.capacity(256, 2, 8, 2.5)  # the buffer sized for the busiest group
    with pytest.raises(ValueError, match="imbalance"):
        planner.plan(cfg, "tpu-v5p", 8, "decode", 8, 2048, imbalance=0.5)
    with pytest.raises(ValueError, match="capacity factor"):
        planner.plan(cfg, "tpu-v5p", 8, "decode", 8, 2048, capacity_factor=0)


def test_dense_results_unchanged():
    """A dense model's figures are the planner's before mixtures of experts (pinned), its ranking
    has no expert-parallel layout, and its as_dict no MoE terms; a mixture of experts with its
    experts removed is costed exactly as the same dense model."""
    palm = planner.plan(preset("palm-540b"), "tpu-v4", 64, "decode", 64, 2048, weight_bytes=1)
    assert [(e.layout, e.attention) for e in palm[:2]] == [("2d_weight_stationary", "batch"),
                                                           ("1d_weight_stationary", "batch")]
    assert palm[0].step_time_s == pytest.approx(0.03680061280000001, rel=1e-12)
    assert palm[1].step_time_s == pytest.approx(0.03712206186666667, rel=1e-12)
    llama = planner.best(preset("llama3-70b"), "tpu-v5p", 8, "prefill", 1, 2048)
    assert llama.step_time_s == pytest.approx(0.10869449906921133, rel=1e-12)
    assert not any(planner.is_expert_parallel(LAYOUTS[e.layout]) for e in palm)
    assert all(e.moe is None and "moe" not in e.as_dict() for e in palm)
    dense = TINY.replace(family="llama", n_experts=0, experts_per_token=0, expert_d_ff=0)
    same = ModelConfig("tiny-dense", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                       d_ff=128, max_seq_len=64)
    for layout in ("1d_weight_stationary", "2d_weight_stationary", "weight_gathered_xy"):
        a = planner.estimate(dense, "tpu-v4", MESH, "decode", 8, 16, layout).as_dict()
        b = planner.estimate(same, "tpu-v4", MESH, "decode", 8, 16, layout).as_dict()
        assert a == b


@pytest.mark.skipif(not EP_LAYOUTS, reason="sharding/layouts.py lists no expert-parallel layout")
def test_cli_shows_expert_parallel_layouts_and_all_to_all_bytes(capsys):
    assert main(["plan", "--model", "mixtral-8x7b", "--chip", "tpu-v5p", "--chips", "8", "--phase", "prefill",
                 "--capacity-factor", "1.25"]) == 0
    out = capsys.readouterr().out
    assert "12.9B active" in out and "a2a MiB" in out and "capacity factor 1.25" in out
    [chosen] = [line for line in out.splitlines() if line.startswith("*")]
    assert chosen.split()[1] == "expert_parallel_xyz" and chosen.split()[-1] == "8x1"
    mib = float(chosen.split()[-2])
    assert mib * 2**20 == pytest.approx(32 * 2 * experts.dispatch_bytes(256, 2, 4096, 8, 2, 1.25), rel=1e-3)


@pytest.mark.parametrize("argv,match", [
    (["--model", "mixtral-8x7b", "--expert-imbalance", "0.5"], "--expert-imbalance must be a finite number >= 1"),
    (["--model", "mixtral-8x7b", "--expert-imbalance", "nan"], "--expert-imbalance must be a finite number >= 1"),
    (["--model", "mixtral-8x7b", "--expert-imbalance", "inf"], "--expert-imbalance must be a finite number >= 1"),
    (["--model", "mixtral-8x7b", "--capacity-factor", "0"], "--capacity-factor must be a finite number > 0"),
    (["--model", "mixtral-8x7b", "--capacity-factor", "-1"], "--capacity-factor must be a finite number > 0"),
    (["--model", "mixtral-8x7b", "--capacity-factor", "many"], "invalid float"),
    (["--model", "llama3-8b", "--capacity-factor", "1.25"], "apply to a mixture of experts"),
])
def test_cli_bad_moe_flags_exit_2_with_one_line(argv, match, capsys):
    assert main(["plan", "--chip", "tpu-v5p", "--chips", "8", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and match in captured.err


def test_expert_parallel_left_out_where_the_experts_do_not_divide():
    """Mixtral's 8 experts do not divide over 64 EP groups: expert_parallel_xyz is left out of the
    ranking (and named with the reason when asked for)."""
    cfg = preset("mixtral-8x7b")
    names = {e.layout for e in planner.plan(cfg, "tpu-v5p", 64, "decode", 64, 2048)}
    assert "expert_parallel_xyz" not in names and ("expert_parallel_x" in names or not EP_LAYOUTS)
    if "expert_parallel_xyz" in LAYOUTS:
        with pytest.raises(ValueError, match="8 experts do not divide over 64"):
            planner.plan(cfg, "tpu-v5p", 64, "decode", 64, 2048, layouts=["expert_parallel_xyz"])
    assert math.isclose(planner.experts_hit(256, 0), 0) and planner.experts_hit(8, 10**6) == pytest.approx(8)


# The planner's per-layer collectives against the compiled program on 8 CPU devices (x=y=z=2), as
# tests/test_layouts.py checks the dense ones: a random MoE whose D, heads and expert F divide 8 ways.
HLO_CFG = ModelConfig("tiny-moe-hlo", vocab_size=512, d_model=256, n_layers=2, n_heads=8, n_kv_heads=8, head_dim=32,
                      d_ff=1024, max_seq_len=256, family="moe", n_experts=8, experts_per_token=2, expert_d_ff=128)


def _compiled_vs_planner(cfg, layout, monkeypatch):
    import jax
    from flax import nnx

    from shardlm.engine import Engine
    from shardlm.engine.llm import Placement
    from shardlm.models import moe
    from shardlm.models.moe import MoE

    # The program TPU and GPU compile, whose experts run as ragged_dot (the planner's chips), not
    # XLA:CPU's scan over the experts (the same bytes, which XLA's combiner merges differently).
    monkeypatch.setattr(moe, "_on_cpu", lambda: False)
    from test_layouts import planner_and_compiled

    from shardlm.sharding.collectives import compiled_collectives, per_layer

    placement = Placement.make(cfg, mesh_shape=MESH, layout=layout, batch_size=8)
    engine = Engine(MoE(cfg, rngs=nnx.Rngs(0)), batch_size=8, max_seq_len=256, placement=placement)
    out = []
    for phase, batch, seq in (("decode", 8, 1), ("prefill", 1, engine.buckets[0])):
        compiled = per_layer(compiled_collectives(engine, phase))
        out += [(phase, *row) for row in planner_and_compiled(cfg, layout, phase, batch, seq, compiled)]
    del engine
    jax.clear_caches()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["1d_weight_stationary", "2d_weight_stationary", *EP_LAYOUTS])
def test_moe_collectives_equal_the_compiled_program(layout, monkeypatch):
    """Every per-layer collective and its operand bytes, decode (batch 8) and prefill (1 x 32): the
    dispatch and combine all-to-alls of the EP layouts are experts.dispatch_bytes, the dense
    layouts' TP inside experts all-reduces the slots' partial sums."""
    for phase, block, got, want in _compiled_vs_planner(HLO_CFG, layout, monkeypatch):
        assert got == want, (phase, block)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["1d_weight_stationary", *EP_LAYOUTS[:1]])
def test_shared_expert_collectives_equal_the_compiled_bytes(layout, monkeypatch):
    """With a shared expert (Qwen2-MoE's, DeepSeek's): the same bytes per kind (XLA's combiner merges
    the gate's [T, 1] all-reduce into another, so the counts differ)."""
    shared = HLO_CFG.replace(name="tiny-moe-hlo-shared", shared_expert_d_ff=512)
    for phase, block, got, want in _compiled_vs_planner(shared, layout, monkeypatch):
        assert {k: sum(v) for k, v in got.items()} == {k: sum(v) for k, v in want.items()}, (phase, block)
