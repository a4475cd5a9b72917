"""Where a wide paged decode step goes on XLA:CPU: the pieces of the step timed alone.

    python benchmarks/decode_parts_cpu.py      # about a minute

SmolLM2-135M's shapes (K=3 kv heads, G=3 query heads per kv head, H=64, D=576, F=1536), 30 layers
unrolled in one jitted function, float32, one CPU device, random values:
- attention: `paged_attention` of one decode token per row over 200 live tokens in pages of 16,
  at 1, 8 and 64 rows;
- page gather: the keys of 64 rows x 16 pages gathered into one block (materialized), beside a sum
  over a block of the same bytes, and a fori_loop of dynamic slices copying the same pages;
- projections: [B, 576] x [576, 1536] matmuls at B = 1, 8, 32, 64, as weight bytes read per second.
Each figure is the mean of 10 calls after one warm-up. Writes benchmarks/results/decode_parts_cpu.json
and .txt.
"""

from __future__ import annotations

import datetime
import time

import jax
import jax.numpy as jnp
import numpy as np

from shardlm.models.paged_attention import paged_attention

from common import RESULTS_DIR, machine, write_results

LAYERS, NUM_PAGES, P, K, G, H = 30, 1024, 16, 3, 3, 64


def mean_ms(f, *args, reps: int = 10) -> float:
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(f(*args))
    return (time.perf_counter() - t) / reps * 1e3


def main():
    rng = np.random.default_rng(0)
    pages = [jnp.asarray(rng.standard_normal((NUM_PAGES, P, K, H), np.float32)) for _ in range(2)]
    out, lines = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "machine": machine(), "attention_ms": {}, "matmul": {}}, []

    attend = jax.jit(lambda q, k, v, t, n: sum(paged_attention(q + i, k, v, t, n).sum() for i in range(LAYERS)))
    for rows in (1, 8, 64):
        tables = jnp.asarray(rng.integers(0, NUM_PAGES, (rows, 512)), jnp.int32)
        q = jnp.asarray(rng.standard_normal((rows, 1, K * G, H), np.float32))
        ms = mean_ms(attend, q, *pages, tables, jnp.full((rows,), 200, jnp.int32))
        out["attention_ms"][rows] = ms
        lines.append(f"paged attention, {rows} rows x 200 live tokens, {LAYERS} layers: {ms:.1f} ms")

    ids = jnp.asarray(rng.integers(0, NUM_PAGES, (64, 16)), jnp.int32).reshape(-1)
    block_bytes = ids.shape[0] * P * K * H * 4

    def loop_gather(k, ids):
        buf = jnp.zeros((ids.shape[0], P, K, H), k.dtype)
        copy = lambda j, b: jax.lax.dynamic_update_index_in_dim(b, jax.lax.dynamic_index_in_dim(k, ids[j], 0, False), j, 0)  # noqa: E731
        return jax.lax.fori_loop(0, ids.shape[0], copy, buf)

    barrier = jax.lax.optimization_barrier
    gather = jax.jit(lambda k, ids: sum(barrier(k[ids + i]).sum() for i in range(LAYERS)))
    looped = jax.jit(lambda k, ids: sum(barrier(loop_gather(k, ids + i)).sum() for i in range(LAYERS)))
    summed = jax.jit(lambda x: sum((x + i).sum() for i in range(LAYERS)))
    out["gather_ms"] = mean_ms(gather, pages[0], ids)
    out["loop_gather_ms"] = mean_ms(looped, pages[0], ids)
    out["sum_same_bytes_ms"] = mean_ms(summed, pages[0][ids])
    lines += [f"gather of 64 rows x 16 pages ({block_bytes / 2**20:.1f} MiB) then sum, {LAYERS} layers: "
              f"{out['gather_ms']:.1f} ms ({LAYERS * block_bytes / out['gather_ms'] / 1e6:.1f} GB/s)",
              f"  the same pages by a fori_loop of dynamic slices: {out['loop_gather_ms']:.1f} ms",
              f"  a sum over a block of the same bytes: {out['sum_same_bytes_ms']:.1f} ms"]

    w = [jnp.asarray(rng.standard_normal((576, 1536), np.float32)) for _ in range(LAYERS)]
    project = jax.jit(lambda x, ws: sum((x @ m).sum() for m in ws))
    for B in (1, 8, 32, 64):
        ms = mean_ms(project, jnp.ones((B, 576), jnp.float32), w)
        gbs = LAYERS * w[0].nbytes / ms / 1e6
        out["matmul"][B] = {"ms": ms, "weight_gb_s": gbs}
        lines.append(f"{LAYERS} x [{B}, 576] x [576, 1536]: {ms:.2f} ms, {gbs:.1f} GB/s of weights")

    print("\n".join(lines))
    write_results(RESULTS_DIR, "decode_parts_cpu", out, lines)


if __name__ == "__main__":
    main()
