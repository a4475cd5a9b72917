"""Pope et al. 2022's partitioning layouts (section 3) as named rule sets over the mesh (x, y, z).

Notation as in the paper: `E_x F_yz` is a weight whose E (d_model) dimension is split over mesh
axis x and F (d_ff) over y and z. Stored, F is split z-major (PartitionSpec entry ("z", "y")) so
that all-gathering it over y (weight_gathered_xy) leaves each device a contiguous block of F_z; with
y major the gathered block would hold strided heads, and grouped-query attention would pair query
heads with the wrong kv heads wherever kv heads are split over fewer axes than query heads.

Weights keep one of two storage layouts, activations change (the projection blocks in blocks.py
derive each block's collectives from the weight storage and the residual layout):

- 1d_weight_stationary: W_in E F_xyz, W_out F_xyz E; heads like F. The residual stream is BLE_xyz:
  all-gather(xyz) before each block's first matmul, reduce-scatter(xyz) after its second.
- 2d_weight_stationary: W_in E_x F_yz, W_out F_yz E_x. Residual BLE_xyz; all-gather(yz) to BLE_x,
  matmul -> BLF_yz partial over x, reduce-scatter(x) -> BLF_yzx, all-gather(x) -> BLF_yz, matmul ->
  BLE_x partial over yz, reduce-scatter(yz) -> BLE_xyz.
- weight_gathered_{x,xy,xyz}: weights stored as in 2D (E_x F_yz) and all-gathered over the named
  axes before use; tokens (batch, or for a single prefill sequence its positions) are split over
  those axes and the remaining axes shard E/F/heads as in the weight-stationary case.
- replicated: everything on every device (one device, or a baseline).

Attention: the projections follow the feed-forward layout (heads in place of F). The attention core
either keeps heads sharded ("heads") or, for multiquery/grouped-query attention whose K kv heads are
fewer than the devices they would be split over, moves Q/K/V to a batch-sharded layout with an
all-to-all so that each device holds B/n rows of the KV cache instead of a replica ("batch",
Pope et al. Fig. 4c/5b). Pope et al. use heads-sharded attention for prefill, batch-sharded for
decode; `attention="auto"` does the same when batch sharding applies.

Mixture of experts (models/moe.py): expert weights [E, D, F] name E "expert" and F "expert_mlp",
the router's output "expert_logits". The dense layouts leave "expert" unsplit and split "expert_mlp"
as "mlp", so every device group holds every expert, each split in D and F as the dense MLP's (tensor
parallelism inside each expert), and the token-slots the experts see ("act_expert_embed") carry
whole D. The expert-parallel layouts split "expert" (`Layout.expert_axes`; sharding/experts.py
dispatches the tokens with two all-to-alls per sparse layer) and run everything else as
1d_weight_stationary: expert_parallel_xyz holds E/8 whole experts per device on 2x2x2,
expert_parallel_x E/X experts per x group with their F split over y/z (EP x TP). E must divide
over the EP axes, and a model without experts is refused (`check_model`).

Shapes an axis does not divide (SmolLM2's 9 query and 3 kv heads over 2 or more devices) are
partially replicated: rules.spec keeps only the leading mesh axes whose product divides the
dimension. Results are unchanged; only memory and communication differ from the ideal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from jax.sharding import Mesh

from shardlm.sharding.rules import ShardingRules

XYZ = ("x", "y", "z")
F_AXES = ("z", "y")  # F and heads of the 2D storage, z-major (see module docstring)


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    weights: dict  # weight logical name -> mesh axes (storage)
    gathered: tuple[str, ...]  # mesh axes weights are all-gathered over before use
    acts: dict  # activation logical name -> mesh axes: tokens, the residual stream, logits
    heads_axes: tuple[str, ...]  # mesh axes the attention core splits heads over (heads mode)

    @property
    def expert_axes(self) -> tuple[str, ...]:
        """Mesh axes the experts are split over (expert parallelism); () for the dense layouts."""
        return self.weights.get("expert", ())

    def check_model(self, mesh: Mesh, config) -> None:
        """Raise unless `config` (a ModelConfig) can run under this layout on mesh: an expert-parallel
        layout needs experts (E over the EP size, each expert's F over the TP size, D over both)."""
        if not self.expert_axes:
            return
        if not config.n_experts:
            raise ValueError(f"layout {self.name} splits a mixture of experts' experts; {config.name} has none "
                             f"(dense): use 1d_weight_stationary, which it runs everything else as")
        live = lambda name: tuple(a for a in self.weights.get(name, ()) if mesh.shape.get(a, 1) > 1)  # noqa: E731
        axes, tp_axes = live("expert"), live("expert_mlp")
        ep, tp = math.prod(mesh.shape[a] for a in axes), math.prod(mesh.shape[a] for a in tp_axes)
        if config.n_experts % ep:
            raise ValueError(f"layout {self.name}: E={config.n_experts} experts do not divide over the EP size {ep} "
                             f"(mesh axes {'/'.join(axes)} of mesh {dict(mesh.shape)})")
        if config.expert_d_ff % tp or config.d_model % (ep * tp):
            raise ValueError(f"layout {self.name}: each expert's F={config.expert_d_ff} must divide over the TP size "
                             f"{tp} and d_model={config.d_model} over the {ep * tp} EP x TP devices of mesh "
                             f"{dict(mesh.shape)}")

    def effective(self, mesh: Mesh, phase: str, batch: int, seq: int = 32) -> "Layout":
        """The layout that actually runs: a weight-gathered layout needs its tokens (the batch, or
        in prefill the sequence positions) split over its gathered axes; where they cannot be, the
        gathers would buy nothing (every device would compute every token), so it runs as 2D
        weight-stationary on the same stored weights (Pope et al. pair the two the same way)."""
        token_axes = self.acts.get("tokens", ())
        if not token_axes:
            return self
        n = math.prod(mesh.shape.get(a, 1) for a in token_axes)
        if batch % n == 0 or (phase == "prefill" and seq % n == 0):
            return self
        return LAYOUTS["2d_weight_stationary"]

    def rules(self, mesh: Mesh, phase: str, batch: int, n_kv_heads: int, attention: str = "auto",
              seq: int | None = None) -> ShardingRules:
        """The rules for one phase ("prefill" or "decode") at a given batch size.

        Token axes: batch over the token axes when it divides, else (a single prefill sequence)
        the sequence positions. Attention: "heads", "batch" or "auto" (see module docstring).
        """
        if phase not in ("prefill", "decode"):
            raise ValueError(f"phase must be prefill or decode, got {phase!r}")
        if attention not in ("auto", "heads", "batch"):
            raise ValueError(f"attention must be auto, heads or batch, got {attention!r}")
        size = lambda axes: math.prod(mesh.shape.get(a, 1) for a in axes)  # noqa: E731
        live = tuple(a for a in XYZ if mesh.shape.get(a, 1) > 1)
        m = dict(self.weights)
        m.setdefault("expert_mlp", m.get("mlp", ()))  # an expert's F as the dense MLP's unless the layout says
        m.update(self.acts)
        token_axes = m.pop("tokens", ())
        if token_axes and batch % size(token_axes) == 0:
            m["batch"] = token_axes
        elif token_axes and phase == "prefill":
            m["seq"] = token_axes
        # Attention core: batch-sharded when asked, or (auto) in decode when the kv heads cannot be
        # split over the head axes and the batch divides over all devices.
        batch_ok = batch % size(live) == 0 and size(live) > 1
        heads_short = n_kv_heads % size(self.heads_axes) != 0 or n_kv_heads < size(self.heads_axes)
        use_batch = attention == "batch" or (attention == "auto" and phase == "decode" and heads_short and batch_ok)
        if attention == "batch" and size(live) == 1:
            raise ValueError("batch-sharded attention (--attention batch) splits the KV cache over devices; "
                             "on one device use heads or auto")
        if attention == "batch" and not batch_ok:
            raise ValueError(f"batch-sharded attention needs the {phase} batch ({batch}) to be a multiple of the "
                             f"{size(live)} devices of mesh {dict(mesh.shape)}")
        if use_batch:
            m.update(attn_batch=live, attn_heads=(), attn_kv_heads=())
        else:
            m.update(attn_batch=m.get("batch", ()), attn_heads=self.heads_axes, attn_kv_heads=self.heads_axes)
        return ShardingRules.of(m, gathered=self.gathered)


def _weight_gathered(axes: tuple[str, ...]) -> Layout:
    rest = tuple(a for a in F_AXES if a not in axes)
    name = "weight_gathered_" + "".join(axes)
    return Layout(
        name=name,
        description=(f"weights stored E_x F_yz, all-gathered over {'/'.join(axes)} before use; tokens split over "
                     f"{'/'.join(axes)}" + (f"; E, F and heads over {'/'.join(rest)}" if rest else "; no activation collectives")),
        weights=dict(embed=("x",), mlp=F_AXES, q_heads=F_AXES, kv_heads=F_AXES, vocab=F_AXES),
        gathered=axes,
        acts=dict(tokens=axes, act_embed=rest, act_vocab=rest),
        heads_axes=rest,
    )


def _expert_parallel(ep: tuple[str, ...], tp: tuple[str, ...]) -> Layout:
    """Experts split over `ep`, each expert's F over `tp`; everything else as 1d_weight_stationary
    (whose residual D over xyz is where the dispatch's D chunks come from: EP then TP axes)."""
    inside = f"each expert's F over {'/'.join(tp)} (EP x TP)" if tp else "whole experts (no split inside one)"
    return Layout(
        name="expert_parallel_" + "".join(ep),
        description=(f"mixture of experts: experts over {'/'.join(ep)}, {inside}; tokens dispatched and combined "
                     f"by two all-to-alls over {'/'.join(ep)} per sparse layer; attention, dense MLPs, embeddings "
                     "and vocab as 1d_weight_stationary; E must divide over the EP axes; refuses a dense model"),
        weights=dict(mlp=XYZ, q_heads=XYZ, kv_heads=XYZ, vocab=XYZ, expert=ep, expert_mlp=tp),
        gathered=(),
        acts=dict(act_embed=XYZ, act_vocab=XYZ),
        heads_axes=XYZ,
    )


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in [
        Layout("replicated", "every weight, activation and the KV cache whole on every device",
               weights={}, gathered=(), acts={}, heads_axes=()),
        Layout("1d_weight_stationary",
               "W_in E F_xyz, W_out F_xyz E, heads over x/y/z; activations BLE_xyz, all-gather + reduce-scatter "
               "over xyz per block",
               weights=dict(mlp=XYZ, q_heads=XYZ, kv_heads=XYZ, vocab=XYZ),
               gathered=(),
               acts=dict(act_embed=XYZ, act_vocab=XYZ),
               heads_axes=XYZ),
        Layout("2d_weight_stationary",
               "W_in E_x F_yz, W_out F_yz E_x, heads over y/z; activations BLE_xyz, gathered over yz before and "
               "reduce-scattered over x between the two matmuls",
               weights=dict(embed=("x",), mlp=F_AXES, q_heads=F_AXES, kv_heads=F_AXES, vocab=F_AXES),
               gathered=(),
               # The residual E_xzy: x major (the weights' E_x), then F's order, so that the second
               # matmul's reduce-scatter over F_zy lands on it without a permute. The embedding
               # lookup's output keeps the table's E_x first (see models/llama.py).
               acts=dict(act_embed=("x",) + F_AXES, act_vocab=F_AXES, act_embed_lookup=("x",)),
               heads_axes=F_AXES + ("x",)),
        _weight_gathered(("x",)),
        _weight_gathered(("x", "y")),
        _weight_gathered(("x", "y", "z")),
        _expert_parallel(XYZ, ()),
        _expert_parallel(("x",), ("y", "z")),
    ]
}


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]
