"""The two matmuls of a block with Pope et al.'s collectives, written out with shard_map.

Left to itself, XLA's partitioner on CPU realises a reduce-scatter as an all-reduce plus a slice
and sometimes gathers where the paper reduce-scatters; these blocks emit exactly the paper's
collectives (sec. 3.2, Fig. 2 and A.2), derived from the actual shardings:

    project_in : residual x [B,T,E] sharded E over E_res (tokens over the layout's token axes)
                 all-gather(E_res - E_w) -> x @ W_in (E_w F_w) -> partial over E_w
                 -> reduce-scatter(E_w) into F                          => h sharded F over F_w+E_w
    project_out: h -> all-gather(E_w) -> h @ W_out (F_w E_w) -> partial over F_w
                 -> reduce-scatter(F_w) into E                           => y sharded E over E_w+F_w

where W_in is stored E_{E_w} F_{F_w} (after the weight-gathered layouts all-gather the weight over
their gathered axes). 1D weight-stationary: E_w = (), F_w = xyz; 2D: E_w = x, F_w = yz;
weight-gathered over G: E_w = (), F_w = yz - G. A dimension that its axes do not divide is reduced
with an all-reduce instead of a reduce-scatter (partial replication). Without active rules, or for
shapes the scheme does not cover, the plain einsum runs and the partitioner decides.

A weight is a float array or a QArray (sharding/qarray.py) (int8 values and per-output-channel scales, sharded as
the weight's output dims); the local matmul reads the int8 shard and multiplies its (partial)
output by the scale shard, which commutes with the partial sums, so the scale is applied before the
reduce-scatter and the collectives are unchanged.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec

from shardlm.sharding import rules as _rules
from shardlm.sharding.compat import shard_map
from shardlm.sharding.qarray import QArray, einsum

RESIDUAL = ("batch", "seq", "act_embed")


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def _size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _weight_spec(w, spec: PartitionSpec):
    """The shard_map spec of a weight: its own, or for a QArray the values' and the scale's (the
    weight's spec without its contracted dims)."""
    if not isinstance(w, QArray):
        return spec
    return QArray(spec, PartitionSpec(*(e for d, e in enumerate(spec) if d not in w.contract)), w.contract)


def _gather_weight(w, spec, gathered: tuple[str, ...]):
    """All-gather a weight's local shard over the gathered mesh axes, dimension by dimension (a
    QArray's values and scale each by its own spec from `_weight_spec`)."""
    if isinstance(w, QArray):
        return QArray(_gather_weight(w.values, spec.values, gathered), _gather_weight(w.scale, spec.scale, gathered),
                      w.contract)
    for dim, entry in enumerate(spec):
        axes = tuple(a for a in _axes(entry) if a in gathered)
        if axes:
            w = jax.lax.all_gather(w, _entry(axes), axis=dim, tiled=True)
    return w


def _plan(mesh, rules, x_shape, w_shape, w_axes, e_dim: int):
    """Shardings for one projection: (x spec, w spec, E_res, E_w, F_w, scatter_f) or None."""
    x_spec = rules.spec(RESIDUAL, x_shape, mesh)
    w_spec = rules.spec(w_axes, w_shape, mesh)
    f_dim = 1 if e_dim == 0 else 0
    if any(_axes(e) for d, e in enumerate(w_spec) if d not in (e_dim, f_dim)):
        return None
    e_res = _axes(x_spec[2])
    e_w = tuple(a for a in _axes(w_spec[e_dim]) if a not in rules.gathered)
    f_w = tuple(a for a in _axes(w_spec[f_dim]) if a not in rules.gathered)
    if e_res[: len(e_w)] != e_w:  # the residual must be E-sharded with E_w as its major axes
        return None
    f_local = w_shape[f_dim] // _size(mesh, f_w)
    scatter_f = bool(e_w) and f_local % _size(mesh, e_w) == 0
    return x_spec, w_spec, e_res, e_w, f_w, scatter_f


def project_in(x, ws, w_axes):
    """x [B,T,E] (residual layout) times each weight [E, F, ...] (an array or a QArray with its
    scale [F, ...]) -> list of [B,T,F,...]."""
    active = _rules.active()
    letters = "fgh"[: ws[0].ndim - 1]
    eq = f"btd,d{letters}->bt{letters}"
    plans = [active and _plan(active[0], active[1], x.shape, w.shape, a, 0) for w, a in zip(ws, w_axes)]
    if active is None or not all(plans):
        return [einsum(eq, x, w) for w in ws]
    mesh, rules = active
    x_spec = plans[0][0]
    e_res, e_w = plans[0][2], plans[0][3]
    if any(p[2:4] != (e_res, e_w) for p in plans):
        return [einsum(eq, x, w) for w in ws]
    gather_x = tuple(a for a in e_res if a not in e_w)
    w_specs = [_weight_spec(w, p[1]) for w, p in zip(ws, plans)]

    def local(x, *ws):
        if gather_x:
            x = jax.lax.all_gather(x, _entry(gather_x), axis=2, tiled=True)  # -> E over E_w
        outs = []
        for w, w_spec, (_, _, _, _, _, scatter_f) in zip(ws, w_specs, plans):
            # partial sum over E_w (per-channel scales commute with it)
            y = einsum(eq, x, _gather_weight(w, w_spec, rules.gathered))
            if e_w and scatter_f:
                y = jax.lax.psum_scatter(y, _entry(e_w), scatter_dimension=2, tiled=True)
            elif e_w:
                y = jax.lax.psum(y, _entry(e_w))
            outs.append(y)
        return tuple(outs)

    out_specs = tuple(PartitionSpec(x_spec[0], x_spec[1], _entry(p[4] + (p[3] if p[5] else ())),
                                    *([None] * (ws[i].ndim - 2))) for i, p in enumerate(plans))
    fn = shard_map(local, mesh=mesh, in_specs=(x_spec, *w_specs), out_specs=out_specs)
    return list(fn(x, *ws))


def _flatten_in(w):
    """A weight [F, ..., E] as [F*..., E]; a QArray's scale [E] is unchanged."""
    if isinstance(w, QArray):
        return QArray(w.values.reshape(-1, w.shape[-1]), w.scale, (0,))
    return w.reshape(-1, w.shape[-1])


def project_out(h, w, w_axes):
    """h [B,T,F,...] times the weight [F, ..., E] (an array or a QArray with its scale [E]) -> [B,T,E]
    in the residual layout."""
    active = _rules.active()
    def matmul(h, w):  # contract the F dims flattened into one (XLA:CPU is ~8x slower on two)
        return einsum("btf,fd->btd", h.reshape(*h.shape[:2], -1), _flatten_in(w))

    plan = active and _plan(active[0], active[1], h.shape[:2] + (w.shape[-1],), w.shape, w_axes, w.ndim - 1)
    if active is None or not plan:
        return _rules.shard(matmul(h, w), RESIDUAL)
    mesh, rules = active
    x_spec, w_spec, e_res, e_w, f_w, scatter_f = plan
    h_f = f_w + (e_w if scatter_f else ())
    h_spec = PartitionSpec(x_spec[0], x_spec[1], _entry(h_f), *([None] * (h.ndim - 3)))
    e_local = w.shape[-1] // _size(mesh, e_w)
    scatter_e = bool(f_w) and e_local % _size(mesh, f_w) == 0

    w_spec = _weight_spec(w, w_spec)

    def local(h, w):
        if e_w and scatter_f:
            h = jax.lax.all_gather(h, _entry(e_w), axis=2, tiled=True)  # F back to F_w
        y = matmul(h, _gather_weight(w, w_spec, rules.gathered))  # partial sum over F_w
        if f_w and scatter_e:
            y = jax.lax.psum_scatter(y, _entry(f_w), scatter_dimension=2, tiled=True)
        elif f_w:
            y = jax.lax.psum(y, _entry(f_w))
        return y

    out_e = e_w + (f_w if scatter_e else ())
    out_spec = PartitionSpec(x_spec[0], x_spec[1], _entry(out_e))
    y = shard_map(local, mesh=mesh, in_specs=(h_spec, w_spec), out_specs=out_spec)(h, w)
    return _rules.shard(y, RESIDUAL)
