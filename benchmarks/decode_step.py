"""Decode step time of a preset shape with random weights on whatever device JAX finds.

    python benchmarks/decode_step.py --model llama3-8b --dtype bfloat16 --batch 1 8 64 --context 1024

Reports ms per step, tokens/s and MBU: (parameter + KV-cache bytes read per step) / step time /
the bandwidth of a large matrix-vector product timed in the same run on the same device.
Results go to benchmarks/results/decode_step_<platform>.json ($OUT/ instead where $OUT is set).
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from shardlm.engine import Engine, SamplingParams
from shardlm.engine.llm import parse_dtype
from shardlm.models.config import preset
from shardlm.models.llama import Llama

from common import RESULTS_DIR, cache_nbytes, params_nbytes, write_results


def best_time(f, *args, reps=10):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def matvec_bandwidth(dtype) -> float:
    n = 16384 if jax.default_backend() != "cpu" else 8192
    w = jnp.ones((n, n), dtype)
    x = jnp.ones((n,), dtype)
    return w.nbytes / best_time(jax.jit(lambda w, x: w @ x), w, x)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tinyllama-1.1b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--context", type=int, default=1024, help="cache length per slot")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()

    dtype = parse_dtype(args.dtype)
    cfg = preset(args.model)
    bw = matvec_bandwidth(dtype)
    device = jax.devices()[0]
    rows = []
    for B in args.batch:
        model = Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0))
        engine = Engine(model, batch_size=B, max_seq_len=args.context)
        state = engine.init_decode_state()
        sp = SamplingParams(max_new_tokens=args.steps)
        for slot in range(B):
            state = engine.insert(engine.prefill(engine.params, [1] * (args.context // 2), sp), state, slot, sp)
        state, tokens = engine.generate(engine.params, state)  # compile
        jax.block_until_ready(tokens)
        t = time.perf_counter()
        for _ in range(args.steps):
            state, tokens = engine.generate(engine.params, state)
        jax.block_until_ready(tokens)
        step = (time.perf_counter() - t) / args.steps
        param_bytes, kv_bytes = params_nbytes(engine.params), cache_nbytes(state)
        row = {"batch": B, "step_ms": step * 1e3, "tok_s": B / step, "param_bytes": param_bytes, "kv_bytes": kv_bytes,
               "mbu": (param_bytes + kv_bytes) / step / bw}
        rows.append(row)
        print(f"{cfg.name} {args.dtype} B={B}: {row['step_ms']:.2f} ms/step, {row['tok_s']:.1f} tok/s, "
              f"MBU {row['mbu']:.0%} (params {param_bytes / 1e9:.2f} GB + KV {kv_bytes / 1e9:.2f} GB at "
              f"{bw / 1e9:.0f} GB/s)", flush=True)
        del engine, state, model
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "jax": jax.__version__, "device": device.device_kind, "platform": device.platform,
           "model": cfg.name, "dtype": args.dtype, "context": args.context, "matvec_bandwidth": bw, "rows": rows}
    stem = write_results(os.environ.get("OUT", RESULTS_DIR), f"decode_step_{device.platform}", out)
    print("wrote", stem + ".json")


if __name__ == "__main__":
    main()
