"""Expert parallelism (EP): the token dispatch of a mixture-of-experts layer whose experts are split
over mesh axes, and the buffer shapes that the engine compiles and the planner costs.

Under an expert-parallel layout (sharding/layouts.py) the rules map "expert" to the EP axes (ep
groups, E/ep whole experts each) and "expert_mlp" to the TP axes inside each group (tp devices,
F/tp of every local expert); the n = ep x tp devices hold the residual stream as the 1D layout
does, every token with D split n ways (D chunk i on the device of linear index i over EP then TP
axes). The dispatch works on those D chunks, so no token is gathered whole before or after it:

    router: partial logits over the local D chunk, summed (psum over all n devices) -> [T, E] on
            every device, routed identically everywhere (so every device knows every slot's place)
    pack:   the T*k token-slots sorted by expert; destination group g's are a contiguous run, laid
            into rows [n*C] of a fixed buffer [ep, n*C, D/n] (C from `capacity`; zero rows past
            the run) -- the bytes of [ep, C, D] full-D rows
    all-to-all over EP: group g receives [ep, n*C, D/n], every EP peer's D chunks of its rows
    (EP x TP) all-gather over TP -> rows [n*C, D], sorted by local expert
    experts: ragged_dot per local expert (gate, up, down; F/tp each under TP); rows past the
            group sizes are zero and stay zero
    (EP x TP) reduce-scatter over TP of the partial down-projection into the D chunks the sources
            hold (half an all-reduce's bytes, and no second split before the combine)
    all-to-all over EP (combine): each device gets its D chunk of its slots' outputs
    weighted sum over each token's k slots -> [T, D/n], already the residual layout.

Every device thus sends `dispatch_bytes(tokens_per_group, k, D, ep, act_bytes, capacity_factor)`
per all-to-all with tokens_per_group = ceil(T / n), the tokens per device (under EP alone n = ep,
the EP group's share). XLA:CPU has no ragged all-to-all, so the buffers have static shapes on every
backend; `capacity` picks C. Dropless (the default) gives one device's results; a capacity factor
drops the slots past a destination's n*C rows (the last ones in expert order), which count zero.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from shardlm.sharding.compat import shard_map
from shardlm.sharding.qarray import QArray
from shardlm.sharding.rules import active


def capacity(tokens_per_group: int, k: int, ep: int, capacity_factor: float | None = None) -> int:
    """Slots one group sends each destination group: C of the [ep, C, D] dispatch buffer.

    tokens_per_group: tokens one EP group routes (its share of the step's tokens, padded up to a
    multiple of ep). k: experts per token. capacity_factor None: dropless, C = every slot of the
    group (all of them may route to one destination), so results equal one device's. A factor c:
    C = ceil(c x slots / ep), at most all slots; slots past a destination's C are dropped (GShard's
    capacity), which trades exactness for all-to-all bytes that shrink with ep.
    """
    if tokens_per_group < 1 or k < 1 or ep < 1:
        raise ValueError(f"tokens_per_group, k and ep must be >= 1, got {tokens_per_group}, {k}, {ep}")
    slots = tokens_per_group * k
    if capacity_factor is None:
        return slots
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0 (or None: dropless), got {capacity_factor!r}")
    return min(slots, math.ceil(capacity_factor * slots / ep))


def dispatch_bytes(tokens_per_group: int, k: int, d_model: int, ep: int, act_bytes: int,
                   capacity_factor: float | None = None) -> int:
    """Per-device operand bytes of one dispatch (or combine) all-to-all: the [ep, C, D] buffer."""
    return ep * capacity(tokens_per_group, k, ep, capacity_factor) * d_model * act_bytes


def _live(mesh, name: str, rules) -> tuple[str, ...]:
    return tuple(a for a in rules.mesh_axes(name) if mesh.shape.get(a, 1) > 1)


def expert_axes() -> tuple[str, ...]:
    """The mesh axes the active rules split experts over (the EP axes); () when experts are whole."""
    current = active()
    return () if current is None else _live(current[0], "expert", current[1])


def _entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _spec(w, *entries):
    """The shard_map spec of an expert weight, or for a QArray its values' and scale's."""
    spec = PartitionSpec(*entries)
    if not isinstance(w, QArray):
        return spec
    return QArray(spec, PartitionSpec(*(e for d, e in enumerate(entries) if d not in w.contract)), w.contract)


def _matmul(rows, w, group_sizes, expert_of_row):
    """rows [R, in] sorted by local expert times each one's weight [E/ep, in, out] -> [R, out]."""
    if isinstance(w, QArray):
        y = jax.lax.ragged_dot(rows, w.values.astype(rows.dtype), group_sizes)
        return y * w.scale[expert_of_row].astype(y.dtype)
    return jax.lax.ragged_dot(rows, w.astype(rows.dtype), group_sizes)


def expert_parallel(x, router, gate, up, down, route, capacity_factor: float | None = None):
    """A mixture-of-experts layer under the active expert-parallel rules (see the module docstring).

    x [B, T, D] in the residual layout; router [D, E] (replicated); gate, up [E, D, F] and down
    [E, F, D], arrays or QArrays (one scale per expert and output channel); route: router logits
    [T, E] float32 -> (weights [T, k], expert ids [T, k]). Returns the weighted sum of each token's
    k experts [B, T, D] in the residual layout.
    """
    mesh, rules = active()
    ep_axes, tp_axes = _live(mesh, "expert", rules), _live(mesh, "expert_mlp", rules)
    ep, tp = math.prod(mesh.shape[a] for a in ep_axes), math.prod(mesh.shape[a] for a in tp_axes)
    n, dev_axes = ep * tp, ep_axes + tp_axes
    (B, T, D), (E, _, F) = x.shape, gate.shape
    if E % ep:
        raise ValueError(f"expert parallelism needs the experts to divide over the EP size: E={E} experts, "
                         f"EP size {ep} (mesh axes {'/'.join(ep_axes)} of {dict(mesh.shape)})")
    if F % tp or D % n:
        raise ValueError(f"expert parallelism over {n} devices needs d_model={D} divisible by {n} and the "
                         f"experts' d_ff={F} by the TP size {tp}")
    E_l = E // ep  # local experts

    def local(x, router, gate, up, down):
        Tn, Dn = x.shape  # [B*T, D/n]: every token, this device's D chunk
        assert Dn == D // n and gate.shape[0] == E_l and gate.shape[2] == F // tp, (x.shape, gate.shape)
        logits = jnp.einsum("td,de->te", x, router, preferred_element_type=jnp.float32)
        weights, experts = route(jax.lax.psum(logits, dev_axes))  # [T, k] each, the same on every device
        k = experts.shape[1]
        rows = n * capacity(-(-Tn // n), k, ep, capacity_factor)  # per destination group: n*C rows of D/n

        # Slots sorted by expert (stable), so each destination group's are one run, by local expert.
        flat = experts.reshape(-1)  # [M = T*k]
        order = jnp.argsort(flat, stable=True)
        counts = jnp.bincount(flat, length=E).astype(jnp.int32)  # [E] slots per expert
        group_counts = counts.reshape(ep, E_l).sum(1)  # [ep]
        starts = jnp.cumsum(group_counts) - group_counts  # [ep] each group's first sorted slot
        slot = jnp.arange(rows)
        sorted_index = jnp.minimum(starts[:, None] + slot, flat.shape[0] - 1)  # [ep, n*C]
        filled = slot < group_counts[:, None]  # [ep, n*C]; past the run (or the capacity): zero rows
        send = jnp.where(filled[..., None], x[order[sorted_index] // k], 0)  # [ep, n*C, D/n]

        with jax.named_scope("dispatch"):
            recv = jax.lax.all_to_all(send, ep_axes, 0, 0, tiled=True)  # [ep, n*C, D/n] from each EP peer
        if tp_axes:
            recv = jax.lax.all_gather(recv, tp_axes, axis=0)  # [tp, ep, n*C, D/n]
            received = recv.transpose(2, 1, 0, 3).reshape(rows, D)  # D chunk e*tp + t in place
        else:
            received = recv.transpose(1, 0, 2).reshape(rows, D)  # [n*C, D]

        g = jax.lax.axis_index(ep_axes)
        ends = jnp.minimum(jnp.cumsum(jax.lax.dynamic_slice(counts, (g * E_l,), (E_l,))), rows)  # [E/ep]
        group_sizes = jnp.diff(ends, prepend=0).astype(jnp.int32)
        expert_of_row = jnp.minimum(jnp.sum(slot[:, None] >= ends[None, :], axis=1), E_l - 1)  # [n*C]
        mm = lambda a, w: _matmul(a, w, group_sizes, expert_of_row)  # noqa: E731
        h = jax.nn.silu(mm(received, gate)) * mm(received, up)  # [n*C, F/tp]
        out = mm(h, down).reshape(rows, ep, tp, Dn)  # [n*C, D], partial over TP
        if tp_axes:
            out = jax.lax.psum_scatter(out, tp_axes, scatter_dimension=2, tiled=True)  # [n*C, ep, 1, D/n]
        out = out.reshape(rows, ep, Dn).transpose(1, 0, 2)  # [ep, n*C, D/n]: each source's D chunk
        with jax.named_scope("combine"):
            back = jax.lax.all_to_all(out, ep_axes, 0, 0, tiled=True)  # [ep, n*C, D/n] from each destination

        # Each slot's output from its destination's buffer (a dropped slot: zero), then per token.
        dest = flat // E_l  # [M]
        position = jnp.argsort(order) - starts[dest]  # [M] its row in the destination's buffer
        kept = position < rows
        outs = jnp.where(kept[:, None], back[dest, jnp.minimum(position, rows - 1)], 0)  # [M, D/n]
        return jnp.einsum("tkd,tk->td", outs.reshape(Tn, k, Dn), weights.astype(outs.dtype))

    ep_e, tp_e, dev_e = _entry(ep_axes), _entry(tp_axes), _entry(dev_axes)
    fn = shard_map(local, mesh=mesh,
                   in_specs=(PartitionSpec(None, dev_e), PartitionSpec(dev_e, None), _spec(gate, ep_e, None, tp_e),
                             _spec(up, ep_e, None, tp_e), _spec(down, ep_e, tp_e, None)),
                   out_specs=PartitionSpec(None, dev_e))
    return fn(x.reshape(B * T, D), router, gate, up, down).reshape(B, T, D)
