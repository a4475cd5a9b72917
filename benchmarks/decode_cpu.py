"""Decode and prefill on CPU, float32: shardlm with its defaults against HF transformers `generate`
(and llama.cpp where llama-cpp-python is installed), same run.

    python benchmarks/decode_cpu.py            # full run (about 15 minutes on a quiet 2-core machine)
    python benchmarks/decode_cpu.py --quick    # fewer tokens and repetitions

Two models, each side by side with HF transformers on the same weights and the same prompts:

- the embedded SmolLM2-135M-Instruct (GGUF, dequantized to float32 by every side), batch 1 and 8,
  on `LLM.load()` with no flag (the paged engine, its pool and limits sized from memory: what a user
  gets), one LLM for both batch sizes;
- a TinyLlama-1.1B shape (D 2048, 22 layers, 32 heads, 4 KV heads, F 5632, V 32000) with random
  weights (independently drawn on each side; the cost of a step does not depend on the values), batch 1,
  on the dense Engine(batch_size=1, max_seq_len=256): the paged default would size its pool from a
  tenth of the host's available memory, less than this model's 4.4 GB of float32 weights here.

Every row decodes `new_tokens` tokens after a `prompt_len`-token prompt of random token ids (stop
tokens ignored on every side, so each generates exactly that many). The first new token comes out
of prefill; the other new_tokens - 1 come out of decode steps, and decode tokens/s counts those.

- shardlm (SmolLM2), end to end: the whole `LLM.generate(prompts, SamplingParams(max_new_tokens,
  ignore_eos=True))` call (prefill steps, decode steps, the scheduler), after a warm-up call on the
  same prompts (compilation excluded). Its decode steps: the intervals between `on_step` calls of
  the decode steps that ran every sequence, inside that same call (the step, the scheduler's host
  work and the host reading the tokens). Prefill: `LLM.generate` of one prompt with
  max_new_tokens=1, timed whole.
- shardlm (TinyLlama, dense Engine): `Engine.generate` steps timed one by one after the prompt is
  inserted, after warm-up steps on a separate state; the host reads the tokens of every step.
- max_seq_len: the decode step at about --live live tokens of engines built with max_seq_len 512
  and 8192 on the same SmolLM2 weights, paged (PagedEngine(model, max_seq_len=S, max_num_seqs=8,
  num_pages=256): one pool size, so only max_seq_len differs;
  engine.decode timed directly on a PagePool) and dense (Engine(model, batch_size=B, max_seq_len=S)),
  batch 1 and 8: a paged step should not grow with max_seq_len, a dense one does.
- llama.cpp (optional; `pip install llama-cpp-python`, not a shardlm dependency): batch 1 on the same
  weights dequantized to float32 and written as an F32 GGUF by the `gguf` package; `Llama.generate`
  greedy, timestamped per token, all cores.
- HF decode: `model.generate(greedy, min_new_tokens = max_new_tokens)` after a warm-up `generate` at
  the same batch and prompt length, minus the prefill time of the same batch (one forward over the
  prompt with logits_to_keep=1, which is what `generate` runs first), timed separately. A stopping
  criterion that timestamps every token gives a second, direct figure (first to last token).
- Rounds: the sides are timed back to back, shardlm then HF (then llama.cpp), in --rounds interleaved rounds
  (SmolLM2, default 3; TinyLlama --tiny-rounds, default 2), so slow drift of the machine hits both
  alike; the report gives medians over rounds, and ratios are medians of per-round ratios.
- Rooflines, timed in this run: memory bandwidth from a jitted [8192, 8192] float32 matrix-vector
  product (and torch.mv on the same matrix), float32 matmul peak from a [2048]^3 product, at the start
  and at the end. Decode MBU = parameter bytes (each weight is read once per step) / mean step time /
  the median bandwidth of the same JAX matrix-vector product sampled before, every 16 steps of
  (outside the timed steps; for HF inside a stopping criterion, its time subtracted), and after that
  decode: this machine's bandwidth jumps between ~35 and ~55 GB/s for tens of seconds at a time, so a
  figure from minutes earlier is no reference. The MBU against the best bandwidth of the whole run is
  printed below it. Prefill MFU = model FLOPs (2 * tokens * layer parameters, causal attention, one
  logits row) / prefill time / the best JAX matmul rate of the run.
- Other processes: on a 2-core machine anything else running ruins the figures (torch's OpenMP
  barriers stall when one of its two threads is descheduled). Before each timed section the script
  waits for a quiet machine; it records the CPU share other processes took during the section and
  reruns a section in which they took more than --max-others. The report prints these shares.

Writes benchmarks/results/decode_cpu.json (all figures, machine, versions, date) and decode_cpu.txt
(the printed report); `--out-dir` changes where.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from shardlm.checkpoints.loader import embedded_model_path  # noqa: E402
from shardlm.engine import LLM, Engine, PagedEngine, SamplingParams  # noqa: E402
from shardlm.models.config import ModelConfig, preset  # noqa: E402
from shardlm.models.llama import Llama  # noqa: E402

from common import (  # noqa: E402
    BW_SAMPLE_EVERY,
    OTHERS,
    RESULTS_DIR,
    Log,
    kv_bytes_per_step,
    local_bandwidth,
    machine,
    median,
    paged_decode_at,
    params_nbytes,
    source_state,
    steady_decode,
    time_prefill,
    wait_until_quiet,
    write_results,
)

log = Log()


# ----- rooflines -----

def rooflines(rows: int = 8192, cols: int = 8192, reps: int = 20) -> dict:
    """Memory bandwidth (matrix-vector product) and float32 matmul rate, JAX and torch."""
    rng = np.random.default_rng(0)
    a_host = rng.standard_normal((rows, cols), dtype=np.float32)
    x_host = rng.standard_normal((cols,), dtype=np.float32)
    nbytes = a_host.nbytes + x_host.nbytes + rows * 4

    a, x = jnp.asarray(a_host), jnp.asarray(x_host)
    matvec = jax.jit(lambda a, x: a @ x)
    for _ in range(3):
        matvec(a, x).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        matvec(a, x).block_until_ready()
        times.append(time.perf_counter() - t0)
    jax_bw = {"best": nbytes / min(times), "median": nbytes / median(times)}
    del a

    at, xt = torch.from_numpy(a_host), torch.from_numpy(x_host)
    for _ in range(3):
        torch.mv(at, xt)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mv(at, xt)
        times.append(time.perf_counter() - t0)
    torch_bw = {"best": nbytes / min(times), "median": nbytes / median(times)}
    del at, xt, a_host

    n = 2048
    flops = 2 * n**3
    m_host = rng.standard_normal((n, n), dtype=np.float32)
    m = jnp.asarray(m_host)
    matmul = jax.jit(lambda a, b: a @ b)
    for _ in range(2):
        matmul(m, m).block_until_ready()
    times = []
    for _ in range(max(3, reps // 4)):
        t0 = time.perf_counter()
        matmul(m, m).block_until_ready()
        times.append(time.perf_counter() - t0)
    jax_flops = flops / min(times)
    mt = torch.from_numpy(m_host)
    for _ in range(2):
        torch.mm(mt, mt)
    times = []
    for _ in range(max(3, reps // 4)):
        t0 = time.perf_counter()
        torch.mm(mt, mt)
        times.append(time.perf_counter() - t0)
    torch_flops = flops / min(times)
    return {"matvec_shape": [rows, cols], "matvec_bytes": nbytes, "jax_matvec_bw": jax_bw,
            "torch_mv_bw": torch_bw, "matmul_n": n, "jax_matmul_flops": jax_flops, "torch_mm_flops": torch_flops}


# ----- model arithmetic -----

def layer_params(cfg: ModelConfig) -> int:
    """Parameters of the transformer layers (what every token multiplies), without embedding/head."""
    return cfg.n_params - cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2) - cfg.d_model


def prefill_flops(cfg: ModelConfig, T: int, B: int = 1) -> float:
    """Model FLOPs of a T-token prefill: weight products, causal attention, one row of logits."""
    matmul = 2 * T * layer_params(cfg)
    attention = 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T * T  # QK^T and PV, causal half
    logits = 2 * cfg.d_model * cfg.vocab_size
    return B * (matmul + attention + logits)


# ----- shardlm side -----

def dense_prefill(engine: Engine, params, prompt, reps: int) -> dict:
    p, prefix = time_prefill(engine, params, prompt, reps)
    return {"median_s": p["median_s"], "best_s": p["best_s"], "logits": np.asarray(prefix.logits)}


def paged_prefill(llm: LLM, prompt: list[int], reps: int) -> dict:
    """One prompt through `LLM.generate` with max_new_tokens=1 (its prefill step and the first
    token: the whole call), timed `reps` times after two untimed calls; the prefill logits of the
    same prompt from `engine.prompt_logits` (untimed) for the comparison with HF."""
    sampling = SamplingParams(max_new_tokens=1, ignore_eos=True)
    for _ in range(2):
        llm.generate([prompt], sampling)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = llm.generate([prompt], sampling)
        times.append(time.perf_counter() - t0)
    assert len(out[0].token_ids) == 1
    return {"median_s": median(times), "best_s": min(times), "times_s": times,
            "logits": np.asarray(llm.engine.prompt_logits(llm.params, prompt))}


def paged_generate(llm: LLM, prompts, new_tokens: int, bw_every: int = BW_SAMPLE_EVERY) -> dict:
    """`LLM.generate` of `prompts` (stop tokens ignored), the whole call timed, after an untimed
    warm-up call of 3 new tokens on the same prompts (the same prefill and decode buckets).

    on_step timestamps every step that makes tokens; the engine's prefill and decode methods are
    wrapped to note which kind each step was (a list append; no timing, no blocking), so a decode
    step's time is the interval from the previous step's on_step to its own: the engine step, the
    scheduler's host work and the host reading the tokens, as generate runs them. Every `bw_every`
    decode steps on_step samples the matvec bandwidth; that time is left out of the timestamps and of
    the total. The steady-state decode figure uses the decode steps that ran all len(prompts)
    sequences (at batch 8 the first 4 prompts decode between the two 512-token prefill steps)."""
    engine, B = llm.engine, len(prompts)
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts, SamplingParams(max_new_tokens=3, ignore_eos=True))  # warm-up
    compiled_before = dict(engine.compiled_count())
    kinds: list[str] = []
    stamps: list[tuple[str, int, float]] = []
    state = {"paused": 0.0, "decodes": 0}
    bandwidth = [local_bandwidth()]

    def wrap(kind):
        inner = getattr(engine, kind)

        def step(*a, **k):
            kinds.append(kind)
            return inner(*a, **k)
        return step

    def on_step(n: int) -> None:
        now = time.perf_counter()
        stamps.append((kinds[-1], n, now - state["paused"]))
        if kinds[-1] == "decode":
            state["decodes"] += 1
            if state["decodes"] % bw_every == 0:
                bandwidth.append(local_bandwidth())
                state["paused"] += time.perf_counter() - now

    engine.prefill, engine.decode = wrap("prefill"), wrap("decode")
    try:
        t0 = time.perf_counter()
        out = llm.generate(prompts, sampling, on_step=on_step)
        total = time.perf_counter() - t0 - state["paused"]
    finally:
        del engine.prefill, engine.decode
    bandwidth.append(local_bandwidth())
    n = sum(len(c.token_ids) for c in out)
    assert n == B * new_tokens, f"generated {n} tokens, expected {B * new_tokens}"
    prev, steps = t0, []
    for kind, k, t in stamps:
        steps.append((kind, k, t - prev))
        prev = t
    full = [s for kind, k, s in steps if kind == "decode" and k == B]
    dec_total = sum(full)
    decode = {"steps": len(full), "total_s": dec_total, "mean_step_s": dec_total / len(full),
              "median_step_s": median(full), "tok_s": B * len(full) / dec_total,
              "median_step_tok_s": B / median(full), "bandwidth": median(bandwidth),
              "bandwidth_samples": bandwidth, "source": "on_step timestamps inside LLM.generate"}
    prefill_steps = [s for kind, _, s in steps if kind == "prefill"]
    return {"total_s": total, "tok_s": n / total, "token_ids": [c.token_ids for c in out], "decode": decode,
            "prefill_steps": len(prefill_steps), "prefill_steps_s": sum(prefill_steps),
            "decode_steps": sum(kind == "decode" for kind, _, _ in steps),
            "recompiled": {k: engine.compiled_count()[k] - compiled_before[k] for k in compiled_before}}


# ----- HF side -----

class _Stamps(transformers.StoppingCriteria):
    """Timestamps every generated token (called once per token, never stops generation), and every
    BW_SAMPLE_EVERY tokens times the bandwidth matvec; `times` and `paused` leave that time out."""

    def __init__(self):
        self.times: list[float] = []
        self.paused = 0.0
        self.bandwidth: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        now = time.perf_counter()
        self.times.append(now - self.paused)
        if len(self.times) % BW_SAMPLE_EVERY == 0:
            self.bandwidth.append(local_bandwidth())
            self.paused += time.perf_counter() - now
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def hf_prefill(model, prompts: np.ndarray, reps: int) -> dict:
    ids = torch.from_numpy(prompts.astype(np.int64))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        for _ in range(2):
            model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
    return {"median_s": median(times), "best_s": min(times), "logits": out.logits[:, -1].float().numpy()}


def hf_generate(model, prompts: np.ndarray, new_tokens: int, prefill_s: float, pad_id: int) -> dict:
    ids = torch.from_numpy(prompts.astype(np.int64))
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=pad_id)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up, same batch and prompt length
    stamps = _Stamps()
    bw_before = local_bandwidth()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         stopping_criteria=transformers.StoppingCriteriaList([stamps]), **kw)
    total = time.perf_counter() - t0 - stamps.paused  # without the bandwidth samples
    bw = [bw_before] + stamps.bandwidth + [local_bandwidth()]
    B, P = prompts.shape
    generated = out[:, P:]
    assert generated.shape == (B, new_tokens), f"HF generated {tuple(generated.shape)}, expected {(B, new_tokens)}"
    steps = new_tokens - 1
    decode_s = total - prefill_s
    stamped_s = stamps.times[-1] - stamps.times[0]
    intervals = np.diff(stamps.times)  # one per decode step
    return {"total_s": total, "end_to_end_tok_s": B * new_tokens / total,
            "decode_s": decode_s, "tok_s": B * steps / decode_s, "mean_step_s": decode_s / steps,
            "stamped_decode_s": stamped_s, "stamped_tok_s": B * steps / stamped_s,
            "median_step_s": median(intervals), "median_step_tok_s": B / median(intervals),
            "bandwidth": median(bw), "bandwidth_samples": bw,
            "token_ids": generated.numpy().tolist()}


# ----- llama.cpp side (optional: llama-cpp-python, not a shardlm dependency) -----

def gguf_to_f32(src: str, dst: str) -> str:
    """Write `src` (a GGUF, any tensor types) as a GGUF with every tensor dequantized to float32 by the
    `gguf` package (the dequantization shardlm's loader uses too), metadata copied; file type F32."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type",
                                              "general.quantization_version"):
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, np.ascontiguousarray(data.reshape(tuple(int(d) for d in reversed(t.shape)))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def llamacpp_setup(gguf_path: str, args) -> dict:
    """A llama.cpp model on the F32 conversion of `gguf_path`, or why there is none."""
    try:
        import llama_cpp
    except ImportError:
        return {"available": False, "reason": "llama-cpp-python is not installed (pip install llama-cpp-python)"}
    dst = os.path.join(args.llamacpp_dir, "SmolLM2-135M-Instruct.F32.gguf")
    t0 = time.perf_counter()
    if not os.path.exists(dst):
        os.makedirs(args.llamacpp_dir, exist_ok=True)
        gguf_to_f32(gguf_path, dst + ".partial")
        os.replace(dst + ".partial", dst)
    convert_s = time.perf_counter() - t0
    threads = os.cpu_count()
    model = llama_cpp.Llama(model_path=dst, n_ctx=max(512, args.prompt_len + args.new_tokens), n_batch=512,
                            n_threads=threads, n_threads_batch=threads, verbose=False)
    return {"available": True, "version": llama_cpp.__version__, "gguf_f32": dst, "gguf_f32_bytes": os.path.getsize(dst),
            "convert_s": convert_s, "n_threads": threads, "model": model}


def llamacpp_generate(model, prompt: list[int], new_tokens: int) -> dict:
    """llama-cpp-python's `Llama.generate` (greedy, temp 0) of `new_tokens` tokens after a `reset`
    (no prefix reuse between calls), timestamped per token; after an untimed 4-token warm-up."""
    def run(n):
        model.reset()
        stamps, tokens = [], []
        t0 = time.perf_counter()
        for tok in model.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            tokens.append(int(tok))
            if len(tokens) == n:
                break
        return t0, stamps, tokens

    run(4)
    t0, stamps, tokens = run(new_tokens)
    total = stamps[-1] - t0
    steps = new_tokens - 1
    decode_s = stamps[-1] - stamps[0]
    intervals = np.diff(stamps)
    return {"total_s": total, "end_to_end_tok_s": new_tokens / total, "prefill_s": stamps[0] - t0,
            "decode_s": decode_s, "tok_s": steps / decode_s, "mean_step_s": decode_s / steps,
            "median_step_s": median(intervals), "token_ids": tokens}


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ----- benchmarks -----

def measured(name: str, fn, args):
    """Run a timed section; if other processes took more than --max-others of the CPUs meanwhile,
    wait for a quiet machine and run it again (at most --retries times). Returns fn's result."""
    for attempt in range(args.retries + 1):
        wait_until_quiet(args.wait_quiet)
        OTHERS.begin(name)
        result = fn()
        OTHERS.end()
        share = OTHERS.sections[name]
        OTHERS.attempts[name] = attempt + 1
        if share <= args.max_others:
            break
        log(f"  {name}: other processes took {share:.0%} of the CPUs meanwhile"
            + ("; measuring again" if attempt < args.retries else "; giving up (figures below are suspect)"))
    return result


def med_tree(items: list):
    """Median over rounds of every numeric leaf (the rounds are dicts of one shape)."""
    first = items[0]
    if isinstance(first, dict):
        return {k: med_tree([it[k] for it in items]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return median(items)
    return first


def dense_round(engine: Engine, params, rows, N: int, reps: int) -> dict:
    """The dense Engine (TinyLlama): prefill timed alone, decode steps timed one by one."""
    return {"prefill": dense_prefill(engine, params, rows[0], reps), "decode": steady_decode(engine, params, rows, N - 1)}


def paged_round(llm: LLM, rows, N: int, reps: int, prefill: bool) -> dict:
    """The default paged engine through `LLM.generate`: the prefill call (batch 1) and the whole
    generate, whose on_step timestamps give the decode steps."""
    r = {}
    if prefill:
        r["prefill"] = paged_prefill(llm, rows[0], reps)
    e = paged_generate(llm, rows, N)
    r["decode"] = e.pop("decode")
    r["e2e"] = e
    return r


def hf_round(model, prompts: np.ndarray, N: int, reps: int, pad_id: int) -> dict:
    hp = hf_prefill(model, prompts, reps)
    return {"prefill": hp, "generate": hf_generate(model, prompts, N, hp["median_s"], pad_id)}


def interleaved(label: str, B: int, rounds: int, run_jax, run_hf, args, run_cpp=None) -> tuple[list, list, list]:
    """`rounds` rounds of (shardlm, HF[, llama.cpp]), alternating, so slow drift of the machine hits all alike."""
    jr, hr, cr = [], [], []
    for i in range(rounds):
        jr.append(measured(f"{label} shardlm B={B} round {i + 1}", run_jax, args))
        hr.append(measured(f"{label} HF B={B} round {i + 1}", run_hf, args))
        if run_cpp is not None:
            cr.append(measured(f"{label} llama.cpp B={B} round {i + 1}", run_cpp, args))
        e2e = (f"; end to end shardlm {jr[-1]['e2e']['tok_s']:.2f}, HF {hr[-1]['generate']['end_to_end_tok_s']:.2f}"
               if "e2e" in jr[-1] else "")
        cpp = f"; llama.cpp decode {cr[-1]['tok_s']:.2f}" if cr else ""
        log(f"  B={B} round {i + 1}/{rounds}: decode shardlm {jr[-1]['decode']['tok_s']:.2f} tok/s, "
            f"HF {hr[-1]['generate']['tok_s']:.2f} (timestamped {hr[-1]['generate']['stamped_tok_s']:.2f}){e2e}{cpp}")
    return jr, hr, cr


def seq_len_contrast(model, cfg: ModelConfig, args) -> dict:
    """Decode step time at about args.live live tokens, for engines built with max_seq_len 512 and
    8192 on the same model: PagedEngine(model, max_seq_len=S, max_num_seqs=8, num_pages=256) (one
    pool size for both, 8 sequences of 512 tokens), timed by common.paged_decode_at;
    and the dense Engine(model, batch_size=B, max_seq_len=S), timed by common.steady_decode after
    B prompts of live - 8 random tokens are inserted. Rounds alternate 512 and 8192."""
    live, steps, lens = args.live, 16, (512, 8192)
    out: dict = {"live_tokens": live, "steps": steps, "max_seq_lens": list(lens), "rounds": args.seq_rounds,
                 "paged": {}, "dense": {}, "paged_plans": {}}
    # num_pages given (enough for 8 sequences of 512 tokens), the same for both: the comparison is of
    # max_seq_len alone (the page-table width), and does not depend on the host's free memory, from
    # which the default pool is sized (a busy host with 3.3 GiB available left no room for it).
    paged = {S: PagedEngine(model, max_seq_len=S, max_num_seqs=8, num_pages=8 * 512 // 16) for S in lens}
    for S, eng in paged.items():
        out["paged_plans"][S] = eng.plan.describe()
    for B in (1, 8):
        rs = {S: [] for S in lens}
        for i in range(args.seq_rounds):
            for S in lens:
                eng = paged[S]
                rs[S].append(measured(f"paged S={S} B={B} round {i + 1}",
                                      lambda: paged_decode_at(eng, eng.params, B, live, steps), args))
        out["paged"][B] = {S: {"rounds": rs[S], "mean_step_s": median([r["mean_step_s"] for r in rs[S]])} for S in lens}
        out["paged"][B]["ratio"] = median([b["mean_step_s"] / a["mean_step_s"] for a, b in zip(rs[512], rs[8192])])
        log(f"  paged B={B}: {out['paged'][B][512]['mean_step_s'] * 1e3:.1f} ms (S=512), "
            f"{out['paged'][B][8192]['mean_step_s'] * 1e3:.1f} ms (S=8192), {out['paged'][B]['ratio']:.2f}x")
    del paged
    gc.collect()
    rng = np.random.default_rng(5)
    for B in (1, 8):
        rows = rng.integers(0, cfg.vocab_size, (B, live - steps // 2)).tolist()
        dense = {S: Engine(model, batch_size=B, max_seq_len=S) for S in lens}
        rs = {S: [] for S in lens}
        for i in range(args.seq_rounds):
            for S in lens:
                eng = dense[S]
                rs[S].append(measured(f"dense S={S} B={B} round {i + 1}",
                                      lambda: steady_decode(eng, eng.params, rows, steps), args))
        out["dense"][B] = {S: {"rounds": rs[S], "mean_step_s": median([r["mean_step_s"] for r in rs[S]])} for S in lens}
        out["dense"][B]["ratio"] = median([b["mean_step_s"] / a["mean_step_s"] for a, b in zip(rs[512], rs[8192])])
        log(f"  dense B={B}: {out['dense'][B][512]['mean_step_s'] * 1e3:.1f} ms (S=512), "
            f"{out['dense'][B][8192]['mean_step_s'] * 1e3:.1f} ms (S=8192), {out['dense'][B]['ratio']:.2f}x")
        del dense
        gc.collect()
    return out


def smollm2(args) -> tuple[dict, ModelConfig]:
    P, N = args.prompt_len, args.new_tokens
    path = embedded_model_path()
    t0 = time.perf_counter()
    llm = LLM.load()  # shardlm's defaults, no flag: the paged engine, its pool and limits sized from memory
    load_s = time.perf_counter() - t0
    cfg, plan = llm.config, llm.engine.plan
    log(f"  LLM.load() defaults: {plan.describe()}")
    out: dict = {"model": "SmolLM2-135M-Instruct (embedded GGUF, dequantized to float32)", "gguf": path,
                 "engine": "PagedEngine from LLM.load() with no flags", "plan": dataclasses.asdict(plan),
                 "plan_text": plan.describe(), "token_buckets": list(llm.engine.token_buckets),
                 "batch_buckets": list(llm.engine.batch_buckets),
                 "prompt_len": P, "new_tokens": N, "rounds": args.rounds, "batches": {},
                 "kv_len_for_mbu": P + N // 2}  # a paged step reads the live tokens' pages: P + N/2 on average
    out["config"] = cfg.__dict__ | {"rope_scaling": cfg.rope_scaling.__dict__}
    rng = np.random.default_rng(1)
    prompts = {B: rng.integers(0, cfg.vocab_size, (B, P)).astype(np.int32) for B in args.batches}

    t0 = time.perf_counter()
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # its dequantization progress bar
        model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    hf_load_s = time.perf_counter() - t0
    hf_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    pad_id = model.config.eos_token_id if model.config.eos_token_id is not None else 0
    pad_id = pad_id[0] if isinstance(pad_id, list) else pad_id

    cpp = llamacpp_setup(path, args) if not args.skip_llamacpp else {"available": False, "reason": "--skip-llamacpp"}
    out["llamacpp"] = {k: v for k, v in cpp.items() if k != "model"}
    if not cpp["available"]:
        log(f"  llama.cpp: not measured ({cpp['reason']})")

    for B in args.batches:
        rows = [p.tolist() for p in prompts[B]]
        run_cpp = (functools.partial(llamacpp_generate, cpp["model"], rows[0], N)
                   if B == 1 and cpp["available"] else None)
        jr, hr, cr = interleaved(
            "SmolLM2", B, args.rounds,
            functools.partial(paged_round, llm, rows, N, args.reps, prefill=B == 1),
            functools.partial(hf_round, model, prompts[B], N, args.reps, pad_id), args, run_cpp)
        # Same weights, same greedy decoding: the tokens of both sides should agree (first round).
        row = {"greedy_tokens_identical_prefix": [common_prefix(a, b) for a, b in
                                                  zip(jr[0]["e2e"]["token_ids"], hr[0]["generate"]["token_ids"])]}
        if B == 1:
            jl, hl = jr[0]["prefill"]["logits"], hr[0]["prefill"]["logits"][0]
            row["prefill_logits_max_abs_diff"] = float(np.max(np.abs(jl - hl)))
            row["prefill_argmax_equal"] = bool(np.argmax(jl) == np.argmax(hl))
        if cr:
            row["llamacpp_tokens_identical_prefix_vs_hf"] = common_prefix(cr[0]["token_ids"], hr[0]["generate"]["token_ids"][0])
            for r in cr:
                r.pop("token_ids")
            row["llamacpp"] = {"rounds": cr}
        for r in jr:
            r["e2e"].pop("token_ids")
            r.get("prefill", {}).pop("logits", None)
        for r in hr:
            r["generate"].pop("token_ids")
            r["prefill"].pop("logits")
        row["jax"] = {"load_s": load_s, "param_bytes": params_nbytes(llm.params), "rounds": jr}
        row["hf"] = {"load_s": hf_load_s, "param_bytes": hf_bytes, "rounds": hr}
        out["batches"][B] = row
    if cpp.get("model") is not None:
        cpp["model"].close()
    del model, cpp
    gc.collect()
    if not args.skip_seq_len:
        log(f"  decode step at about {args.live} live tokens, engines of max_seq_len 512 and 8192 ...")
        out["seq_len"] = seq_len_contrast(llm.engine.model(), cfg, args)
    del llm
    gc.collect()
    return out, cfg


def tinyllama(args) -> tuple[dict, ModelConfig]:
    P, N, N_hf = args.prompt_len, args.tiny_new_tokens, args.tiny_hf_new_tokens
    cfg = preset("tinyllama-1.1b")
    out: dict = {"model": "TinyLlama-1.1B shape, random weights", "config": cfg.__dict__ | {"rope_scaling": cfg.rope_scaling.__dict__},
                 "prompt_len": P, "new_tokens": N, "hf_new_tokens": N_hf, "rounds": args.tiny_rounds, "batches": {},
                 "engine": f"dense Engine(batch_size=1, max_seq_len={max(256, P + N)})",
                 "kv_len_for_mbu": max(256, P + N)}  # the dense step attends over every slot of its cache
    # Why not the paged default: on CPU plan_pool gives weights + pool 0.1 of the host's available
    # memory, which is less than this model's float32 weights on a 24 GB machine (it would refuse).
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    out["paged_default_room"] = {"memory": avail, "tenth": 0.1 * avail, "weight_bytes": 4 * cfg.n_params}
    prompt = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, P)).astype(np.int32)
    reps = max(2, args.reps // 2)

    t0 = time.perf_counter()
    engine = Engine(Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)), batch_size=1, max_seq_len=max(256, P + N))
    params = engine.params
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=1, eos_token_id=2)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).to(torch.float32).eval()
    hf_init_s = time.perf_counter() - t0
    hf_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())

    jr, hr, _ = interleaved("TinyLlama", 1, args.tiny_rounds,
                            functools.partial(dense_round, engine, params, [prompt[0].tolist()], N, reps),
                            functools.partial(hf_round, hf, prompt, N_hf, reps, pad_id=0), args)
    for r in jr:
        r["prefill"].pop("logits")
    for r in hr:
        r["prefill"].pop("logits")
        r["generate"].pop("token_ids")
    out["batches"][1] = {"jax": {"init_s": init_s, "param_bytes": params_nbytes(params), "rounds": jr},
                         "hf": {"init_s": hf_init_s, "param_bytes": hf_bytes, "rounds": hr}}
    del engine, params, hf
    gc.collect()
    return out, cfg


def derive_round(cfg: ModelConfig, P: int, S: int, B: int, j: dict, h: dict, jpb: int, hpb: int, roof: dict) -> dict:
    """Ratios and utilisations of one round (one shardlm and one HF measurement, back to back)."""
    bw, peak = roof["bandwidth_for_mbu"], roof["flops_for_mfu"]
    # MBU against the median of the matrix-vector bandwidth sampled during the same decode;
    # `*_run_best` against the best bandwidth seen anywhere in the run (more pessimistic).
    jbw, hbw = j["decode"]["bandwidth"], h["generate"]["bandwidth"]
    jstep, hstep = j["decode"]["mean_step_s"], h["generate"]["mean_step_s"]
    x = {"decode_ratio": j["decode"]["tok_s"] / h["generate"]["tok_s"],
         "decode_ratio_vs_stamped": j["decode"]["tok_s"] / h["generate"]["stamped_tok_s"],
         "decode_ratio_median_step": j["decode"]["median_step_tok_s"] / h["generate"]["median_step_tok_s"],
         "jax_bandwidth": jbw, "hf_bandwidth": hbw,
         "jax_mbu": jpb / jstep / jbw,
         "jax_mbu_with_kv": (jpb + kv_bytes_per_step(cfg, B, S)) / jstep / jbw,
         "hf_mbu": hpb / hstep / hbw,
         "jax_mbu_run_best": jpb / jstep / bw,
         "hf_mbu_run_best": hpb / hstep / bw,
         "jax_ideal_step_s": jpb / jbw}
    if "e2e" in j:
        x["end_to_end_ratio"] = j["e2e"]["tok_s"] / h["generate"]["end_to_end_tok_s"]
    if "prefill" in j:
        f = prefill_flops(cfg, P)
        x["prefill_ratio"] = h["prefill"]["median_s"] / j["prefill"]["median_s"]  # > 1: shardlm faster
        x["prefill_flops"] = f
        x["jax_prefill_mfu"] = f / j["prefill"]["median_s"] / peak
        x["hf_prefill_mfu"] = f / h["prefill"]["median_s"] / peak
    return x


def derive(res: dict, cfg: ModelConfig, roof: dict, N: int) -> dict:
    """Per batch: medians over rounds of each round's ratios and utilisations (and the rounds)."""
    P = res["prompt_len"]
    S = res["kv_len_for_mbu"]  # KV tokens a step reads: the paged step its live tokens, the dense one its cache
    d = {}
    for B, row in res["batches"].items():
        j, h = row["jax"], row["hf"]
        xs = [derive_round(cfg, P, S, B, jr, hr, j["param_bytes"], h["param_bytes"], roof)
              for jr, hr in zip(j["rounds"], h["rounds"])]
        if "llamacpp" in row:  # shardlm / llama.cpp, per round (llama.cpp ran right after HF)
            for x, jr, cr in zip(xs, j["rounds"], row["llamacpp"]["rounds"]):
                x["llamacpp_decode_ratio"] = jr["decode"]["tok_s"] / cr["tok_s"]
                x["llamacpp_end_to_end_ratio"] = jr["e2e"]["tok_s"] / cr["end_to_end_tok_s"]
                x["llamacpp_mbu"] = j["param_bytes"] / cr["mean_step_s"] / jr["decode"]["bandwidth"]
        d[B] = med_tree(xs) | {"rounds": xs}
    return d


# ----- report -----

def report(res: dict) -> None:
    roof = res["roofline"]
    log()
    log("Rooflines (timed in this run; start / end):")
    for tag in ("start", "end"):
        r = roof[tag]
        log(f"  {tag:5s}  JAX matvec [{r['matvec_shape'][0]}x{r['matvec_shape'][1]}] f32: "
            f"{r['jax_matvec_bw']['best'] / 1e9:.1f} GB/s best, {r['jax_matvec_bw']['median'] / 1e9:.1f} median;  "
            f"torch.mv {r['torch_mv_bw']['best'] / 1e9:.1f} GB/s best;  "
            f"matmul {r['matmul_n']}^3 f32: JAX {r['jax_matmul_flops'] / 1e9:.0f}, torch {r['torch_mm_flops'] / 1e9:.0f} GFLOP/s")
    log(f"  best JAX matvec of the run {roof['bandwidth_for_mbu'] / 1e9:.1f} GB/s; "
        f"MFU uses {roof['flops_for_mfu'] / 1e9:.0f} GFLOP/s (best JAX matmul of the run)")

    for key, title in (("smollm2", "SmolLM2-135M (embedded GGUF, f32)"), ("tinyllama", "TinyLlama-1.1B shape, random weights (f32)")):
        if key not in res:
            continue
        m = res[key]
        log()
        n_hf = m.get("hf_new_tokens", m["new_tokens"])
        log(f"{title}: {m['prompt_len']}-token prompt, {m['new_tokens']} new tokens"
            + (f" (HF: {n_hf})" if n_hf != m["new_tokens"] else "")
            + f"; parameters {next(iter(m['batches'].values()))['jax']['param_bytes'] / 1e6:.0f} MB"
            + (f"; medians of {m['rounds']} interleaved rounds" if m["rounds"] > 1 else ""))
        log(f"  shardlm engine: {m['engine']}" + (f"; {m['plan_text']}" if "plan_text" in m else ""))
        hdr = f"  {'':26s}{'shardlm':>12s}{'HF':>12s}{'ratio':>9s}"
        for B, row in m["batches"].items():
            j, h, d = med_tree(row["jax"]["rounds"]), med_tree(row["hf"]["rounds"]), m["derived"][B]
            log(f" batch {B}")
            log(hdr)
            if "e2e" in j:
                log(f"  {'end to end tok/s':26s}{j['e2e']['tok_s']:12.2f}{h['generate']['end_to_end_tok_s']:12.2f}"
                    f"{d['end_to_end_ratio']:8.2f}x   (LLM.generate / HF generate, prefill included)")
            if "prefill" in j:
                log(f"  {'prefill ' + str(m['prompt_len']) + ' tokens (ms)':26s}{j['prefill']['median_s'] * 1e3:12.1f}"
                    f"{h['prefill']['median_s'] * 1e3:12.1f}{d['prefill_ratio']:8.2f}x")
                log(f"  {'prefill MFU':26s}{d['jax_prefill_mfu']:12.0%}{d['hf_prefill_mfu']:12.0%}")
            log(f"  {'decode tok/s':26s}{j['decode']['tok_s']:12.2f}{h['generate']['tok_s']:12.2f}{d['decode_ratio']:8.2f}x")
            if abs(h['generate']['tok_s'] / h['generate']['stamped_tok_s'] - 1) > 0.15:
                log("  WARNING: HF decode by subtraction and by timestamps differ by more than 15% (noisy run?)")
            log(f"  {'  HF timestamped tok/s':26s}{'':12s}{h['generate']['stamped_tok_s']:12.2f}{d['decode_ratio_vs_stamped']:8.2f}x")
            log(f"  {'decode step (ms)':26s}{j['decode']['mean_step_s'] * 1e3:12.1f}{h['generate']['mean_step_s'] * 1e3:12.1f}")
            log(f"  {'decode tok/s, median step':26s}{j['decode']['median_step_tok_s']:12.2f}"
                f"{h['generate']['median_step_tok_s']:12.2f}{d['decode_ratio_median_step']:8.2f}x")
            log(f"  {'matvec GB/s during decode':26s}{d['jax_bandwidth'] / 1e9:12.1f}{d['hf_bandwidth'] / 1e9:12.1f}")
            log(f"  {'decode MBU (params)':26s}{d['jax_mbu']:12.0%}{d['hf_mbu']:12.0%}")
            log(f"  {'  vs best GB/s of the run':26s}{d['jax_mbu_run_best']:12.0%}{d['hf_mbu_run_best']:12.0%}")
            log(f"  {'  shardlm MBU params+KV':26s}{d['jax_mbu_with_kv']:12.0%}")
            if "llamacpp" in row:
                c = med_tree(row["llamacpp"]["rounds"])
                log(f"  llama.cpp (llama-cpp-python {m['llamacpp']['version']}, F32 GGUF, {m['llamacpp']['n_threads']} threads):"
                    f" decode {c['tok_s']:.2f} tok/s ({c['mean_step_s'] * 1e3:.1f} ms/step, MBU {d['llamacpp_mbu']:.0%}),"
                    f" end to end {c['end_to_end_tok_s']:.2f} tok/s, prefill {c['prefill_s'] * 1e3:.0f} ms;"
                    f" shardlm / llama.cpp: decode {d['llamacpp_decode_ratio']:.2f}x, end to end {d['llamacpp_end_to_end_ratio']:.2f}x;"
                    f" greedy tokens identical to HF's for the first {row['llamacpp_tokens_identical_prefix_vs_hf']}")
            if "greedy_tokens_identical_prefix" in row:
                p = row["greedy_tokens_identical_prefix"]
                log(f"  greedy tokens identical for the first {min(p)}..{max(p)} of {m['new_tokens']} (per row)"
                    + (f"; prefill logits max |diff| {row['prefill_logits_max_abs_diff']:.2e}, "
                       f"argmax equal: {row['prefill_argmax_equal']}" if "prefill_logits_max_abs_diff" in row else ""))

    sl = res.get("smollm2", {}).get("seq_len")
    if sl:
        log()
        log(f"SmolLM2 decode step at about {sl['live_tokens']} live tokens (ms; {sl['steps']} steps, medians of "
            f"{sl['rounds']} alternating rounds), engines built with max_seq_len 512 and 8192:")
        log(f"  {'':22s}{'512':>10s}{'8192':>10s}{'8192/512':>10s}")
        for kind in ("paged", "dense"):
            for B, r in sl[kind].items():
                log(f"  {kind + ' B=' + str(B):22s}{r[512]['mean_step_s'] * 1e3:10.1f}{r[8192]['mean_step_s'] * 1e3:10.1f}"
                    f"{r['ratio']:9.2f}x")
        log("  paged: PagedEngine(model, max_seq_len=S, max_num_seqs=8, num_pages=256), engine.decode timed on a pool")
        for S, text in sl["paged_plans"].items():
            log(f"    S={S}: {text}")
        log("  dense: Engine(model, batch_size=B, max_seq_len=S), Engine.generate timed after B prompts are inserted")

    log()
    shares, attempts = res["other_processes_cpu_share"], res["attempts"]
    worst = max(shares, key=shares.get)
    log(f"CPU share taken by other processes (and steal) in each timed section: at most {shares[worst]:.0%} "
        f"({worst}), steal at most {max(res['steal_share'].values()):.0%}; a section is rerun above "
        f"{res['args']['max_others']:.0%}")
    reruns = {k: n for k, n in attempts.items() if n > 1}
    if reruns:
        log("  rerun because of other load: " + ", ".join(f"{k} ({n} tries)" for k, n in reruns.items()))
    disturbed = shares[worst] > res["args"]["max_others"]
    if disturbed:
        log("  WARNING: other processes ran during this benchmark; its figures are suspect, rerun on a quiet machine")
    log()
    log("Aims: SmolLM2 end to end (LLM.generate, defaults) B=1 >= 3x HF, B=8 >= 2x HF; paged step at 200 live")
    log("tokens with max_seq_len 8192 within 1.15x of 512; SmolLM2 B=1 MBU >= 50%, TinyLlama B=1 MBU >= 80%")
    s, t = res.get("smollm2"), res.get("tinyllama")
    checks = []
    if s and 1 in s["derived"]:
        checks.append(("SmolLM2 B=1 end to end ratio", s["derived"][1]["end_to_end_ratio"], 3.0, "x"))
    if s and 8 in s["derived"]:
        checks.append(("SmolLM2 B=8 end to end ratio", s["derived"][8]["end_to_end_ratio"], 2.0, "x"))
    if s and 1 in s["derived"]:
        checks.append(("SmolLM2 B=1 MBU", s["derived"][1]["jax_mbu"], 0.5, "%"))
    if s and "seq_len" in s:
        for B, r in s["seq_len"]["paged"].items():
            checks.append((f"paged B={B} 8192/512 step", r["ratio"], 1.15, "<="))
    if t:
        checks.append(("TinyLlama B=1 MBU", t["derived"][1]["jax_mbu"], 0.8, "%"))
    for name, v, aim, unit in checks:
        fmt = (lambda z: f"{z:.0%}") if unit == "%" else (lambda z: f"{z:.2f}x")
        ok = v <= aim if unit == "<=" else v >= aim
        verdict = ("met" if ok else "NOT met") + (" (disturbed run)" if disturbed else "")
        log(f"  {name:28s}{fmt(v):>8s}  aim {fmt(aim):>5s}  {verdict}")
    log()
    log("End to end: the whole LLM.generate call (prefill steps, decode steps, the scheduler) against the whole HF")
    log("generate, both after a warm-up call. Decode tok/s counts tokens made by decode steps (the first comes from")
    log("prefill); shardlm's from the intervals between on_step calls of its decode steps with every sequence running.")
    log("HF decode = generate time minus its prefill (one forward, logits_to_keep=1, timed separately);")
    log("ratios are medians of per-round ratios (each round times shardlm, then HF, back to back);")
    log("'timestamped' is first-to-last token inside generate; 'median step' uses the median step time on both")
    log("sides (robust to bursts of other load). MBU: parameter bytes / mean step time / the median bandwidth of")
    log(f"a [8192, 8192] f32 JAX matvec sampled before, every {BW_SAMPLE_EVERY} steps of, and after that decode (outside")
    log("the step timings); below it, against the run's best matvec bandwidth.")
    log("Warm-up and compilation excluded on every side.")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 new tokens (TinyLlama 16), fewer repetitions")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (32 with --quick)")
    ap.add_argument("--tiny-new-tokens", type=int, default=None, help="TinyLlama, shardlm side; default = --new-tokens (16 with --quick)")
    ap.add_argument("--tiny-hf-new-tokens", type=int, default=None, help="TinyLlama, HF side; default = --tiny-new-tokens")
    ap.add_argument("--reps", type=int, default=None, help="prefill repetitions (default 5, 3 with --quick)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=None, help="SmolLM2: interleaved shardlm/HF rounds (default 3, 1 with --quick)")
    ap.add_argument("--tiny-rounds", type=int, default=None, help="TinyLlama: interleaved rounds (default 2, 1 with --quick)")
    ap.add_argument("--skip-tinyllama", action="store_true")
    ap.add_argument("--live", type=int, default=200, help="live tokens of the max_seq_len 512 / 8192 step comparison")
    ap.add_argument("--seq-rounds", type=int, default=None, help="rounds of that comparison (default 3, 1 with --quick)")
    ap.add_argument("--skip-seq-len", action="store_true", help="skip the max_seq_len 512 / 8192 comparison")
    ap.add_argument("--skip-llamacpp", action="store_true", help="skip llama.cpp even where llama-cpp-python is installed")
    ap.add_argument("--llamacpp-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "shardlm-bench"),
                    help="where the F32 GGUF for llama.cpp is written (once)")
    ap.add_argument("--out-dir", default=RESULTS_DIR)
    ap.add_argument("--wait-quiet", type=float, default=600, metavar="S",
                    help="before each timed section wait up to S seconds for other processes to leave the CPUs")
    ap.add_argument("--max-others", type=float, default=0.05,
                    help="share of the CPUs other processes may take during a timed section before it is rerun")
    ap.add_argument("--retries", type=int, default=3, help="reruns of a timed section disturbed by other processes")
    args = ap.parse_args(argv)
    args.new_tokens = args.new_tokens or (32 if args.quick else 128)
    args.tiny_new_tokens = args.tiny_new_tokens or (16 if args.quick else args.new_tokens)
    args.tiny_hf_new_tokens = args.tiny_hf_new_tokens or args.tiny_new_tokens
    args.reps = args.reps or (3 if args.quick else 5)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.tiny_rounds = args.tiny_rounds or (1 if args.quick else 2)
    args.seq_rounds = args.seq_rounds or (1 if args.quick else 3)
    if args.new_tokens < 2 or args.tiny_new_tokens < 2 or args.tiny_hf_new_tokens < 2:
        ap.error("new token counts must be >= 2 (one from prefill, at least one decode step)")

    torch.set_num_threads(os.cpu_count())
    started = datetime.datetime.now(datetime.timezone.utc)
    res: dict = {"benchmark": "decode_cpu", "date": started.isoformat(timespec="seconds"), "machine": machine(),
                 "source": source_state(), "args": vars(args)}
    log(f"decode_cpu  {res['date']}  {res['machine']['cpu']}, {res['machine']['cores']} cores, "
        f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}")
    src = res["source"]
    log(f"shardlm at {(src['commit'] or 'unknown')[:10]}"
        + (f" with {len(src['modified'])} files modified or untracked" if src["modified"] else ""))
    log("rooflines ...")
    roof = {"start": measured("rooflines start", lambda: rooflines(reps=10 if args.quick else 20), args)}
    res["roofline"] = roof
    cfgs = {}
    log("SmolLM2-135M ...")
    res["smollm2"], cfgs["smollm2"] = smollm2(args)
    if not args.skip_tinyllama:
        log("TinyLlama-1.1B shape ...")
        res["tinyllama"], cfgs["tinyllama"] = tinyllama(args)
    log("rooflines again ...")
    roof["end"] = measured("rooflines end", lambda: rooflines(reps=10 if args.quick else 20), args)
    res["other_processes_cpu_share"] = OTHERS.sections
    res["attempts"] = OTHERS.attempts
    res["steal_share"] = OTHERS.steal
    # Conservative: the best bandwidth and matmul rate seen anywhere in the run.
    roof["bandwidth_for_mbu"] = max(roof[t]["jax_matvec_bw"]["best"] for t in ("start", "end"))
    roof["flops_for_mfu"] = max(roof[t]["jax_matmul_flops"] for t in ("start", "end"))
    for key, cfg in cfgs.items():
        res[key]["derived"] = derive(res[key], cfg, roof, res[key]["new_tokens"])
    res["wall_s"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    report(res)
    log(f"wall time {res['wall_s']:.0f} s")

    write_results(args.out_dir, "decode_cpu", res, log.lines)
    return res


if __name__ == "__main__":
    main()
