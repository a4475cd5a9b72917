"""What the benchmarks share: result writing, machine facts, other processes' CPU share, the memory
bandwidth probe, and timing of the engine's steps. No torch: a benchmark that compares with HF
transformers imports torch itself.

The scripts run as `python benchmarks/NAME.py`; Python puts benchmarks/ first on sys.path, so
`import common` finds this file. Importing it imports neither JAX nor torch (the functions that
need JAX import it), so a script may set XLA_FLAGS after importing it, and a child process that
measures HF transformers' memory does not hold JAX.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BW_SAMPLE_EVERY = 16  # decode steps between bandwidth samples in `steady_decode`


# ----- report lines and result files -----

class Log:
    """`log(line)` prints a line and keeps it for the .txt report (`log.lines`)."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


def _plain(o):
    return o.item() if hasattr(o, "item") else str(o)  # numpy scalars; anything else as text


def write_results(out_dir: str, stem: str, result: dict, lines: list[str] | None = None) -> str:
    """Write `out_dir/stem.json` (the figures) and, given report lines, `out_dir/stem.txt`."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, stem)
    with open(path + ".json", "w") as f:
        json.dump(result, f, indent=1, default=_plain)
    if lines is not None:
        with open(path + ".txt", "w") as f:
            f.write("\n".join(lines) + "\n")
    return path


def median(xs) -> float:
    return float(statistics.median(xs))


# ----- what was measured, and where -----

def source_state() -> dict:
    """The commit measured, and the files that differed from it when the run started."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*a):
        try:
            return subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "modified": status.splitlines() if status else []}


def _version(package: str) -> str | None:
    """A package's version without importing it (the imported module's own where it is loaded)."""
    if package in sys.modules:
        return sys.modules[package].__version__
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """CPU, cores, memory, OS, versions, JAX devices and XLA_FLAGS (starts the JAX backend).
    torch_threads is None unless this process imported torch."""
    import flax
    import jax
    import jaxlib

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    torch = sys.modules.get("torch")
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_bytes": mem, "platform": platform.platform(),
            "python": sys.version.split()[0], "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "numpy": np.__version__,
            "torch": _version("torch"), "transformers": _version("transformers"),
            "torch_threads": torch.get_num_threads() if torch else None,
            "jax_devices": [str(d) for d in jax.devices()], "XLA_FLAGS": os.environ.get("XLA_FLAGS")}


# ----- other processes -----

def cpu_seconds() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of the whole machine so far (all processes, all cores); busy
    includes steal, the time the hypervisor gave our virtual CPUs to someone else. None where
    /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq + steal) / tick, steal / tick


class Others:
    """Share of the machine's CPU time taken by other processes (and steal) while a section ran.

    Timings on a 2-core machine are meaningless if something else runs: torch's OpenMP barriers stall
    for milliseconds when one of its two threads is descheduled. `begin(name)` ... `end()` records
    `sections[name]` (None without /proc/stat). children=True counts the CPU time of this process's
    finished child processes as its own (for benchmarks that run each load in a child).
    """

    def __init__(self, children: bool = False):
        self.sections: dict[str, float | None] = {}  # others + steal, as a share of all cores' time
        self.steal: dict[str, float | None] = {}
        self.attempts: dict[str, int] = {}
        self._own = (lambda: sum(os.times()[:4])) if children else (lambda: sum(os.times()[:2]))
        self._open = None

    def begin(self, name: str) -> None:
        self.end()
        self._open = (name, time.perf_counter(), cpu_seconds(), self._own())

    def end(self) -> None:
        if self._open is None:
            return
        name, w0, start, o0 = self._open
        self._open = None
        now = cpu_seconds()
        if start is None or now is None:
            self.sections[name] = self.steal[name] = None
            return
        cap = (time.perf_counter() - w0) * os.cpu_count()
        others = (now[0] - start[0]) - (self._own() - o0)
        self.sections[name] = max(0.0, others / cap)
        self.steal[name] = (now[1] - start[1]) / cap


OTHERS = Others()  # one per benchmark process


def wait_until_quiet(max_wait_s: float, threshold: float = 0.1, window_s: float = 3.0) -> float | None:
    """Wait (up to max_wait_s) for a window in which the machine is under `threshold` busy; returns
    the last window's busy share (None without /proc/stat)."""
    t0 = time.perf_counter()
    said = -60.0
    while True:
        start = cpu_seconds()
        if start is None:
            return None
        time.sleep(window_s)
        busy = (cpu_seconds()[0] - start[0]) / (window_s * os.cpu_count())
        waited = time.perf_counter() - t0
        if busy < threshold or waited > max_wait_s:
            return busy
        if waited - said >= 60:  # progress on the terminal only, not in the recorded report
            print(f"  machine {busy:.0%} busy with other processes; waiting for it to be quiet ...", flush=True)
            said = waited


# ----- memory bandwidth -----

_MATVEC: dict = {}


def local_bandwidth(reps: int = 3, rows: int = 8192, cols: int = 8192) -> float:
    """Best JAX [rows, cols] float32 matrix-vector bandwidth right now (bytes/s: matrix, vector and
    result). Sampled during each decode measurement: the 2-core machine's bandwidth jumps between
    ~35 and ~55 GB/s for tens of seconds at a time, so a figure from minutes earlier is no reference."""
    import jax

    if not _MATVEC:
        rng = np.random.default_rng(3)
        _MATVEC["a"] = jax.numpy.asarray(rng.standard_normal((rows, cols), dtype=np.float32))
        _MATVEC["x"] = jax.numpy.asarray(rng.standard_normal((cols,), dtype=np.float32))
        _MATVEC["f"] = jax.jit(lambda a, x: a @ x)
        _MATVEC["f"](_MATVEC["a"], _MATVEC["x"]).block_until_ready()
    a, x, f = _MATVEC["a"], _MATVEC["x"], _MATVEC["f"]
    nbytes = a.nbytes + x.nbytes + a.shape[0] * 4
    f(a, x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


# ----- bytes a step reads -----

def params_nbytes(params) -> int:
    import jax

    return int(sum(x.nbytes for x in jax.tree.leaves(params)))


def cache_nbytes(state) -> int:
    """Bytes of a decode state's KV cache (all slots of every row; int8 scales included)."""
    import jax

    return int(sum(x.nbytes for x in jax.tree.leaves((state.cache.k, state.cache.v))))


def kv_bytes_per_step(cfg, B: int, S: int, itemsize: int = 4) -> int:
    """KV cache bytes a decode step reads when it attends over S slots of B rows."""
    return cfg.n_layers * 2 * B * S * cfg.n_kv_heads * cfg.head_dim * itemsize


# ----- timing the engine's steps (Engine.prefill / insert / generate) -----

def time_prefill(engine, params, prompt: list[int], reps: int) -> tuple[dict, object]:
    """One prompt's prefill: the first call (compiles) timed alone, one more untimed, then `reps`
    timed calls. Returns the figures and the last Prefix (to fill decode slots with)."""
    import jax

    t0 = time.perf_counter()
    prefix = jax.block_until_ready(engine.prefill(params, prompt))
    first_s = time.perf_counter() - t0
    jax.block_until_ready(engine.prefill(params, prompt))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        prefix = jax.block_until_ready(engine.prefill(params, prompt))
        times.append(time.perf_counter() - t0)
    return {"median_s": median(times), "best_s": min(times), "times_s": times, "first_call_s": first_s}, prefix


def run_steps(engine, params, state, n: int):
    """`n` untimed decode steps (warm-up; the first compiles). Returns the state and their seconds."""
    import jax

    t0 = time.perf_counter()
    tokens = None
    for _ in range(n):
        state, tokens = engine.generate(params, state)
    jax.block_until_ready((state, tokens))
    return state, time.perf_counter() - t0


def timed_steps(engine, params, state, steps: int, bandwidth_every: int = 0):
    """`steps` decode steps timed one by one, the host reading each step's tokens as the batching
    loop does; with bandwidth_every, `local_bandwidth` is sampled between every that many steps
    (outside their timing). Returns (state, step seconds, bandwidth samples)."""
    times, bandwidth = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        state, tokens = engine.generate(params, state)
        np.asarray(tokens)
        times.append(time.perf_counter() - t0)
        if bandwidth_every and (i + 1) % bandwidth_every == 0:
            bandwidth.append(local_bandwidth())
    return state, times, bandwidth


def steady_decode(engine, params, prompts: list[list[int]], steps: int, warm_steps: int = 3) -> dict:
    """Steady-state decode: `steps` timed steps once every slot holds one of `prompts`, after
    `warm_steps` on a separate state (so positions start over); the bandwidth is sampled before,
    every BW_SAMPLE_EVERY steps of, and after the timed steps, and the median kept."""
    import jax

    def filled():
        state = engine.init_decode_state()
        for slot, p in enumerate(prompts):
            state = engine.insert(engine.prefill(params, p), state, slot)
        return jax.block_until_ready(state)

    run_steps(engine, params, filled(), warm_steps)
    state = filled()
    bw = [local_bandwidth()]
    state, times, samples = timed_steps(engine, params, state, steps, BW_SAMPLE_EVERY)
    bw += samples + [local_bandwidth()]
    del state
    B = engine.batch_size
    total = sum(times)
    return {"steps": steps, "total_s": total, "mean_step_s": total / steps, "median_step_s": median(times),
            "tok_s": B * steps / total, "median_step_tok_s": B / median(times),
            "bandwidth": median(bw), "bandwidth_samples": bw}


# ----- timing the paged engine's steps (PagedEngine.prefill / decode over a PagePool) -----

def paged_decode_at(engine, params, batch: int, live: int, steps: int = 16, warm_steps: int = 3) -> dict:
    """Direct timing of `engine.decode` (a PagedEngine) for `batch` sequences holding about `live`
    tokens: each sequence gets pages for live - steps // 2 tokens in a fresh PagePool (no prefill:
    the pool's values do not change a step's cost), then `steps` decode steps, each allocating one
    more token per sequence as the scheduler does and reading the tokens on the host, so the live
    lengths run around `live`. `warm_steps` first on another pool (the first compiles the batch
    bucket). Returns the step times."""
    from shardlm.engine.sampling import SamplingParams
    from shardlm.engine.scheduler import DecodeBatch

    rng = np.random.default_rng(4)
    start = live - steps // 2
    sampling = (SamplingParams(),) * batch

    def run(n):
        pool = engine.new_pool()
        for s in range(batch):
            pool.allocate(s, start)
        times = []
        for _ in range(n):
            for s in range(batch):
                pool.allocate(s, 1)
            b = DecodeBatch(tuple(range(batch)), tuple(int(t) for t in rng.integers(0, engine.cfg.vocab_size, batch)),
                            tuple(pool.length(s) - 1 for s in range(batch)), sampling)
            t0 = time.perf_counter()
            np.asarray(engine.decode(params, b, pool)[0])
            times.append(time.perf_counter() - t0)
        return times

    run(warm_steps)
    times = run(steps)
    return {"batch": batch, "live_tokens": [start + 1, start + steps], "steps": steps,
            "mean_step_s": sum(times) / steps, "median_step_s": median(times), "times_s": times}


class PagedStepTimer:
    """Wraps a PagedEngine's prefill and decode (instance attributes, removed by `remove`) to time
    each step to its tokens being ready (the scheduler reads them on the host right after, so
    blocking here adds no wait); `steps` holds (kind, n, seconds): kind "prefill" (n chunks) or
    "decode" (n sequences)."""

    def __init__(self, engine):
        import jax

        self.engine, self.steps = engine, []
        for kind in ("prefill", "decode"):
            inner = getattr(engine, kind)

            def timed(params, batch, pool, _inner=inner, _kind=kind):
                t0 = time.perf_counter()
                out = _inner(params, batch, pool)
                jax.block_until_ready(out[0])
                n = len(batch.chunks) if _kind == "prefill" else len(batch.seq_ids)
                self.steps.append((_kind, n, time.perf_counter() - t0))
                return out

            setattr(engine, kind, timed)

    def remove(self):
        del self.engine.prefill, self.engine.decode

    def total(self, kind: str) -> tuple[int, float]:
        """(steps, seconds) of one kind."""
        xs = [s for k, _, s in self.steps if k == kind]
        return len(xs), sum(xs)
