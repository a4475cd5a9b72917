"""Decode with int8 weights and an int8 KV cache on CPU, against float32 and bfloat16, same run.

    python benchmarks/quantization_cpu.py            # both models, batch 1 and 8
    python benchmarks/quantization_cpu.py --quick    # fewer steps

For the embedded SmolLM2-135M-Instruct (GGUF, dequantized to float32, then cast or quantized) and a
TinyLlama-1.1B shape with random weights, at batch 1 and 8, four variants on one device:
float32, bfloat16, int8 weights (float32 activations and scales), int8 weights + int8 KV cache.
Decode steps are timed one by one after the prompts are inserted (`common.steady_decode`, as in
benchmarks/decode_cpu.py: compilation excluded, the host reads every step's tokens).

MBU = bytes a step reads (every parameter once, scales included, plus the KV cache it attends over:
all S slots) / mean step time / the median bandwidth of a float32 [8192, 8192] matrix-vector product
sampled around and during the same decode. The share of CPU time other processes took during each
row is recorded next to it (`common.Others`): this machine is shared.

Writes benchmarks/results/quantization_cpu.json and quantization_cpu.txt.
"""

from __future__ import annotations

import argparse
import datetime
import gc

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shardlm.checkpoints import loader
from shardlm.engine import Engine
from shardlm.models import quant
from shardlm.models.config import preset
from shardlm.models.llama import Llama

from common import (
    RESULTS_DIR,
    Log,
    Others,
    cache_nbytes,
    machine,
    params_nbytes,
    source_state,
    steady_decode,
    write_results,
)

VARIANTS = ["float32", "bfloat16", "int8", "int8+kv8"]
log = Log()


def cast(model, dtype):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a.astype(dtype), state))


def variant_model(f32_model, name):
    if name == "float32":
        return f32_model, None
    if name == "bfloat16":
        return cast(f32_model, jnp.bfloat16), None
    return quant.quantize_model(f32_model, "int8"), (jnp.int8 if name == "int8+kv8" else None)


def kv_read_bytes(engine: Engine) -> int:
    """Bytes of the decode cache a step attends over (all S slots of every row, scales included)."""
    return cache_nbytes(engine.init_decode_state())


def run_model(label, f32_model, batches, steps, prompt_len, max_seq_len, others):
    cfg = f32_model.cfg
    rng = np.random.default_rng(0)
    rows = []
    for B in batches:
        prompts = [rng.integers(0, cfg.vocab_size, prompt_len).tolist() for _ in range(B)]
        for name in VARIANTS:
            model, cache_dtype = variant_model(f32_model, name)
            engine = Engine(model, batch_size=B, max_seq_len=max_seq_len, cache_dtype=cache_dtype)
            section = f"{label} B={B} {name}"
            others.begin(section)
            d = steady_decode(engine, engine.params, prompts, steps)
            others.end()
            weight_bytes, kv_bytes = params_nbytes(engine.params), kv_read_bytes(engine)
            mbu = (weight_bytes + kv_bytes) / d["mean_step_s"] / d["bandwidth"]
            row = {"model": label, "batch": B, "variant": name, "tok_s": d["tok_s"], "step_ms": d["mean_step_s"] * 1e3,
                   "median_step_ms": d["median_step_s"] * 1e3, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
                   "bandwidth_gbs": d["bandwidth"] / 1e9, "mbu": mbu, "others_cpu": others.sections[section]}
            rows.append(row)
            log(f"{label:10} B={B} {name:9} {row['tok_s']:8.1f} tok/s {row['step_ms']:8.1f} ms/step  "
                f"weights {weight_bytes / 2**20:7.1f} MiB  KV {kv_bytes / 2**20:6.1f} MiB  "
                f"bw {row['bandwidth_gbs']:5.1f} GB/s  MBU {mbu:5.0%}  others {row['others_cpu']:4.0%}")
            del engine, model
            gc.collect()
            jax.clear_caches()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out-dir", default=RESULTS_DIR)
    args = p.parse_args(argv)
    steps = 8 if args.quick else 16
    others = Others()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    log(f"quantization_cpu: decode tok/s and MBU, one device, jax {jax.__version__}, {started}")
    log("variants: float32; bfloat16; int8 weights (f32 activations); int8 weights + int8 KV cache")

    smol = loader.load().model
    rows = run_model("SmolLM2", smol, [1, 8], steps, prompt_len=64, max_seq_len=256, others=others)
    del smol
    gc.collect()
    tiny = Llama(preset("tinyllama-1.1b"), dtype=jnp.float32, rngs=nnx.Rngs(0))
    rows += run_model("TinyLlama", tiny, [1, 8], max(4, steps // 2), prompt_len=64, max_seq_len=256, others=others)
    del tiny

    log()
    log("ratios to float32 (tok/s):")
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["batch"] == r["batch"] and b["variant"] == "float32")
        r["speed_vs_f32"] = r["tok_s"] / base["tok_s"]
        r["bytes_vs_f32"] = (r["weight_bytes"] + r["kv_bytes"]) / (base["weight_bytes"] + base["kv_bytes"])
        log(f"  {r['model']:10} B={r['batch']} {r['variant']:9} speed x{r['speed_vs_f32']:.2f}  "
            f"bytes read x{r['bytes_vs_f32']:.2f}")
    result = {"benchmark": "quantization_cpu", "started": started, "steps": steps, "rows": rows,
              "machine": machine(), "source": source_state()}
    write_results(args.out_dir, "quantization_cpu", result, log.lines)
    return result


if __name__ == "__main__":
    main()
