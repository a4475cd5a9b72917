"""Host memory of loading a ~1B-parameter Hugging Face checkpoint: shardlm against HF transformers.

    python benchmarks/load_memory.py            # writes the synthetic checkpoint to /tmp once (~2.2 GB)

A TinyLlama-1.1B-shaped checkpoint (D 2048, 22 layers, 32 heads, 4 KV heads, F 5632, V 32000, untied,
1.1e9 parameters) with random bf16 weights is written as 5 safetensors shards with an index. Each
load runs in a fresh subprocess that samples its own /proc/self/status every 5 ms (VmRSS, RssAnon,
RssFile) and reports the peaks, the kernel's VmHWM, the RSS before the load (Python + JAX/torch
imported) and the bytes of the arrays it ends up holding:

- shardlm HF import onto 1 device, and onto 8 virtual CPU devices in 2D weight-stationary (x=2,y=2,z=2),
  bf16 (`LLM.load`: each device slice read with positioned reads straight into its shard);
- `shardlm convert` of the same folder to a shardlm (Orbax) checkpoint, and restoring that onto 1 device
  (`LLM.load` of the checkpoint);
- reference: HF transformers `LlamaForCausalLM.from_pretrained(folder, dtype=bfloat16)` on the same files,
  as returned (its tensors map the files lazily: nothing is read yet), and after reading every weight once
  (as a first forward would).

RssFile counts the safetensors file pages a process has mapped and touched (page cache the kernel can
drop); RssAnon is the process's own memory. The figure to judge is peak RSS minus the RSS before the
load, against the checkpoint size. Load throughput is compared with a plain sequential read of the same
files timed in the same run (files in the page cache: they were just written or read).

Writes benchmarks/results/load_memory.json and load_memory.txt.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import threading
import time

from common import RESULTS_DIR, Log, Others, machine, source_state, write_results

SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
log = Log()


# ----- the synthetic checkpoint -----

def hf_tensors():
    """(name, shape) of every tensor of a Llama checkpoint with SHAPE, in HF's order."""
    D, F, V, L = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"], SHAPE["num_hidden_layers"]
    H = D // SHAPE["num_attention_heads"]
    NH, KH = SHAPE["num_attention_heads"] * H, SHAPE["num_key_value_heads"] * H
    yield "model.embed_tokens.weight", (V, D)
    for i in range(L):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (D,)
        yield p + "self_attn.q_proj.weight", (NH, D)
        yield p + "self_attn.k_proj.weight", (KH, D)
        yield p + "self_attn.v_proj.weight", (KH, D)
        yield p + "self_attn.o_proj.weight", (D, NH)
        yield p + "post_attention_layernorm.weight", (D,)
        yield p + "mlp.gate_proj.weight", (F, D)
        yield p + "mlp.up_proj.weight", (F, D)
        yield p + "mlp.down_proj.weight", (D, F)
    yield "model.norm.weight", (D,)
    yield "lm_head.weight", (V, D)


def write_checkpoint(folder: str, shard_bytes: int = 500 * 2**20) -> None:
    """Random bf16 weights in shards of about shard_bytes, written one shard at a time."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    if os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
        return
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    shards, current, size = [], {}, 0
    for name, shape in hf_tensors():
        if current and size + 2 * int(np.prod(shape)) > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = shape
        size += 2 * int(np.prod(shape))
    shards.append(current)
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
                   for n, s in shard.items()}
        save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
        del tensors
    total = sum(os.path.getsize(os.path.join(folder, f)) for f in set(weight_map.values()))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config = dict(SHAPE, model_type="llama", architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="bfloat16", hidden_act="silu")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)


# ----- one load, in a child process -----

def _status_kib() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


class PeakSampler:
    def __init__(self, every_s: float = 0.005):
        self.peak = _status_kib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s):
        while not self._stop.is_set():
            now = _status_kib()
            self.peak = {k: max(v, now.get(k, 0)) for k, v in self.peak.items()}
            time.sleep(every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def child(mode: str, src: str, dst: str) -> dict:
    if mode in ("hf_transformers", "hf_transformers_read"):
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count())

        def load():
            model = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
            if mode == "hf_transformers_read":  # every weight read once, as a first forward would
                for p in model.parameters():
                    p.detach().view(torch.int16).max()
            return model
        held = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
    else:
        import jax

        from shardlm.checkpoints import convert
        from shardlm.engine import LLM

        def held(llm):
            return sum(s.data.nbytes for a in jax.tree.leaves(llm.params) for s in a.addressable_shards)

        if mode == "shardlm_1dev":
            load = lambda: LLM.load(src, dtype="bfloat16")
        elif mode == "shardlm_8dev_2d":
            assert jax.device_count() == 8
            load = lambda: LLM.load(src, dtype="bfloat16", mesh_shape={"x": 2, "y": 2, "z": 2},
                                    layout="2d_weight_stationary")
        elif mode == "convert":
            load = lambda: convert.convert(src, dst, dtype="bf16", force=True)
            held = lambda _: 0
        elif mode == "restore_1dev":
            load = lambda: LLM.load(dst, dtype=None)
        else:
            raise ValueError(mode)
    before = _status_kib()
    with PeakSampler() as sampler:
        t0 = time.perf_counter()
        result = load()
        seconds = time.perf_counter() - t0
    after = _status_kib()
    return {"mode": mode, "seconds": seconds, "held_bytes": held(result), "before_kib": before,
            "peak_kib": sampler.peak, "after_kib": after}


def run_child(mode: str, src: str, dst: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if mode == "shardlm_8dev_2d":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--src", src, "--dst", dst], env=env,
                         capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def sequential_read(files: list[str], block: int = 16 * 2**20) -> float:
    """Seconds to read the files once with plain reads (the ceiling a loader could reach)."""
    t0 = time.perf_counter()
    buf = bytearray(block)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/shardlm_load_memory", help="where the synthetic checkpoint goes")
    ap.add_argument("--out-dir", default=RESULTS_DIR)
    ap.add_argument("--modes", nargs="+", default=["shardlm_1dev", "shardlm_8dev_2d", "hf_transformers", "hf_transformers_read", "convert",
                                                   "restore_1dev"])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--src", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dst", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.src, args.dst)))
        return {}

    OTHERS = Others(children=True)  # each load runs in a child process

    src, dst = os.path.join(args.dir, "hf"), os.path.join(args.dir, "shardlm")
    started = datetime.datetime.now(datetime.timezone.utc)
    res = {"benchmark": "load_memory", "date": started.isoformat(timespec="seconds"), "machine": machine(),
           "source": source_state(), "shape": SHAPE}
    log(f"load_memory  {res['date']}  {res['machine']['cpu']}, {res['machine']['cores']} cores, "
        f"jax {res['machine']['jax']}, torch {res['machine']['torch']}")
    log(f"shardlm at {(res['source']['commit'] or 'unknown')[:10]}"
        + (f" with {len(res['source']['modified'])} files modified or untracked" if res["source"]["modified"] else ""))
    write_checkpoint(src)
    files = sorted(os.path.join(src, f) for f in os.listdir(src) if f.endswith(".safetensors"))
    ckpt_bytes = sum(os.path.getsize(f) for f in files)
    n_params = sum(math.prod(s) for _, s in hf_tensors())
    res.update(checkpoint_bytes=ckpt_bytes, n_params=n_params, shards=len(files))
    log(f"checkpoint: {n_params / 1e9:.3f} B parameters, bf16, {len(files)} safetensors shards, "
        f"{ckpt_bytes / 2**30:.2f} GiB ({src})")
    OTHERS.begin("sequential read")
    read_s = min(sequential_read(files) for _ in range(2))
    OTHERS.end()
    res["sequential_read_s"] = read_s
    log(f"plain sequential read of the files (page cache): {read_s:.2f} s = {ckpt_bytes / read_s / 1e9:.2f} GB/s")
    log()
    log(f"{'load':18} {'seconds':>8} {'GB/s':>6} {'of read':>8} {'held GiB':>9} {'peak-before GiB':>16} "
        f"{'x ckpt':>7} {'peak anon GiB':>14} {'peak file GiB':>14} {'others':>7}")
    res["runs"] = {}
    for mode in args.modes:
        OTHERS.begin(mode)
        r = run_child(mode, src, dst)
        OTHERS.end()
        r["others_cpu_share"] = OTHERS.sections[mode]
        gib = lambda kib: kib * 1024 / 2**30  # noqa: E731
        growth = r["peak_kib"]["VmRSS"] - r["before_kib"]["VmRSS"]
        r["peak_minus_before_bytes"] = growth * 1024
        r["peak_growth_over_checkpoint"] = growth * 1024 / ckpt_bytes
        r["throughput_GBps"] = ckpt_bytes / r["seconds"] / 1e9
        r["fraction_of_sequential_read"] = read_s / r["seconds"]
        res["runs"][mode] = r
        log(f"{mode:18} {r['seconds']:8.2f} {r['throughput_GBps']:6.2f} {r['fraction_of_sequential_read']:8.0%} "
            f"{r['held_bytes'] / 2**30:9.2f} {gib(growth):16.2f} {r['peak_growth_over_checkpoint']:7.2f} "
            f"{gib(r['peak_kib']['RssAnon'] - r['before_kib']['RssAnon']):14.2f} "
            f"{gib(r['peak_kib']['RssFile'] - r['before_kib']['RssFile']):14.2f} {r['others_cpu_share']:7.0%}")
    log()
    log("peak-before: peak VmRSS during the load minus VmRSS after imports, sampled every 5 ms; x ckpt: that over "
        "the checkpoint's bytes. anon/file: growth of RssAnon (own memory) and RssFile (mapped file pages, "
        "droppable page cache). others: CPU share other processes on the machine took during the run "
        "(the machine was shared). held: bytes of the arrays the process holds at the end (convert: none).")
    res["wall_s"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    write_results(args.out_dir, "load_memory", res, log.lines)
    return res


if __name__ == "__main__":
    main()
