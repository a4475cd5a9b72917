"""Time to the first token of `shardlm generate` from the process's start: cold (an empty compile
cache) against warm (the cache a first run left), with the programs each compiled.

    python benchmarks/warm_start.py             # about 3 minutes on the 2-core machine
    python benchmarks/warm_start.py --rounds 1  # one cold and one warm start

Each round makes a fresh cache directory, then runs the same command `--warm` + 1 times:
`shardlm generate --compile-cache DIR --chat --max-new-tokens 8 "What is the capital of France?"`
with the defaults otherwise (the embedded model, the paged engine, its pool sized from memory). The
first run is cold: it traces and compiles every program it uses and stores them; the others are
warm. The clock starts just before the process is started and stops when its first generated text
reaches its stdout (the single prompt is streamed). The stderr lines the CLI prints as it goes are
timestamped as they arrive: the pool's line, printed once the model is loaded and the engine built,
splits the time into loading (imports, reading the weights) and what follows (tracing and compiling,
or reading stored programs back, then the first prefill). The child counts
JAX's monitoring events: XLA compiles (backend_compile_duration), persistent-cache hits and misses,
and shardlm's program-store loads.

Writes benchmarks/results/warm_start.json and .txt.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time

from common import RESULTS_DIR, Log, machine, median, source_state, wait_until_quiet, write_results

CHILD = """import collections, json, sys
events = collections.Counter()
import jax
jax.monitoring.register_event_listener(lambda event, **kw: events.update([event]))
jax.monitoring.register_event_duration_secs_listener(lambda event, secs, **kw: events.update([event]))
from shardlm.engine.cli import main
rc = main(sys.argv[1:])
print("EVENTS" + json.dumps(events), file=sys.stderr, flush=True)
sys.exit(rc)
"""
PROMPT = "What is the capital of France?"
COMPILED = "/jax/core/compile/backend_compile_duration"
CACHE = "/jax/compilation_cache/"


def start(cache_dir: str, new_tokens: int) -> dict:
    """One `shardlm generate` process: seconds from its start to each stderr line and to its first
    stdout text, its whole wall time, its events and its text."""
    from shardlm.engine.programs import LOAD_EVENT

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    argv = ["generate", "--compile-cache", cache_dir, "--chat", "--max-new-tokens", str(new_tokens), PROMPT]
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", CHILD, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ, "out")
    sel.register(p.stderr, selectors.EVENT_READ, "err")
    out, err, first_token, stages = b"", b"", None, []
    open_streams = 2
    while open_streams:
        for key, _ in sel.select():
            chunk = os.read(key.fileobj.fileno(), 65536)
            now = time.perf_counter() - t0
            if not chunk:
                sel.unregister(key.fileobj)
                open_streams -= 1
            elif key.data == "out":
                if first_token is None and chunk.strip():
                    first_token = now
                out += chunk
            else:
                err += chunk
                stages += [(now, line) for line in chunk.decode(errors="replace").splitlines()
                           if line.strip() and not line.startswith("EVENTS")]
    rc, wall = p.wait(), time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"shardlm generate exited {rc}: {err.decode(errors='replace')[-2000:]}")
    events = json.loads(err.decode().rsplit("EVENTS", 1)[1].splitlines()[0])
    loaded = next(s for s, line in stages if line.startswith("KV pool"))  # printed once the engine is built
    return {"first_token_s": first_token, "loaded_s": loaded, "after_load_s": first_token - loaded,
            "wall_s": wall, "text": out.decode().strip(),
            "stages": [{"s": round(s, 3), "line": line[:160]} for s, line in stages],
            "xla_compiles": events.get(COMPILED, 0), "cache_hits": events.get(CACHE + "cache_hits", 0),
            "cache_misses": events.get(CACHE + "cache_misses", 0), "programs_loaded": events.get(LOAD_EVENT, 0)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="fresh cache directories, each a cold start")
    ap.add_argument("--warm", type=int, default=2, help="warm starts after each cold one")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--quiet-wait", type=float, default=30.0)
    ap.add_argument("--out-dir", default=RESULTS_DIR)
    args = ap.parse_args()

    log = Log()
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "source": source_state(), "machine": machine(), "prompt": PROMPT, "new_tokens": args.new_tokens,
              "runs": []}
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="shardlm-warm-start-") as cache_dir:
            for i in range(args.warm + 1):
                wait_until_quiet(args.quiet_wait)
                run = {"round": r, "kind": "cold" if i == 0 else "warm", **start(cache_dir, args.new_tokens)}
                result["runs"].append(run)
                log(f"round {r} {run['kind']}: first token {run['first_token_s']:.2f} s (loaded at "
                    f"{run['loaded_s']:.2f} s, then {run['after_load_s']:.2f} s), process {run['wall_s']:.2f} s; "
                    f"{run['xla_compiles']} XLA compiles, cache {run['cache_hits']} hits / {run['cache_misses']} "
                    f"misses, {run['programs_loaded']} programs loaded")
    texts = {run["text"] for run in result["runs"]}
    pick = lambda kind, field: median([run[field] for run in result["runs"] if run["kind"] == kind])  # noqa: E731
    cold, warm = pick("cold", "first_token_s"), pick("warm", "first_token_s")
    cold_after, warm_after = pick("cold", "after_load_s"), pick("warm", "after_load_s")
    result |= {"cold_first_token_s": cold, "warm_first_token_s": warm, "speedup": cold / warm,
               "cold_after_load_s": cold_after, "warm_after_load_s": warm_after,
               "speedup_after_load": cold_after / warm_after, "same_text": len(texts) == 1}
    log(f"first token from the process's start, medians: cold {cold:.2f} s, warm {warm:.2f} s: {cold / warm:.2f}x; "
        f"from the engine's start (model loaded): cold {cold_after:.2f} s, warm {warm_after:.2f} s: "
        f"{cold_after / warm_after:.2f}x; the same text in every run: {len(texts) == 1} ({sorted(texts)[0][:60]!r})")
    write_results(args.out_dir, "warm_start", result, log.lines)


if __name__ == "__main__":
    main()
