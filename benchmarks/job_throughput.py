"""Decoding jobs through `shardlm run`'s code path with shardlm's defaults, against HF transformers'
batched `generate` on the same GGUF and the same token ids, in the same run: a 200-prompt job of
mixed lengths, a job whose prompts share a ~300-token system message, and n = 8 samples of 32 prompts.

    python benchmarks/job_throughput.py            # about 15 minutes on the 2-core machine
    python benchmarks/job_throughput.py --quick    # fewer prompts, to check the script (writes nothing)

- The job: 200 chat prompts of mixed length (about 40 to 150 tokens with the chat template), each
  asking for `--new-tokens` tokens (default 16) with stop tokens ignored on both sides, so both
  sides generate exactly the same number of tokens. Greedy, float32, one CPU device.
- shardlm: `LLM.load()` with no flag (the paged engine, its pool, max_num_seqs and prefill token
  budget sized from memory, as `shardlm run` does with no tuning flag), then `jobs.run_job` (what
  `shardlm run` calls: continuous batching, packed prefill steps alternating with decode steps,
  JSONL written as sequences finish). The whole job is run twice: the first (cold: it compiles
  every step bucket the job uses) is recorded, the second is the figure (the steady state a long
  job runs at). The engine's prefill and decode steps are timed as the scheduler calls them.
- Extras (tuned, beside the default, never instead of it): `--extra-seqs` runs the same job on
  `llm.relayout(batch_size=N)` (max_num_seqs N, the pool sized again).
- HF: `model.generate` over the same token ids in batches of 32 (`--hf-batches`; sorted by length,
  left-padded), after a warm-up generate.
- The shared job (`--shared-prompts`, default 128): each chat prompt opens with the same ~300-token
  system message, then a short question of its own; greedy, 16 new tokens. shardlm's prefix cache
  (on by default) computes the system message once; its hit rate and the prefill tokens computed
  are recorded. HF: batches of 32, as above.
- The samples job (`--sample-prompts`, default 32): n = 8 samples of each prompt, temperature 0.8,
  16 new tokens each with stop tokens ignored; shardlm prefills each prompt once and forks its
  samples. HF: `num_return_sequences=8` with `do_sample=True`, 4 prompts a call (32 rows, as
  batch 32 above). Sampled tokens cannot match across the two RNGs: throughput only.
- Figures: completions/s and generated tokens/s over the wall time of the whole job; for shardlm
  also its prefill and decode steps, and the decode MBU = (parameter bytes + KV bytes of the live
  tokens) per step / step time / the bandwidth of a large matrix-vector product timed before and
  after the section.
- Other processes: the CPU share other processes took during each section is recorded next to it
  (the machine is shared; see benchmarks/common.py `Others`).

Writes benchmarks/results/job_throughput.json and .txt.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the HF side loads the local GGUF only
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402

from shardlm.checkpoints.loader import embedded_model_path  # noqa: E402
from shardlm.engine import LLM, SamplingParams, jobs  # noqa: E402

from common import (
    OTHERS,
    RESULTS_DIR,
    Log,
    PagedStepTimer,
    kv_bytes_per_step,
    local_bandwidth,
    machine,
    params_nbytes,
    source_state,
    wait_until_quiet,
    write_results,
)

log = Log()

TOPICS = ["the sea", "volcanoes", "bread", "the moon", "chess", "rivers", "bees", "glass", "trains", "maps",
          "winter", "copper", "owls", "bridges", "tea", "clocks", "deserts", "paper", "whales", "gardens"]
CONTEXT = ("Background: the town sits where two rivers meet; its market opens at dawn, its bridge is older "
           "than the cathedral, and every spring the river floods the lower streets. ")


def job_prompts(n: int) -> list[dict]:
    """n chat prompts whose lengths vary over about 5x."""
    out = []
    for i in range(n):
        text = CONTEXT * (i % 4) + f"Write {2 + i % 5} sentences about {TOPICS[i % len(TOPICS)]} (note {i})."
        out.append({"id": i, "messages": [{"role": "user", "content": text}]})
    return out


def run_shardlm(llm: LLM, name: str, input_path: str, sampling: SamplingParams, bw_before: float,
                mean_live: float) -> dict:
    """The job twice through jobs.run_job: cold (compiles) and timed, its steps timed by PagedStepTimer."""
    with tempfile.TemporaryDirectory() as tmp:
        cold = jobs.run_job(llm, input_path, os.path.join(tmp, "cold.jsonl"), sampling, progress=False)
        compiled = dict(llm.engine.compiled_count())
        timer = PagedStepTimer(llm.engine)
        OTHERS.begin(name)
        try:
            summary = jobs.run_job(llm, input_path, os.path.join(tmp, "out.jsonl"), sampling, progress=False)
        finally:
            OTHERS.end()
            timer.remove()
        with open(os.path.join(tmp, "out.jsonl")) as f:
            tokens = {r["id"]: r["token_ids"] if "choices" not in r else [c["token_ids"] for c in r["choices"]]
                      for r in map(json.loads, f)}
    bw = statistics.median([bw_before, local_bandwidth()])
    n_dec, dec_s = timer.total("decode")
    n_pre, pre_s = timer.total("prefill")
    dec_rows = [n for k, n, _ in timer.steps if k == "decode"]
    pre_rows = [n for k, n, _ in timer.steps if k == "prefill"]
    step = dec_s / n_dec
    mean_rows = statistics.mean(dec_rows)
    cfg, eng = llm.config, llm.engine
    step_bytes = params_nbytes(llm.params) + kv_bytes_per_step(cfg, 1, 1) * mean_rows * mean_live
    return {"name": name, "max_num_seqs": eng.max_num_seqs, "plan": eng.plan.describe(),
            "completions_per_s": summary["completions_per_s"], "tokens_per_s": summary["tokens_per_s"],
            "wall_s": summary["wall_s"], "completion_tokens": summary["completion_tokens"],
            "cold_wall_s": cold["wall_s"], "cold_completions_per_s": cold["completions_per_s"],
            "recompiled": {k: eng.compiled_count()[k] - compiled[k] for k in compiled},
            "decode_steps": n_dec, "decode_s": dec_s, "mean_step_s": step, "mean_decode_rows": mean_rows,
            "prefill_steps": n_pre, "prefill_s": pre_s, "mean_prefill_chunks": statistics.mean(pre_rows),
            "host_s": summary["wall_s"] - dec_s - pre_s,
            **{k: summary[k] for k in jobs.PREFILL_FIELDS},
            "step_bytes": step_bytes, "bandwidth": bw, "decode_mbu": step_bytes / step / bw,
            "others_cpu_share": OTHERS.sections[name], "tokens": tokens}


def log_shardlm(r: dict) -> None:
    log(f"shardlm {r['name']}: {r['completions_per_s']:6.2f} completions/s, {r['tokens_per_s']:7.1f} generated tok/s "
        f"({r['wall_s']:.1f} s; cold, compiling: {r['cold_wall_s']:.1f} s); {r['prefill_steps']} prefill steps "
        f"({r['mean_prefill_chunks']:.1f} prompts each) {r['prefill_s']:.1f} s, {r['decode_steps']} decode steps "
        f"({r['mean_decode_rows']:.1f} sequences each) of {r['mean_step_s'] * 1e3:.1f} ms = {r['decode_s']:.1f} s, "
        f"the rest {r['host_s']:.1f} s; decode MBU {r['decode_mbu']:.0%} of {r['bandwidth'] / 1e9:.1f} GB/s; "
        f"others took {r['others_cpu_share']:.0%} of the CPU")
    hit = r["prefix_cache_hit_rate"]
    log(f"  {r['plan']}; prefix cache hit {'off' if hit is None else f'{hit:.0%}'}: {r['prefill_tokens_computed']} of "
        f"{r['prompt_tokens_submitted']} prompt tokens computed, {r['kv_preemptions']} preemptions")


def run_hf(model, prompts: list[list[int]], batch: int, new_tokens: int, pad_id: int) -> dict:
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))

    def generate(rows):
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
        return out[:, width:].tolist()

    generate([prompts[i] for i in order[:batch]])  # warm-up
    tokens = {}
    OTHERS.begin("hf")
    t0 = time.perf_counter()
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        for i, row in zip(chunk, generate([prompts[i] for i in chunk])):
            tokens[i] = row
    wall = time.perf_counter() - t0
    OTHERS.end()
    n_tokens = sum(map(len, tokens.values()))
    return {"batch": batch, "completions_per_s": len(prompts) / wall, "tokens_per_s": n_tokens / wall,
            "wall_s": wall, "completion_tokens": n_tokens, "others_cpu_share": OTHERS.sections["hf"], "tokens": tokens}


SYSTEM = ("You are the town's archivist. You answer questions about the town from its records, briefly and "
          "plainly, in full sentences, and you say so when the records are silent. " + CONTEXT * 7
          + "The records note the harbour, the mill, the school, the old walls, the lighthouse and the fair. ")


def shared_prompts(n: int) -> list[dict]:
    """n chat prompts opening with the same ~300-token system message, then a question of their own."""
    return [{"id": i, "messages": [{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": f"What do the records say about {TOPICS[i % len(TOPICS)]}? "
                                                               f"(question {i})"}]} for i in range(n)]


def run_hf_samples(model, prompts: list[list[int]], per_call: int, n: int, new_tokens: int, pad_id: int,
                   temperature: float) -> dict:
    """HF generate with num_return_sequences=n, `per_call` prompts a call (left-padded)."""
    def generate(rows):
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=True, temperature=temperature, top_k=0, num_return_sequences=n,
                           pad_token_id=pad_id)

    generate(prompts[:per_call])  # warm-up
    OTHERS.begin("hf_samples")
    t0 = time.perf_counter()
    for start in range(0, len(prompts), per_call):
        generate(prompts[start:start + per_call])
    wall = time.perf_counter() - t0
    OTHERS.end()
    n_tokens = len(prompts) * n * new_tokens
    return {"batch": per_call * n, "completions_per_s": len(prompts) / wall, "tokens_per_s": n_tokens / wall,
            "wall_s": wall, "completion_tokens": n_tokens, "others_cpu_share": OTHERS.sections["hf_samples"]}


def write_job(tmp: str, name: str, specs: list[dict]) -> str:
    path = os.path.join(tmp, f"{name}.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in specs)
    return path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--extra-seqs", type=int, nargs="*", default=[32],
                    help="tuned extras: max_num_seqs for llm.relayout(batch_size=N) runs beside the default")
    ap.add_argument("--hf-batches", type=int, nargs="+", default=[32])
    ap.add_argument("--quiet-wait", type=float, default=30.0, help="seconds to wait for a quiet machine per section")
    ap.add_argument("--shared-prompts", type=int, default=128, help="prompts of the shared-system-message job (0: skip)")
    ap.add_argument("--sample-prompts", type=int, default=32, help="prompts of the n-samples job (0: skip)")
    ap.add_argument("--samples", type=int, default=8, help="n of the samples job")
    ap.add_argument("--quick", action="store_true", help="24 prompts, 32 shared, 8 x n samples")
    ap.add_argument("--out-dir", default=RESULTS_DIR)
    args = ap.parse_args(argv)
    n = 24 if args.quick else args.prompts
    n_shared = min(args.shared_prompts, 32) if args.quick else args.shared_prompts
    n_sampled = min(args.sample_prompts, 8) if args.quick else args.sample_prompts
    sampling = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    source = source_state()

    with tempfile.TemporaryDirectory() as tmp:
        specs = job_prompts(n)
        input_path = write_job(tmp, "in", specs)

        llm = LLM.load()  # no flag: what `shardlm run --input ... --output ...` does
        cfg = llm.config
        prompt_ids = [llm.encode(s["messages"]) for s in specs]
        lengths = [len(p) for p in prompt_ids]
        mean_live = statistics.mean(lengths) + args.new_tokens / 2
        log(f"job: {n} chat prompts of {min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}), "
            f"{args.new_tokens} new tokens each (stop tokens ignored), greedy, float32, SmolLM2-135M, one CPU device")
        runs = [("default", llm)] + [(f"max_num_seqs={k} (tuned extra)", None) for k in args.extra_seqs]
        shardlm = []
        path = embedded_model_path()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
        pad_id = model.config.eos_token_id if model.config.eos_token_id is not None else 0
        pad_id = pad_id[0] if isinstance(pad_id, list) else pad_id
        hf = []
        for i, (name, this) in enumerate(runs):
            this = this or llm.relayout(batch_size=args.extra_seqs[i - 1])
            wait_until_quiet(args.quiet_wait)
            r = run_shardlm(this, name, input_path, sampling, local_bandwidth(), mean_live)
            shardlm.append(r)
            log_shardlm(r)
            del this
            if i == 0:  # HF right after the default run, before the extras
                for batch in args.hf_batches:
                    wait_until_quiet(args.quiet_wait)
                    h = run_hf(model, prompt_ids, batch, args.new_tokens, pad_id)
                    hf.append(h)
                    log(f"HF batch {batch:2d}: {h['completions_per_s']:6.2f} completions/s, {h['tokens_per_s']:7.1f} "
                        f"generated tok/s ({h['wall_s']:.1f} s); others took {h['others_cpu_share']:.0%} of the CPU")
        shared = samples = None
        if n_shared:
            shared = run_shared(llm, model, tmp, n_shared, args, sampling, pad_id)
        if n_sampled:
            samples = run_samples(llm, model, tmp, n_sampled, args, pad_id)
        del llm, model

    log()
    best_hf = max(hf, key=lambda h: h["tokens_per_s"])
    reference = shardlm[0]["tokens"]
    for r in shardlm:
        r["same_tokens_as_default"] = sum(r["tokens"][i] == reference[i] for i in reference)
        r["same_tokens_as_hf"] = sum(r["tokens"][i] == best_hf["tokens"][i] for i in reference)
        r["vs_hf"] = r["completions_per_s"] / best_hf["completions_per_s"]
        log(f"shardlm {r['name']} / HF batch {best_hf['batch']} (HF's best): {r['vs_hf']:.2f}x completions/s; "
            f"completions token-identical to the default run's {r['same_tokens_as_default']}/{n}, "
            f"to HF's {r['same_tokens_as_hf']}/{n}")
    for h in hf:
        h["same_tokens_as_shardlm_default"] = sum(h["tokens"][i] == reference[i] for i in reference)
    log("(token ids compared per prompt; HF's left-padded batches can flip a near-tie greedy choice)")
    aim = shardlm[0]["vs_hf"] >= 1.5
    log(f"Aim: shardlm with its defaults >= 1.5x HF's completions/s: {shardlm[0]['vs_hf']:.2f}x, "
        + ("met" if aim else "NOT met"))
    if shared:
        log(f"Aim: the shared-system-message job with defaults >= 4x HF batch 32: {shared['vs_hf']:.2f}x, "
            + ("met" if shared["vs_hf"] >= 4 else "NOT met"))
    if samples:
        log(f"n = {args.samples} samples of {n_sampled} prompts: {samples['vs_hf']:.2f}x HF's num_return_sequences")

    result = {"benchmark": "job_throughput", "started": started, "finished":
              datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "source": source, "machine": machine(), "prompts": n, "new_tokens": args.new_tokens,
              "prompt_tokens": {"min": min(lengths), "max": max(lengths), "mean": statistics.mean(lengths)},
              "shardlm": [{k: v for k, v in r.items() if k != "tokens"} for r in shardlm],
              "hf": [{k: v for k, v in h.items() if k != "tokens"} for h in hf],
              "aim_1_5x_met": aim, "shared_job": shared, "samples_job": samples,
              "other_processes_cpu_share": OTHERS.sections,
              "config": {"name": cfg.name, "n_layers": cfg.n_layers, "d_model": cfg.d_model}}
    if not args.quick:
        write_results(args.out_dir, "job_throughput", result, log.lines)
    return result


def run_shared(llm, model, tmp, n, args, sampling, pad_id) -> dict:
    """The shared-system-message job: shardlm's defaults (prefix cache on) against HF batch 32."""
    specs = shared_prompts(n)
    path = write_job(tmp, "shared", specs)
    ids = [llm.encode(s["messages"]) for s in specs]
    lengths = [len(p) for p in ids]
    common = next((j for j in range(min(lengths)) if len({p[j] for p in ids}) > 1), min(lengths))
    log()
    log(f"shared job: {n} chat prompts of {min(lengths)}-{max(lengths)} tokens, the first {common} the same "
        f"(the system message), {args.new_tokens} new tokens each (stop tokens ignored), greedy")
    wait_until_quiet(args.quiet_wait)
    r = run_shardlm(llm, "shared, defaults", path, sampling, local_bandwidth(),
                    statistics.mean(lengths) + args.new_tokens / 2)
    log_shardlm(r)
    wait_until_quiet(args.quiet_wait)
    h = run_hf(model, ids, 32, args.new_tokens, pad_id)
    log(f"HF batch 32: {h['completions_per_s']:6.2f} completions/s, {h['tokens_per_s']:7.1f} generated tok/s "
        f"({h['wall_s']:.1f} s); others took {h['others_cpu_share']:.0%} of the CPU")
    same = sum(r["tokens"][i] == h["tokens"][i] for i in range(n))
    vs = r["completions_per_s"] / h["completions_per_s"]
    log(f"shardlm / HF: {vs:.2f}x completions/s; completions token-identical {same}/{n}; prefill tokens saved "
        f"{r['prompt_tokens_submitted'] - r['prefill_tokens_computed']} of {r['prompt_tokens_submitted']}")
    return {"prompts": n, "shared_tokens": common, "prompt_tokens": sum(lengths),
            "shardlm": {k: v for k, v in r.items() if k != "tokens"},
            "hf": {k: v for k, v in h.items() if k != "tokens"}, "vs_hf": vs, "same_tokens_as_hf": same}


def run_samples(llm, model, tmp, n, args, pad_id) -> dict:
    """n prompts x args.samples samples: shardlm (one prefill a prompt, forked samples) against HF's
    num_return_sequences."""
    specs = [dict(s, n=args.samples) for s in job_prompts(n)]
    path = write_job(tmp, "samples", specs)
    ids = [llm.encode(s["messages"]) for s in specs]
    sampling = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True, temperature=0.8, seed=1)
    log()
    log(f"samples job: {n} chat prompts x n = {args.samples} samples, {args.new_tokens} new tokens each "
        f"(stop tokens ignored), temperature 0.8")
    wait_until_quiet(args.quiet_wait)
    r = run_shardlm(llm, f"n={args.samples}, defaults", path, sampling, local_bandwidth(),
                    statistics.mean(map(len, ids)) + args.new_tokens / 2)
    log_shardlm(r)
    wait_until_quiet(args.quiet_wait)
    h = run_hf_samples(model, ids, 4, args.samples, args.new_tokens, pad_id, 0.8)
    log(f"HF num_return_sequences={args.samples}, 4 prompts a call: {h['completions_per_s']:6.2f} prompts/s, "
        f"{h['tokens_per_s']:7.1f} generated tok/s ({h['wall_s']:.1f} s); others took {h['others_cpu_share']:.0%}")
    vs = r["completions_per_s"] / h["completions_per_s"]
    distinct = sum(len({tuple(t) for t in choices}) for choices in r["tokens"].values()) / n
    log(f"shardlm / HF: {vs:.2f}x prompts/s; {distinct:.1f} distinct samples a prompt (of {args.samples})")
    return {"prompts": n, "n": args.samples, "shardlm": {k: v for k, v in r.items() if k != "tokens"}, "hf": h,
            "vs_hf": vs, "distinct_samples_per_prompt": distinct}


if __name__ == "__main__":
    main()
