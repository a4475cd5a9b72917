"""Decode step and prefill time per layout on a device mesh, side by side with one device, same run.

    python benchmarks/layouts_cpu.py                      # mesh x=2,y=2,z=2: 8 virtual CPU devices on a CPU host
    python benchmarks/layouts_cpu.py --quick              # fewer steps and repetitions
    python benchmarks/layouts_cpu.py --mesh x=2,y=4       # an 8-chip TPU/GPU host: the same harness, real devices

Model: the embedded SmolLM2-135M-Instruct (GGUF, float32), loaded once on one device and moved onto
the mesh under each layout with `LLM.relayout` (same weights, no reload).

- Prefill: one `prompt_len`-token prompt (random ids) through `Engine.prefill` with the layout as
  prefill layout (prefill is always one sequence, so it does not depend on the decode batch); median
  of --prefill-reps after two warm-up calls (the first compiles).
- Decode, for each batch B in --batches: an engine with B slots, each slot holding that prompt
  (inserted from the prefill above), timed `Engine.generate` steps after --warmup steps (the first
  compiles); the host reads every step's tokens, as the batching loop does. Weight-gathered decode
  all-gathers every weight each step, which XLA:CPU's in-process collectives make slow (seconds per
  step on 8 virtual devices), so those layouts run --gathered-steps steps instead of --steps.
- Where a layout cannot run as asked (a weight-gathered layout whose tokens do not divide over its
  gathered axes, e.g. decode at B=1), the engine runs it as 2D weight-stationary
  (`Layout.effective`); the table marks such cells and reuses the figure of the layout that runs.
- Baseline: the same steps on a single device (replicated), in the same process, before the mesh runs.

Devices: on a CPU host (no accelerator, or JAX_PLATFORMS=cpu) XLA is told to split the host into as
many virtual devices as the mesh needs (--xla_force_host_platform_device_count), unless XLA_FLAGS
already sets that count or --cpu-devices says otherwise. The flag only concerns the host platform,
so on a TPU or GPU host the mesh is built over the real accelerators. CPU timings say little about
an accelerator: the virtual devices share the host's cores and memory bandwidth, and their
collectives are memory copies.

Writes benchmarks/results/layouts_<platform>.json (all figures, versions, date, devices) and .txt
(the printed report); --out-dir changes where.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import time

from common import RESULTS_DIR, Log, Others, machine, median, run_steps, time_prefill, timed_steps, write_results

log = Log()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer decode steps and prefill repetitions")
    ap.add_argument("--mesh", default="x=2,y=2,z=2", help="mesh axis sizes (axes stage, x, y, z); default x=2,y=2,z=2")
    ap.add_argument("--cpu-devices", type=int, default=None,
                    help="virtual CPU devices to create on a CPU host (default: the mesh's device count)")
    ap.add_argument("--layouts", nargs="+", default=None, help="layout names (default: all; see `shardlm layouts`)")
    ap.add_argument("--attention", default="auto", choices=["auto", "heads", "batch"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-seq-len", type=int, default=None, help="cache length per slot (default prompt-len + 32)")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps (default 8, 4 with --quick)")
    ap.add_argument("--gathered-steps", type=int, default=None,
                    help="timed decode steps of weight-gathered layouts (default 3, 2 with --quick)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed decode steps first (the first compiles)")
    ap.add_argument("--prefill-reps", type=int, default=None, help="timed prefills (default 3, 2 with --quick)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out-dir", default=RESULTS_DIR)
    args = ap.parse_args(argv)
    args.steps = args.steps or (4 if args.quick else 8)
    args.gathered_steps = args.gathered_steps or (2 if args.quick else 3)
    args.prefill_reps = args.prefill_reps or (2 if args.quick else 3)
    args.max_seq_len = args.max_seq_len or args.prompt_len + 32
    if args.max_seq_len < args.prompt_len + args.warmup + max(args.steps, args.gathered_steps) + 1:
        ap.error("--max-seq-len leaves no room for the prompt plus the decode steps")
    return args


def force_cpu_devices(args) -> None:
    """Ask XLA for virtual host devices before JAX starts (affects the CPU platform only)."""
    from shardlm.sharding.mesh import parse_mesh  # imports no JAX backend

    n = args.cpu_devices or math.prod(parse_mesh(args.mesh).values())
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags and n > 1:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    force_cpu_devices(ARGS)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from shardlm.engine import LLM  # noqa: E402
from shardlm.sharding.layouts import LAYOUTS  # noqa: E402
from shardlm.sharding.mesh import parse_mesh  # noqa: E402

# ----- measurements -----

def prefill_figures(llm: LLM, prompt: list[int], reps: int) -> tuple[dict, object]:
    """Median prefill time of one prompt; returns the figures and the last Prefix (for filling slots)."""
    figures, prefix = time_prefill(llm.engine, llm.params, prompt, reps)
    return {"runs_as": llm.layouts[0], **figures}, prefix


def time_decode(llm: LLM, prefix, steps: int, warmup: int) -> dict:
    """Steady-state decode: every slot holds the prompt; `steps` Engine.generate calls after `warmup`."""
    engine = llm.engine
    state = engine.init_decode_state()
    for slot in range(engine.batch_size):
        state = engine.insert(prefix, state, slot)
    state, warmup_s = run_steps(engine, llm.params, state, warmup)
    state, times, _ = timed_steps(engine, llm.params, state, steps)
    del state
    B = engine.batch_size
    return {"runs_as": llm.layouts[1], "steps": steps, "median_step_s": median(times), "mean_step_s": sum(times) / steps,
            "best_step_s": min(times), "tok_s": B / median(times), "warmup_s": warmup_s, "times_s": times}


def run_placement(base: LLM, args, prompt: list[int], mesh_shape, layout: str | None, reuse: dict) -> dict:
    """Prefill and decode (every batch) of one layout; `reuse` maps (phase, B, runs-as layout) to
    figures already measured on this mesh, so a layout that runs as another is not timed twice."""
    out = {"prefill": None, "decode": {}}
    prefix = None
    for B in args.batches:
        llm = base.relayout(mesh_shape=mesh_shape, layout=layout, attention=args.attention, batch_size=B,
                            max_seq_len=args.max_seq_len)
        prefill_as, decode_as = llm.layouts
        if out["prefill"] is None:
            key = ("prefill", 1, prefill_as)
            if key in reuse:
                out["prefill"] = dict(reuse[key], reused=True)
                prefix = None
            else:
                out["prefill"], prefix = prefill_figures(llm, prompt, args.prefill_reps)
                reuse[key] = out["prefill"]
            log(f"  prefill {args.prompt_len} tokens: {out['prefill']['median_s'] * 1e3:9.1f} ms"
                + (f"  (runs as {prefill_as})" if prefill_as != (layout or "replicated") else ""))
        key = ("decode", B, decode_as)
        if key in reuse:
            r = dict(reuse[key], reused=True)
        else:
            if prefix is None:  # prefill figures were reused; the slots still need a prompt's KV rows
                prefix = jax.block_until_ready(llm.engine.prefill(llm.params, prompt))
            gathered = bool(LAYOUTS[decode_as].gathered)
            r = time_decode(llm, prefix, args.gathered_steps if gathered else args.steps, args.warmup)
            reuse[key] = r
        out["decode"][B] = r
        log(f"  decode B={B:<3d} step {r['median_step_s'] * 1e3:9.1f} ms  {r['tok_s']:8.1f} tok/s"
            + (f"  (runs as {decode_as})" if decode_as != (layout or "replicated") else "")
            + ("  [same program, not rerun]" if r.get("reused") else f"  [median of {r['steps']}]"))
        del llm
        gc.collect()
    return out


# ----- report -----

def report(res: dict, args) -> None:
    Bs = args.batches
    single, layouts = res["single_device"], res["layouts"]
    log()
    log(f"SmolLM2-135M {args.dtype}, prompt {args.prompt_len} tokens, cache {args.max_seq_len} per slot; "
        f"mesh {res['mesh']} of {res['device_count']} {res['platform']} devices ({res['device_kind']}); "
        f"attention={args.attention}")
    log()
    w = 22
    head = f"{'layout':{w}} {'prefill ms':>11}" + "".join(f" {'B=' + str(B) + ' step ms':>14}" for B in Bs) \
        + "".join(f" {'B=' + str(B) + ' tok/s':>12}" for B in Bs)
    log(head)
    log("-" * len(head))

    def row(name, r, layout):
        mark = lambda ran: "*" if layout and ran != layout else " "  # noqa: E731
        p = r["prefill"]
        cells = f"{name:{w}} {p['median_s'] * 1e3:10.1f}{mark(p['runs_as'])}"
        cells += "".join(f" {r['decode'][B]['median_step_s'] * 1e3:13.1f}{mark(r['decode'][B]['runs_as'])}" for B in Bs)
        cells += "".join(f" {r['decode'][B]['tok_s']:12.1f}" for B in Bs)
        log(cells)

    row("one device", single, None)
    for name, r in layouts.items():
        row(name, r, name)
    log()
    log("Speed-up over one device (one-device time / layout time; > 1: the mesh is faster):")
    head = f"{'layout':{w}} {'prefill':>9}" + "".join(f" {'B=' + str(B) + ' decode':>12}" for B in Bs)
    log(head)
    for name, r in layouts.items():
        log(f"{name:{w}} {single['prefill']['median_s'] / r['prefill']['median_s']:8.2f}x"
            + "".join(f" {single['decode'][B]['median_step_s'] / r['decode'][B]['median_step_s']:11.2f}x" for B in Bs))
    log()
    log("* runs as another layout (Layout.effective: the tokens do not divide over the gathered axes),")
    log("  so the cell is that layout's figure. Decode: median step time with every slot holding the prompt;")
    log(f"  weight-gathered layouts time {args.gathered_steps} steps, the others {args.steps}, after {args.warmup} warm-up steps.")
    if res["platform"] == "cpu":
        log("  CPU: the virtual devices share the host's cores; collectives are in-process copies. Relative")
        log("  figures between layouts do not carry over to TPUs or GPUs.")
    share = res.get("other_processes_cpu_share")
    if share is not None:
        log(f"Other processes took {share:.0%} of the machine's CPU time during the run"
            + (" (figures are suspect: rerun on a quiet machine)" if share > 0.1 else "") + ".")


def main(args) -> dict:
    mesh_shape = parse_mesh(args.mesh)
    names = args.layouts or list(LAYOUTS)
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        raise SystemExit(f"unknown layouts {unknown}; known: {', '.join(LAYOUTS)}")
    started = datetime.datetime.now(datetime.timezone.utc)
    others = Others()
    others.begin("run")
    devices = jax.devices()
    res: dict = {"benchmark": "layouts", "date": started.isoformat(timespec="seconds"), "jax": jax.__version__,
                 "platform": jax.default_backend(), "device_kind": devices[0].device_kind, "device_count": len(devices),
                 "mesh": mesh_shape, "machine": machine(), "args": vars(args)}
    log(f"layouts  {res['date']}  jax {jax.__version__}, {len(devices)} {res['platform']} devices "
        f"({res['device_kind']}), host {res['machine']['cpu']} x{res['machine']['cores']}, mesh {args.mesh}")

    t0 = time.perf_counter()
    base = LLM.load(None, dtype=args.dtype, batch_size=max(args.batches), max_seq_len=args.max_seq_len)
    log(f"loaded {base.config.name} in {time.perf_counter() - t0:.1f} s")
    prompt = np.random.default_rng(0).integers(0, base.config.vocab_size, args.prompt_len).tolist()

    log("one device (replicated):")
    res["single_device"] = run_placement(base, args, prompt, None, None, {})
    res["layouts"] = {}
    reuse: dict = {}  # shared by the layouts on the mesh
    for name in names:
        log(f"{name}:")
        t0 = time.perf_counter()
        res["layouts"][name] = run_placement(base, args, prompt, mesh_shape, name, reuse)
        res["layouts"][name]["wall_s"] = time.perf_counter() - t0
    others.end()
    res["other_processes_cpu_share"] = others.sections["run"]
    res["wall_s"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    report(res, args)
    log(f"wall time {res['wall_s']:.0f} s")

    stem = write_results(args.out_dir, f"layouts_{res['platform']}", res, log.lines)
    log(f"wrote {stem}.json and .txt")
    return res


if __name__ == "__main__":
    main(ARGS)
