"""Where each parameter and KV cache array lives on the mesh: a table for notebooks and debugging.

`placement_report(params, cache)` reads the arrays themselves (their shardings), so it shows what is
placed, not what a layout intends: per array its logical axes, global shape, dtype, PartitionSpec,
the shape of one device's shard and that shard's bytes. Arrays alike but for their layer (the first
integer part of their path) share one row, `layers.*.mlp.gate` or `k.*`, with their count.

Plain inputs, so that any layer may call it (sharding/ imports nothing above it):

- params: an nnx.State whose Variables carry logical `axes` metadata (what `LLM.params` and
  `Engine.params` hold), or a mapping name -> array, (array, axes) or a pytree of arrays;
- cache: a mapping of the same kind, e.g. `{"k": state.cache.k, "v": state.cache.v}` of a decode
  state (a list of per-layer arrays, int8 values and scales included); a cache array without axes
  of its own gets `rules.KV_CACHE_AXES` ([B, S, K, H], after `layers` for a stacked [L, B, S, K, H]).

A name is a string or a path tuple (`("layers", 0, "mlp", "gate")`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from shardlm.sharding.rules import KV_CACHE_AXES


@dataclass(frozen=True)
class Row:
    group: str  # "params" or "cache"
    name: str  # "layers.*.mlp.gate": one row for the arrays of every layer that are alike
    axes: tuple | None  # logical axes (None where not given)
    shape: tuple[int, ...]
    dtype: str
    spec: PartitionSpec | None  # None: not a NamedSharding (a host array, a single-device sharding)
    shard_shape: tuple[int, ...]  # one device's part of one array
    shard_bytes: int  # bytes of that part
    count: int  # arrays this row stands for


@dataclass(frozen=True)
class PlacementReport:
    rows: list[Row]
    bytes_per_device: dict[str, int]  # group -> the most bytes one device holds of that group (all arrays)
    text: str

    def __str__(self) -> str:
        return self.text


def _parts(name) -> tuple:
    return tuple(name) if isinstance(name, tuple) else (name,)


def _is_axes(a) -> bool:
    return isinstance(a, (tuple, list)) and all(n is None or isinstance(n, str) for n in a)


def _key(k):
    for attr in ("idx", "key", "name"):  # SequenceKey, DictKey, GetAttrKey
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def _cache_axes(x) -> tuple | None:
    return ("layers",) * (x.ndim - 4) + KV_CACHE_AXES if x.ndim >= 4 else None


def _leaves(entries, default_axes=lambda x: None):
    """(path parts, array, axes or None) for every array of a State or a mapping."""
    if isinstance(entries, nnx.State):
        for path, var in nnx.to_flat_state(entries):
            yield tuple(path), var[...], var.get_metadata().get("axes")
        return
    for name, value in entries.items():
        axes = None
        if isinstance(value, tuple) and len(value) == 2 and _is_axes(value[1]) and hasattr(value[0], "shape"):
            value, axes = value
        for keys, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
            yield _parts(name) + tuple(_key(k) for k in keys), leaf, axes if axes is not None else default_axes(leaf)


def _display(parts: tuple) -> str:
    """The path with its first integer part, the layer, as `*`: ("k", 3, 0) -> "k.*.0"."""
    ints = [i for i, p in enumerate(parts) if isinstance(p, (int, np.integer))]
    return ".".join("*" if ints and i == ints[0] else str(p) for i, p in enumerate(parts))


def _mib(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def placement_report(params, cache: Mapping | None = None) -> PlacementReport:
    """Rows (one per kind of array, in order of first appearance) and the formatted table."""
    grouped: dict[tuple, list] = {}
    per_device: dict[str, dict] = {"params": {}, "cache": {}}
    for group, entries, default_axes in (("params", params, lambda x: None), ("cache", cache or {}, _cache_axes)):
        for parts, x, axes in _leaves(entries, default_axes):
            shape, dtype = tuple(x.shape), np.dtype(x.dtype)
            sharding = getattr(x, "sharding", None)
            shard_shape = tuple(sharding.shard_shape(shape)) if sharding is not None else shape
            shard_bytes = math.prod(shard_shape) * dtype.itemsize
            spec = sharding.spec if isinstance(sharding, NamedSharding) else None
            for d in (sharding.device_set if sharding is not None else ("host",)):
                per_device[group][d] = per_device[group].get(d, 0) + shard_bytes
            key = (group, _display(parts), tuple(axes) if axes is not None else None, shape, str(dtype), spec,
                   shard_shape, shard_bytes)
            grouped.setdefault(key, []).append(parts)
    rows = [Row(*key, count=len(members)) for key, members in grouped.items()]
    totals = {g: max(d.values(), default=0) for g, d in per_device.items()}
    return PlacementReport(rows, totals, _format(rows, totals))


def _format(rows: list[Row], totals: dict[str, int]) -> str:
    head = ("array", "logical axes", "shape", "dtype", "PartitionSpec", "shard (per device)", "bytes/device", "n")
    cells = [(r.name, "-" if r.axes is None else str(r.axes), str(r.shape), r.dtype,
              "-" if r.spec is None else str(r.spec), str(r.shard_shape), _mib(r.shard_bytes), str(r.count))
             for r in rows]
    widths = [max(len(c[i]) for c in [head] + cells) for i in range(len(head))]
    line = lambda c: "  ".join(s.rjust(w) if i >= 6 else s.ljust(w) for i, (s, w) in enumerate(zip(c, widths)))
    out = [line(head)]
    for group in ("params", "cache"):
        out += [line(c) for r, c in zip(rows, cells) if r.group == group]
    out.append("per device (the most one device holds, every array counted): "
               + ", ".join(f"{g} {_mib(n)}" for g, n in totals.items() if n or g == "params"))
    return "\n".join(s.rstrip() for s in out)
