"""Where a model runs: the mesh, the sharding rules of each phase, the forward strategy (unrolled
layers or pipeline stages), and so the sharding of every parameter from its logical axes.

Loading reads the config, makes the placement, and creates each parameter directly in
`placement.param_sharding(axes, shape, path)`; an engine takes the model and its placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
from flax import nnx

from shardlm.sharding.layouts import get_layout
from shardlm.sharding.mesh import make_mesh
from shardlm.sharding.pipeline import Pipeline, UnrolledLayers, strategy_for
from shardlm.sharding.rules import ShardingRules


@dataclass(frozen=True)
class Placement:
    """The mesh, the layout and rules of each phase, and how the layers run (`strategy`)."""

    mesh: jax.sharding.Mesh
    prefill_layout: str
    decode_layout: str
    prefill_rules: ShardingRules
    decode_rules: ShardingRules
    strategy: UnrolledLayers | Pipeline

    @classmethod
    def make(cls, config, *, mesh_shape=None, layout=None, prefill_layout=None, decode_layout=None,
             attention="auto", batch_size=8, microbatches=None, devices=None) -> "Placement":
        """mesh_shape None: one device; devices: the devices the mesh spans (default all of them). layout: both phases, or prefill_layout/decode_layout ("auto":
        the planner's best for these devices); default replicated on one device, else
        2d_weight_stationary. batch_size: the decode batch the decode rules are made for."""
        mesh = make_mesh(mesh_shape, devices) if mesh_shape else make_mesh(devices=(devices or jax.devices())[:1])
        strategy = strategy_for(config, mesh, microbatches)
        if layout is not None and (prefill_layout is not None or decode_layout is not None):
            raise ValueError("give either layout (both phases) or prefill_layout/decode_layout, not both")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        default = "replicated" if mesh.size == 1 else "2d_weight_stationary"
        if "auto" in (layout, prefill_layout, decode_layout):  # the planner's best for these devices
            from shardlm.sharding import planner

            pick = planner.auto_layouts(config, mesh, batch_size)
            prefill_layout = pick["prefill"] if "auto" in (layout, prefill_layout) else prefill_layout
            decode_layout = pick["decode"] if "auto" in (layout, decode_layout) else decode_layout
            layout = None
        prefill = get_layout(prefill_layout or layout or default).effective(mesh, "prefill", 1)
        decode = get_layout(decode_layout or layout or default).effective(mesh, "decode", batch_size)
        for chosen in (prefill, decode):
            chosen.check_model(mesh, config)
        prefill_rules = strategy.rules(prefill.rules(mesh, "prefill", 1, config.n_kv_heads, attention))
        decode_rules = strategy.rules(decode.rules(mesh, "decode", batch_size, config.n_kv_heads, attention))
        return cls(mesh, prefill.name, decode.name, prefill_rules, decode_rules, strategy)

    def param_sharding(self, axes, shape, path=()) -> jax.sharding.Sharding:
        """Where the parameter at `path` (("layers", 3, "mlp", "up"), ...) with logical `axes` lives:
        its decode layout's storage sharding, on its own stage's devices under a pipeline."""
        return self.strategy.param_sharding(self.mesh, self.decode_rules, axes, tuple(shape), tuple(path))

    def place(self, model: nnx.Module) -> nnx.Module:
        """The model with every parameter moved (device to device) to `param_sharding`; arrays
        already there stay as they are."""
        graphdef, state = nnx.split(model)
        flat = [(path, var.replace(jax.device_put(var[...], self.param_sharding(
                    var.get_metadata()["axes"], var.shape, path))))
                for path, var in nnx.to_flat_state(state)]
        return nnx.merge(graphdef, nnx.from_flat_state(flat))
