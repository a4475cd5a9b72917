"""An analytical planner for Pope et al. 2022's layouts: per layer and per step FLOPs, HBM traffic,
memory held and the bytes of every collective, an estimated step time, and a ranking of layouts.

The collectives are derived from the same data flow as sharding/blocks.py (which is what the
engine emits), using the sharding rules of sharding/layouts.py on an abstract mesh, so for any
layout the predicted feed-forward collectives equal those of the compiled program (see
tests/test_planner.py). Attention projections follow the feed-forward layout with heads in place
of F; batch-sharded attention (Fig. 4c/5b) adds an all-to-all of Q before the attention core and
of its output after it.

Bytes (Pope et al. App. A.1), per chip, with K the devices of one collective's group:
    all-gather     per-chip output bytes x (K-1)/K
    reduce-scatter per-chip input bytes  x (K-1)/K
    all-reduce     2 x per-chip input bytes x (K-1)/K
    all-to-all     per-chip input bytes  x (K-1)/K
(`Coll.cost_bytes`; the paper drops (K-1)/K, we keep it, because the engine gathers a weight
dimension by dimension and only with the factor does that cost the same as one gather.)

Time (`Coll.phases`), alpha-beta on the torus: a collective runs one bidirectional ring per mesh
axis it spans, in turn; each ring costs a fixed overhead, alpha per ring step (K // 2 hops) and its
bytes over that axis' two links (chips.json: ici_bw_per_axis, hop_latency_s,
collective_overhead_s, with their sources; beyond ici_domain, dcn_bw). A weight-gathered layout's
weights instead travel one way around one ring through all the gathered chips, as Pope et al.'s
code streams them.

Overlap (`step_time`): Looped CollectiveEinsum (Pope et al. 3.5, Wang et al. 2023) cuts a
collective that feeds or follows a matmul into K chunks and runs all but one under the matmul. It
applies to single-axis activation collectives (the authors' loops run over one mesh axis) and to
weight rings; the rest (activation collectives over several axes, all-to-alls, the all-gather half
of an all-reduce, norm statistics) adds. step = max(compute, HBM, hidden communication) + the
exposed chunks + the rest; comm_s is every collective's time, hidden or not. Compute and HBM
traffic overlap (a roofline); matmuls run at the bf16 peak even with int8 weights ("the matmuls
still use bfloat16 arithmetic", Pope et al. 4.4); int8 weights halve weight bytes, held and moved.
benchmarks/results/planner_vs_paper.md compares the result with the paper's measurements.
MFU = 2 N tokens / (chips x peak x step) as in Pope et al. (N: the unpadded parameter count;
a mixture of experts' active parameters); MBU = HBM bytes per step / (step x HBM bandwidth).

Mixture of experts (`config.n_experts > 0`, `_estimate_moe`): a sparse layer's FLOPs are its
active parameters' (router, k experts per token, the shared expert) with attention's; each chip
holds its share of all E experts, and reads per step the experts the step's B*T*k token-slots
touch, E (1 - (1 - 1/E)^(B T k)) a layer under uniform routing. The dense layouts keep every expert
whole on every device group and split its D and F as the dense MLP's (tensor parallelism inside
every expert): XLA all-gathers the residual to whole D and all-reduces the partial sums of the
T*k slots' projections (not a reduce-scatter of the T tokens after the combine, as a dense MLP's
would be); weight-gathered layouts gather every expert. The expert-parallel layouts
(`is_expert_parallel`: sharding/layouts.py splits "expert" over ep devices, "expert_mlp" over tp)
run attention and dense layers as 1d_weight_stationary and a sparse layer as sharding/experts.py
does: the router's logits all-reduced over the n = ep x tp devices, one all-to-all dispatching each
device's D chunk of the [ep, C, D] slot buffer (C = experts.capacity for the ceil(T/n) tokens of a
device) and one combining it back, both of operand bytes experts.dispatch_bytes; under EP x TP the
buffer all-gathered over the tp axes and the down projection's partial sums reduce-scattered.
`imbalance` m >= 1: the busiest EP group receives m x the mean slots (its expert FLOPs and the
experts it touches scale, the step waits for it); with a `capacity_factor` c the buffer is sized
for that group, C = capacity(.., c x m), and slots past it are dropped. Tensor parallelism inside
experts is immune to imbalance: every chip computes its F slice of every slot.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import time
import types
from dataclasses import dataclass, field, replace

from shardlm.sharding.layouts import LAYOUTS, XYZ, get_layout

NORM_BYTES = 4  # RMSNorm statistics are all-reduced in float32
ACT_BYTES = 2  # bf16 activations


# ----- chips -----

@dataclass(frozen=True)
class Chip:
    name: str
    bf16_flops: float  # peak dense FLOP/s
    int8_flops: float
    hbm_bytes: float
    hbm_bw: float  # bytes/s
    ici_bw_per_axis: float  # bytes/s one ring over one torus axis moves: its two links, one each way
    ici_axes: int
    ici_domain: int  # most chips on the fast interconnect
    dcn_bw: float  # bytes/s per chip beyond ici_domain
    source: str
    hop_latency_s: float = 0.0  # alpha: one ring step to a neighbour
    collective_overhead_s: float = 0.0  # fixed cost of one ring (one per mesh axis a collective spans)

    @property
    def ici_bw(self) -> float:
        return self.ici_bw_per_axis * self.ici_axes

    def network_bw(self, n_chips: int) -> float:
        return self.ici_bw if n_chips <= self.ici_domain else self.dcn_bw

    def axis_bw(self, n_chips: int) -> float:
        """Bytes/s one ring over one mesh axis moves (its links in both directions)."""
        return self.ici_bw_per_axis if n_chips <= self.ici_domain else self.dcn_bw


@functools.cache
def chips() -> dict[str, Chip]:
    raw = json.loads((pathlib.Path(__file__).with_name("chips.json")).read_text())
    return {name: Chip(name=name, **spec) for name, spec in raw.items() if not name.startswith("_")}


@functools.cache
def _measure_cpu() -> Chip:
    """Time a jitted 2048^2 matmul (FLOP/s) and a 4096x8192 matrix-vector product (bytes/s) here."""
    import jax
    import jax.numpy as jnp

    def best(f, *args):
        f(*args).block_until_ready()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            f(*args).block_until_ready()
            times.append(time.perf_counter() - t)
        return min(times)

    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    flops = 2 * n**3 / best(jax.jit(lambda a, b: a @ b), a, a)
    m = jnp.ones((4096, 8192), jnp.float32)
    v = jnp.ones((8192,), jnp.float32)
    bw = m.nbytes / best(jax.jit(lambda m, v: m @ v), m, v)
    return Chip("cpu", flops, flops, 8 * 2**30, bw, bw, 1, 1 << 20, bw,
                "measured on this machine: jitted float32 2048^2 matmul and 4096x8192 matrix-vector product")


def get_chip(name: str) -> Chip:
    if name == "cpu":
        return _measure_cpu()
    table = chips()
    if name not in table:
        raise ValueError(f"unknown chip {name!r}; known: {', '.join([*table, 'cpu'])}")
    return table[name]


def chip_for_device_kind(kind: str, platform: str = "") -> str:
    """jax.devices()[0].device_kind (and .platform) -> a chip name of chips.json, or "cpu"."""
    k = kind.lower()
    if platform == "cpu" or k == "cpu":
        return "cpu"
    for needle, name in (("v6", "tpu-v6e"), ("v5 lite", "tpu-v5e"), ("v5e", "tpu-v5e"), ("v5", "tpu-v5p"),
                         ("v4", "tpu-v4"), ("h200", "h200"), ("h100", "h100")):
        if needle in k:
            return name
    raise ValueError(f"no chip spec for device kind {kind!r}; known chips: {', '.join(chips())}")


# ----- meshes -----

def default_mesh(n_chips: int) -> dict[str, int]:
    """The most cubic x <= y <= z with x*y*z = n_chips (4,4,4 for 64, as in Pope et al.'s code)."""
    if not isinstance(n_chips, int) or n_chips < 1:
        raise ValueError(f"chip count must be an integer >= 1, got {n_chips!r}")
    best_shape = None
    for x in range(1, n_chips + 1):
        for y in range(x, n_chips + 1):
            if n_chips % (x * y) == 0 and n_chips // (x * y) >= y:
                shape = (x, y, n_chips // (x * y))
                if best_shape is None or max(shape) - min(shape) < max(best_shape) - min(best_shape):
                    best_shape = shape
    return dict(zip(XYZ, best_shape))


def check_mesh(mesh_shape: dict[str, int], n_chips: int | None = None) -> dict[str, int]:
    bad = set(mesh_shape) - set(XYZ) - {"stage"}
    if bad:
        raise ValueError(f"unknown mesh axes {sorted(bad)}; allowed: x, y, z")
    if mesh_shape.get("stage", 1) != 1:
        raise ValueError("the planner covers the x/y/z torus only; stage (pipeline) must be 1")
    if any(not isinstance(v, int) or v < 1 for v in mesh_shape.values()):
        raise ValueError(f"mesh axis sizes must be integers >= 1, got {mesh_shape}")
    shape = {a: mesh_shape.get(a, 1) for a in XYZ}
    if n_chips is not None and math.prod(shape.values()) != n_chips:
        raise ValueError(f"mesh {','.join(f'{a}={s}' for a, s in shape.items())} has {math.prod(shape.values())} "
                         f"chips, not {n_chips}")
    return shape


# ----- collectives of one layer, following sharding/blocks.py -----

@dataclass(frozen=True)
class Coll:
    block: str  # "attention" or "mlp"
    kind: str  # all-gather | reduce-scatter | all-reduce | all-to-all
    what: str  # which tensor
    group: int  # devices in one group
    operand_bytes: int  # per-device input (as sharding.collectives reports it)
    axis_sizes: tuple = ()  # sizes of the mesh axes the group spans, in order (empty: one axis of `group`)
    looped: bool = False  # feeds or follows a matmul that can hide it (Looped CollectiveEinsum)
    ring: int = 0  # chips a weight streams around (all the gathered ones); 0: the group

    def phases(self, chip: "Chip", bw_per_axis: float) -> list[tuple[int, float, bool]]:
        """(ring length, seconds, hidden by a loop) of each ring this collective runs: alpha-beta on
        a torus.

        Activations: one bidirectional ring per mesh axis in turn, each ring step one hop (alpha =
        chip.hop_latency_s), each phase's bytes over that axis' two links (bw_per_axis, both
        directions), plus chip.collective_overhead_s per ring. A weight-gathered layout's weights
        instead travel one way around one ring through all the gathered chips, one link at a
        time, as Pope et al.'s code moves them (matmul_collective_weights_gather_*: a ppermute to
        the next chip under each partial matmul). all-reduce = reduce-scatter + all-gather; only
        its reduce-scatter half follows a matmul."""
        if self.kind == "all-reduce":
            return (replace(self, kind="reduce-scatter").phases(chip, bw_per_axis)
                    + [(k, t, False) for k, t, _ in replace(self, kind="all-gather", operand_bytes=self.operand_bytes
                                                             / self.group).phases(chip, bw_per_axis)])
        if self.what.endswith(" weight"):
            k = self.group
            t = chip.collective_overhead_s + (k - 1) * chip.hop_latency_s + self.operand_bytes * (k - 1) / (bw_per_axis / 2)
            return [(self.ring or k, t, self.looped)]
        sizes = [k for k in self.axis_sizes or (self.group,) if k > 1]
        # Pope et al.'s looped collective einsums (matmul_reducescatter_*, allgather_matmul_*) loop
        # over one mesh axis: a collective of activations over several axes runs plain.
        hideable = self.looped and len(sizes) == 1
        data, out = float(self.operand_bytes), []
        for k in sizes:
            if self.kind == "all-gather":
                data *= k  # this phase's output
            t = chip.collective_overhead_s + k // 2 * chip.hop_latency_s + data * (k - 1) / k / bw_per_axis
            out.append((k, t, hideable))
            if self.kind == "reduce-scatter":
                data /= k
        return out

    def time_s(self, chip: "Chip", bw_per_axis: float) -> float:
        return sum(t for _, t, _ in self.phases(chip, bw_per_axis))

    @property
    def cost_bytes(self) -> float:
        """Bytes that set its time (Pope et al. A.1), times (K-1)/K."""
        k = self.group
        base = {"all-gather": self.operand_bytes * k, "all-reduce": 2 * self.operand_bytes}.get(self.kind, self.operand_bytes)
        return base * (k - 1) / k


class _Ctx:
    """Rules of one layout and phase on an abstract mesh, with the divisibility of rules.spec."""

    def __init__(self, layout, mesh_shape, phase, batch, seq, n_kv_heads, attention):
        self.mesh = types.SimpleNamespace(shape={"stage": 1, **mesh_shape})
        self.rules = layout.rules(self.mesh, phase, batch, n_kv_heads, attention, seq)
        self.gathered = self.rules.gathered

    def size(self, axes) -> int:
        return math.prod(self.mesh.shape[a] for a in axes)

    def sizes(self, axes) -> tuple[int, ...]:
        return tuple(self.mesh.shape[a] for a in axes)

    def axes(self, name: str, dim: int) -> tuple[str, ...]:
        """The mesh axes that split a dimension of size `dim` named `name` (as rules.spec keeps them)."""
        entry = self.rules.spec((name,), (dim,), self.mesh)[0]
        return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _weight_gathers(ctx, block, what, dims, wb) -> list[Coll]:
    """All-gather a stored weight over the gathered axes, dimension by dimension (blocks._gather_weight)."""
    local = math.prod(d // ctx.size(ax) for d, ax in dims) * wb
    out = []
    for _, ax in dims:
        g = tuple(a for a in ax if a in ctx.gathered)
        if g:
            out.append(Coll(block, "all-gather", f"{what} weight", ctx.size(g), local, ctx.sizes(g), looped=True,
                            ring=ctx.size(ctx.gathered)))
            local *= ctx.size(g)
    return out


def _project_in(ctx, block, tokens, E, weights, ab, wb, gather_x=True) -> list[Coll]:
    """weights: [(name, F, rest, f_logical)] of [E, F, rest] matrices read from the residual."""
    e_res = ctx.axes("act_embed", E)
    e_ax = ctx.axes("embed", E)
    e_w = tuple(a for a in e_ax if a not in ctx.gathered)
    out = []
    g = tuple(a for a in e_res if a not in e_w)
    if g and gather_x:
        out.append(Coll(block, "all-gather", "residual", ctx.size(g), tokens * E // ctx.size(e_res) * ab, ctx.sizes(g),
                        looped=True))
    for name, F, rest, f_name in weights:
        f_ax = ctx.axes(f_name, F)
        out += _weight_gathers(ctx, block, name, [(E, e_ax), (F, f_ax), (rest, ())], wb)
        f_local = F // ctx.size(tuple(a for a in f_ax if a not in ctx.gathered))
        if e_w:
            kind = "reduce-scatter" if f_local % ctx.size(e_w) == 0 else "all-reduce"
            out.append(Coll(block, kind, f"{name} output", ctx.size(e_w), tokens * f_local * rest * ab, ctx.sizes(e_w),
                            looped=True))
    return out


def _project_out(ctx, block, tokens, E, name, F, rest, f_name, ab, wb, scatter_out=True) -> list[Coll]:
    """h [T, F, rest] times the weight [F, rest, E] back to the residual."""
    e_ax, f_ax = ctx.axes("embed", E), ctx.axes(f_name, F)
    e_w = tuple(a for a in e_ax if a not in ctx.gathered)
    f_w = tuple(a for a in f_ax if a not in ctx.gathered)
    f_local = F // ctx.size(f_w)
    out = []
    if e_w and f_local % ctx.size(e_w) == 0:
        out.append(Coll(block, "all-gather", f"{name} input", ctx.size(e_w), tokens * f_local // ctx.size(e_w) * rest * ab,
                        ctx.sizes(e_w), looped=True))
    out += _weight_gathers(ctx, block, name, [(F, f_ax), (rest, ()), (E, e_ax)], wb)
    if f_w and scatter_out:
        kind = "reduce-scatter" if (E // ctx.size(e_w)) % ctx.size(f_w) == 0 else "all-reduce"
        out.append(Coll(block, kind, f"{name} output", ctx.size(f_w), tokens * (E // ctx.size(e_w)) * ab, ctx.sizes(f_w),
                        looped=True))
    return out


@dataclass(frozen=True)
class _Shape:
    """What one layer's arithmetic needs, after head padding."""
    E: int
    F: int
    N: int  # query heads, padded
    K: int
    Q: int
    n_in: int  # input matrices of the feed-forward block (2: SwiGLU)


def layer_collectives(ctx: _Ctx, s: _Shape, batch: int, seq: int, parallel: bool, ab: int, wb: int,
                      ffn_only: bool = False) -> list[Coll]:
    """The collectives of one layer per step, in the order the engine runs them."""
    T_b = batch // ctx.size(ctx.axes("batch", batch))
    T_s = seq // ctx.size(ctx.axes("seq", seq))
    tokens = T_b * T_s
    e_res = ctx.axes("act_embed", s.E)
    norm = [Coll("", "all-reduce", "rmsnorm", ctx.size(e_res), tokens * NORM_BYTES, ctx.sizes(e_res))] if e_res else []
    mlp_in = [("gate", s.F, 1, "mlp"), ("up", s.F, 1, "mlp")][: s.n_in]
    mlp = [replace(c, block="mlp") for c in norm]
    mlp += _project_in(ctx, "mlp", tokens, s.E, mlp_in, ab, wb)
    mlp += _project_out(ctx, "mlp", tokens, s.E, "down", s.F, 1, "mlp", ab, wb)
    if ffn_only:
        return mlp
    attn = [] if parallel else [replace(c, block="attention") for c in norm]
    qkv = [("q", s.N, s.Q, "q_heads"), ("k", s.K, s.Q, "kv_heads"), ("v", s.K, s.Q, "kv_heads")]
    # A parallel block (PaLM) reads one gathered input and reduce-scatters the sum of both outputs.
    attn += _project_in(ctx, "attention", tokens, s.E, qkv, ab, wb, gather_x=not parallel)
    batch_axes = ctx.axes("attn_batch", batch)
    if ctx.size(batch_axes) > ctx.size(ctx.axes("batch", batch)):  # batch-sharded core: Fig. 5b all-to-alls
        q_ax = ctx.axes("q_heads", s.N)
        q_local = tokens * s.N // max(1, ctx.size(tuple(a for a in q_ax if a not in ctx.gathered))) * s.Q * ab
        a2a_axes = tuple(a for a in batch_axes if a not in ctx.axes("batch", batch))
        group = ctx.size(batch_axes) // ctx.size(ctx.axes("batch", batch))
        attn.append(Coll("attention", "all-to-all", "q", group, q_local, ctx.sizes(a2a_axes)))
        attn.append(Coll("attention", "all-to-all", "attention output", group, q_local, ctx.sizes(a2a_axes)))
    seq_axes = ctx.axes("seq", seq)
    if ctx.size(seq_axes) > 1:  # a prefill split by positions: every query needs all keys and values
        kv_ax = tuple(a for a in ctx.axes("kv_heads", s.K) if a not in ctx.gathered)
        kv_local = tokens * (s.K // ctx.size(kv_ax)) * s.Q * ab
        attn += [Coll("attention", "all-gather", name, ctx.size(seq_axes), kv_local, ctx.sizes(seq_axes))
                 for name in ("k", "v")]
    attn += _project_out(ctx, "attention", tokens, s.E, "o", s.N, s.Q, "q_heads", ab, wb, scatter_out=not parallel)
    return attn + mlp


# ----- estimates -----

@dataclass(frozen=True)
class Estimate:
    layout: str
    attention: str  # "heads" or "batch"
    phase: str
    fits: bool
    step_time_s: float
    compute_s: float
    memory_s: float
    comm_s: float
    mfu: float
    mbu: float
    bytes_per_chip: float  # HBM held: weights, KV cache, one gathered layer
    flops: float  # per chip per step
    hbm_bytes: float  # HBM traffic per chip per step
    kv_bytes_per_chip: float
    weight_bytes_per_chip: float
    collectives: dict = field(default_factory=dict)  # kind -> operand bytes per chip per step
    layer_collectives: tuple = ()  # Coll of one layer
    padded_heads: int = 0
    mesh: dict = field(default_factory=dict)
    moe: dict | None = None  # a mixture of experts' terms (`_estimate_moe`); None for a dense model

    def as_dict(self) -> dict:
        keys = ("layout", "attention", "fits", "step_time_s", "compute_s", "memory_s", "comm_s", "mfu", "mbu",
                "bytes_per_chip", "flops", "hbm_bytes", "kv_bytes_per_chip", "weight_bytes_per_chip", "padded_heads")
        out = {k: getattr(self, k) for k in keys} | {"collectives": dict(self.collectives)}
        return out if self.moe is None else out | {"moe": dict(self.moe)}


# ----- expert parallelism -----

def is_expert_parallel(layout) -> bool:
    """A layout that splits the experts (sharding/layouts.py: weights["expert"] names mesh axes)."""
    return bool(layout.weights.get("expert"))


def default_layouts(config, n_chips: int) -> list[str]:
    """The layouts `plan` ranks by default: all but replicated (replicated on one chip), the
    expert-parallel ones only for a mixture of experts."""
    if n_chips == 1:
        return ["replicated"]
    return [name for name, lay in LAYOUTS.items()
            if name != "replicated" and (config.n_experts or not is_expert_parallel(lay))]


def expert_axes(layout, mesh_shape) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(EP axes, TP axes) of an expert-parallel layout on a mesh: the mesh axes (of more than one
    device) the experts are split over, and those each expert's F is split over, as
    sharding/experts.py reads them from the rules."""
    live = lambda name: tuple(a for a in layout.weights.get(name, ()) if mesh_shape.get(a, 1) > 1)  # noqa: E731
    return live("expert"), live("expert_mlp")


def expert_split(config, layout, mesh_shape) -> tuple[int, int]:
    """(ep, tp) of an expert-parallel layout: the groups the experts are split over and the devices
    of a group that split each expert's F; ValueError where the layout cannot run the model there."""
    ep_axes, tp_axes = expert_axes(layout, mesh_shape)
    ep, tp = math.prod(mesh_shape[a] for a in ep_axes), math.prod(mesh_shape[a] for a in tp_axes)
    where = f"mesh {','.join(f'{a}={s}' for a, s in mesh_shape.items())}"
    if not config.n_experts:
        raise ValueError(f"{layout.name} splits a mixture of experts' experts; {config.name} has none")
    if ep == 1:
        raise ValueError(f"{layout.name}: its expert axes have one device on {where} (no expert parallelism)")
    if config.n_experts % ep:
        raise ValueError(f"{layout.name}: {config.n_experts} experts do not divide over {ep} expert groups on {where}")
    if config.expert_d_ff % tp or config.d_model % (ep * tp):
        raise ValueError(f"{layout.name}: expert F {config.expert_d_ff} over {tp} or d_model {config.d_model} over "
                         f"{ep * tp} devices does not divide on {where}")
    return ep, tp


def experts_hit(n_experts: int, slots: float) -> float:
    """Expected distinct experts that `slots` token-slots routed uniformly at random touch."""
    return n_experts * (1 - (1 - 1 / n_experts) ** slots)


def check_moe_inputs(imbalance, capacity_factor) -> None:
    number = lambda v: not isinstance(v, bool) and isinstance(v, (int, float))  # noqa: E731
    if not number(imbalance) or not 1 <= imbalance < math.inf:
        raise ValueError(f"expert imbalance must be a finite number >= 1 (1: uniform routing), got {imbalance!r}")
    if capacity_factor is not None and (not number(capacity_factor) or not 0 < capacity_factor < math.inf):
        raise ValueError(f"capacity factor must be a finite number > 0 (or None: dropless), got {capacity_factor!r}")


def _padded_heads(config, layout, mesh_shape) -> int:
    """Query heads padded to a multiple of the devices the layout splits heads over (PaLM 540B's 48
    -> 64 on 64 chips, Pope et al. 4.2), so each projection reduce-scatters instead of all-reducing;
    not where that would add more than half the heads (they are then partially replicated)."""
    split = math.prod(mesh_shape[a] for a in layout.heads_axes)
    N = config.n_heads
    padded = -(-N // split) * split
    if split > 1 and N % split and padded <= 1.5 * N:  # else heads stay partially replicated
        N = padded
    return N


def estimate(config, chip, mesh_shape, phase, batch, context, layout, attention="heads", weight_bytes=2,
             kv_bytes=2, act_bytes=ACT_BYTES, *, imbalance=1.0, capacity_factor=None) -> Estimate:
    """One layout and attention sharding; see the module docstring for the model. imbalance and
    capacity_factor apply to a mixture of experts only."""
    chip = get_chip(chip) if isinstance(chip, str) else chip
    mesh_shape = check_mesh(mesh_shape)
    n = math.prod(mesh_shape.values())
    lay = get_layout(layout) if isinstance(layout, str) else layout
    if config.n_experts:
        check_moe_inputs(imbalance, capacity_factor)
        return _estimate_moe(config, chip, mesh_shape, phase, batch, context, lay, attention, weight_bytes, kv_bytes,
                             act_bytes, imbalance, capacity_factor)
    seq = 1 if phase == "decode" else context
    tokens = batch * seq
    N = _padded_heads(config, lay, mesh_shape)
    s = _Shape(config.d_model, config.d_ff, N, config.n_kv_heads, config.head_dim, 2)
    ctx = _Ctx(lay, mesh_shape, phase, batch, seq, config.n_kv_heads, attention)
    colls = layer_collectives(ctx, s, batch, seq, config.parallel_block, act_bytes, weight_bytes)
    L = config.n_layers
    E, F, K, Q, V = s.E, s.F, s.K, s.Q, config.vocab_size
    layer_params = E * (N + 2 * K) * Q + N * Q * E + 3 * E * F + 2 * E
    vocab_params = V * E * (1 if config.tie_embeddings else 2)

    # FLOPs per chip: matmuls split evenly over chips (weights or tokens), attention core over heads
    # or batch, logits for one position per sequence.
    attn_ctx = context if phase == "decode" else (context + 1) / 2  # causal: mean positions visible
    flops = (L * (2 * tokens * layer_params + 4 * tokens * attn_ctx * N * Q) + 2 * batch * E * V) / n

    # HBM: weights held (stored shards) and read per step (gathered shards for weight-gathered).
    gathered = math.prod(mesh_shape[a] for a in lay.gathered)
    weight_held = (L * layer_params + vocab_params) * weight_bytes / n
    weight_read = (L * layer_params * gathered + vocab_params) * weight_bytes / n
    kv_batch = ctx.size(ctx.axes("attn_batch", batch))
    kv_heads = ctx.size(ctx.axes("attn_kv_heads", K))
    kv_held = 2 * L * batch * context * K * Q * kv_bytes / (kv_batch * kv_heads)
    gathered_layer = layer_params * weight_bytes * gathered / n if gathered > 1 else 0
    held = weight_held + kv_held + gathered_layer
    hbm = weight_read + kv_held  # decode reads the cache, prefill writes it

    compute_s = flops / chip.bf16_flops
    memory_s = hbm / chip.hbm_bw
    step, comm_s = step_time(colls, L, compute_s, memory_s, chip, n)
    kinds = {}
    for c in colls:
        kinds[c.kind] = kinds.get(c.kind, 0) + L * c.operand_bytes
    return Estimate(
        layout=lay.name, attention=attention, phase=phase, fits=held <= chip.hbm_bytes, step_time_s=step,
        compute_s=compute_s, memory_s=memory_s, comm_s=comm_s,
        mfu=2 * config.n_params * tokens / (n * chip.bf16_flops * step), mbu=memory_s / step,
        bytes_per_chip=held, flops=flops, hbm_bytes=hbm, kv_bytes_per_chip=kv_held, weight_bytes_per_chip=weight_held,
        collectives=kinds, layer_collectives=tuple(colls), padded_heads=N, mesh=dict(mesh_shape))


def _estimate_moe(config, chip, mesh_shape, phase, batch, context, lay, attention, wb, kvb, ab, imbalance,
                  capacity_factor) -> Estimate:
    """A mixture of experts: see the module docstring's last paragraph."""
    from shardlm.sharding import experts  # the dispatch buffer's shapes, as the engine compiles them

    n = math.prod(mesh_shape.values())
    seq = 1 if phase == "decode" else context
    tokens = batch * seq
    ep_layout = is_expert_parallel(lay)
    ep, tp = expert_split(config, lay, mesh_shape) if ep_layout else (1, 1)
    N = _padded_heads(config, lay, mesh_shape)
    D, K, Q, V = config.d_model, config.n_kv_heads, config.head_dim, config.vocab_size
    NE, k, Fe, Fs = config.n_experts, config.experts_per_token, config.expert_d_ff, config.shared_expert_d_ff
    L = config.n_layers
    L_moe = sum(config.is_moe_layer(i) for i in range(L))
    L_dense = L - L_moe
    ctx = _Ctx(lay, mesh_shape, phase, batch, seq, K, attention)
    s = _Shape(D, config.d_ff, N, K, Q, 2)
    dense_layer = layer_collectives(ctx, s, batch, seq, config.parallel_block, ab, wb)
    attn = [c for c in dense_layer if c.block == "attention"]
    local = batch // ctx.size(ctx.axes("batch", batch)) * (seq // ctx.size(ctx.axes("seq", seq)))  # tokens here

    def weight_gathers(what, dims):  # a stored weight (all its experts) gathered dimension by dimension
        return _weight_gathers(ctx, "mlp", what, dims, wb)

    if ep_layout:
        # sharding/experts.py's data flow: each device routes every token from its D chunk of the
        # 1D residual (the logits psummed over all devices) and sends each EP group its D chunk of
        # the slots routed there, [ep, n*C, D/n], the bytes of [ep, C, D] with C for the
        # ceil(T/n) tokens of a device; under EP x TP the buffer is all-gathered over TP before the
        # experts and their partial down projections reduce-scattered after them.
        ep_axes, tp_axes = expert_axes(lay, mesh_shape)
        devices = ep * tp
        cf = None if capacity_factor is None else capacity_factor * imbalance  # sized for the busiest group
        tokens_per_group = -(-local // devices)
        capacity = experts.capacity(tokens_per_group, k, ep, cf)
        a2a = experts.dispatch_bytes(tokens_per_group, k, D, ep, ab, cf)  # per device, dispatch and combine each
        moe = [c for c in dense_layer if c.block == "mlp" and c.what == "rmsnorm"]
        moe.append(Coll("mlp", "all-reduce", "router logits", devices, local * NE * 4, ctx.sizes(ep_axes + tp_axes)))
        moe.append(Coll("mlp", "all-to-all", "expert dispatch", ep, a2a, ctx.sizes(ep_axes)))
        if tp > 1:
            moe.append(Coll("mlp", "all-gather", "expert input", tp, a2a, ctx.sizes(tp_axes), looped=True))
            moe.append(Coll("mlp", "reduce-scatter", "expert down output", tp, tp * a2a, ctx.sizes(tp_axes),
                            looped=True))
        moe.append(Coll("mlp", "all-to-all", "expert combine", ep, a2a, ctx.sizes(ep_axes)))
        if Fs:
            moe += _shared_expert(ctx, D, Fs, N, K, Q, batch, seq, local, ab, wb)
        m = min(imbalance, ep)  # the busiest group cannot receive more than every slot
        received = min(m * local * k / ep, devices * capacity)  # slots the busiest group computes
        expert_flops = 2 * received * 3 * D * Fe / tp
        dropped = 1 - received / (m * local * k / ep)
        hit = experts_hit(NE, m * tokens * k)
    else:
        # Tensor parallel inside every expert, as XLA partitions models/moe.py's dispatch (checked
        # against the compiled program on 8 CPU devices): the residual all-gathered to whole D, the
        # M = T*k slots' matmuls on each device's D x F block of every expert, and their partial
        # sums all-reduced on the slots (before the combine): the router's logits and the gate/up
        # outputs over the axes splitting the weights' D, the down projection's over those
        # splitting F. Weight-gathered layouts gather the router and every expert (XLA also sorts
        # the slots of all their token-split devices together: small collectives not counted).
        e_res, e_ax = ctx.axes("act_embed", D), ctx.axes("embed", D)
        f_ax = ctx.axes("expert_mlp", Fe) or ctx.axes("mlp", Fe)
        e_w = tuple(a for a in e_ax if a not in ctx.gathered)
        f_w = tuple(a for a in f_ax if a not in ctx.gathered)
        slots = local * k
        moe = [c for c in dense_layer if c.block == "mlp" and c.what == "rmsnorm"]
        if e_res:
            moe.append(Coll("mlp", "all-gather", "residual", ctx.size(e_res), local * D // ctx.size(e_res) * ab,
                            ctx.sizes(e_res), looped=True))
        moe += weight_gathers("router", [(D, e_ax), (NE, ())])
        if e_w:
            moe.append(Coll("mlp", "all-reduce", "router logits", ctx.size(e_w), local * NE * ab, ctx.sizes(e_w)))
        for name in ("gate", "up"):
            moe += weight_gathers(f"expert {name}", [(NE, ()), (D, e_ax), (Fe, f_ax)])
        if e_w:  # XLA combines the gate's and the up projection's all-reduce into one
            moe.append(Coll("mlp", "all-reduce", "expert gate+up output", ctx.size(e_w),
                            2 * slots * (Fe // ctx.size(f_w)) * ab, ctx.sizes(e_w), looped=True))
        moe += weight_gathers("expert down", [(NE, ()), (Fe, f_ax), (D, e_ax)])
        if f_w:
            moe.append(Coll("mlp", "all-reduce", "expert down output", ctx.size(f_w),
                            slots * (D // ctx.size(e_w)) * ab, ctx.sizes(f_w), looped=True))
        if Fs:
            moe += _shared_expert(ctx, D, Fs, N, K, Q, batch, seq, local, ab, wb)
        expert_flops = 2 * tokens * k * 3 * D * Fe / n
        dropped = 0.0
        hit = experts_hit(NE, tokens * k)
        tokens_per_group = capacity = None  # no dispatch

    attn_params = D * (N + 2 * K) * Q + N * Q * D + 2 * D
    dense_mlp = 3 * D * config.d_ff
    sparse_rest = D * NE + (3 * D * Fs + D if Fs else 0)  # router, shared expert and its gate
    expert = 3 * D * Fe
    vocab_params = V * D * (1 if config.tie_embeddings else 2)
    attn_ctx = context if phase == "decode" else (context + 1) / 2
    flops = ((L * (2 * tokens * attn_params + 4 * tokens * attn_ctx * N * Q) + L_dense * 2 * tokens * dense_mlp
              + L_moe * 2 * tokens * sparse_rest + 2 * batch * D * V) / n + L_moe * expert_flops)

    gathered = math.prod(mesh_shape[a] for a in lay.gathered)
    shared_params = L * attn_params + L_dense * dense_mlp + L_moe * sparse_rest
    weight_held = (shared_params + L_moe * NE * expert + vocab_params) * wb / n
    weight_read = ((shared_params + L_moe * hit * expert) * gathered + vocab_params) * wb / n
    kv_batch = ctx.size(ctx.axes("attn_batch", batch))
    kv_heads = ctx.size(ctx.axes("attn_kv_heads", K))
    kv_held = 2 * L * batch * context * K * Q * kvb / (kv_batch * kv_heads)
    gathered_layer = (attn_params + sparse_rest + NE * expert) * wb * gathered / n if gathered > 1 else 0
    held = weight_held + kv_held + gathered_layer
    hbm = weight_read + kv_held

    compute_s = flops / chip.bf16_flops
    memory_s = hbm / chip.hbm_bw
    dense_mlp_colls = [c for c in dense_layer if c.block == "mlp"]
    groups = [(attn, L), (dense_mlp_colls, L_dense), (moe, L_moe)]
    step, comm_s = _step_time_groups(groups, compute_s, memory_s, chip, n)
    kinds = {}
    for colls, count in groups:
        for c in colls:
            kinds[c.kind] = kinds.get(c.kind, 0) + count * c.operand_bytes
    a2a_layer = sum(c.operand_bytes for c in moe if c.what in ("expert dispatch", "expert combine"))
    terms = dict(active_params=config.n_active_params, experts=NE, experts_per_token=k, sparse_layers=L_moe,
                 ep=ep, tp=tp, imbalance=imbalance, capacity_factor=capacity_factor,
                 tokens_per_group=tokens_per_group, capacity=capacity, dropped_fraction=dropped,
                 experts_hit_per_layer=hit, all_to_all_bytes_per_layer=a2a_layer,
                 all_to_all_bytes=L_moe * a2a_layer, expert_compute_s=L_moe * expert_flops / chip.bf16_flops,
                 expert_read_bytes=L_moe * hit * expert * gathered * wb / n)
    return Estimate(
        layout=lay.name, attention=attention, phase=phase, fits=held <= chip.hbm_bytes, step_time_s=step,
        compute_s=compute_s, memory_s=memory_s, comm_s=comm_s,
        mfu=2 * config.n_active_params * tokens / (n * chip.bf16_flops * step), mbu=memory_s / step,
        bytes_per_chip=held, flops=flops, hbm_bytes=hbm, kv_bytes_per_chip=kv_held, weight_bytes_per_chip=weight_held,
        collectives=kinds, layer_collectives=tuple(attn + moe), padded_heads=N, mesh=dict(mesh_shape), moe=terms)


def _shared_expert(ctx, D, Fs, N, K, Q, batch, seq, tokens, ab, wb) -> list[Coll]:
    """A shared expert (models/moe.py keeps it a dense MLP under every layout): the dense MLP's
    collectives at width Fs, and its scalar gate x . w [T, 1] summed over the residual's D split."""
    shared = layer_collectives(ctx, _Shape(D, Fs, N, K, Q, 2), batch, seq, False, ab, wb, ffn_only=True)
    out = [c for c in shared if c.what != "rmsnorm"]
    e_res = ctx.axes("act_embed", D)
    if e_res:
        out.append(Coll("mlp", "all-reduce", "shared gate", ctx.size(e_res), tokens * ab, ctx.sizes(e_res)))
    return out


def _step_time_groups(groups, compute_s, memory_s, chip, n_chips) -> tuple[float, float]:
    """step_time over layers of several kinds: groups of (one layer's collectives, layer count)."""
    if n_chips == 1:
        return max(compute_s, memory_s), 0.0
    bw = chip.axis_bw(n_chips)
    hidden = exposed = total = 0.0
    for colls, count in groups:
        for c in colls:
            for k, t, hideable in c.phases(chip, bw):
                total += count * t
                if hideable:
                    hidden += count * t * (k - 1) / k
                    exposed += count * t / k
                else:
                    exposed += count * t
    return max(compute_s, memory_s, hidden) + exposed, total


def step_time(colls, n_layers, compute_s, memory_s, chip, n_chips) -> tuple[float, float]:
    """(step, communication) seconds. A looped ring (Pope et al. 3.5, Wang et al. 2023) is cut into
    as many chunks as it has chips: all but one run under the matmuls (the chunk the loop starts or
    ends with does not), so the step is max(compute, HBM, hidden communication) plus the unhidden
    chunks plus the rings that cannot overlap (activation collectives over several axes,
    all-to-alls, the all-gather half of all-reduces, norm statistics, attention's K/V gathers)."""
    if n_chips == 1:
        return max(compute_s, memory_s), 0.0
    bw = chip.axis_bw(n_chips)
    hidden = exposed = total = 0.0
    for c in colls:
        for k, t, hideable in c.phases(chip, bw):
            total += t
            if hideable:
                hidden += t * (k - 1) / k
                exposed += t / k
            else:
                exposed += t
    return max(compute_s, memory_s, n_layers * hidden) + n_layers * exposed, n_layers * total


def check_inputs(config, phase, batch, context, weight_bytes, kv_bytes):
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be prefill or decode, got {phase!r}")
    for name, v in (("batch", batch), ("context", context), ("weight_bytes", weight_bytes), ("kv_bytes", kv_bytes)):
        if not isinstance(v, (int, float)) or v < 1 or (name in ("batch", "context") and not isinstance(v, int)):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if context > config.max_seq_len:
        raise ValueError(f"context {context} exceeds {config.name}'s max_seq_len {config.max_seq_len}")


def plan(config, chip, mesh_shape, phase, batch, context, weight_bytes=2, kv_bytes=2, *, layouts=None,
         attention="auto", imbalance=1.0, capacity_factor=None) -> list[Estimate]:
    """Every layout x attention sharding, best first (those that fit HBM before those that do not).

    mesh_shape: {"x":..,"y":..,"z":..} or a chip count (the most cubic mesh). layouts: names to
    consider (default `default_layouts`: all but replicated, replicated on one chip; the
    expert-parallel ones for a mixture of experts where its experts split). attention: "heads",
    "batch" or "auto" (both where they apply). imbalance, capacity_factor: a mixture of experts'
    routing (module docstring). Names that cannot apply raise ValueError.
    """
    chip = get_chip(chip) if isinstance(chip, str) else chip
    mesh_shape = default_mesh(mesh_shape) if isinstance(mesh_shape, int) else check_mesh(mesh_shape)
    check_inputs(config, phase, batch, context, weight_bytes, kv_bytes)
    check_moe_inputs(imbalance, capacity_factor)
    if attention not in ("auto", "heads", "batch"):
        raise ValueError(f"attention must be auto, heads or batch, got {attention!r}")
    n = math.prod(mesh_shape.values())
    seq = 1 if phase == "decode" else context
    explicit = layouts is not None
    if layouts is None:
        layouts = default_layouts(config, n)
    if attention == "batch" and (n == 1 or batch % n):
        raise ValueError(f"batch-sharded attention needs the batch ({batch}) to be a multiple of the {n} chips")
    moe = dict(imbalance=imbalance, capacity_factor=capacity_factor) if config.n_experts else {}
    out = []
    for name in layouts:
        lay = get_layout(name)
        if is_expert_parallel(lay) and config.n_experts:
            try:
                expert_split(config, lay, mesh_shape)
            except ValueError:
                if explicit:
                    raise
                continue
        abstract_mesh = types.SimpleNamespace(shape=mesh_shape)
        if lay.gathered and lay.effective(abstract_mesh, phase, batch, seq) is not lay:
            if explicit:
                raise ValueError(f"{name} cannot split batch {batch}{' or context ' + str(context) if phase == 'prefill' else ''} "
                                 f"over its gathered axes of mesh {mesh_shape}")
            continue
        covers = math.prod(mesh_shape[a] for a in lay.acts.get("tokens", ())) == n  # already batch-split
        modes = [attention] if attention != "auto" else ["heads"] + (["batch"] if n > 1 and batch % n == 0 and not covers else [])
        for mode in modes:
            out.append(estimate(config, chip, mesh_shape, phase, batch, context, lay, mode, weight_bytes, kv_bytes,
                                **moe))
    return sorted(out, key=lambda e: (not e.fits, e.step_time_s))


def best(config, chip, mesh_shape, phase, batch, context, weight_bytes=2, kv_bytes=2, **kw) -> Estimate:
    """The fastest layout that fits in HBM; ValueError when none does."""
    ranked = plan(config, chip, mesh_shape, phase, batch, context, weight_bytes, kv_bytes, **kw)
    if not ranked or not ranked[0].fits:
        need = min((e.bytes_per_chip for e in ranked), default=float("nan"))
        chip_spec = get_chip(chip) if isinstance(chip, str) else chip
        raise ValueError(f"{config.name} does not fit: the smallest layout needs {need / 2**30:.1f} GiB per chip, "
                         f"{chip_spec.name} has {chip_spec.hbm_bytes / 2**30:.1f} GiB")
    return ranked[0]


def ffn_comm_bytes(d_model, d_ff, mesh_shape, layout, tokens, n_in=1, act_bytes=2, weight_bytes=2) -> float:
    """Cost bytes per chip of one feed-forward block's collectives (Fig. 3: n_in=1, no norm)."""
    mesh_shape = check_mesh(mesh_shape)
    lay = get_layout(layout)
    ctx = _Ctx(lay, mesh_shape, "prefill", tokens, 1, 1, "heads")
    s = _Shape(d_model, d_ff, 1, 1, 2, n_in)
    colls = layer_collectives(ctx, s, tokens, 1, False, act_bytes, weight_bytes, ffn_only=True)
    return sum(c.cost_bytes for c in colls if c.what != "rmsnorm")


def auto_layouts(config, mesh, batch_size: int, context: int = 1024) -> dict[str, str]:
    """{"prefill": layout, "decode": layout}: the planner's best for this mesh's devices
    (`layout="auto"`), at a context of min(the model's, `context`)."""
    device = mesh.devices.flat[0]
    chip = chip_for_device_kind(device.device_kind, device.platform)
    shape = mesh.size if mesh.size == 1 else {a: mesh.shape[a] for a in ("x", "y", "z")}
    context = min(config.max_seq_len, context)
    return {phase: best(config, chip, shape, phase, batch, context).layout
            for phase, batch in (("prefill", 1), ("decode", batch_size))}


def max_context(config, chip, mesh_shape, batch, layout="2d_weight_stationary", attention="batch",
                weight_bytes=2, kv_bytes=2) -> int:
    """Longest decode context whose weights and KV cache fit each chip's memory (Pope et al. Table 1).

    kv_bytes per cached element may be fractional: an int8 cache with one float32 scale per token
    and head holds 1 + 4 / head_dim bytes per element (models/quant.py)."""
    one = estimate(config, chip, mesh_shape, "decode", batch, 1, layout, attention, weight_bytes, kv_bytes)
    two = estimate(config, chip, mesh_shape, "decode", batch, 2, layout, attention, weight_bytes, kv_bytes)
    per_token = two.bytes_per_chip - one.bytes_per_chip
    free = get_chip(chip).hbm_bytes - (one.bytes_per_chip - per_token)
    return max(0, int(free // per_token))
