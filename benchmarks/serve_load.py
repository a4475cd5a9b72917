"""Load test of OpenAI-compatible servers through the official `openai` client, side by side in one run:
`shardlm serve` (its defaults, with --precompile) against HF's own `transformers serve`, with and without its
`--continuous-batching` (paged attention), on the same weights (the embedded SmolLM2-135M-Instruct
GGUF; HF gets it as a float32 safetensors folder converted once from the GGUF), CPU, float32, greedy.

    python benchmarks/serve_load.py                       # about 25 minutes on the 2-core machine
    python benchmarks/serve_load.py --only hf --concurrency 1,8 --requests-per-client 1 --no-write

- Load: at each concurrency C, C clients (asyncio, one `openai.AsyncOpenAI`) each send
  `--requests-per-client` K streamed chat completions one after another (closed loop, C x K requests).
  Every prompt is `--prompt-tokens` N tokens with the chat template (distinct words per request, so
  only the template's system message is common to them) and asks for exactly `--output-tokens` M
  tokens with stop tokens off: shardlm's `ignore_eos: true`; HF's per-request `generation_config`
  (`min_new_tokens` = `max_new_tokens` = M; its continuous batching then has no EOS at all). The
  tokens counted are the servers' own `usage` (prompt and completion), checked against N and M.
- Warm-up: after /health answers, one request; then before each level an untimed round of C
  concurrent requests of the same shape (so programs compiled, or caches sized, for that batch are
  not in the timed round; its wall time is recorded as `warmup_wall_s`).
- Figures per server and level: output tokens/s = completion tokens / wall time of the level (first
  request sent to last stream ended); TTFT = request sent to first chunk with content; ITL = gaps
  between content chunks as the client reads them (a server that flushes several tokens at once
  shows gaps near 0 between them); TPOT = (last content - first content) / (completion tokens - 1)
  per request. p50/p99 are numpy's linear percentiles over all requests (TTFT) or all gaps (ITL).
- Ratios: shardlm / the better HF mode (by output tokens/s) at each level; the aim (the issue's):
  at concurrency 32, >= 3x its output tokens/s with a lower p99 TTFT.
- CPU: the server's process group CPU seconds, this client's, and the share the rest of the
  machine took (others' processes and steal) are recorded per level; the script waits for a quiet
  machine (`--quiet-wait`) before each level.
- Servers listen on 127.0.0.1 on free ports; each is started in a process group of its own and
  stopped (SIGTERM, then SIGKILL) when its levels end, on errors and on Ctrl-C.

Writes benchmarks/results/serve_load.json (with the settings, versions and date) and .txt; the
server logs go to benchmarks/.cache/serve_load/ (git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np

from common import RESULTS_DIR, Log, cpu_seconds, machine, source_state, write_results

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE_DIR = os.path.join(HERE, ".cache", "serve_load")
BIN = os.path.dirname(sys.executable)
MODES = {  # name -> how the server is run (filled in per run by server_command)
    "shardlm": "shardlm serve --precompile (defaults otherwise)",
    "hf": "transformers serve (model.generate per request, one at a time)",
    "hf_cb": "transformers serve --continuous-batching (paged attention)",
}
WORDS = ("river stone bread moon chess owl glass train map winter copper bridge tea clock desert paper whale garden "
         "apple cloud field horse lamp music north ocean pencil queen road salt table voice water yellow zebra "
         "forest island candle mirror silver thunder valley window autumn harbor market meadow orange planet rocket "
         "shadow spring summer tiger violin wheel basket camera dragon engine feather hammer jacket kettle ladder").split()

log = Log()


# ----- the weights for transformers serve -----

def _convert(gguf_path: str, dst: str) -> None:
    """Dequantize the GGUF into a float32 HF folder (transformers serve cannot load the GGUF itself: the config
    it reads from the file has no `architectures`, and save_pretrained refuses a model loaded from GGUF)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    import torch
    import transformers

    d, f = os.path.split(gguf_path)
    m = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    cfg = m.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.architectures = [type(m).__name__]
    plain = type(m)(cfg).to(torch.float32)
    plain.load_state_dict(m.state_dict(), strict=True)
    plain.generation_config = m.generation_config
    tmp = dst + ".partial"
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, dst)


def cache_dir() -> str:
    """benchmarks/.cache/serve_load, git-ignored by a .gitignore of its own."""
    os.makedirs(CACHE_DIR, exist_ok=True)
    ignore = os.path.join(os.path.dirname(CACHE_DIR), ".gitignore")
    if not os.path.exists(ignore):
        with open(ignore, "w") as f:
            f.write("*\n")
    return CACHE_DIR


def hf_model_dir(gguf_path: str) -> str:
    """The float32 HF folder of `gguf_path` under benchmarks/.cache (made once, in a child process)."""
    st = os.stat(gguf_path)
    dst = os.path.join(cache_dir(), f"{os.path.splitext(os.path.basename(gguf_path))[0]}-{st.st_size}-f32")
    if not os.path.exists(os.path.join(dst, "model.safetensors")):
        log(f"converting {gguf_path} to a float32 HF folder {dst} (once) ...")
        p = multiprocessing.get_context("spawn").Process(target=_convert, args=(gguf_path, dst))
        p.start()
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"converting the GGUF for transformers serve failed (exit {p.exitcode})")
    return dst


# ----- prompts -----

def make_prompts(tok, n: int, prompt_tokens: int, first: int = 0) -> list[list[dict]]:
    """n chat prompts of exactly prompt_tokens tokens with the chat template, numbered from `first`, each
    its own words (no prompt is sent twice in a run, so a prefix cache finds only the template's part)."""
    words = [w for w in WORDS if len(tok.encode(" " + w, add_special_tokens=False)) == 1]
    rng = random.Random(first)

    def count(content):
        return len(tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=True)["input_ids"])

    out = []
    for i in range(first, first + n):
        head = f"Request {i}: write a long story using these words:"
        k = max(0, prompt_tokens - count(head))
        body = [rng.choice(words) for _ in range(k)]
        content = head + "".join(" " + w for w in body)
        while count(content) > prompt_tokens and body:  # a merge across the seam: drop words until it fits
            body.pop()
            content = head + "".join(" " + w for w in body)
        while count(content) < prompt_tokens:
            body.append(rng.choice(words))
            content = head + "".join(" " + w for w in body)
        if count(content) != prompt_tokens:
            raise ValueError(f"could not make a prompt of {prompt_tokens} tokens (got {count(content)})")
        out.append([{"role": "user", "content": content}])
    return out


# ----- servers -----

def server_command(mode: str, port: int, hf_dir: str | None, served_name: str) -> list[str]:
    if mode == "shardlm":
        # --precompile: every prefill and decode bucket compiled before it listens, as a production
        # server warms up (the warm-up rounds below cannot hit every packing of prompts a level makes).
        return [os.path.join(BIN, "shardlm"), "serve", "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", served_name, "--precompile"]
    cmd = [os.path.join(BIN, "transformers"), "serve", hf_dir, "--device", "cpu", "--dtype", "float32",
           "--host", "127.0.0.1", "--port", str(port)]
    return cmd + (["--continuous-batching"] if mode == "hf_cb" else [])


class Server:
    """A server in a process group of its own; `stop()` ends the whole group."""

    def __init__(self, mode: str, cmd: list[str], port: int, log_path: str):
        self.mode, self.cmd, self.port, self.log_path = mode, cmd, port, log_path
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        self.pgid = self.proc.pid

    def wait_ready(self, timeout_s: float) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.mode} exited with {self.proc.returncode} before it was ready:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.mode} not ready after {timeout_s:.0f} s:\n{self.tail()}")

    def cpu_s(self) -> float:
        """CPU seconds (user + system) of the live processes of the server's group."""
        tick, total = os.sysconf("SC_CLK_TCK"), 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.pgid:  # fields[0] is the state: pgrp is the 5th field of stat
                total += int(fields[11]) + int(fields[12])
        return total / tick

    def rss_bytes(self) -> int | None:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) * 1024
        except (OSError, StopIteration):
            return None

    def tail(self, n: int = 30) -> str:
        self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.pgid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # stragglers of the group (the leader gone, a child left)
            os.killpg(self.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()


def wait_quiet(server: Server | None, max_wait_s: float, threshold: float = 0.1, window_s: float = 3.0) -> float | None:
    """common.wait_until_quiet, not counting the (idle) server's own CPU time or this process's: waits up to
    max_wait_s for a window in which other processes take under `threshold` of the machine."""
    t0, said = time.perf_counter(), -60.0
    while True:
        start, own0, srv0 = cpu_seconds(), sum(os.times()[:2]), server.cpu_s() if server else 0.0
        if start is None:
            return None
        time.sleep(window_s)
        srv = (server.cpu_s() if server else 0.0) - srv0
        busy = max(0.0, cpu_seconds()[0] - start[0] - srv - (sum(os.times()[:2]) - own0)) / (window_s * os.cpu_count())
        waited = time.perf_counter() - t0
        if busy < threshold or waited > max_wait_s:
            return busy
        if waited - said >= 60:
            print(f"  machine {busy:.0%} busy with other processes; waiting for it to be quiet ...", flush=True)
            said = waited


# ----- load -----

def request_kwargs(mode: str, model: str, messages: list[dict], output_tokens: int) -> dict:
    kw = {"model": model, "messages": messages, "max_tokens": output_tokens, "stream": True,
          "stream_options": {"include_usage": True}}
    if mode == "shardlm":
        kw.update(temperature=0.0, extra_body={"ignore_eos": True})
    else:  # transformers serve refuses unknown fields; its generation_config replaces the model's (no EOS)
        kw["extra_body"] = {"generation_config": json.dumps(
            {"max_new_tokens": output_tokens, "min_new_tokens": output_tokens, "do_sample": False})}
    return kw


async def one_request(client, kw: dict) -> dict:
    t0 = time.perf_counter()
    times, usage, finish, error = [], None, None, None
    try:
        stream = await client.chat.completions.create(**kw)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    times.append(now)
                if choice.finish_reason:
                    finish = choice.finish_reason
    except Exception as e:  # noqa: BLE001 - recorded, the level goes on
        error = f"{type(e).__name__}: {e}"[:500]
    end = time.perf_counter()
    return {"start": t0, "end": end, "ttft": times[0] - t0 if times else None, "itl": list(np.diff(times)),
            "chunks": len(times), "span": times[-1] - times[0] if len(times) > 1 else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "prompt_tokens": usage.prompt_tokens if usage else None, "finish_reason": finish, "error": error}


async def run_level(base_url: str, mode: str, model: str, prompts: list, concurrency: int, per_client: int,
                    output_tokens: int) -> tuple[list[dict], float]:
    import httpx
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=3600.0,
                                http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 4),
                                                              timeout=3600.0))
    results: list[dict] = []

    async def worker(c):
        for k in range(per_client):
            messages = prompts[(c * per_client + k) % len(prompts)]
            results.append(await one_request(client, request_kwargs(mode, model, messages, output_tokens)))

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in range(concurrency)))
    finally:
        await client.close()
    return results, time.perf_counter() - t0


def sec(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def rx(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def ratio(a, b):
    return a / b if a is not None and b else None


def dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else None


def summarize(results: list[dict], wall: float, concurrency: int, prompt_tokens: int, output_tokens: int) -> dict:
    ok = [r for r in results if r["error"] is None]
    toks = sum(r["completion_tokens"] or 0 for r in ok)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [g for r in ok for g in r["itl"]]
    tpot = [r["span"] / (r["completion_tokens"] - 1) for r in ok
            if r["span"] is not None and (r["completion_tokens"] or 0) > 1]
    finish: dict[str, int] = {}
    for r in ok:
        finish[str(r["finish_reason"])] = finish.get(str(r["finish_reason"]), 0) + 1
    t0 = min(r["start"] for r in results)
    per_request = [{"start_s": r["start"] - t0, "e2e_s": r["end"] - r["start"], "ttft_s": r["ttft"],
                    "completion_tokens": r["completion_tokens"], "prompt_tokens": r["prompt_tokens"],
                    "content_chunks": r["chunks"], "tpot_s": r["span"] / (r["completion_tokens"] - 1)
                    if r["span"] is not None and (r["completion_tokens"] or 0) > 1 else None,
                    "finish_reason": r["finish_reason"], "error": r["error"]} for r in results]
    return {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
            "error_samples": sorted({r["error"] for r in results if r["error"]})[:3],
            "output_tokens": toks, "wall_s": wall, "output_tokens_per_s": toks / wall, "requests_per_s": len(ok) / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "ttft_max_s": max(ttft) if ttft else None,
            "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99), "tpot_p50_s": pct(tpot, 50),
            "content_chunks": sum(r["chunks"] for r in ok),
            "completion_tokens_not_m": sum(r["completion_tokens"] != output_tokens for r in ok),
            "prompt_tokens_seen": sorted({r["prompt_tokens"] for r in ok}),
            "prompt_tokens_not_n": sum(r["prompt_tokens"] != prompt_tokens for r in ok), "finish_reasons": finish,
            "per_request": per_request}


def run_server(mode: str, args, prompts: dict, hf_dir: str | None) -> dict:
    from shardlm.engine.launch import free_port

    port = free_port()
    served = "smollm2-135m-instruct" if mode == "shardlm" else hf_dir
    cmd = server_command(mode, port, hf_dir, served)
    log_path = os.path.join(cache_dir(), f"{mode}.log")
    base_url = f"http://127.0.0.1:{port}/v1"
    out = {"mode": mode, "what": MODES[mode], "command": " ".join(cmd), "log": os.path.relpath(log_path, HERE),
           "levels": []}
    log(f"{mode}: {' '.join(cmd)}")
    wait_quiet(None, args.quiet_wait)
    t0 = time.perf_counter()
    server = Server(mode, cmd, port, log_path)
    try:
        out["ready_s"] = server.wait_ready(args.start_timeout)
        first, w = asyncio.run(run_level(base_url, mode, served, prompts["first"], 1, 1, args.output_tokens))
        if first[0]["error"]:
            raise RuntimeError(f"{mode}: the first request failed: {first[0]['error']}\n{server.tail()}")
        out["first_request_s"] = w
        out["startup_s"] = time.perf_counter() - t0
        log(f"  ready after {out['ready_s']:.1f} s, first request {w:.1f} s (TTFT {first[0]['ttft']:.2f} s)")
        for c in args.concurrency:
            warm, warm_wall = asyncio.run(run_level(base_url, mode, served, prompts[c]["warmup"], c, 1,
                                                    args.output_tokens))
            quiet = wait_quiet(server, args.quiet_wait)
            busy0, own0, srv0 = cpu_seconds(), sum(os.times()[:2]), server.cpu_s()
            results, wall = asyncio.run(run_level(base_url, mode, served, prompts[c]["timed"], c,
                                                  args.requests_per_client, args.output_tokens))
            busy1, own1, srv1 = cpu_seconds(), sum(os.times()[:2]), server.cpu_s()
            s = summarize(results, wall, c, args.prompt_tokens, args.output_tokens)
            s.update(others_before=quiet, warmup_wall_s=warm_wall, warmup_errors=sum(r["error"] is not None for r in warm),
                     server_cpu_s=srv1 - srv0, client_cpu_s=own1 - own0, server_rss_bytes=server.rss_bytes())
            if busy0 is not None and busy1 is not None:
                s["others_cpu_share"] = max(0.0, (busy1[0] - busy0[0]) - s["server_cpu_s"] - s["client_cpu_s"]) / (
                    wall * os.cpu_count())
            out["levels"].append(s)
            log(f"  c={c:2d}: {s['requests']:3d} req, {s['output_tokens']:5d} tok in {wall:6.1f} s = "
                f"{s['output_tokens_per_s']:6.1f} tok/s; TTFT p50 {sec(s['ttft_p50_s'])} p99 {sec(s['ttft_p99_s'])} s; "
                f"ITL p50 {ms(s['itl_p50_s'])} p99 {ms(s['itl_p99_s'])} ms; TPOT p50 "
                f"{ms(s['tpot_p50_s'])} ms; server CPU {s['server_cpu_s'] / wall:.2f} cores, client "
                f"{s['client_cpu_s'] / wall:.2f}, others {s.get('others_cpu_share', 0):.0%}"
                + (f"; {s['errors']} ERRORS: {s['error_samples']}" if s["errors"] else "")
                + (f"; {s['completion_tokens_not_m']} completions not of {args.output_tokens} tokens"
                   if s["completion_tokens_not_m"] else "")
                + (f"; prompt tokens {s['prompt_tokens_seen']}" if s["prompt_tokens_not_n"] else ""))
    finally:
        server.stop()
        with open(log_path, errors="replace") as f:
            text = f.read()
        out["log_error_lines"] = [line.strip()[:300] for line in text.splitlines()
                                  if any(w in line for w in ("Traceback", "ERROR", "Error:", "Exception"))][:10]
    return out


def compare(servers: dict, concurrency: list[int]) -> list[dict]:
    rows = []
    if "shardlm" not in servers:
        return rows
    hf_modes = [m for m in ("hf", "hf_cb") if m in servers]
    for i, c in enumerate(concurrency):
        s = servers["shardlm"]["levels"][i]
        row = {"concurrency": c}
        for m in hf_modes:
            h = servers[m]["levels"][i]
            row[f"vs_{m}"] = {"output_tokens_per_s": ratio(s["output_tokens_per_s"], h["output_tokens_per_s"]),
                              "ttft_p99": ratio(s["ttft_p99_s"], h["ttft_p99_s"]),
                              "ttft_p50": ratio(s["ttft_p50_s"], h["ttft_p50_s"])}
        if hf_modes:
            best = max(hf_modes, key=lambda m: servers[m]["levels"][i]["output_tokens_per_s"])
            row["best_hf"] = best
            row["vs_best_hf"] = row[f"vs_{best}"]
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length with the chat template")
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--only", choices=["shardlm", "hf"], help="one side only (hf: both transformers serve modes)")
    ap.add_argument("--hf-modes", default="hf,hf_cb", help="transformers serve modes: hf, hf_cb (continuous batching)")
    ap.add_argument("--start-timeout", type=float, default=900.0, help="seconds for a server to answer /health")
    ap.add_argument("--quiet-wait", type=float, default=30.0, help="seconds to wait for a quiet machine per level")
    ap.add_argument("--out-dir", default=RESULTS_DIR)
    ap.add_argument("--no-write", action="store_true", help="print only (for checking the script)")
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    source = source_state()

    import transformers

    from shardlm.checkpoints.loader import embedded_model_path

    gguf = embedded_model_path()
    modes = [] if args.only == "hf" else ["shardlm"]
    if args.only != "shardlm":
        modes += [m for m in args.hf_modes.split(",") if m]
    hf_dir = hf_model_dir(gguf) if any(m != "shardlm" for m in modes) else None
    d, f = os.path.split(gguf)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    prompts: dict = {"first": make_prompts(tok, 1, args.prompt_tokens)}  # each server gets the same ones
    i = 1
    for c in args.concurrency:
        n_timed = c * args.requests_per_client
        prompts[c] = {"warmup": make_prompts(tok, c, args.prompt_tokens, i),
                      "timed": make_prompts(tok, n_timed, args.prompt_tokens, i + c)}
        i += c + n_timed
    log(f"load: concurrency {args.concurrency}, {args.requests_per_client} requests a client, chat prompts of "
        f"{args.prompt_tokens} tokens (chat template included), {args.output_tokens} output tokens (stop tokens off), "
        f"greedy, streamed; {os.path.basename(gguf)} (HF: {hf_dir}), float32, CPU")

    servers = {}
    for mode in modes:
        servers[mode] = run_server(mode, args, prompts, hf_dir)

    log()
    log("| server | clients | requests | output tokens | wall s | output tok/s | TTFT p50 / p99 s | ITL p50 / p99 ms "
        "| TPOT p50 ms |")
    log("|---|---|---|---|---|---|---|---|---|")
    for mode, srv in servers.items():
        for s in srv["levels"]:
            log(f"| {mode} | {s['concurrency']} | {s['requests']}" + (f" ({s['errors']} failed)" if s["errors"] else "")
                + f" | {s['output_tokens']} | {s['wall_s']:.1f} | {s['output_tokens_per_s']:.1f} | "
                f"{sec(s['ttft_p50_s'])} / {sec(s['ttft_p99_s'])} | {ms(s['itl_p50_s'])} / {ms(s['itl_p99_s'])} | "
                f"{ms(s['tpot_p50_s'])} |")
    log()
    ratios = compare(servers, args.concurrency)
    for r in [r for r in ratios if "best_hf" in r]:
        v = r["vs_best_hf"]
        log(f"c={r['concurrency']:2d}: shardlm / {r['best_hf']} (the better HF mode here): "
            f"{rx(v['output_tokens_per_s'])} output tok/s, p99 TTFT {rx(v['ttft_p99'])}, p50 TTFT {rx(v['ttft_p50'])}")
    aim = None
    if ratios and "best_hf" in ratios[0] and 32 in args.concurrency:
        r = ratios[args.concurrency.index(32)]
        v = r["vs_best_hf"]
        aim = (v["output_tokens_per_s"] or 0) >= 3 and (v["ttft_p99"] or 2) < 1
        log(f"Aim at concurrency 32: >= 3x the better transformers serve mode's output tok/s with a lower p99 TTFT: "
            f"{rx(v['output_tokens_per_s'])}, p99 TTFT {rx(v['ttft_p99'])}: "
            + ("met" if aim else "NOT met"))

    result = {"benchmark": "serve_load", "started": started,
              "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "source": source, "machine": machine(),
              "versions": {p: dist_version(p) for p in ("openai", "httpx", "fastapi", "uvicorn", "transformers", "torch",
                                                    "jax", "shardlm")},
              "settings": {"concurrency": args.concurrency, "requests_per_client": args.requests_per_client,
                           "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
                           "model": os.path.basename(gguf), "hf_model_dir": hf_dir, "greedy": True, "dtype": "float32",
                           "endpoint": "/v1/chat/completions", "stream": True,
                           "fixed_length": {"shardlm": {"ignore_eos": True},
                                            "hf": {"generation_config": {"max_new_tokens": args.output_tokens,
                                                                         "min_new_tokens": args.output_tokens,
                                                                         "do_sample": False}}}},
              "servers": servers, "shardlm_vs_hf": ratios, "aim_c32_3x_and_lower_p99_ttft_met": aim}
    if not args.no_write:
        path = write_results(args.out_dir, "serve_load", result, log.lines)
        log(f"wrote {path}.json, .txt")
    return result


if __name__ == "__main__":
    def _term(signum, frame):  # SIGTERM runs the finally blocks that stop the servers
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    main()
