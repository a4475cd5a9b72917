"""Forward strategies: how the engine runs a model's layers. One interface, two strategies:

- `UnrolledLayers`: one module (and one weight array per projection) per layer, run in a Python
  loop at trace time (the model's own forward).
- `Pipeline`: pipeline stages over the `stage` mesh axis, composed with any tensor layout of
  layouts.py. The layers' parameters are stacked on a leading `layers` dimension [L', ...] and the
  KV cache is one array [L', B, S, K, H]; `layers` maps to the `stage` mesh axis, so each group of
  devices of one stage holds only its layers and their cache. L layers over N stages split as
  vLLM splits them: the first L mod N stages take one layer more; every stage is padded to
  ceil(L / N) slots, and a padding slot passes its input through unchanged. Inside a stage every
  weight and activation keeps the tensor layout it has without a pipeline (the stage dimension is
  vmapped with spmd_axis_name="stage", so the shard_map projections of blocks.py run per stage).

Both give the engine: `rules(rules)` (the layout's rules for this strategy), `param_sharding(mesh,
rules, axes, shape, path)` (where one parameter of the plain model lives), `split(model, mesh,
rules)` -> (graphdef, params), `merge(graphdef, params)` -> the plain model, `forward(graphdef,
params, tokens, positions, cache, logits_index)` -> (logits, cache), and the cache they run on:
`stacked` (one [L', ...] array, or a list per layer) and `cache_layers` (L').

Pipeline schedule (GPipe, Huang et al. 2019; as in MaxText's pipeline.py): the step's tokens are
split into M microbatches -- decode: groups of B/M rows; prefill of one sequence: M chunks of
positions, which stage s sees in order, so a chunk attends to the earlier chunks' keys already in
the stage's cache. At tick t stage s runs microbatch t - s; after each tick the activations shift
one stage on (a roll over the stage-sharded dimension, which compiles to a collective-permute). A
step takes M + stages - 1 ticks, of which stages - 1 per stage are idle: the bubble fraction
(stages - 1) / (M + stages - 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from shardlm.sharding import rules as _rules
from shardlm.sharding.rules import KV_CACHE_AXES, ShardingRules, shard

STAGE = "stage"
LAYERS = "layers"  # the logical name of the stacked layer dimension


def schedule(n_stages: int, n_microbatches: int) -> list[tuple[int | None, ...]]:
    """For each tick, the microbatch each stage runs (None: idle). Stage s runs microbatch t - s."""
    if n_stages < 1 or n_microbatches < 1:
        raise ValueError(f"stages and microbatches must be >= 1, got {n_stages} and {n_microbatches}")
    return [tuple(t - s if 0 <= t - s < n_microbatches else None for s in range(n_stages))
            for t in range(n_microbatches + n_stages - 1)]


def bubble_fraction(n_stages: int, n_microbatches: int) -> float:
    """Fraction of stage-ticks idle in one step: (stages - 1) / (M + stages - 1)."""
    return (n_stages - 1) / (n_microbatches + n_stages - 1)


def check_stages(n_layers: int, n_stages: int) -> None:
    if not 1 <= n_stages <= n_layers:
        raise ValueError(f"{n_layers} layers cannot be split into {n_stages} pipeline stages; "
                         f"use between 1 and {n_layers} stages")


def stage_sizes(n_layers: int, n_stages: int) -> list[int]:
    """Layers per stage: the first n_layers mod n_stages stages take one more (30 over 4: 8, 8, 7, 7)."""
    check_stages(n_layers, n_stages)
    base, extra = divmod(n_layers, n_stages)
    return [base + (s < extra) for s in range(n_stages)]


def microbatches_for(n: int, wanted: int) -> int:
    """The largest count <= wanted that divides n (n rows in decode, n positions in prefill)."""
    return max(m for m in range(1, min(n, wanted) + 1) if n % m == 0)


@dataclass(frozen=True)
class UnrolledLayers:
    """Every layer its own module, run one after another by the model's forward."""

    n_layers: int
    stacked = False

    @property
    def cache_layers(self) -> int:
        return self.n_layers

    @staticmethod
    def rules(rules: ShardingRules) -> ShardingRules:
        return rules

    @staticmethod
    def param_sharding(mesh, rules: ShardingRules, axes, shape, path=()):
        return rules.sharding(mesh, axes, shape)

    @staticmethod
    def split(model: nnx.Module, mesh=None, rules=None):
        return nnx.split(model)

    @staticmethod
    def merge(graphdef, params) -> nnx.Module:
        return nnx.merge(graphdef, params)

    @staticmethod
    def forward(graphdef, params, tokens, positions, cache, logits_index=None):
        return nnx.merge(graphdef, params)(tokens, positions, cache, logits_index=logits_index)


@dataclass(frozen=True)
class Pipeline:
    """`stages` pipeline stages over the mesh axis `stage`; `microbatches` per step (at most)."""

    stages: int
    microbatches: int
    n_layers: int
    stacked = True

    def __post_init__(self):
        if self.stages < 2:
            raise ValueError(f"a pipeline needs at least 2 stages, got {self.stages}")
        if not isinstance(self.microbatches, int) or self.microbatches < 1:
            raise ValueError(f"microbatches must be an integer >= 1, got {self.microbatches!r}")
        check_stages(self.n_layers, self.stages)

    @property
    def per_stage(self) -> int:
        """Slots per stage: the largest stage's layer count."""
        return -(-self.n_layers // self.stages)

    @property
    def cache_layers(self) -> int:
        return self.stages * self.per_stage

    def slots(self) -> list[int]:
        """For each layer, its slot in the stacked [stages * per_stage] dimension."""
        out = []
        for s, n in enumerate(stage_sizes(self.n_layers, self.stages)):
            out += [s * self.per_stage + j for j in range(n)]
        return out

    def stage_of(self, layer: int) -> int:
        return self.slots()[layer] // self.per_stage

    @staticmethod
    def rules(rules: ShardingRules) -> ShardingRules:
        """A layout's rules plus the stacked `layers` dimension over `stage`."""
        return ShardingRules(rules.rules + ((LAYERS, (STAGE,)),), rules.gathered)

    # ----- parameters: the model without its layers, plus the layers stacked [L', ...] -----

    def param_sharding(self, mesh, rules: ShardingRules, axes, shape, path=()):
        """A parameter of layer i (path ("layers", i, ...)) on its stage's devices only, split there
        as the layout says; any other parameter as `rules` say."""
        if len(path) < 2 or path[0] != "layers":
            return rules.sharding(mesh, axes, shape)
        stage_devices = Mesh(mesh.devices[self.stage_of(int(path[1]))], mesh.axis_names[1:])
        return NamedSharding(stage_devices, rules.spec(axes, shape, mesh))

    def split(self, model: nnx.Module, mesh, rules: ShardingRules):
        """(graphdef, params): params = {"model": the rest, "layers": stacked [L', ...]}; graphdef is
        (the model's without layers, one block's)."""
        if len(model.layers) != self.n_layers:
            raise ValueError(f"the pipeline was made for {self.n_layers} layers, the model has {len(model.layers)}")
        splits = [nnx.split(layer) for layer in model.layers]
        block_graph = splits[0][0]
        differ = [i for i, (graph, _) in enumerate(splits) if graph != block_graph]
        if differ:  # every slot runs layer 0's graph
            raise ValueError(f"pipeline stages need layers of one structure; layers {differ} differ from layer 0 "
                             f"(e.g. a sliding-window layer among global ones): run without a stage axis")
        by_slot = [None] * self.cache_layers  # None: a padding slot
        for slot, (_, state) in zip(self.slots(), splits):
            by_slot[slot] = state
        to = rules.sharding_fn(mesh)
        shardings = jax.tree.map(lambda v: to((LAYERS,) + v.get_metadata()["axes"], (self.cache_layers,) + v.shape),
                                 splits[0][1], is_leaf=lambda v: isinstance(v, nnx.Variable))
        try:  # from the shards each device already holds (no copy of another stage's layers)
            stacked = jax.tree.map(lambda sh, *ls: _stack_local(sh, ls, by_slot), shardings,
                                   *[state for _, state in splits])
        except _NotLocal:
            stacked = jax.jit(partial(_stack, by_slot=[s is not None for s in by_slot]),
                              out_shardings=shardings)([state for _, state in splits])
        shell = nnx.merge(*nnx.split(model))  # a shallow copy, so the caller's model keeps its layers
        shell.layers = nnx.List([])
        graphdef, rest = nnx.split(shell)
        return (graphdef, block_graph), {"model": rest, "layers": stacked}

    def merge(self, graphdef, params) -> nnx.Module:
        """The plain model (one module per layer) back from `split`'s output."""
        model_graph, block_graph = graphdef
        model = nnx.merge(model_graph, params["model"])
        model.layers = nnx.List([nnx.merge(block_graph, jax.tree.map(lambda w: w[slot], params["layers"]))
                                 for slot in self.slots()])
        return model

    # ----- the forward -----

    def forward(self, graphdef, params, tokens, positions, cache, logits_index=None):
        """The model's forward with cache.k/v stacked [L', B, S, K, H] and the layers pipelined."""
        model_graph, block_graph = graphdef
        model = nnx.merge(model_graph, params["model"])
        run = partial(self._run, block_graph, params["layers"])
        return model(tokens, positions, cache, logits_index=logits_index, layers=run)

    def _valid(self) -> np.ndarray:
        """[stages, per_stage] bool: which slots hold a layer (the rest are padding)."""
        valid = np.zeros(self.cache_layers, bool)
        valid[self.slots()] = True
        return valid.reshape(self.stages, self.per_stage)

    def _run(self, block_graph, layers, x, positions, cache):
        k, v = cache.k, cache.v
        n, per_stage = self.stages, self.per_stage
        L = k.shape[0]
        B, T, D = x.shape
        if B > 1:
            # Decode: microbatches of rows. Microbatch m takes the same rows from every batch shard
            # of the cache (rows [m*r, (m+1)*r) of each), so selecting it never moves cache rows.
            shards = _batch_shards(k.shape[1:])
            M = microbatches_for(B // shards, self.microbatches)
            r = B // shards // M

            def to_mb(a):  # [B, ...] -> [M, shards*r, ...]
                a = jnp.moveaxis(a.reshape((shards, M, r) + a.shape[1:]), 1, 0)
                return a.reshape((M, shards * r) + a.shape[3:])

            def from_mb(a):  # [M, shards*r, ...] -> [B, ...]
                a = jnp.moveaxis(a.reshape((M, shards, r) + a.shape[2:]), 0, 1)
                return a.reshape((B,) + a.shape[3:])

            def rows(c, m):  # c [per_stage, B, ...] -> microbatch m's rows [per_stage, shards*r, ...]
                c = c.reshape(c.shape[:1] + (shards, M, r) + c.shape[2:])
                c = jax.lax.dynamic_index_in_dim(c, m, axis=2, keepdims=False)
                return c.reshape(c.shape[:1] + (shards * r,) + c.shape[3:])

            def put_rows(c, m, new):
                view = c.reshape(c.shape[:1] + (shards, M, r) + c.shape[2:])
                new = new.reshape(new.shape[:1] + (shards, 1, r) + new.shape[2:])
                return jax.lax.dynamic_update_slice_in_dim(view, new, m, axis=2).reshape(c.shape)
        else:
            # Prefill of one sequence: microbatches are chunks of positions; every chunk uses the
            # whole cache (it writes its own positions and reads the earlier chunks').
            M = microbatches_for(T, self.microbatches)

            def to_mb(a):  # [1, T, ...] -> [M, 1, T/M, ...]
                return jnp.moveaxis(a.reshape((B, M, T // M) + a.shape[2:]), 1, 0)

            def from_mb(a):
                return jnp.moveaxis(a, 0, 1).reshape((B, T) + a.shape[3:])

            def rows(c, m):
                return c

            def put_rows(c, m, new):
                return new

        xs, ps = to_mb(x), to_mb(positions)  # [M, b, t, D], [M, b, t]
        # [stages, per_stage, ...]: the leading dimension is the stage-sharded one.
        by_stage = lambda a: a.reshape((n, per_stage) + a.shape[1:])  # noqa: E731
        w = jax.tree.map(by_stage, layers)
        k, v = by_stage(k), by_stage(v)
        stage_ids = jnp.arange(n)
        valid_slots = self._valid()
        padded = not valid_slots.all()

        def stage_fn(w, x, pos, k, v, m, valid, slot_valid):
            """One stage on microbatch m: x [b,t,D], pos [b,t], k/v [per_stage, B, S, K, H]; each
            block reads and writes its layer's rows through the cache's view of them."""
            kr, vr = rows(k, m), rows(v, m)
            ks, vs = [], []
            for j in range(per_stage):
                block = nnx.merge(block_graph, jax.tree.map(lambda a: a[j], w))
                y, kv = block(x, pos, cache.layer_view(kr[j], vr[j]))
                kj, vj = kv.k, kv.v
                x = jnp.where(slot_valid[j], y, x) if padded else y  # a padding slot passes x through
                ks.append(kj)
                vs.append(vj)
            # An idle tick (no microbatch) computes on stale data; keep its cache rows unchanged.
            kr, vr = jnp.where(valid, jnp.stack(ks), kr), jnp.where(valid, jnp.stack(vs), vr)
            return x, put_rows(k, m, kr), put_rows(v, m, vr)

        run_stages = jax.vmap(stage_fn, spmd_axis_name=STAGE)
        act_axes = (LAYERS, "batch", "seq", "act_embed")
        slot_valid = jnp.asarray(valid_slots)

        def tick(i, carry):
            state, k, v, out = carry  # state [stages, b, t, D]: each stage's input this tick
            state = shard(state.at[0].set(xs[jnp.minimum(i, M - 1)]), act_axes)
            m = i - stage_ids  # the microbatch of each stage at tick i
            valid = (m >= 0) & (m < M)
            m = jnp.clip(m, 0, M - 1)
            y, k, v = run_stages(w, state, ps[m], k, v, m, valid, slot_valid)
            state = shard(jnp.roll(y, 1, axis=0), act_axes)  # stage s -> s+1: a collective-permute
            done = i - (n - 1)  # the last stage's microbatch, now at position 0 after the roll
            out = jnp.where(done >= 0, out.at[jnp.maximum(done, 0)].set(state[0]), out)
            return state, k, v, out

        state = shard(jnp.zeros((n,) + xs.shape[1:], x.dtype), act_axes)
        _, k, v, out = jax.lax.fori_loop(0, M + n - 1, tick, (state, k, v, jnp.zeros_like(xs)))
        x = shard(from_mb(out), ("batch", "seq", "act_embed"))
        return x, cache.replace(k=k.reshape((L,) + k.shape[2:]), v=v.reshape((L,) + v.shape[2:]))


def _batch_shards(cache_shape) -> int:
    """Into how many pieces the active rules split the cache's batch dimension ([B, S, K, H])."""
    active = _rules.active()
    if active is None:
        return 1
    mesh, rules = active
    spec = rules.spec(KV_CACHE_AXES, cache_shape, mesh)
    axes = () if spec[0] is None else (spec[0],) if isinstance(spec[0], str) else spec[0]
    return math.prod(mesh.shape[a] for a in axes)


class _NotLocal(Exception):
    pass


def _stack(layers, by_slot):
    """Per-layer pytrees -> one pytree of [L', ...] arrays, zeros in the padding slots."""
    it = iter(range(len(layers)))
    order = [next(it) if real else None for real in by_slot]
    return jax.tree.map(lambda *xs: jnp.stack([xs[i] if i is not None else jnp.zeros_like(xs[0]) for i in order]),
                        *layers)


def _stack_local(sharding, layers, by_slot):
    """Layers [...] -> one array [L', ...] in `sharding`, each device stacking the shards it holds
    (zeros in padding slots). `by_slot[s]` is not None where slot s holds a layer."""
    slot_layer = {}
    i = 0
    for s, state in enumerate(by_slot):
        if state is not None:
            slot_layer[s] = i
            i += 1
    shape = (len(by_slot),) + layers[0].shape
    held = [{sh.device: sh for sh in layer.addressable_shards} for layer in layers]
    pieces = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        want = tuple(len(range(*ix.indices(n))) for ix, n in zip(index[1:], shape[1:]))
        parts = []
        for s in range(*index[0].indices(len(by_slot))):
            if s not in slot_layer:
                parts.append(jnp.zeros(want, layers[0].dtype, device=device))
                continue
            sh = held[slot_layer[s]].get(device)
            if sh is None or sh.data.shape != want or sh.index != index[1:]:
                raise _NotLocal
            parts.append(sh.data)
        pieces.append(jnp.stack(parts))
    return jax.make_array_from_single_device_arrays(shape, sharding, pieces)


def stage_transfer_bytes(batch: int, tokens: int, d_model: int, act_bytes: int, n_stages: int) -> float:
    """Activation bytes passed between stages per step (all boundaries): (stages - 1) x B T D."""
    return (n_stages - 1) * batch * tokens * d_model * act_bytes


def stages_of(mesh) -> int:
    return mesh.shape.get(STAGE, 1)


def stages_in(mesh_shape: dict[str, int] | None) -> int:
    """The stage count a mesh shape asks for (1: no pipeline)."""
    return (mesh_shape or {}).get(STAGE, 1)


def strategy_for(config, mesh, microbatches: int | None = None) -> UnrolledLayers | Pipeline:
    """The forward strategy a mesh asks for: a pipeline with a stage axis > 1 (microbatches default to
    the stages), else unrolled layers."""
    n = stages_of(mesh)
    if n == 1:
        if microbatches not in (None, 1):
            raise ValueError(f"microbatches={microbatches} needs a pipeline: give the mesh a stage axis > 1")
        return UnrolledLayers(config.n_layers)
    return Pipeline(n, n if microbatches is None else microbatches, config.n_layers)


# ----- cost model (the planner's per-stage estimate, run M + stages - 1 times per step) -----

@dataclass(frozen=True)
class PipelineEstimate:
    stages: int
    microbatches: int
    bubble_fraction: float
    stage_bytes: float  # activation bytes passed between stages per step, all boundaries
    step_time_s: float
    tick: object  # planner.Estimate of one stage (its ceil(L/stages) slots) on one microbatch
    bytes_per_chip: float
    fits: bool

    def as_dict(self) -> dict:
        keys = ("stages", "microbatches", "bubble_fraction", "stage_bytes", "step_time_s", "bytes_per_chip", "fits")
        return {k: getattr(self, k) for k in keys} | {"layout": self.tick.layout, "tick": self.tick.as_dict()}


def pipeline_estimate(config, chip, mesh_shape: dict[str, int], phase: str, batch: int, context: int,
                      layout: str, microbatches: int | None = None, attention: str = "heads", weight_bytes=2,
                      kv_bytes=2, act_bytes=2) -> PipelineEstimate:
    """Pipeline stages over mesh_shape["stage"], each stage an x/y/z group running `layout`.

    One tick is the planner's estimate for the largest stage's ceil(L/stages) layers on one microbatch (decode: batch/M rows;
    prefill: batch/M rows, or context/M positions of a single sequence, whose attention to earlier
    chunks is not counted). A step is M + stages - 1 ticks (idle ticks cost as much as busy ones:
    the stages run in lockstep), plus one activation hop per tick over the inter-stage link. Each
    stage holds its layers' weights and the KV cache of the whole batch.
    """
    from shardlm.sharding import planner

    stages = mesh_shape.get("stage", 1)
    per_stage = max(stage_sizes(config.n_layers, stages))
    tensor = planner.check_mesh({a: s for a, s in mesh_shape.items() if a != "stage"})
    chip = planner.get_chip(chip) if isinstance(chip, str) else chip
    rows = phase == "decode" or batch > 1
    M = microbatches_for(batch if rows else context, microbatches or stages)
    b, seq = (batch // M, context) if rows else (batch, context // M)
    tick = planner.estimate(config.replace(n_layers=per_stage), chip, tensor, phase, b, seq,
                            layout, attention, weight_bytes, kv_bytes, act_bytes)
    ticks = M + stages - 1
    tokens = batch * (1 if phase == "decode" else context)
    hop = tokens // M * config.d_model * act_bytes / math.prod(tensor.values())  # per chip, one tick
    step = ticks * (tick.step_time_s + hop / chip.network_bw(stages * math.prod(tensor.values())))
    held = tick.bytes_per_chip + (M - 1) * tick.kv_bytes_per_chip  # the cache of all M microbatches
    return PipelineEstimate(stages, M, bubble_fraction(stages, M),
                            stage_transfer_bytes(batch, tokens // batch, config.d_model, act_bytes, stages),
                            step, tick, held, held <= chip.hbm_bytes)


def check_not_quantized(mesh_shape: dict[str, int] | None, quantized) -> None:
    """Pipeline stages run float weights and cache only (int8 is not stacked per stage yet)."""
    if quantized and stages_in(mesh_shape) > 1:
        raise ValueError("int8 weights or KV cache cannot be combined with pipeline stages yet; use stage=1")


def pipeline_plan(config, chip, mesh_shape: dict[str, int], phase: str, batch: int, context: int,
                  microbatches: int | None = None, weight_bytes=2, kv_bytes=2) -> list[PipelineEstimate]:
    """Every layout x attention the planner considers for one stage's x/y/z group, pipelined; best
    first (those that fit before those that do not)."""
    from shardlm.sharding import planner

    stages = stages_in(mesh_shape)
    per_stage = max(stage_sizes(config.n_layers, stages))
    planner.check_inputs(config, phase, batch, context, weight_bytes, kv_bytes)
    tensor = planner.check_mesh({a: s for a, s in mesh_shape.items() if a != STAGE})
    rows = phase == "decode" or batch > 1
    M = microbatches_for(batch if rows else context, microbatches or stages)
    b, seq = (batch // M, context) if rows else (batch, context // M)
    candidates = planner.plan(config.replace(n_layers=per_stage), chip, tensor, phase, b, seq,
                              weight_bytes, kv_bytes)
    out = [pipeline_estimate(config, chip, mesh_shape, phase, batch, context, e.layout, M, e.attention,
                             weight_bytes, kv_bytes) for e in candidates]
    return sorted(out, key=lambda e: (not e.fits, e.step_time_s))
