"""Which collectives a compiled step runs: kind, bytes and the layer/block they belong to.

Read from the optimized HLO of the partitioned program (what actually runs), so the layouts can be
checked against Pope et al.'s per-layer collectives and the planner's predicted volumes.
"""

from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*(?P<result>.+?)\s(?P<kind>" + "|".join(KINDS) + r")(?:-start)?\(")
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


@dataclass(frozen=True)
class Collective:
    kind: str
    result_bytes: int  # per device, all outputs of the op
    operand_bytes: int  # per device, its input
    group: int  # devices per replica group
    layer: int | None  # from the `layer_i` named scope, None outside the layers
    block: str  # "attention", "mlp", "sampling" (top-k/top-p branch) or "" (embedding, logits)
    op_name: str


def _group_size(line: str) -> int:
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)  # mesh['a'=8,...] {'a'} format
    if m:
        sizes = {k.strip(" '"): int(v) for k, v in (p.split("=") for p in m.group(1).split(","))}
        return math.prod(sizes[a.strip(" '")] for a in m.group(2).split(",") if a.strip())
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)  # iota format [groups, size]
    if m:
        return int(m.group(2))
    m = re.search(r"source_target_pairs=\{(.*?)\}\}", line)
    return 2 if m else 1


def parse(hlo_text: str) -> list[Collective]:
    out = []
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if not m or "-done" in line.split("=")[1].split("(")[0]:
            continue
        result = sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _SHAPE.findall(m["result"]))
        kind, group = m["kind"], _group_size(line)
        operand = {"all-gather": result // max(group, 1), "reduce-scatter": result * group}.get(kind, result)
        op = re.search(r'op_name="([^"]*)"', line)
        op_name = op.group(1) if op else ""
        layer = re.search(r"layer_(\d+)", op_name)
        # "sampling": the top-k/top-p branch, which greedy batches skip at run time.
        block = next((b for b in ("attention", "mlp") if f"/{b}/" in op_name), "sampling" if "cond/branch" in op_name else "")
        out.append(Collective(kind, result, operand, group, int(layer.group(1)) if layer else None, block, op_name))
    return out


def compiled_collectives(engine, phase: str = "decode", bucket: int | None = None) -> list[Collective]:
    """The collectives of one compiled step of `engine` (anything with `compiled_text(phase, bucket)`,
    such as engine.Engine): "decode", or "prefill" at `bucket` positions (default the smallest)."""
    return parse(engine.compiled_text(phase, bucket))


def per_layer(collectives: list[Collective], layer: int = 0) -> dict[tuple[str, str], list[int]]:
    """{(block, kind): sorted operand bytes} of one layer (every layer is the same)."""
    table = collections.defaultdict(list)
    for c in collectives:
        if c.layer == layer:
            table[(c.block, c.kind)].append(c.operand_bytes)
    return {k: sorted(v) for k, v in sorted(table.items())}


def summary(collectives: list[Collective]) -> str:
    """A short table: per (block, kind), the count and bytes in layer 0, and outside the layers."""
    lines = [f"{'block':10} {'collective':19} {'count':>5} {'operand bytes':>14}"]
    for (block, kind), sizes in per_layer(collectives).items():
        lines.append(f"{block:10} {kind:19} {len(sizes):5d} {sum(sizes):14,d}")
    rest = [c for c in collectives if c.layer is None]
    for kind in KINDS:
        sizes = [c.operand_bytes for c in rest if c.kind == kind]
        if sizes:
            lines.append(f"{'(outside)':10} {kind:19} {len(sizes):5d} {sum(sizes):14,d}")
    return "\n".join(lines)
