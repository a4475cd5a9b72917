"""`shardlm run` (JSONL jobs) and `shardlm launch` (local multi-process jobs).

The model is a tiny random Llama written as a GGUF with the embedded SmolLM2 tokenizer (2 layers,
d_model 64, untied output so greedy tokens follow the context instead of echoing it): real jobs
of real processes, but each step costs milliseconds. The references are a one-device run and a
one-process 8-device run in this process; the multi-process runs are separate `shardlm launch`
processes joined by jax.distributed over loopback, each with 4 virtual CPU devices.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import gguf
import numpy as np
import pytest

from shardlm.checkpoints.gguf import read_metadata
from shardlm.checkpoints.loader import embedded_model_path
from shardlm.engine import LLM, SamplingParams, jobs, launch
from shardlm.engine.cli import main

MAX_SEQ_LEN = 128
SLOTS = 4
MESH = {"x": 2, "y": 2, "z": 2}
MESH_ARGS = ["--mesh", "x=2,y=2,z=2", "--layout", "2d_weight_stationary"]
DEFAULTS = SamplingParams(max_new_tokens=8)
WORDS = ("the quick brown fox jumps over the lazy dog while seven sleepy cats watch from a sunny window "
         "and count the clouds").split()
N_PROMPTS = 20
BAD_LINES = 4  # malformed JSON, missing id, duplicate id, over-long prompt


def write_tiny_gguf(path: str, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, seed=0,
                    context=MAX_SEQ_LEN) -> None:
    meta = read_metadata(embedded_model_path())
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-random")
    w.add_block_count(n_layers)
    w.add_context_length(context)
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(d_ff)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(meta["tokenizer.chat_template"])
    rng = np.random.default_rng(seed)
    V, D, H = len(meta["tokenizer.ggml.tokens"]), d_model, d_model // n_heads

    def proj(rows, cols):  # GGUF order [out, in], unit-variance outputs
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    w.add_tensor("token_embd.weight", rng.standard_normal((V, D)).astype(np.float32))
    w.add_tensor("output.weight", rng.standard_normal((V, D)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(D, np.float32))
    for i in range(n_layers):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", np.ones(D, np.float32))
        w.add_tensor(b + "ffn_norm.weight", np.ones(D, np.float32))
        w.add_tensor(b + "attn_q.weight", proj(n_heads * H, D))
        w.add_tensor(b + "attn_k.weight", proj(n_kv_heads * H, D))
        w.add_tensor(b + "attn_v.weight", proj(n_kv_heads * H, D))
        w.add_tensor(b + "attn_output.weight", proj(D, n_heads * H))
        w.add_tensor(b + "ffn_gate.weight", proj(d_ff, D))
        w.add_tensor(b + "ffn_up.weight", proj(d_ff, D))
        w.add_tensor(b + "ffn_down.weight", proj(D, d_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def job_lines() -> list[str]:
    """20 prompts of 3 to ~60 tokens (several length buckets), some as chat messages, some with their own
    max_new_tokens, then one line of each kind of mistake."""
    lines = []
    for i in range(N_PROMPTS):
        text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + (i * 11) % 45))
        record = {"id": f"p{i}" if i % 3 else i}  # string and integer ids
        if i % 5 == 0:
            record["messages"] = [{"role": "user", "content": text}]
        else:
            record["prompt"] = text
        if i % 4 == 1:
            record["max_new_tokens"] = 3 + i % 7
        lines.append(json.dumps(record))
    lines += ['{"id": "broken", "prompt": ', json.dumps({"prompt": "no id"}),
              json.dumps({"id": "p1", "prompt": "again"}), json.dumps({"id": "long", "prompt": "word " * 300})]
    return lines


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    write_tiny_gguf(path)
    return path


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    path = tmp_path_factory.mktemp("job") / "prompts.jsonl"
    path.write_text("\n".join(job_lines()) + "\n")
    return str(path)


def read_records(path) -> dict:
    """Output records by id (results) or by ("error", line); each must appear once."""
    with open(path, "rb") as f:
        data = f.read()
    assert data.endswith(b"\n"), "the output ends in a partial line"
    out = {}
    for raw in data.decode().splitlines():
        r = json.loads(raw)
        key = ("error", r["line"]) if "error" in r else json.dumps(r["id"])
        assert key not in out, f"{key} written twice"
        out[key] = r
    return out


def run_in_process(llm, job, output) -> dict:
    jobs.run_job(llm, job, str(output), DEFAULTS, progress=False)
    return read_records(output)


def launch_argv(tiny, job, output) -> list[str]:
    return [sys.executable, "-m", "shardlm.engine.cli", "launch", "--num-processes", "2", "--devices-per-process",
            "4", "--", "run", "--model", tiny, "--input", job, "--output", str(output), "--max-new-tokens", "8",
            "--max-seq-len", str(MAX_SEQ_LEN), "--batch-size", str(SLOTS), *MESH_ARGS]


@pytest.fixture(scope="module")
def launcher_env(tmp_path_factory) -> dict:
    """The launched processes' environment: their own device count; a compilation cache shared by
    the launches of this module, so reruns do not compile again."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


@pytest.fixture(scope="module")
def one_device(tiny, job, tmp_path_factory):
    llm = LLM.load(tiny, batch_size=SLOTS, max_seq_len=MAX_SEQ_LEN)
    return llm, run_in_process(llm, job, tmp_path_factory.mktemp("one") / "out.jsonl")


@pytest.fixture(scope="module")
def two_processes(tiny, job, launcher_env, tmp_path_factory):
    """The job on 2 processes x 4 devices, uninterrupted."""
    output = tmp_path_factory.mktemp("two") / "out.jsonl"
    p = subprocess.run(launch_argv(tiny, job, output), env=launcher_env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"[0] {N_PROMPTS} prompts done, {BAD_LINES} error records" in p.stderr
    return read_records(output)


@pytest.mark.slow
def test_job_records(one_device):
    llm, records = one_device
    results = {k: r for k, r in records.items() if k[0] != "error"}
    assert len(results) == N_PROMPTS and len(records) == N_PROMPTS + BAD_LINES
    for i, line in enumerate(job_lines()[:N_PROMPTS]):
        spec = json.loads(line)
        r = results[json.dumps(spec["id"])]
        assert set(r) == {"id", "text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"}
        ids = (llm.tokenizer.encode(llm.tokenizer.apply_chat_template(spec["messages"])) if "messages" in spec
               else llm.encode(spec["prompt"]))
        assert r["prompt_tokens"] == len(ids)
        assert r["completion_tokens"] == len(r["token_ids"]) <= spec.get("max_new_tokens", 8)
        assert r["text"] == llm.decode(r["token_ids"])
        # the job's continuous batching against the same request generated alone
        alone = llm.generate([ids], SamplingParams(max_new_tokens=spec.get("max_new_tokens", 8)))[0]
        assert (r["token_ids"], r["finish_reason"]) == (alone.token_ids, alone.finish_reason), spec["id"]
    n = N_PROMPTS
    assert records[("error", n + 1)]["id"] is None and "malformed JSON" in records[("error", n + 1)]["error"]
    assert records[("error", n + 2)] == {"id": None, "line": n + 2, "error": 'missing "id"'}
    assert records[("error", n + 3)]["id"] == "p1" and "duplicate id \"p1\" (first on line 2)" in records[("error", n + 3)]["error"]
    assert records[("error", n + 4)]["id"] == "long" and "at most 127" in records[("error", n + 4)]["error"]


@pytest.mark.slow
def test_two_processes_equal_one_process_and_one_device(tiny, job, one_device, two_processes, tmp_path):
    eight = LLM.load(tiny, mesh_shape=MESH, layout="2d_weight_stationary", batch_size=SLOTS, max_seq_len=MAX_SEQ_LEN)
    assert eight.placement.mesh.size == 8
    one_process = run_in_process(eight, job, tmp_path / "eight.jsonl")
    _, reference = one_device
    assert one_process == reference
    assert two_processes == reference
    assert sum(len(r.get("token_ids", ())) for r in reference.values()) > N_PROMPTS * 4  # real generations


@pytest.mark.slow
def test_slots_do_not_change_greedy_results(one_device, job, tmp_path):
    llm, four = one_device
    for slots in (1, 16):
        other = llm.relayout(batch_size=slots)
        assert run_in_process(other, job, tmp_path / f"slots{slots}.jsonl") == four, slots


def test_resume_cuts_torn_line_and_skips_done(one_device, job, tmp_path):
    llm, reference = one_device
    out = tmp_path / "out.jsonl"
    lines = [json.dumps(r) for r in reference.values()]
    keep = lines[:10]
    out.write_text("\n".join(keep) + "\n" + lines[10][:25])  # a torn line, as if a write was cut
    summary = jobs.run_job(llm, job, str(out), DEFAULTS, progress=False)
    assert read_records(out) == reference
    done_before = sum(1 for line in keep if "error" not in json.loads(line))
    assert summary["prompts"] == N_PROMPTS - done_before
    before = out.read_bytes()
    summary = jobs.run_job(llm, job, str(out), DEFAULTS, progress=False)
    assert out.read_bytes() == before and summary["prompts"] == 0 and summary["skipped"] == N_PROMPTS + BAD_LINES


def test_output_that_is_not_a_job_file_is_refused(one_device, job, tmp_path):
    llm, _ = one_device
    out = tmp_path / "notes.txt"
    out.write_text("my notes\n")
    with pytest.raises(ValueError, match="line 1 is not a job record"):
        jobs.run_job(llm, job, str(out), DEFAULTS, progress=False)
    assert out.read_text() == "my notes\n"
    with pytest.raises(ValueError, match="its folder does not exist"):
        jobs.run_job(llm, job, str(tmp_path / "no" / "out.jsonl"), DEFAULTS, progress=False)


@pytest.mark.parametrize("argv, fragment", [
    (["run", "--input", "/nonexistent.jsonl", "--output", "out.jsonl"], "is not a file"),
    (["run", "--input", "x", "--output", "y", "--coordinator", "127.0.0.1:1"], "none of them"),
    (["run", "--input", "x", "--output", "y", "--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"],
     "HOST:PORT"),
    (["run", "--input", "x", "--output", "y", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id"),
    (["launch", "--num-processes", "2", "--", "generate", "hi"], "launch runs a multi-host shardlm command"),
    (["launch", "--num-processes", "0", "--", "run"], "--num-processes must be >= 1"),
    (["launch", "--num-processes", "2", "--", "run", "--process-id", "1"], "sets --process-id itself"),
    (["run", "--input", "x", "--output", "y", "--drain-timeout", "-1"], "drain timeout must be"),
    (["run", "--input", "x", "--output", "y", "--precompile", "--mesh", "stage=2"], "--precompile is for the paged"),
    (["run", "--input", "x", "--output", "y", "--summary", "/nonexistent/s.json"], "folder does not exist"),
])
def test_usage_errors(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0], err


@pytest.mark.slow  # two launches of 2 processes (~45 s each on 2 cores)
def test_killed_process_stops_job_and_rerun_completes(tiny, job, launcher_env, two_processes, tmp_path):
    output = tmp_path / "out.jsonl"
    launcher = subprocess.Popen(launch_argv(tiny, job, output), env=launcher_env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    stderr = []
    reader = threading.Thread(target=lambda: stderr.extend(launcher.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not (output.exists() and output.read_bytes().count(b"\n") >= BAD_LINES + 2):
            assert launcher.poll() is None and time.monotonic() < deadline, "".join(stderr)[-3000:]
            time.sleep(0.02)
        pid = int(re.search(r"launch: process 0 pid (\d+)", "".join(stderr)).group(1))
        os.kill(pid, signal.SIGKILL)  # the writer, mid-job
        killed = time.monotonic()
        rc = launcher.wait(timeout=30)
        assert time.monotonic() - killed < 30
    finally:
        if launcher.poll() is None:
            launcher.kill()
    reader.join(timeout=5)
    text = "".join(stderr)
    assert rc != 0
    # The survivor may abort on its own (its collectives break) before the launcher stops it.
    assert re.search(rf"launch: process 0 \(pid {pid}\) was killed by SIGKILL; stopping the other [01] process", text), \
        text[-2000:]
    partial = read_records(output)  # whole lines only
    assert BAD_LINES + 2 <= len(partial) < N_PROMPTS + BAD_LINES, "the kill came after the job ended"
    rerun = subprocess.run(launch_argv(tiny, job, output), env=launcher_env, capture_output=True, text=True,
                           timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert read_records(output) == two_processes


@pytest.mark.slow  # one launch of 2 processes and a 5 s heartbeat timeout (~35 s)
def test_lost_process_stops_the_others_without_launcher(tiny, job, launcher_env, tmp_path):
    """On a cluster nothing like the launcher watches the processes: JAX's coordination service
    notices the silent one and aborts the rest, naming it."""
    output = tmp_path / "out.jsonl"
    env = dict(launcher_env, **{k: v for k, v in launch.process_env(4).items() if k in ("XLA_FLAGS", "JAX_PLATFORMS")})
    argv = launch_argv(tiny, job, output)
    run_args = argv[argv.index("run"):] + ["--coordinator", f"127.0.0.1:{launch.free_port()}", "--num-processes",
                                          "2", "--heartbeat-timeout", "5"]
    procs = [subprocess.Popen([sys.executable, "-m", "shardlm.engine.cli", *run_args, "--process-id", str(i)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 180
        while not (output.exists() and output.read_bytes().count(b"\n") >= BAD_LINES + 2):
            assert procs[0].poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        procs[1].kill()
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        assert time.monotonic() - killed < 60
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode != 0
    # The coordination service names the silent task in one of two messages, depending on whether its
    # heartbeat check or the error poll gets there first.
    assert re.search(r"Task 1 heartbeat timeout|stopped sending heartbeats\):\s*1\s", err), err[-3000:]
    assert BAD_LINES + 2 <= len(read_records(output)) < N_PROMPTS + BAD_LINES  # whole lines, job unfinished


# ----- files a user gave are never damaged; one bad line is that line's error -----

@pytest.mark.parametrize("content", [b"my notes", b"my notes\nmore notes", b'{"a": 1}\n', b'{"id": 1}\n',
                                     b'{"id": "other-job", "text": "", "token_ids": [], "finish_reason": "stop", '
                                     b'"prompt_tokens": 1, "completion_tokens": 0}\n{"id": "p1", "te',
                                     b"\xff\xfe not utf-8\n", b'{"id": 0, "token_ids": []}\nnotes'])
def test_output_that_is_not_this_jobs_is_left_byte_identical(one_device, job, tmp_path, content):
    llm, _ = one_device
    out = tmp_path / "given.txt"
    out.write_bytes(content)
    with pytest.raises(ValueError, match="not a job record|not of this --input"):
        jobs.run_job(llm, job, str(out), DEFAULTS, progress=False)
    assert out.read_bytes() == content
    # The CLI refuses it before loading any model.
    assert main(["run", "--model", "/no/such/model.gguf", "--input", job, "--output", str(out)]) == 2
    assert out.read_bytes() == content


@pytest.mark.parametrize("how", ["symlink", "hardlink", "dot"])
def test_output_that_is_the_input_under_another_name_is_refused(job, tmp_path, monkeypatch, capsys, how):
    src = tmp_path / "in.jsonl"
    src.write_bytes(open(job, "rb").read())
    monkeypatch.chdir(tmp_path)
    if how == "symlink":
        os.symlink(src, tmp_path / "out.jsonl")
    elif how == "hardlink":
        os.link(src, tmp_path / "out.jsonl")
    other = {"dot": "./in.jsonl"}.get(how, "out.jsonl")
    before = src.read_bytes()
    assert main(["run", "--model", "/no/such/model.gguf", "--input", "in.jsonl", "--output", other]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "same file as --input" in err[0], err
    assert src.read_bytes() == before


@pytest.mark.parametrize("where, fragment", [("dir", "is a folder"), ("missing/out.jsonl", "folder does not exist")])
def test_bad_output_path_is_refused_before_the_model_loads(job, tmp_path, capsys, where, fragment):
    (tmp_path / "dir").mkdir()
    assert main(["run", "--input", job, "--output", str(tmp_path / where)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and "loading" not in err[0], err


POISON = {  # line -> a fragment of its error record
    b'{"id": "seed", "prompt": "hi", "seed": 99999999999999999999999}': "seed must be at most 2147483647",
    b'{"id": "topk", "prompt": "hi", "top_k": 3000000000}': "top_k must be at most",
    b'{"id": "eos", "prompt": "hi", "ignore_eos": "yes"}': '"ignore_eos" must be true or false, got "yes"',
    b'{"id": "stops", "prompt": "hi", "stop_token_ids": "198"}': '"stop_token_ids" must be a list of integers',
    b'{"id": "hot", "prompt": "hi", "temperature": "hot"}': '"temperature" must be a number, got "hot"',
    b'{"id": "inf", "prompt": "hi", "temperature": 1e999}': "temperature must be a finite number",
    b'{"id": "many", "prompt": "hi", "max_new_tokens": 2.5}': '"max_new_tokens" must be an integer',
    b'{"id": "bytes", "prompt": "caf\xe9"}': "not valid UTF-8",
    b'{"id": "surrogate", "prompt": "\\ud800"}': "not valid UTF-8",
    b'{"id": "deep", "prompt": ' + b"[" * 100000 + b"}": "malformed JSON",
}


def test_poisoned_lines_are_their_own_error_records_and_the_rerun_completes(one_device, tmp_path):
    llm, _ = one_device
    job = tmp_path / "poisoned.jsonl"
    good = [b'{"id": "first", "prompt": "the quick brown fox"}', '{"id": "sep", "prompt": "a\u2028b"}'.encode()]
    lines = list(POISON) + good
    job.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # with a UTF-8 byte-order mark
    out = tmp_path / "out.jsonl"
    summary = jobs.run_job(llm, str(job), str(out), DEFAULTS, progress=False)
    assert summary["prompts"] == 2 and summary["errors"] == len(POISON)
    records = read_records(out)
    for number, fragment in enumerate(POISON.values(), 1):
        assert fragment in records[("error", number)]["error"], (number, records[("error", number)])
    assert {'"first"', '"sep"'} <= records.keys()  # the BOM line ran; U+2028 did not split a line
    before = out.read_bytes()
    summary = jobs.run_job(llm, str(job), str(out), DEFAULTS, progress=False)  # its own output is accepted
    assert summary["prompts"] == 0 and summary["skipped"] == len(lines) and out.read_bytes() == before


# ----- preemption: SIGTERM drains, exit 75, a rerun completes; lockstep divergence -----

LONG_PROMPTS = 80


@pytest.fixture(scope="module")
def long_job(tmp_path_factory):
    """80 prompts of 16 new tokens: seconds of work at 4 sequences, time to signal it mid-run."""
    path = tmp_path_factory.mktemp("long") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(4 + i % 9)),
                                        "ignore_eos": True}) + "\n" for i in range(LONG_PROMPTS)))
    return str(path)


@pytest.fixture(scope="module")
def long_reference(one_device, long_job, tmp_path_factory):
    llm, _ = one_device
    output = tmp_path_factory.mktemp("long_ref") / "out.jsonl"
    jobs.run_job(llm, long_job, str(output), SamplingParams(max_new_tokens=16), progress=False)
    return read_records(output)


def _wait_for_records(output, n, proc, stderr, timeout=180):
    deadline = time.monotonic() + timeout
    while not (output.exists() and output.read_bytes().count(b"\n") >= n):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(stderr)[-3000:]
        time.sleep(0.01)


def _popen(argv, env):
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    return proc, stderr


@pytest.mark.slow
def test_sigterm_drains_the_job_exits_75_and_the_rerun_completes(tiny, long_job, long_reference, launcher_env,
                                                                  tmp_path):
    output, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    argv = [sys.executable, "-m", "shardlm.engine.cli", "run", "--model", tiny, "--input", long_job, "--output",
            str(output), "--max-new-tokens", "16", "--max-seq-len", str(MAX_SEQ_LEN), "--batch-size", str(SLOTS),
            "--summary", str(summary), "--drain-timeout", "30", "--precompile"]
    proc, stderr = _popen(argv, launcher_env)
    try:
        _wait_for_records(output, 3, proc, stderr)
        at_signal = output.read_bytes().count(b"\n")
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        rc = proc.wait(timeout=60)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.2)  # the reader thread takes the last lines
    text = "".join(stderr)
    assert rc == 75, text[-3000:]
    # 5 token and 3 batch buckets, and the page copies of forked samples at 1, 2 and 3 pages
    assert re.search(r"^precompiled 11 programs in", text, re.M), text[-3000:]
    assert took < 30, f"the drain took {took:.1f} s, more than --drain-timeout"
    last = text.strip().splitlines()[-1]
    m = re.fullmatch(r"preempted at step \d+: (\d+) done, (\d+) pending; run the same command again to resume "
                     r"\(exit 75\)", last)
    assert m, text[-2000:]
    partial = read_records(output)  # whole lines only
    done, pending = int(m[1]), int(m[2])
    assert len(partial) == done and done + pending == LONG_PROMPTS and pending > 0
    assert len(partial) > at_signal, "the sequences running at the signal were not finished"
    assert all(long_reference[k] == r for k, r in partial.items()), "a drained record differs from an uninterrupted run"
    record = json.loads(summary.read_text())
    assert (record["done"], record["pending"], record["preempted"], record["preemptions"]) == (done, pending, True, 1)
    assert record["completion_tokens"] == 16 * done and record["compile_s"] >= 0

    rerun = subprocess.run(argv, env=launcher_env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert read_records(output) == long_reference
    record = json.loads(summary.read_text())
    assert (record["done"], record["skipped"], record["pending"], record["preempted"], record["preemptions"]) == \
        (pending, done, 0, False, 1)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_drains_both_at_one_step(tiny, job, one_device, launcher_env, tmp_path):
    """2 processes of 1 device each (mesh x=2): cheaper steps, the same drain logic as any mesh."""
    output = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "shardlm.engine.cli", "launch", "--num-processes", "2", "--", "run", "--model", tiny,
            "--input", job, "--output", str(output), "--max-new-tokens", "8", "--max-seq-len", str(MAX_SEQ_LEN),
            "--batch-size", str(SLOTS), "--mesh", "x=2"]
    launcher, stderr = _popen(argv, launcher_env)
    try:
        _wait_for_records(output, BAD_LINES + 1, launcher, stderr)
        pid = int(re.search(r"launch: process 1 pid (\d+)", "".join(stderr)).group(1))
        os.kill(pid, signal.SIGTERM)  # not the writer: the drain must reach process 0 through the step's flags
        rc = launcher.wait(timeout=90)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    time.sleep(0.2)
    text = "".join(stderr)
    assert rc == 75, text[-3000:]
    steps = {int(m[1]): int(m[2]) for m in re.finditer(r"^\[(\d)\] (?:process \d: )?preempted at step (\d+)", text, re.M)}
    assert set(steps) == {0, 1} and steps[0] == steps[1], text[-3000:]
    partial = read_records(output)
    _, reference = one_device
    assert BAD_LINES + 1 <= len(partial) < N_PROMPTS + BAD_LINES, "the signal came after the job ended"
    assert all(reference[k] == r for k, r in partial.items())
    rerun = subprocess.run(argv, env=launcher_env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert read_records(output) == reference


# Process 1 of the job takes a different token at its third step, as a bit flip or a nondeterministic
# kernel would make it; the schedule (ignore_eos, fixed lengths) stays the same, so no collective hangs.
PERTURBED_WORKER = """
import sys
import numpy as np
from shardlm.engine import cli, scheduler

if sys.argv[-1] == "1":
    calls, real = [0], scheduler.to_host
    def to_host(x):
        calls[0] += 1
        out = np.array(real(x))
        if calls[0] == 3:
            out[0] += 1
        return out
    scheduler.to_host = to_host
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_lockstep_divergence_stops_the_job_naming_the_step(tiny, job, launcher_env, tmp_path):
    output = tmp_path / "out.jsonl"
    env = dict(launcher_env, **{k: v for k, v in launch.process_env(4).items() if k in ("XLA_FLAGS", "JAX_PLATFORMS")})
    argv = launch_argv(tiny, job, output)
    run_args = argv[argv.index("run"):] + ["--ignore-eos", "--lockstep-every", "8", "--coordinator",
                                          f"127.0.0.1:{launch.free_port()}", "--num-processes", "2"]
    procs = [subprocess.Popen([sys.executable, "-c", PERTURBED_WORKER, *run_args, "--process-id", str(i)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        errs = [p.communicate(timeout=180)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, err in zip(procs, errs):
        assert p.returncode == 1, err[-3000:]
        assert "error: processes [1] ran different steps than process 0 by step 8" in err, err[-3000:]
    # Line 2 (4 new tokens) finishes at step 4, after the divergence and before the check that finds
    # it: held, never written (error records of bad lines may be, as the stream reaches them).
    written = [json.loads(line) for line in output.read_bytes().splitlines()] if output.exists() else []
    assert all("error" in r for r in written), "a result computed after the divergence was written"


@pytest.mark.slow
def test_precompile_compiles_every_program_and_the_job_none(tiny, job, one_device, tmp_path):
    """After `precompile` no step of the job compiles (its own engine shape, so nothing earlier in this
    process compiled its programs); the records are the reference's."""
    import jax

    compiles = []
    listener = lambda event, secs, **kw: compiles.append(event) if event.endswith("backend_compile_duration") else None  # noqa: E731
    llm = LLM.load(tiny, batch_size=3, max_seq_len=MAX_SEQ_LEN - 16)
    jax.block_until_ready(llm.engine.k)  # the pools' own program (zeroed on a thread) is not a step's
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        llm.engine.precompile()
        at_start = len(compiles)
        records = run_in_process(llm, job, tmp_path / "out.jsonl")
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert at_start == len(llm.engine.programs()) > 4
    assert len(compiles) == at_start, f"{len(compiles) - at_start} programs compiled during the job"
    _, reference = one_device
    results = {k: r for k, r in records.items() if k[0] != "error"}
    assert results == {k: r for k, r in reference.items() if k[0] != "error"}


STREAM_WORKER = """
import sys
from shardlm.engine import cli
rc = cli.main(sys.argv[1:])
print("PEAK", [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0], file=sys.stderr)
sys.exit(rc)
"""


@pytest.mark.slow  # 50,000 requests in two jobs, ~50 s on 2 cores
def test_a_long_input_runs_in_memory_that_does_not_grow_with_its_lines(tiny, tmp_path):
    """The input is a stream: 40,000 lines peak within 10% of 10,000 (a small pool and no compile
    cache, so both runs hold and compile the same; what would grow is what the job keeps per line)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    peaks = {}
    for n in (10_000, 40_000):
        path, out = tmp_path / f"in{n}.jsonl", tmp_path / f"out{n}.jsonl"
        path.write_text("".join(json.dumps({"id": i, "prompt": f"line {i} of the job"}) + "\n" for i in range(n)))
        p = subprocess.run([sys.executable, "-c", STREAM_WORKER, "run", "--model", tiny, "--input", str(path),
                            "--output", str(out), "--max-new-tokens", "1", "--max-seq-len", "64", "--kv-pages", "64",
                            "--no-compile-cache"], capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        assert f"{n} prompts done" in p.stderr
        assert out.read_bytes().count(b"\n") == n
        peaks[n] = int(re.search(r"^PEAK (\d+)", p.stderr, re.M).group(1))
    assert peaks[40_000] < 1.1 * peaks[10_000], peaks
