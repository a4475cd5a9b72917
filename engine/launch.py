"""`shardlm launch`: N local processes of one multi-host command, for development and tests.

Each process gets K virtual CPU devices and joins the others through jax.distributed on a free
loopback port, exactly as the hosts of a slice would. Their output is forwarded line by line
with a `[i]` prefix. When one process dies the others are stopped at once (a job cannot go on
without it) and the launcher exits non-zero naming the lost process. A SIGTERM or SIGINT to the
launcher is passed on to every process (a job drains, engine/job_control.py); a process that
exits 75 (drained: rerun it) is waited for with the others, which stop at the same step, and the
launcher then exits 75 too.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

DISTRIBUTED_COMMANDS = ("run", "serve")  # shardlm subcommands that take --coordinator/--num-processes/--process-id
STOP_GRACE_S = 5.0
EX_TEMPFAIL = 75  # a drained process: every process of the job drains at the same step


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices: int) -> dict[str, str]:
    """This environment, on CPU with `devices` virtual devices."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags.strip()} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _forward(stream, prefix: str, dest) -> None:
    for line in iter(stream.readline, ""):
        dest.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
        dest.flush()
    stream.close()


def _how_it_ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def launch(num_processes: int, devices_per_process: int, command: list[str]) -> int:
    """Run `shardlm <command>` in `num_processes` local processes; 0 when all succeed."""
    if num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
    if devices_per_process < 1:
        raise ValueError(f"--devices-per-process must be >= 1, got {devices_per_process}")
    if not command or command[0] not in DISTRIBUTED_COMMANDS:
        raise ValueError(f"launch runs a multi-host shardlm command after `--`, one of: "
                         f"{', '.join(DISTRIBUTED_COMMANDS)} (e.g. `shardlm launch --num-processes 2 -- run "
                         f"--input in.jsonl --output out.jsonl --mesh x=2`); got {' '.join(command) or 'nothing'}")
    taken = {"--coordinator", "--num-processes", "--process-id"} & {a.split("=")[0] for a in command}
    if taken:
        raise ValueError(f"launch sets {', '.join(sorted(taken))} itself; leave them out of the command")
    coordinator = f"127.0.0.1:{free_port()}"
    env = process_env(devices_per_process)
    procs, threads = [], []
    try:
        for i in range(num_processes):
            argv = [sys.executable, "-m", "shardlm.engine.cli", *command, "--coordinator", coordinator,
                    "--num-processes", str(num_processes), "--process-id", str(i)]
            # A session of its own: a terminal's Ctrl-C reaches the launcher only, which passes it on once.
            p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
            procs.append(p)
            print(f"launch: process {i} pid {p.pid}", file=sys.stderr, flush=True)
            for stream, dest in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
                t = threading.Thread(target=_forward, args=(stream, f"[{i}] ", dest), daemon=True)
                t.start()
                threads.append(t)
        # One waiter per process reports its end the moment it happens, so the process that died
        # first is the one named, not a peer that aborted a moment later when its collectives broke.
        ended = queue.SimpleQueue()
        for i, p in enumerate(procs):
            threading.Thread(target=lambda i=i, p=p: (p.wait(), ended.put(i)), daemon=True).start()
        def forward(signum, frame):
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signum)

        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, forward)
        drained = False
        for _ in procs:
            i = ended.get()
            code = procs[i].returncode
            if code == EX_TEMPFAIL:
                drained = True
            elif code != 0:
                running = sum(p.returncode is None for p in procs)
                print(f"launch: process {i} (pid {procs[i].pid}) {_how_it_ended(code)}; "
                      f"stopping the other {running} process(es)", file=sys.stderr, flush=True)
                return code if code > 0 else 1
        return EX_TEMPFAIL if drained else 0
    finally:
        _stop(procs)
        for t in threads:
            t.join(timeout=1.0)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM whatever still runs, SIGKILL what is left after a grace period."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
