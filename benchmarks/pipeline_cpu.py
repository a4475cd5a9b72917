"""Decode through pipeline stages against pure tensor layouts on the same 8 virtual CPU devices.

    python benchmarks/pipeline_cpu.py            # batch 8 and 32, 24 timed steps per row
    python benchmarks/pipeline_cpu.py --quick    # 8 timed steps per row

Model: the SmolLM2-135M shape (D 576, 9 heads, 3 KV heads, F 1536, V 49152) with 32 layers instead
of 30, so that 2, 4 and 8 stages split it evenly; random float32 weights (a step's cost does not
depend on the values). Every placement runs the same model in the same process:

- one device (replicated): the reference;
- tensor layouts on all 8 devices: 1d_weight_stationary over x=8, 2d_weight_stationary over x=2,y=2,z=2;
- pipelines: stage=2 x 2d_weight_stationary over x=2,y=2; stage=4 x 1d_weight_stationary over x=2;
  stage=8 (no tensor split); microbatches = stages (the default), so the bubble is (N-1)/(2N-1).

Decode, for each batch B: a fresh decode state whose every slot holds `--context` tokens (the cache
length set directly; the values do not matter for timing), `--warmup` steps (the first compiles),
then `--steps` timed `Engine.generate` steps, the host reading every step's tokens as the batching
loop does. Throughput = B / median step; per-token latency = the median step (every sequence gets
one token per step). MBU = bytes a step must read (all weights once, plus the KV cache up to the
context: the attention reads every slot of it, masked) / median step / the JAX [8192, 8192] float32
matrix-vector bandwidth sampled right after the row (common.local_bandwidth).

The 8 virtual devices share the host's 2 cores and its memory bandwidth, and their collectives are
memory copies: this measures the engine's overheads (ticks, bubble, collectives) on CPU, not what a
pipeline buys on chips with their own memory (see results/pipeline_cpu.md). Other processes' share of the CPU during
each row is recorded (common.Others) and printed next to it.

Writes benchmarks/results/pipeline_cpu.json and pipeline_cpu.txt.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from shardlm.engine import Engine  # noqa: E402
from shardlm.engine.llm import Placement  # noqa: E402
from shardlm.models.config import preset  # noqa: E402
from shardlm.models.llama import Llama  # noqa: E402
from shardlm.sharding.pipeline import bubble_fraction, microbatches_for, stage_transfer_bytes, stages_in  # noqa: E402

from common import (  # noqa: E402
    OTHERS,
    RESULTS_DIR,
    Log,
    kv_bytes_per_step,
    local_bandwidth,
    median,
    run_steps,
    timed_steps,
    wait_until_quiet,
    write_results,
)

CONFIG = preset("smollm2-135m").replace(name="smollm2-135m-32l", n_layers=32)
PLACEMENTS = [  # name, mesh, layout
    ("one device", None, "replicated"),
    ("1D x=8", {"x": 8}, "1d_weight_stationary"),
    ("2D x=2,y=2,z=2", {"x": 2, "y": 2, "z": 2}, "2d_weight_stationary"),
    ("stage=2 x 2D x=2,y=2", {"stage": 2, "x": 2, "y": 2}, "2d_weight_stationary"),
    ("stage=4 x 1D x=2", {"stage": 4, "x": 2}, "1d_weight_stationary"),
    ("stage=8", {"stage": 8}, "replicated"),
]

log = Log()


def time_decode(engine, params, context: int, steps: int, warmup: int) -> dict:
    B = engine.batch_size
    state = engine.init_decode_state()  # every row's cache holds `context` tokens (zeros: timing only)
    lengths = jax.device_put(np.full((B,), context, np.int32), state.cache.lengths.sharding)
    state = dataclasses.replace(state, cache=state.cache.replace(lengths=lengths))
    state, warmup_s = run_steps(engine, params, state, warmup)
    state, times, _ = timed_steps(engine, params, state, steps)
    return {"median_step_s": median(times), "best_step_s": min(times), "tok_s": B / median(times),
            "warmup_s": warmup_s, "times_s": times}


def step_bytes(B: int, context: int) -> int:
    """Bytes a decode step reads at least: every weight once, K and V of every layer up to `context`."""
    return CONFIG.n_params * 4 + kv_bytes_per_step(CONFIG, B, context)


def main(args) -> dict:
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    log(f"pipeline_cpu  {started}  {os.cpu_count()} cores, jax {jax.__version__}, {jax.device_count()} "
        f"{jax.default_backend()} devices")
    log(f"model {CONFIG.name}: {CONFIG.n_params / 1e6:.0f}M parameters, {CONFIG.n_layers} layers, float32, random "
        f"weights; decode at context {args.context}, {args.steps} timed steps after {args.warmup} warm-up")
    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    rows = []
    for B in args.batches:
        for name, mesh, layout in PLACEMENTS:
            quiet = wait_until_quiet(args.max_wait)
            placement = Placement.make(CONFIG, mesh_shape=mesh, layout=layout, batch_size=B)
            engine = Engine(model, placement=placement, batch_size=B, max_seq_len=args.max_seq_len)
            OTHERS.begin(f"{name} B={B}")
            r = time_decode(engine, engine.params, args.context, args.steps, args.warmup)
            OTHERS.end()
            bw = local_bandwidth()
            stages = stages_in(mesh)
            M = microbatches_for(B, stages) if stages > 1 else 1  # microbatches default to the stages
            r.update(placement=name, mesh=mesh or {}, layout=placement.decode_layout, batch=B, stages=stages,
                     microbatches=M, bubble_fraction=bubble_fraction(stages, M) if stages > 1 else 0.0,
                     stage_bytes_per_step=stage_transfer_bytes(B, 1, CONFIG.d_model, 4, stages),
                     matvec_bw=bw, mbu=step_bytes(B, args.context) / r["median_step_s"] / bw,
                     others_share=OTHERS.sections[f"{name} B={B}"], quiet_before=quiet)
            rows.append(r)
            log(f"  B={B:2d} {name:22} {r['tok_s']:8.1f} tok/s  {r['median_step_s'] * 1e3:7.1f} ms/token  "
                f"MBU {r['mbu']:.0%}  others {r['others_share']:.0%}")
            del engine, placement
            gc.collect()
            jax.clear_caches()
    report(rows, args)
    return {"date": started, "model": CONFIG.name, "n_params": CONFIG.n_params, "context": args.context,
            "steps": args.steps, "devices": jax.device_count(), "cores": os.cpu_count(),
            "jax": jax.__version__, "rows": rows}


def report(rows, args) -> None:
    log("")
    log(f"Decode on 8 virtual CPU devices ({os.cpu_count()} cores), {CONFIG.name}, context {args.context}; "
        "ratio = tok/s over one device's in the same run")
    log(f"  {'placement':22} {'B':>3} {'M':>2} {'bubble':>6} {'tok/s':>8} {'ms/token':>9} {'ratio':>6} "
        f"{'vs 2D':>6} {'MBU':>5} {'stage KB':>8} {'others':>6}")
    for B in args.batches:
        ref = next(r for r in rows if r["batch"] == B and r["stages"] == 1 and not r["mesh"])
        twod = next(r for r in rows if r["batch"] == B and r["placement"].startswith("2D"))
        for r in (r for r in rows if r["batch"] == B):
            log(f"  {r['placement']:22} {B:3d} {r['microbatches']:2d} {r['bubble_fraction']:6.0%} {r['tok_s']:8.1f} "
                f"{r['median_step_s'] * 1e3:9.1f} {r['tok_s'] / ref['tok_s']:5.2f}x {r['tok_s'] / twod['tok_s']:5.2f}x "
                f"{r['mbu']:5.0%} {r['stage_bytes_per_step'] / 1024:8.1f} {r['others_share']:6.0%}")
    log("M: microbatches per step; bubble: (stages-1)/(M+stages-1) of each stage's ticks idle; stage KB: activation "
        "bytes passed between stages per step; others: CPU share taken by other processes during the row "
        "(the machine was shared)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-wait", type=float, default=20.0, help="seconds to wait for a quiet machine per row")
    p.add_argument("--out-dir", default=RESULTS_DIR)
    args = p.parse_args()
    if args.quick:
        args.steps = 8
    result = main(args)
    write_results(args.out_dir, "pipeline_cpu", result, log.lines)
