"""The CLI as people use it: no traceback on any mistake, Ctrl-C and closed pipes, streamed
`generate`, `shardlm chat` through a pipe, --version, a fast --help.

The model is the tiny random Llama of test_jobs (the embedded tokenizer and chat template): the
model's answers do not matter here, only what the command does with them.
"""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_cli import assert_usage_error, run_cli
from test_jobs import write_tiny_gguf

from shardlm.engine import LLM
from shardlm.engine.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    write_tiny_gguf(path)
    return path


def test_help_does_not_import_jax_and_version_and_bare_command():
    code = ("import sys\nfrom shardlm.engine.cli import build_parser\n"
            "try:\n    build_parser().parse_args(['generate', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'jax' not in sys.modules, 'jax imported'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "--quiet" in p.stdout and "reads it from stdin" in p.stdout
    p = run_cli("--version")
    assert p.returncode == 0 and p.stdout.startswith("shardlm 0.")
    p = run_cli()
    assert p.returncode == 2 and "usage: shardlm" in p.stderr and "chat" in p.stderr and "Traceback" not in p.stderr


MISTAKES = {  # argv -> fragments of the one error line
    "seed out of int32": (["generate", "--seed", "3000000000", "hi"], ["--seed", "2147483647"]),
    "top-k out of int32": (["generate", "--top-k", "3000000000", "hi"], ["--top-k", "2147483647"]),
    "invalid UTF-8 prompt": (["generate", "caf\udce9"], ["not valid UTF-8"]),
    "max-seq-len above context": (["generate", "--model", "{tiny}", "--max-seq-len", "999", "hi"],
                                  ["--max-seq-len 999", "context of 128"]),
    "duplicate mesh axis": (["generate", "--mesh", "x=2,x=4", "hi"], ["'x' is given twice"]),
    "microbatches without stages": (["generate", "--microbatches", "2", "hi"], ["--microbatches 2", "stage axis"]),
    "microbatches that do not divide": (["plan", "--model", "smollm2-135m", "--chip", "h100", "--chips", "8",
                                         "--mesh", "stage=2,x=4", "--batch", "8", "--microbatches", "3"],
                                        ["--microbatches 3", "divide --batch (8)"]),
    "context 0": (["plan", "--model", "smollm2-135m", "--chip", "h100", "--chips", "1", "--context", "0"],
                  ["--context must be >= 1"]),
    "window 0": (["perplexity", "--window", "0", "{here}"], ["--window must be >= 2"]),
    "attention batch on one device": (["generate", "--model", "{tiny}", "--attention", "batch", "hi"],
                                      ["--attention batch", "one device"]),
    "convert under a file": (["convert", "{tiny}", "{tiny}/ckpt"], ["is not a folder"]),
    "convert under a missing folder": (["convert", "{tiny}", "/no/such/folder/ckpt"], ["does not exist"]),
    # /proc takes no new files, whoever asks (the tests run as root, for whom permission bits do not stop a write)
    "convert into a folder that takes no files": (["convert", "{tiny}", "/proc/ckpt"], ["/proc is not writable"]),
    "run output in a folder that takes no files": (["run", "--input", "{here}", "--output", "/proc/out.jsonl"],
                                                   ["/proc is not writable"]),
}


@pytest.mark.parametrize("case", list(MISTAKES))
@pytest.mark.slow
def test_mistakes_are_one_error_line(case, tiny, capsys):
    argv, fragments = MISTAKES[case]
    rc = main([a.format(tiny=tiny, here=__file__) for a in argv])
    out, err = capsys.readouterr()
    assert_usage_error(rc, out, err, *fragments)


def test_wrong_json_types_in_config_json_name_the_field(tmp_path):
    from shardlm.checkpoints.gguf import CheckpointError
    from shardlm.checkpoints.hf import read_config

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": "49152", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match='vocab_size must be a non-negative integer, got "49152"'):
        read_config(str(tmp_path))


@pytest.mark.slow
def test_closed_stdout_and_invalid_utf8_argument_in_a_real_process(tiny):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [os.path.join(os.path.dirname(sys.executable), "shardlm"), "generate", "--model", tiny,
           "--max-new-tokens", "60", "--ignore-eos"]
    p = subprocess.run(" ".join(cmd) + " hello | head -c 3", shell=True, capture_output=True, env=env, timeout=120)
    assert p.stdout and b"Traceback" not in p.stderr and b"Exception" not in p.stderr, p.stderr[-2000:]
    p = subprocess.run(cmd + [b"caf\xe9"], capture_output=True, env=env, timeout=120)
    assert p.returncode == 2 and b"Traceback" not in p.stderr and b"not valid UTF-8" in p.stderr


@pytest.mark.slow  # 10 processes at once, ~15 s on 2 cores
def test_sigint_to_generate_exits_130_every_time(tiny):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [os.path.join(os.path.dirname(sys.executable), "shardlm"), "generate", "--model", tiny,
           "--max-new-tokens", "100", "--ignore-eos", "hi"]

    def interrupt(delay: float):  # at 0 .. 3.6 s after it started loading: loading, compiling, generating
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        assert "loading model" in p.stderr.readline()
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        return p.returncode, err

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        ended = list(pool.map(interrupt, [i * 0.4 for i in range(10)]))
    for code, err in ended:
        assert "Traceback" not in err and "Exception" not in err, err[-2000:]
    assert [code for code, _ in ended] == [130] * 10


COUNT_COMPILES = """import collections, json, sys, jax
events = collections.Counter()
jax.monitoring.register_event_listener(lambda event, **kw: events.update([event]))
jax.monitoring.register_event_duration_secs_listener(lambda event, secs, **kw: events.update([event]))
from shardlm.engine.cli import main
rc = main(sys.argv[1:])
print("EVENTS" + json.dumps(events), file=sys.stderr)
sys.exit(rc)
"""


@pytest.mark.slow
def test_second_run_with_the_compile_cache_compiles_nothing(tiny, tmp_path):
    from shardlm.engine.programs import LOAD_EVENT

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # A fixed pool: the default one follows the host's free memory, whose swings between two runs of a
    # busy machine can change its shape (and so the programs).
    args = ["generate", "--model", tiny, "--max-new-tokens", "5", "--json", "--kv-pages", "256", "hi",
            "a longer prompt"]
    cached = args + ["--compile-cache", str(tmp_path / "cc")]

    def run(argv):
        p = subprocess.run([sys.executable, "-c", COUNT_COMPILES, *argv], capture_output=True, text=True, env=env,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return p, json.loads(p.stderr.rsplit("EVENTS", 1)[1].splitlines()[0])

    (p1, first), (p2, second) = run(cached), run(cached)
    cache, compiled = "/jax/compilation_cache/", "/jax/core/compile/backend_compile_duration"
    stored = sorted((tmp_path / "cc" / "shardlm-programs").iterdir())
    # The first run compiled every program: the steps (prefill, decode) for the store, beside JAX's
    # cache; the pools' zeroing through it.
    assert len(stored) == 2 and LOAD_EVENT not in first and first[compiled] == 3, (stored, first)
    assert first[cache + "compile_requests_use_cache"] == first[cache + "cache_misses"] == 1, first
    # The second compiled nothing: it read the steps back (no tracing), and JAX's cache served the rest.
    assert second[LOAD_EVENT] == len(stored), second
    assert second.get(cache + "cache_misses", 0) == 0, second
    assert second[cache + "compile_requests_use_cache"] == second[cache + "cache_hits"] == 1, second
    assert p1.stdout == p2.stdout  # the same completions from the programs read back
    # A torn entry is a miss: compiled again, stored whole, the same completions.
    for path in stored:
        path.write_bytes(path.read_bytes()[:100])
    p3, third = run(cached)
    assert "not loaded" in p3.stderr and LOAD_EVENT not in third and third[compiled] == first[compiled], third
    assert p3.stdout == p1.stdout and run(cached)[1][LOAD_EVENT] == len(stored)
    # And the store's programs compute what jit's do.
    assert run(args + ["--no-compile-cache"])[0].stdout == p1.stdout


@pytest.mark.slow
def test_generate_streams_what_json_prints_and_reads_stdin(tiny, capsys, monkeypatch):
    import io

    argv = ["generate", "--model", tiny, "--max-new-tokens", "12", "--quiet"]
    assert main(argv + ["--json", "the quick brown fox"]) == 0
    [record] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    seen, real_run = [], LLM.run

    def spy(self, requests, **kw):
        seen.append(kw.get("on_token"))
        return real_run(self, requests, **kw)

    monkeypatch.setattr(LLM, "run", spy)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"the quick brown fox\n")))
    assert main(argv + ["-"]) == 0
    out, err = capsys.readouterr()
    assert out == record["text"] + "\n" and err == ""  # streamed pieces join to the --json text; --quiet
    assert seen and seen[0] is not None  # through LLM.run's on_token


def _chat(tiny, monkeypatch, capsys, turns: list[str], *extra):
    """`shardlm chat` in this process with stdin a real pipe; returns (stdout, prompt ids per turn)."""
    r, w = os.pipe()
    os.write(w, "".join(t + "\n" for t in turns).encode())
    os.close(w)
    monkeypatch.setattr(sys, "stdin", os.fdopen(r, "r"))
    prompts = []
    real_run = LLM.run

    def spy(self, requests, **kw):
        prompts.extend(list(req.prompt_ids) for req in requests)
        return real_run(self, requests, **kw)

    monkeypatch.setattr(LLM, "run", spy)
    rc = main(["chat", "--model", tiny, "--max-new-tokens", "6", "--system", "Be brief.", "--quiet", *extra])
    out, err = capsys.readouterr()
    assert rc == 0 and "Traceback" not in err, err
    return out, prompts


@pytest.mark.slow
def test_chat_through_a_pipe_keeps_the_history_the_template_renders(tiny, monkeypatch, capsys):
    turns = ["hello there", "what is a fox", "and a dog", "/reset", "start again"]
    out_json, _ = _chat(tiny, monkeypatch, capsys, turns, "--json")
    answers = [json.loads(line)["text"] for line in out_json.splitlines()]
    assert len(answers) == 4
    out, prompts = _chat(tiny, monkeypatch, capsys, turns + ["/exit", "never read"])
    assert out == "".join(a + "\n" for a in answers)  # the streamed answers are the --json texts

    tok = LLM.load(tiny, max_seq_len=128).tokenizer
    system = [{"role": "system", "content": "Be brief."}]
    history, expected = list(system), []
    for text, answer in zip(turns[:3], answers):
        history.append({"role": "user", "content": text})
        expected.append(tok.encode(tok.apply_chat_template(history)))
        history.append({"role": "assistant", "content": answer})
    expected.append(tok.encode(tok.apply_chat_template(system + [{"role": "user", "content": "start again"}])))
    assert prompts == expected


@pytest.mark.slow
def test_sigint_during_convert_leaves_no_partial_checkpoint(tmp_path):
    """Ctrl-C while the checkpoint is being written: exit 130, one line, no traceback, nothing at
    DST or DST.partial; the next convert then succeeds."""
    from shardlm.checkpoints.loader import embedded_model_path

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    dst = tmp_path / "ck"
    partial = tmp_path / "ck.partial"
    cmd = [os.path.join(os.path.dirname(sys.executable), "shardlm"), "convert", embedded_model_path(), str(dst)]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not partial.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert partial.exists(), "the save never started"
    p.send_signal(signal.SIGINT)
    err = p.stderr.read()
    assert p.wait() == 130, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert not partial.exists() and not dst.exists()


def test_job_progress_prints_a_line_on_a_timer_even_when_nothing_finishes(capsys):
    from shardlm.engine.jobs import _ProgressLines

    bar = _ProgressLines(3, every_s=0.05)  # what run_job shows where stderr is not a terminal, every 10 s
    bar.set_postfix_str("12.5 tok/s")
    time.sleep(0.3)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 3, lines
    assert all(line.startswith("job: 0/3 prompts, 12.5 tok/s") and "ETA" in line for line in lines), lines
