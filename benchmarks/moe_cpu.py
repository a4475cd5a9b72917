"""Mixture-of-experts decode on CPU, float32: shardlm against HF transformers on the same weights, same run.

    python benchmarks/moe_cpu.py            # about 5 minutes on a quiet 2-core machine
    python benchmarks/moe_cpu.py --quick    # fewer tokens and rounds

The model: a random MixtralForCausalLM at Mixtral-8x7B's proportions scaled down 8x in width
(D 512, F 1792 = 3.5 D, 8 experts top-2, 8 query and 2 kv heads of 64, 8 layers, vocab 32000),
saved with save_pretrained and loaded by both sides from that folder.

- shardlm: `LLM.load(folder)` (the defaults a user gets), `LLM.generate` of B random-id prompts
  with `SamplingParams(max_new_tokens=N, ignore_eos=True)`, after a warm-up call of the same shape.
- HF: `model.generate(greedy, min_new_tokens=N)` after a warm-up call, torch's threads = cores.
- Decode tokens/s: (generate of N tokens - generate of 1 token) timed on each side, over
  B x (N - 1) tokens; medians over interleaved rounds (shardlm then HF each round), so drift of the
  machine hits both alike. The greedy tokens of both sides are compared.
- MBU: bytes a decode step must read / step time / this machine's matrix-vector bandwidth, sampled
  before each section. Bytes: every non-expert weight, the lm head, and per layer the experts that
  B x k token-slots touch under uniform routing (E (1 - (1 - 1/E)^(B k)) of the E experts), as HF's
  per-expert loop reads them. XLA:CPU has no grouped matmul, so shardlm's experts run there as
  models/moe.py's CPU path: at batch 1 (2 token-slots, fewer than half the 8 experts) each slot's
  expert is gathered (2 experts read), at batch 8 a scan over all 8 experts (all read, E/k times the
  active FLOPs); the MBU counts the active bytes either way. On TPU and GPU ragged_dot is a grouped
  matmul over the rows each expert has.

Writes benchmarks/results/moe_cpu.json and moe_cpu.txt (`--out-dir` changes where).
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from shardlm.engine import LLM, SamplingParams  # noqa: E402

from common import (  # noqa: E402
    OTHERS,
    RESULTS_DIR,
    Log,
    PagedStepTimer,
    local_bandwidth,
    machine,
    median,
    source_state,
    wait_until_quiet,
    write_results,
)

log = Log()
SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1792, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, num_local_experts=8, num_experts_per_tok=2,
             max_position_embeddings=4096, tie_word_embeddings=False)


def decode_bytes(B: int) -> dict:
    """Bytes (float32) one decode step of batch B must read: dense weights + the experts B*k slots touch."""
    D, F, E, k, L, V = (SHAPE[n] for n in ("hidden_size", "intermediate_size", "num_local_experts",
                                          "num_experts_per_tok", "num_hidden_layers", "vocab_size"))
    H, N, K = SHAPE["head_dim"], SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"]
    expert = 3 * D * F
    dense_layer = D * (N + 2 * K) * H + N * H * D + D * E + 2 * D
    touched = E * (1 - (1 - 1 / E) ** (B * k))
    active = 4 * (L * (dense_layer + touched * expert) + V * D + D)
    every_expert = 4 * (L * (dense_layer + E * expert) + V * D + D)
    return {"active_bytes": active, "all_expert_bytes": every_expert, "experts_touched_per_layer": touched}


def time_shardlm(llm, prompts, n: int) -> tuple[float, list, float | None]:
    """(seconds of the whole generate call, tokens, median seconds of its full-batch decode steps)."""
    sampling = SamplingParams(max_new_tokens=n, ignore_eos=True)
    timer = PagedStepTimer(llm.engine)
    t0 = time.perf_counter()
    out = llm.generate(prompts, sampling)
    seconds = time.perf_counter() - t0
    timer.remove()
    steps = [s for kind, b, s in timer.steps if kind == "decode" and b == len(prompts)]
    return seconds, [c.token_ids for c in out], median(steps) if steps else None


def time_hf(model, prompts, n: int) -> tuple[float, list]:
    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0)
    return time.perf_counter() - t0, out[:, ids.shape[1]:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out-dir", default=RESULTS_DIR)
    args = ap.parse_args()
    new = 16 if args.quick else 48
    rounds = args.rounds or (1 if args.quick else 3)
    torch.set_num_threads(os.cpu_count())

    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**SHAPE)).eval()
    folder = tempfile.mkdtemp(prefix="moe-cpu-")
    model.save_pretrained(folder)
    llm = LLM.load(folder)
    rng = np.random.default_rng(0)
    rows = []
    for B in (1, 8):
        prompts = rng.integers(3, SHAPE["vocab_size"], (B, args.prompt_len)).tolist()
        for n in (1, new):  # warm-up: compiles every bucket these calls use
            time_shardlm(llm, prompts, n)
            time_hf(model, prompts, n)
        per_round = []
        for _ in range(rounds):
            wait_until_quiet(60)
            bw = local_bandwidth()
            OTHERS.begin(f"b{B}")
            s1, _, _ = time_shardlm(llm, prompts, 1)
            sn, s_tokens, s_step = time_shardlm(llm, prompts, new)
            h1, _ = time_hf(model, prompts, 1)
            hn, h_tokens = time_hf(model, prompts, new)
            OTHERS.end()
            per_round.append({"bandwidth": bw, "shardlm_s": sn - s1, "shardlm_step_s": s_step, "hf_s": hn - h1,
                              "others": OTHERS.sections[f"b{B}"]})
        tokens = B * (new - 1)
        s_tps = median([tokens / r["shardlm_s"] for r in per_round])
        s_step = median([r["shardlm_step_s"] for r in per_round])
        h_tps = median([tokens / r["hf_s"] for r in per_round])
        bw = median([r["bandwidth"] for r in per_round])
        need = decode_bytes(B)
        step = lambda tps: B / tps  # noqa: E731  seconds per decode step
        rows.append({"batch": B, "new_tokens": new, "prompt_len": args.prompt_len, "rounds": per_round,
                     "shardlm_tokens_per_s": s_tps, "hf_tokens_per_s": h_tps,
                     "ratio": median([r["hf_s"] / r["shardlm_s"] for r in per_round]),
                     "shardlm_decode_step_s": s_step,
                     "shardlm_mbu": need["active_bytes"] / step(s_tps) / bw,
                     "shardlm_step_mbu": need["active_bytes"] / s_step / bw,
                     "hf_mbu": need["active_bytes"] / step(h_tps) / bw,
                     "bandwidth_bytes_per_s": bw, **need,
                     "same_greedy_tokens": s_tokens == h_tokens})

    log(f"MoE decode on CPU, float32, {datetime.date.today()}: random Mixtral shape D {SHAPE['hidden_size']}, "
        f"F {SHAPE['intermediate_size']}, {SHAPE['num_local_experts']} experts top-{SHAPE['num_experts_per_tok']}, "
        f"{SHAPE['num_hidden_layers']} layers, vocab {SHAPE['vocab_size']}; prompt {args.prompt_len} tokens, "
        f"{new} new; medians of {rounds} rounds")
    log(f"{'batch':>5} {'shardlm tok/s':>14} {'HF tok/s':>9} {'ratio':>6} {'step ms':>8} {'shardlm MBU':>12} "
        f"{'HF MBU':>7} {'GB/s':>5} {'experts/layer':>13} {'same tokens':>11} {'others':>6}")
    for r in rows:
        others = max((x["others"] or 0) for x in r["rounds"])
        log(f"{r['batch']:5d} {r['shardlm_tokens_per_s']:14.1f} {r['hf_tokens_per_s']:9.1f} {r['ratio']:6.2f} "
            f"{r['shardlm_decode_step_s'] * 1e3:8.2f} {r['shardlm_mbu']:12.2f} {r['hf_mbu']:7.2f} "
            f"{r['bandwidth_bytes_per_s'] / 1e9:5.1f} {r['experts_touched_per_layer']:13.2f} "
            f"{str(r['same_greedy_tokens']):>11} {others:6.0%}")
    log("MBU: active bytes per decode step (dense weights, lm head, the experts the batch's slots touch) / step "
        "/ matrix-vector bandwidth sampled before each round. On CPU shardlm gathers each slot's expert when the "
        f"slots are fewer than half the {SHAPE['num_local_experts']} experts, else scans over all of them.")
    path = write_results(args.out_dir, "moe_cpu", {"date": str(datetime.date.today()), "shape": SHAPE,
                                                   "rows": rows, "machine": machine(), "source": source_state()},
                         log.lines)
    print(f"wrote {path}.json and .txt")


if __name__ == "__main__":
    main()
