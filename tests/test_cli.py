"""The `shardlm generate` command and the LLM API on bad input: one `error:` line and exit code 2,
never a traceback; and on good input, output that matches the Python API.

Mistakes caught before the model loads are checked in-process (`cli.main`, milliseconds); a few
runs in a subprocess check the real exit code and stderr of the installed command.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from shardlm.engine import SamplingParams
from shardlm.engine.cli import main

CAPITAL = "What is the capital of France?"
STORY = "Write a long story about a dragon."


def error_lines(stderr: str) -> list[str]:
    # splitlines also splits at "\r", so the tqdm bar (redrawn with "\r") is not glued to the error.
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_usage_error(rc: int, stdout: str, stderr: str, *fragments: str) -> None:
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    for f in fragments:
        assert f in lines[0]
    assert stdout == ""


def run_cli(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """The command in a fresh process (one CPU device: the tests' XLA_FLAGS are not passed on)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    exe = shutil.which("shardlm", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "shardlm.engine.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, gguf_path):
    d = tmp_path_factory.mktemp("bad_models")
    text = d / "notes.gguf"
    text.write_text("this is a text file, not a model\n")
    truncated = d / "truncated.gguf"
    with open(gguf_path, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    return {"text": str(text), "truncated": str(truncated), "missing": str(d / "no_such_model.gguf")}


# (argv after `generate`, fragments the error line must contain); {text} etc. are bad_files.
EARLY_ERRORS = {
    "empty prompt": ([""], ["prompt is empty"]),
    "empty second prompt": (["hello", ""], ["prompt is empty"]),
    "max-new-tokens 0": (["--max-new-tokens", "0", "hi"], ["--max-new-tokens", ">= 1", "got 0"]),
    "temperature -1": (["--temperature", "-1", "hi"], ["--temperature", ">= 0", "-1"]),
    "top-p 0": (["--top-p", "0", "hi"], ["--top-p", "(0, 1]", "got 0.0"]),
    "top-p 1.5": (["--top-p", "1.5", "hi"], ["--top-p", "(0, 1]", "got 1.5"]),
    "top-k -1": (["--top-k", "-1", "hi"], ["--top-k", ">= 0", "got -1"]),
    "top-k not a number": (["--top-k", "many", "hi"], ["--top-k", "invalid int value", "'many'"]),
    "unknown dtype": (["--dtype", "float16", "hi"], ["unknown dtype 'float16'", "bfloat16"]),
    "missing PROMPT": ([], ["required", "PROMPT"]),
    "model does not exist": (["--model", "{missing}", "hi"], ["does not exist", "no_such_model.gguf"]),
    "not a GGUF file": (["--model", "{text}", "hi"], ["not a GGUF file", "notes.gguf"]),
    "truncated GGUF": (["--model", "{truncated}", "hi"], ["truncated or corrupt", "truncated.gguf"]),
    "compile cache under a file": (["--compile-cache", "{text}/cache", "hi"], ["--compile-cache", "cannot be written"]),
    "compile cache and none": (["--compile-cache", "{missing}", "--no-compile-cache", "hi"],
                               ["--no-compile-cache", "not both"]),
}


def _argv(case, bad_files):
    args, fragments = EARLY_ERRORS[case]
    return ["generate"] + [a.format(**bad_files) for a in args], fragments


@pytest.mark.parametrize("case", list(EARLY_ERRORS))
def test_early_mistakes_are_one_error_line_in_process(case, bad_files, capsys):
    argv, fragments = _argv(case, bad_files)
    rc = main(argv)
    out, err = capsys.readouterr()
    assert_usage_error(rc, out, err, *fragments)


def test_bare_command_prints_usage_and_the_verbs(capsys):
    rc = main([])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "usage: shardlm" in err
    for verb in ("generate", "chat", "run", "launch", "convert", "inspect", "perplexity", "layouts", "plan"):
        assert f"    {verb}" in err


@pytest.mark.parametrize("case", ["top-p 1.5", "missing PROMPT", "not a GGUF file", "truncated GGUF"])
@pytest.mark.slow
def test_early_mistakes_exit_2_in_a_real_process(case, bad_files):
    argv, fragments = _argv(case, bad_files)
    p = run_cli(*argv)
    assert_usage_error(p.returncode, p.stdout, p.stderr, *fragments)


@pytest.mark.slow
def test_prompt_longer_than_the_context_exits_2_after_loading():
    p = run_cli("generate", "--max-seq-len", "64", "--max-new-tokens", "4", "word " * 100)
    assert_usage_error(p.returncode, p.stdout, p.stderr, "the context holds 64 tokens", "at most 63")
    assert "compiling and generating" not in p.stderr  # refused before any work


@pytest.mark.slow
def test_chat_answers_the_capital_of_france():
    p = run_cli("generate", "--chat", CAPITAL)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and not error_lines(p.stderr)
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1  # one prompt: the bare completion, one line here
    assert "Paris" in lines[0]


@pytest.mark.slow  # loads the model in-process and compiles two engines: ~40 s on 2 CPU cores
def test_json_lines_match_the_api_and_exclude_the_stop_token(llm, capsys):
    max_new = 12
    rc = main(["generate", "--json", "--chat", "--max-new-tokens", str(max_new), "--batch-size", "4",
               "--max-seq-len", "256", CAPITAL, STORY])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == [CAPITAL, STORY]  # one line per prompt, in order
    for r in rows:
        assert {"prompt", "text", "token_ids", "finish_reason"} <= r.keys()
        assert r["completion_tokens"] == len(r["token_ids"])
        assert not set(r["token_ids"]) & llm.stop_token_ids

    capital, story = rows
    assert capital["finish_reason"] == "stop" and "Paris" in capital["text"]
    assert story["finish_reason"] == "length" and len(story["token_ids"]) == max_new

    # Same engine shape as the `llm` fixture, greedy: the API gives the same tokens and text.
    api = llm.generate([CAPITAL, STORY], SamplingParams(max_new_tokens=max_new), chat=True)
    assert [c.token_ids for c in api] == [r["token_ids"] for r in rows]
    assert [c.text for c in api] == [r["text"] for r in rows]
    assert [len(c.prompt_token_ids) for c in api] == [r["prompt_tokens"] for r in rows]
    # The "stop" answer ended on a stop token, which was left out: ignoring EOS shows it next.
    [more] = llm.generate(CAPITAL, SamplingParams(max_new_tokens=max_new, ignore_eos=True), chat=True)
    n = len(capital["token_ids"])
    assert more.token_ids[:n] == capital["token_ids"]
    assert more.token_ids[n] in llm.stop_token_ids


# ----- the same mistakes through the Python API -----


def test_api_rejects_an_empty_prompt(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate("")
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]])
    with pytest.raises(ValueError, match="no prompts"):
        llm.generate([])


@pytest.mark.parametrize("bad", [-1, "vocab"])
def test_api_rejects_token_ids_outside_the_vocabulary(llm, bad):
    bad = llm.config.vocab_size if bad == "vocab" else bad
    with pytest.raises(ValueError, match=rf"token ids \[{bad}\] are outside the vocabulary \[0, {llm.config.vocab_size}\)"):
        llm.generate([1, 2, bad])


def test_api_rejects_a_prompt_that_fills_the_context(llm):
    S = llm.engine.max_seq_len
    with pytest.raises(ValueError, match=f"at most {S - 1}"):
        llm.generate([1] * S)
    with pytest.raises(ValueError, match=f"prompt has {S + 50} tokens"):
        llm.generate([1] * (S + 50))


def test_api_rejects_mismatched_sampling_and_chat_on_token_ids(llm):
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()])
    with pytest.raises(ValueError, match="chat=True needs text prompts"):
        llm.generate([1, 2, 3], chat=True)


def test_api_a_bad_prompt_anywhere_stops_the_whole_batch_before_work(llm, monkeypatch):
    calls = []
    prefill = llm.engine.prefill
    monkeypatch.setattr(llm.engine, "prefill", lambda *a, **k: calls.append(1) or prefill(*a, **k))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2, 3], [4, llm.config.vocab_size + 5]])
    assert calls == []  # the good first prompt was not run either
