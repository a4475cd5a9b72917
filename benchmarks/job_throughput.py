"""A 200-prompt decoding job (`shardlm run`'s code path) with 1, 8 and 32 slots, against HF
transformers' batched `generate` on the same GGUF and the same token ids, in the same run.

    python benchmarks/job_throughput.py            # about 10 minutes on the 2-core machine
    python benchmarks/job_throughput.py --quick    # 24 prompts, to check the script

- The job: 200 chat prompts of mixed length (about 30 to 150 tokens with the chat template), each
  asking for `--new-tokens` tokens (default 16) with stop tokens ignored on both sides, so both
  sides generate exactly the same number of tokens. Greedy, float32, one CPU device.
- shardlm: `jobs.run_job` (continuous batching, prompts grouped by length bucket, JSONL written as
  sequences finish), after a warm-up job that compiles every step it will use, so the figure is
  the steady state a long job runs at. The decode steps are timed as the batching loop calls them
  (the loop reads each step's tokens, so the time is the step's own).
- HF: `model.generate` over the same token ids in batches of 32 (`--hf-batches`; sorted by length as shardlm
  groups them, left-padded), after a warm-up generate.
- Figures: completions/s and generated tokens/s over the wall time of the whole job; for shardlm
  also the mean decode step and its MBU = (parameter bytes + KV cache bytes read) per step / step
  time / the bandwidth of a large matrix-vector product timed before and after each section.
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


class StepTimer:
    """Wraps engine.generate to count and time decode steps (the loop reads the tokens right after,
    so blocking on them here adds no wait)."""

    def __init__(self, engine):
        self.engine, self.inner, self.times, self.active = engine, engine.generate, [], []
        engine.generate = self

    def __call__(self, params, state):
        t0 = time.perf_counter()
        state, tokens = self.inner(params, state)
        tokens.block_until_ready()
        self.times.append(time.perf_counter() - t0)
        return state, tokens

    def remove(self):
        del self.engine.generate


def run_shardlm(llm: LLM, input_path: str, warm_path: str, sampling: SamplingParams, bw_before: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        jobs.run_job(llm, warm_path, os.path.join(tmp, "warm.jsonl"), sampling, progress=False)
        timer = StepTimer(llm.engine)
        OTHERS.begin("shardlm")
        try:
            summary = jobs.run_job(llm, input_path, os.path.join(tmp, "out.jsonl"), sampling, progress=False)
        finally:
            OTHERS.end()
            timer.remove()
        with open(os.path.join(tmp, "out.jsonl")) as f:
            tokens = {r["id"]: r["token_ids"] for r in map(json.loads, f)}
    bw = statistics.median([bw_before, local_bandwidth()])
    step = statistics.mean(timer.times)
    cfg, B = llm.config, llm.engine.batch_size
    step_bytes = params_nbytes(llm.params) + kv_bytes_per_step(cfg, B, llm.engine.max_seq_len)
    return {"slots": B, "completions_per_s": summary["completions_per_s"], "tokens_per_s": summary["tokens_per_s"],
            "wall_s": summary["wall_s"], "completion_tokens": summary["completion_tokens"],
            "decode_steps": len(timer.times), "decode_s": sum(timer.times), "mean_step_s": step,
            "step_bytes": step_bytes, "bandwidth": bw, "decode_mbu": step_bytes / step / bw,
            "others_cpu_share": OTHERS.sections["shardlm"], "tokens": tokens}


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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--hf-batches", type=int, nargs="+", default=[32])
    ap.add_argument("--quiet-wait", type=float, default=30.0, help="seconds to wait for a quiet machine per section")
    ap.add_argument("--quick", action="store_true", help="24 prompts")
    ap.add_argument("--out-dir", default=RESULTS_DIR)
    args = ap.parse_args(argv)
    n = 24 if args.quick else args.prompts
    sampling = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    source = source_state()

    with tempfile.TemporaryDirectory() as tmp:
        specs = job_prompts(n)
        input_path, warm_path = os.path.join(tmp, "in.jsonl"), os.path.join(tmp, "warm.jsonl")
        with open(input_path, "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in specs)
        with open(warm_path, "w") as f:  # a short prompt of each length bucket the job uses: compiles every step
            f.writelines(json.dumps(dict(s, id=f"w{k}", max_new_tokens=2)) + "\n" for k, s in enumerate(specs[:4]))

        llm = LLM.load(None, batch_size=max(args.slots), max_seq_len=256)
        cfg = llm.config
        prompt_ids = [llm.encode(s["messages"]) for s in specs]
        lengths = [len(p) for p in prompt_ids]
        log(f"job: {n} chat prompts of {min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}), "
            f"{args.new_tokens} new tokens each (stop tokens ignored), greedy, float32, SmolLM2-135M, one CPU device")
        shardlm = []
        for slots in args.slots:
            wait_until_quiet(args.quiet_wait)
            bw = local_bandwidth()
            r = run_shardlm(llm.relayout(batch_size=slots), input_path, warm_path, sampling, bw)
            shardlm.append(r)
            log(f"shardlm {slots:2d} slots: {r['completions_per_s']:6.2f} completions/s, {r['tokens_per_s']:7.1f} "
                f"generated tok/s ({r['wall_s']:.1f} s); {r['decode_steps']} decode steps of "
                f"{r['mean_step_s'] * 1e3:.1f} ms, decode MBU {r['decode_mbu']:.0%} of {r['bandwidth'] / 1e9:.1f} GB/s; "
                f"others took {r['others_cpu_share']:.0%} of the CPU")
        del llm

        path = embedded_model_path()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
        pad_id = model.config.eos_token_id if model.config.eos_token_id is not None else 0
        pad_id = pad_id[0] if isinstance(pad_id, list) else pad_id
        hf = []
        for batch in args.hf_batches:
            wait_until_quiet(args.quiet_wait)
            h = run_hf(model, prompt_ids, batch, args.new_tokens, pad_id)
            hf.append(h)
            log(f"HF batch {batch:2d}:       {h['completions_per_s']:6.2f} completions/s, {h['tokens_per_s']:7.1f} "
                f"generated tok/s ({h['wall_s']:.1f} s); others took {h['others_cpu_share']:.0%} of the CPU")

    log()
    best_hf = max(hf, key=lambda h: h["tokens_per_s"])
    reference = shardlm[0]["tokens"]
    for r in shardlm:
        r["same_tokens_as_1_slot"] = sum(r["tokens"][i] == reference[i] for i in reference)
        r["same_tokens_as_hf"] = sum(r["tokens"][i] == best_hf["tokens"][i] for i in reference)
        log(f"shardlm {r['slots']:2d} slots / HF batch {best_hf['batch']} (HF's best): "
            f"{r['tokens_per_s'] / best_hf['tokens_per_s']:.2f}x; completions token-identical to the 1-slot run "
            f"{r['same_tokens_as_1_slot']}/{n}, to HF's {r['same_tokens_as_hf']}/{n}")
    for h in hf:
        h["same_tokens_as_shardlm_1_slot"] = sum(h["tokens"][i] == reference[i] for i in reference)
    log("(token ids compared per prompt; HF's left-padded batches can flip a near-tie greedy choice)")

    result = {"benchmark": "job_throughput", "started": started, "finished":
              datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "source": source, "machine": machine(), "prompts": n, "new_tokens": args.new_tokens,
              "prompt_tokens": {"min": min(lengths), "max": max(lengths), "mean": statistics.mean(lengths)},
              "shardlm": [{k: v for k, v in r.items() if k != "tokens"} for r in shardlm],
              "hf": [{k: v for k, v in h.items() if k != "tokens"} for h in hf],
              "config": {"name": cfg.name, "n_layers": cfg.n_layers, "d_model": cfg.d_model}}
    if not args.quick:
        write_results(args.out_dir, "job_throughput", result, log.lines)
    return result


if __name__ == "__main__":
    main()
