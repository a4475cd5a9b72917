"""Logical axis names -> mesh axes: the one place where the model's names meet the mesh.

Models name every dimension logically ("batch", "embed", "mlp", ...). A `ShardingRules` maps each
name to a tuple of mesh axes. `spec` turns the names of one array into a PartitionSpec and raises
when two dimensions would land on the same mesh axis. A dimension that its mesh axes do not divide
(SmolLM2's 9 heads over 2 devices) keeps only the leading mesh axes whose product divides it; the
rest of the mesh holds replicas of that dimension (partial replication), so results never change.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Axes = Sequence[str | None]

# Logical axes of one layer's KV cache array [B, S, K, H] (models write it, layouts split it).
KV_CACHE_AXES = ("attn_batch", "cache_seq", "attn_kv_heads", "head_dim")


@dataclass(frozen=True)
class ShardingRules:
    """Hashable map logical name -> tuple of mesh axes; names not listed are replicated.

    `gathered`: mesh axes that weights are all-gathered over right before use (weight-gathered
    layouts); `gather_weight` applies it.
    """

    rules: tuple[tuple[str, tuple[str, ...]], ...] = ()
    gathered: tuple[str, ...] = ()

    @classmethod
    def of(cls, mapping: dict[str, str | Sequence[str] | None], gathered: Sequence[str] = ()) -> "ShardingRules":
        items = []
        for name, axes in mapping.items():
            if axes is None:
                axes = ()
            elif isinstance(axes, str):
                axes = (axes,)
            items.append((name, tuple(axes)))
        return cls(tuple(items), tuple(gathered))

    def mesh_axes(self, name: str | None) -> tuple[str, ...]:
        for logical, axes in self.rules:
            if logical == name:
                return axes
        return ()

    def spec(self, axes: Axes, shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> PartitionSpec:
        """PartitionSpec for an array whose dimensions are named `axes`.

        With `shape` and `mesh`, mesh axes that do not divide a dimension are dropped (replication).
        """
        used: dict[str, str] = {}
        out = []
        for dim, name in enumerate(axes):
            mesh_axes = tuple(a for a in self.mesh_axes(name) if mesh is None or mesh.shape.get(a, 1) > 1)
            if shape is not None and mesh is not None:
                kept = []
                for a in mesh_axes:
                    if shape[dim] % (math.prod(mesh.shape[b] for b in kept) * mesh.shape[a]):
                        break
                    kept.append(a)
                mesh_axes = tuple(kept)
            for a in mesh_axes:
                if a in used:
                    raise ValueError(f"logical axes {tuple(axes)}: {used[a]!r} and {name!r} both map to mesh "
                                     f"axis {a!r}; one array cannot be split twice over one mesh axis")
                used[a] = name
            out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        return PartitionSpec(*out)

    def sharding(self, mesh: Mesh, axes: Axes, shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(mesh, self.spec(axes, shape, mesh))

    def sharding_fn(self, mesh: Mesh):
        """(axes, shape) -> NamedSharding, for creating arrays directly in their shards."""
        return lambda axes, shape: self.sharding(mesh, axes, shape)

    def gathered_sharding(self, mesh: Mesh, axes: Axes, shape: Sequence[int]) -> NamedSharding:
        """The sharding of a weight in use: its storage sharding without the gathered mesh axes."""
        def drop(entry):
            kept = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a not in self.gathered)
            return None if not kept else kept[0] if len(kept) == 1 else kept

        return NamedSharding(mesh, PartitionSpec(*(drop(e) for e in self.spec(axes, shape, mesh))))


# The mesh and rules that `shard` applies while a step is traced. A step enters them inside its
# traced function (engine/engine.py), so a compiled program always carries the rules it was traced
# under; `active()` is how code below the step reads them.
_ACTIVE: contextvars.ContextVar[tuple[Mesh, ShardingRules] | None] = contextvars.ContextVar("shardlm_rules", default=None)


@contextlib.contextmanager
def use_rules(mesh: Mesh | None, rules: ShardingRules | None):
    token = _ACTIVE.set((mesh, rules) if mesh is not None and rules is not None else None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh, ShardingRules] | None:
    """(mesh, rules) entered with `use_rules` around the code being traced, or None."""
    return _ACTIVE.get()


def gather_weight(w: jax.Array, axes: Axes) -> jax.Array:
    """A weight about to be used: in the active layout's storage sharding, less its gathered axes.

    Under a weight-stationary layout whose storage the weights already have this is a no-op; under a
    weight-gathered one it all-gathers; under a layout with another storage (a prefill layout
    paired with a different decode layout) it reshards each step, which is correct but costs
    communication (pair 2d_weight_stationary with weight_gathered_* to share the storage).
    """
    active = _ACTIVE.get()
    if active is None:
        return w
    mesh, rules = active
    return jax.lax.with_sharding_constraint(w, rules.gathered_sharding(mesh, axes, w.shape))


def shard(x: jax.Array, axes: Axes) -> jax.Array:
    """Constrain activation `x` to the sharding its logical `axes` get under the active rules."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    if len(axes) != x.ndim:
        raise ValueError(f"logical axes {tuple(axes)} do not match an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, rules.sharding(mesh, axes, x.shape))
