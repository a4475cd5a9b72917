"""The planner (sharding/planner.py) against Pope et al. 2022's measured figures: Table 2 and 3's
layouts and times, Figure 6's decode by chip count, Figure 7's prefill crossover. No device: the
planner is arithmetic, so this runs on CPU in about a second.

    python benchmarks/planner_vs_paper.py

Writes benchmarks/results/planner_vs_paper.json (every figure) and .md (the tables). The paper's
numbers are typed in from the paper (Tables 2-3 exactly, Figures 6-7 read off the plots, about
+-5-10 %); everything in the planner's columns is computed here. tests/test_planner.py asserts the
same choices, crossover and band on the planner directly.
"""

from __future__ import annotations

import json
import os

from shardlm.models.config import preset
from shardlm.sharding import planner

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CHIP = "tpu-v4"
CONTEXT = 2048  # Tables 2-3: prefill of 2048 tokens; decode at a 2048-token context
DECODE_STEPS = 64  # Tables 2-3's decode latency is for 64 generated tokens
BAND = 1.5  # the planner's time must lie within paper / BAND .. paper * BAND

SHORT = {"1d_weight_stationary": "WS 1D", "2d_weight_stationary": "WS 2D", "weight_gathered_x": "WG X",
         "weight_gathered_xy": "WG XY", "weight_gathered_xyz": "WG XYZ"}

# (table, model, chips, phase, batch, weight bytes, paper FFN layout, paper attention, paper seconds)
# Decode seconds are per step (the table's latency / 64 generated tokens).
TABLE_ROWS = [
    ("Table 2 LL prefill", "palm-540b", 64, "prefill", 1, 1, "WS 2D", "heads", 0.29),
    ("Table 2 LL decode", "palm-540b", 64, "decode", 64, 1, "WS 2D", "batch", 1.82 / DECODE_STEPS),
    ("Table 2 HT prefill", "palm-540b", 64, "prefill", 512, 2, "WG XYZ", "batch", 85.2),
    ("Table 2 HT decode", "palm-540b", 64, "decode", 512, 2, "WS 2D", "batch", 6.0 / DECODE_STEPS),
    ("Table 3 LL prefill", "palm-62b", 16, "prefill", 1, 1, "WS 2D", "heads", 0.16),
    ("Table 3 LL decode", "palm-62b", 16, "decode", 32, 1, "WS 2D", "batch", 0.73 / DECODE_STEPS),
    ("Table 3 HT prefill", "palm-62b", 32, "prefill", 512, 2, "WG XYZ", "batch", 20.2),
    ("Table 3 HT decode", "palm-62b", 8, "decode", 512, 2, "WS 2D", "batch", 5.1 / DECODE_STEPS),
]
FIG6 = {  # PaLM 540B decode, batch 512, ms per step: chips -> (mesh, 2D WS, 1D WS), read off Fig. 6
    64: ({"x": 4, "y": 4, "z": 4}, 92, 96),
    128: ({"x": 4, "y": 4, "z": 8}, 73, 94),
    256: ({"x": 4, "y": 8, "z": 8}, 67, 89),
}
FIG7 = {131072: (40, 28), 262144: (40, 54), 524288: (40, 74), 1048576: (42, 77)}  # tokens -> MFU % 2D WS, WG
FIG7_RANGE = (131072, 262144)  # the measured 2D WS -> weight-gathered crossover lies between these


def table_rows() -> list[dict]:
    out = []
    for name, model, chips, phase, batch, wb, paper_ffn, paper_attn, paper_s in TABLE_ROWS:
        ranked = planner.plan(preset(model), CHIP, chips, phase, batch, CONTEXT, weight_bytes=wb)
        best = ranked[0]
        paper_pick = [e for e in ranked if SHORT[e.layout] == paper_ffn]
        out.append(dict(
            row=name, model=model, chips=chips, mesh=best.mesh, phase=phase, batch=batch, weight_bytes=wb,
            paper_layout=paper_ffn, paper_attention=paper_attn, paper_s=paper_s,
            layout=SHORT[best.layout], attention=best.attention, step_s=best.step_time_s, mfu=best.mfu,
            compute_s=best.compute_s, memory_s=best.memory_s, comm_s=best.comm_s,
            ratio=paper_s / best.step_time_s, within_band=1 / BAND <= paper_s / best.step_time_s <= BAND,
            same_layout=SHORT[best.layout] == paper_ffn,
            paper_layout_s=min(e.step_time_s for e in paper_pick) if paper_pick else None,
            runner_up=(SHORT[ranked[1].layout] + "/" + ranked[1].attention, ranked[1].step_time_s) if len(ranked) > 1 else None,
        ))
    return out


def fig6_rows() -> list[dict]:
    palm = preset("palm-540b")
    out = []
    for chips, (mesh, paper_2d, paper_1d) in FIG6.items():
        ms = {lay: planner.plan(palm, CHIP, mesh, "decode", 512, CONTEXT, layouts=[lay], attention="batch")[0].step_time_s * 1e3
              for lay in ("2d_weight_stationary", "1d_weight_stationary")}
        out.append(dict(chips=chips, mesh=mesh, paper_2d_ms=paper_2d, paper_1d_ms=paper_1d,
                        planner_2d_ms=ms["2d_weight_stationary"], planner_1d_ms=ms["1d_weight_stationary"]))
    return out


def prefill_mfu(tokens: int) -> dict[str, float]:
    """Best MFU of each layout (either attention sharding) for PaLM 540B bf16 prefill on 64 chips."""
    out = {}
    for e in planner.plan(preset("palm-540b"), CHIP, 64, "prefill", tokens // CONTEXT, CONTEXT):
        out[e.layout] = max(out.get(e.layout, 0.0), e.mfu)
    return out


def crossover(against: list[str]) -> int | None:
    """First batch-token count (powers of two, 2k..2M) at which one of `against` beats 2D WS."""
    for k in range(11, 22):
        mfu = prefill_mfu(2**k)
        if max(mfu.get(lay, 0.0) for lay in against) > mfu["2d_weight_stationary"]:
            return 2**k
    return None


def fig7() -> dict:
    gathered = ["weight_gathered_x", "weight_gathered_xy", "weight_gathered_xyz"]
    return dict(
        points={t: dict(paper_2d=p2, paper_wg=pw, planner=prefill_mfu(t)) for t, (p2, pw) in FIG7.items()},
        crossover_vs_xyz=crossover(["weight_gathered_xyz"]), crossover_vs_any=crossover(gathered),
        paper_range=FIG7_RANGE)


def chip_constants() -> dict:
    c = planner.get_chip(CHIP)
    return dict(ici_bw_per_axis=c.ici_bw_per_axis, hop_latency_s=c.hop_latency_s,
                collective_overhead_s=c.collective_overhead_s, bf16_flops=c.bf16_flops, hbm_bw=c.hbm_bw, source=c.source)


def markdown(rows, f6, f7, const) -> str:
    ms = lambda s: f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"  # noqa: E731
    lines = [
        "# Planner (sharding/planner.py) vs Pope et al. 2022",
        "",
        "Generated by `python benchmarks/planner_vs_paper.py` (planner arithmetic, no device). Paper: Pope et al.",
        '2022, "Efficiently Scaling Transformer Inference" (arXiv 2211.05102); Tables 2-3 exactly, Figures 6-7',
        "read off the plots (about ±5-10 %). Decode rows are per step (the table's latency / 64 tokens); prefill",
        "rows are one step of batch × 2048 tokens.",
        "",
        "Model: collectives alpha-beta on the torus, one bidirectional ring per mesh axis at "
        f"{const['ici_bw_per_axis'] / 1e9:.0f} GB/s per axis,",
        f"{const['hop_latency_s'] * 1e6:.0f} µs per hop and {const['collective_overhead_s'] * 1e6:.0f} µs per ring; "
        "weight-gathered weights one way around one ring through the gathered chips (Pope et al.'s code);",
        "single-axis activation collectives and weight rings looped under the matmuls (one chunk in k exposed),",
        "the rest (multi-axis collectives, all-to-alls, all-gather halves of all-reduces) additive. step = max(compute,",
        "HBM, hidden communication) + exposed communication. Constants and sources: sharding/chips.json.",
        "",
        "## Tables 2 and 3",
        "",
        "| row | chips | batch | weights | paper layout | paper time | planner layout | planner time (MFU) | paper / planner | paper's layout in the planner |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        paper_layout = ms(r["paper_layout_s"]) if r["paper_layout_s"] is not None else "n/a"
        lines.append(
            f"| {r['row']} ({r['model']}) | {r['chips']} | {r['batch']} | {'int8' if r['weight_bytes'] == 1 else 'bf16'} "
            f"| {r['paper_layout']} / {r['paper_attention']} | {ms(r['paper_s'])} | {r['layout']} / {r['attention']}"
            f"{'' if r['same_layout'] else ' **(differs)**'} | {ms(r['step_s'])} ({r['mfu']:.0%}) | {r['ratio']:.2f}"
            f"{'' if r['within_band'] else ' **(outside 1.5x)**'} | {paper_layout} |")
    lines += ["", "## Figure 6: PaLM 540B decode, batch 512, 2D vs 1D weight-stationary (ms per step)", "",
              "| chips | mesh | paper 2D / 1D | planner 2D / 1D |", "|---|---|---|---|"]
    for r in f6:
        mesh = "x".join(str(r["mesh"][a]) for a in "xyz")
        lines.append(f"| {r['chips']} | {mesh} | ≈{r['paper_2d_ms']} / ≈{r['paper_1d_ms']} | "
                     f"{r['planner_2d_ms']:.1f} / {r['planner_1d_ms']:.1f} |")
    lines += ["", "## Figure 7: PaLM 540B prefill on 64 chips, MFU by tokens per batch", "",
              "| tokens | paper 2D WS / WG | planner 2D WS | planner WG X / XY / XYZ |", "|---|---|---|---|"]
    for t, p in f7["points"].items():
        m = p["planner"]
        lines.append(f"| {t:,} | ≈{p['paper_2d']} / ≈{p['paper_wg']} % | {m['2d_weight_stationary']:.0%} | "
                     f"{m['weight_gathered_x']:.0%} / {m['weight_gathered_xy']:.0%} / {m['weight_gathered_xyz']:.0%} |")
    lo, hi = f7["paper_range"]
    lines += ["", f"Crossover (first power-of-two token count where a weight-gathered layout beats 2D WS): paper between "
              f"{lo:,} and {hi:,}; planner, 2D WS vs WG XYZ: {f7['crossover_vs_xyz']:,}; 2D WS vs any WG variant: "
              f"{f7['crossover_vs_any']:,}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    rows, f6, f7, const = table_rows(), fig6_rows(), fig7(), chip_constants()
    with open(os.path.join(RESULTS, "planner_vs_paper.json"), "w") as f:
        json.dump(dict(chip=CHIP, context=CONTEXT, band=BAND, constants=const, tables=rows, fig6=f6, fig7=f7), f, indent=1)
    text = markdown(rows, f6, f7, const)
    with open(os.path.join(RESULTS, "planner_vs_paper.md"), "w") as f:
        f.write(text + NOTES)
    print(text)


NOTES = """
## What does not match, and why

- **The collective overhead is fitted** (chips.json: per ring, to Fig. 6 at 128 and 256 chips, not
  to Table 2); the link bandwidth and the hop latency are sourced. Table 2's four rows are therefore
  an out-of-sample check, Fig. 6's 128/256-chip rows are not.
- **Table 2 LL decode picks 2D over 1D by under 1 %**: at batch 64 the step is bound by collective
  latency, and 2D runs more collectives than 1D (about 25 rings per layer against 18), which nearly
  cancels its smaller volume. A few µs more overhead per ring flips the choice to 1D.
- **Prefill times are ~1.3x below the paper** and MFU near 100 % at large batch: matmuls run at peak
  in the planner, while the paper measures 76 % with "communication overhead almost negligible". The
  planner has no matmul efficiency below peak, no vector-unit time (norms, softmax, SwiGLU) and no
  kernel launch costs.
- **Fig. 7, 2D WS prefill MFU ~65 % vs the paper's ~40 %**: the same missing costs; also, the
  planner's loops may hide more of the single-axis collectives than the real ones did.
- **Fig. 7 crossover**: 2D WS against XYZ weight-gathered (the variant the authors' code implements,
  and the one Table 2 uses) switches between 131k and 262k tokens, as measured. Against every
  weight-gathered variant the planner switches much earlier, to XY-weight-gathered: with a one-way
  weight ring over 16 chips and its single-axis activation collectives hidden, XY is cheap from
  tens of thousands of tokens, as the paper's own volume analysis (Fig. 3) also says. Fig. 7 did not
  measure X or XY.
- **Table 3 (PaLM 62B at 8 and 16 chips) picks 1D** where the paper ran 2D: 16 chips is the paper's own
  break-even (2D wins above n = 4F/E = 16), and at 8 chips 1D has less to communicate. The paper's
  2D layout in the planner is listed in the last column.
- **Heads vs batch attention for weight-gathered XYZ** is the same layout here: its tokens are already
  split over all 64 chips, so the planner lists it once, as heads.
"""

if __name__ == "__main__":
    main()
