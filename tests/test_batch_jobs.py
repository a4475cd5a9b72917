"""`shardlm run` on OpenAI batch files (the Batch API's format), on the tiny random GGUF of
test_jobs.py: each output line is the Batch API's record, each body's choices equal `LLM.generate`
of the same prompt and sampling built by hand, bad lines are their own error records, a rerun
completes a truncated output, and two processes write what one does. The quick tests need no model."""

import json
import re
import subprocess

import pytest
from test_jobs import MAX_SEQ_LEN, SLOTS, WORDS, launch_argv, launcher_env, write_tiny_gguf  # noqa: F401

from shardlm.engine import LLM, SamplingParams, jobs
from shardlm.engine.cli import main

MODEL = "tiny-random"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def _text(i: int, n: int) -> str:
    return " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n))


def _line(custom_id, url, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": MODEL, **body}}


def _chat(i, n=6, system=False):
    messages = [{"role": "user", "content": _text(i, n)}]
    return ([{"role": "system", "content": "You answer briefly."}] if system else []) + messages


GOOD = [  # each runs: (line, what LLM.generate is given)
    _line("chat-greedy", CHAT, messages=_chat(0, 9, system=True), temperature=0, max_tokens=8, return_token_ids=True),
    _line("cmpl-greedy", COMPLETIONS, prompt=_text(3, 12), temperature=0, max_tokens=8, return_token_ids=True),
    _line("chat-seeded", CHAT, messages=_chat(5), temperature=0.9, top_p=0.9, seed=7, max_tokens=8,
          return_token_ids=True),
    _line("chat-n2", CHAT, messages=_chat(8), temperature=1.0, seed=5, n=2, max_completion_tokens=6,
          return_token_ids=True),
    _line("cmpl-two-prompts", COMPLETIONS, prompt=[_text(1, 5), _text(11, 20)], temperature=0, max_tokens=5,
          return_token_ids=True),
    _line("cmpl-logprobs", COMPLETIONS, prompt=_text(2, 7), temperature=0, max_tokens=6, logprobs=2,
          return_token_ids=True),
    _line("chat-logprobs", CHAT, messages=_chat(4), temperature=0, max_tokens=4, logprobs=True, top_logprobs=2,
          return_token_ids=True),
    # no seed: sampled with jobs.batch_seed("chat-unseeded"), the same on every process and every rerun
    _line("chat-unseeded", CHAT, messages=_chat(6), max_tokens=6, return_token_ids=True),
    # no max_tokens: the rest of the context, as the server does
    _line("cmpl-no-max", COMPLETIONS, prompt=_text(7, 30), temperature=0, return_token_ids=True),
]
API_ERRORS = {  # custom_id -> (line, status, param, code)
    "unknown-model": ({**_line("unknown-model", CHAT, messages=_chat(1)), "body": {"model": "gpt-4o", "messages": _chat(1)}},
                      404, "model", "model_not_found"),
    "cold": (_line("cold", CHAT, messages=_chat(1), temperature=-1), 400, "temperature", None),
    "long": (_line("long", COMPLETIONS, prompt="word " * 300, max_tokens=4), 400, "prompt", "context_length_exceeded"),
    "streamed": (_line("streamed", CHAT, messages=_chat(1), stream=True), 400, "stream", None),
}
NOT_BATCH = [  # (raw line, custom_id of its record, a fragment of its message)
    ('{"custom_id": "broken", "method": ', None, "malformed JSON"),
    (json.dumps({"method": "POST", "url": CHAT, "body": {"model": MODEL, "messages": _chat(1)}}), None,
     'missing "custom_id"'),
    (json.dumps({"custom_id": 12, "method": "POST", "url": CHAT, "body": {}}), None, '"custom_id" must be a string'),
    (json.dumps(_line("bad-url", "/v1/embeddings", input="hi")), "bad-url", '"url" must be "/v1/chat/completions" or'),
    (json.dumps({**_line("get", CHAT, messages=_chat(1)), "method": "GET"}), "get", '"method" must be "POST"'),
    (json.dumps({"custom_id": "no-body", "method": "POST", "url": CHAT, "body": "hi"}), "no-body",
     '"body" must be a JSON object'),
    (json.dumps({"id": 3, "prompt": "a shardlm line"}), None, "a line of the shardlm job format"),
    (json.dumps(_line("cmpl-greedy", COMPLETIONS, prompt="again", max_tokens=2)), "cmpl-greedy",
     'duplicate custom_id "cmpl-greedy" (first on line 2)'),
]


def batch_file_lines() -> list[str]:
    lines = [json.dumps(line) for line in GOOD[:4]] + [""]  # a blank line, skipped
    lines += [json.dumps(line) for line, *_ in API_ERRORS.values()]
    lines += [json.dumps(line) for line in GOOD[4:]]
    lines += [raw for raw, *_ in NOT_BATCH]
    return lines


N_RECORDS = len(GOOD) + len(API_ERRORS) + len(NOT_BATCH)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    write_tiny_gguf(path)
    return path


@pytest.fixture(scope="module")
def batch_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("batch") / "batch.jsonl"
    path.write_text("\n".join(batch_file_lines()) + "\n")
    return str(path)


def run_argv(tiny, batch_file, output) -> list[str]:
    return ["run", "--model", tiny, "--input", batch_file, "--output", str(output), "--max-seq-len", str(MAX_SEQ_LEN),
            "--batch-size", str(SLOTS), "--served-model-name", MODEL]


def read_batch_output(path) -> dict:
    """Records by what resuming keys them by: custom_id (a record with a response) or ("line", n)
    (a record without, its line from its id); each must appear once."""
    data = open(path, "rb").read()
    assert data.endswith(b"\n"), "the output ends in a partial line"
    out = {}
    for raw in data.decode().splitlines():
        r = json.loads(raw)
        m = re.fullmatch(r"batch_req_([0-9a-f]+)[0-9a-f]{24}", r["id"])
        assert m, r["id"]
        key = r["custom_id"] if r["response"] is not None else ("line", int(m[1], 16))
        assert key not in out, f"{key} written twice"
        out[key] = r
    return out


def _strip(record: dict) -> dict:
    """A record without what differs between runs: its ids, request_id and created time."""
    r = {k: v for k, v in record.items() if k != "id"}
    if r["response"] is not None:
        body = {k: v for k, v in r["response"]["body"].items() if k not in ("id", "created")}
        r["response"] = {"status_code": r["response"]["status_code"], "body": body}
    return r


@pytest.fixture(scope="module")
def full_run(tiny, batch_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("full") / "out.jsonl"
    summary = output.parent / "summary.json"
    assert main(run_argv(tiny, batch_file, output) + ["--summary", str(summary)]) == 0
    return output, json.loads(summary.read_text())


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM.load(tiny, batch_size=SLOTS, max_seq_len=MAX_SEQ_LEN)


def _reference(llm, line: dict):
    """LLM.generate of the line's prompts with SamplingParams built by hand from its body."""
    body = line["body"]
    chat = line["url"] == CHAT
    prompts = [body["messages"]] if chat else ([body["prompt"]] if isinstance(body["prompt"], str) else body["prompt"])
    lp = (body.get("top_logprobs", 0) if body.get("logprobs") else None) if chat else body.get("logprobs")
    out = []
    for prompt in prompts:
        ids = llm.encode(prompt)
        sampling = SamplingParams(
            temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0),
            seed=body.get("seed", jobs.batch_seed(line["custom_id"])), n=body.get("n", 1), logprobs=lp,
            max_new_tokens=body.get("max_tokens", body.get("max_completion_tokens", MAX_SEQ_LEN - len(ids))))
        (c,) = llm.generate(prompt, sampling)
        out.append(c)
    return out


def test_batch_records_are_the_batch_apis_and_equal_generate(full_run, llm):
    output, summary = full_run
    records = read_batch_output(output)
    assert len(records) == N_RECORDS
    for r in records.values():
        assert set(r) == {"id", "custom_id", "response", "error"}
        if r["response"] is not None:
            assert set(r["response"]) == {"status_code", "request_id", "body"} and r["error"] is None
            assert re.fullmatch(r"[0-9a-f]{32}", r["response"]["request_id"])
    for line in GOOD:
        r = records[line["custom_id"]]
        assert r["response"]["status_code"] == 200, r
        body, chat = r["response"]["body"], line["url"] == CHAT
        assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
        assert body["object"] == ("chat.completion" if chat else "text_completion") and body["model"] == MODEL
        assert body["id"].startswith("chatcmpl-" if chat else "cmpl-")
        reference = _reference(llm, line)
        samples = [(c, s) for c in reference for s in c.outputs]
        assert [c["index"] for c in body["choices"]] == list(range(len(samples)))
        for choice, (c, s) in zip(body["choices"], samples):
            assert set(choice) == {"index", "message" if chat else "text", "logprobs", "finish_reason", "token_ids",
                                   "prompt_token_ids"}
            text = choice["message"]["content"] if chat else choice["text"]
            if chat:
                assert choice["message"] == {"role": "assistant", "content": text}
            assert (text, choice["finish_reason"], choice["token_ids"], choice["prompt_token_ids"]) == \
                (s.text, s.finish_reason, s.token_ids, c.prompt_token_ids), line["custom_id"]
            if s.logprobs is None:
                assert choice["logprobs"] is None
            elif chat:
                logprobs = [e["logprob"] for e in choice["logprobs"]["content"]]
                assert logprobs == pytest.approx([lp for lp, _ in s.logprobs], abs=1e-4)  # float32, other batches
                assert all(len(e["top_logprobs"]) == 2 for e in choice["logprobs"]["content"])
            else:
                assert set(choice["logprobs"]) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
                assert choice["logprobs"]["token_logprobs"] == pytest.approx([lp for lp, _ in s.logprobs], abs=1e-4)
        assert body["usage"] == {"prompt_tokens": sum(len(c.prompt_token_ids) for c in reference),
                                 "completion_tokens": sum(len(s.token_ids) for _, s in samples),
                                 "total_tokens": body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]}
    n2 = records["chat-n2"]["response"]["body"]["choices"]
    assert n2[0]["token_ids"] != n2[1]["token_ids"]  # two samples, not one twice
    assert len(records["cmpl-no-max"]["response"]["body"]["choices"][0]["token_ids"]) > 8  # the context's rest
    for custom_id, (_, status, param, code) in API_ERRORS.items():
        r = records[custom_id]
        assert r["response"]["status_code"] == status and r["error"] is None, r
        error = r["response"]["body"]["error"]
        assert set(r["response"]["body"]) == {"error"} and set(error) == {"message", "type", "param", "code"}
        assert (error["param"], error["code"]) == (param, code), r
        assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    not_batch = [r for k, r in records.items() if isinstance(k, tuple)]
    assert len(not_batch) == len(NOT_BATCH)
    first = len(batch_file_lines()) - len(NOT_BATCH) + 1
    for number, (raw, custom_id, fragment) in enumerate(NOT_BATCH, first):
        r = records[("line", number)]
        assert (r["custom_id"], r["response"]) == (custom_id, None), r
        assert set(r["error"]) == {"code", "message"} and r["error"]["code"] == "invalid_request"
        assert fragment in r["error"]["message"], r
    assert (summary["done"], summary["errors"], summary["pending"]) == \
        (len(GOOD), len(API_ERRORS) + len(NOT_BATCH), 0)
    assert summary["completion_tokens"] == sum(b["response"]["body"]["usage"]["completion_tokens"]
                                               for k, b in records.items() if k in {g["custom_id"] for g in GOOD})


def test_rerun_completes_a_truncated_output(tiny, batch_file, full_run, tmp_path, capsys):
    output, _ = full_run
    lines = open(output, "rb").read().splitlines(keepends=True)
    reference = {k: _strip(r) for k, r in read_batch_output(output).items()}
    out = tmp_path / "out.jsonl"
    k = N_RECORDS - 4  # the error records (written as the lines are read) and some results
    kept = [json.loads(line) for line in lines[:k]]
    assert {r["response"] is not None and r["response"]["status_code"] == 200 for r in kept} == {True, False}
    out.write_bytes(b"".join(lines[:k]) + lines[k][:30])  # k records and a torn one
    summary = tmp_path / "summary.json"
    assert main(run_argv(tiny, batch_file, out) + ["--summary", str(summary)]) == 0
    assert {key: _strip(r) for key, r in read_batch_output(out).items()} == reference  # each key once
    s = json.loads(summary.read_text())
    assert (s["done"], s["errors"], s["skipped"]) == (4, 0, k)
    before = out.read_bytes()
    assert main(run_argv(tiny, batch_file, out) + ["--summary", str(summary)]) == 0
    s = json.loads(summary.read_text())
    assert out.read_bytes() == before and (s["done"], s["errors"], s["skipped"]) == (0, 0, N_RECORDS)


@pytest.mark.slow  # a launch of 2 processes (~45 s on 2 cores)
def test_two_processes_write_what_one_does(tiny, batch_file, full_run, launcher_env, tmp_path):  # noqa: F811
    """Unseeded sampled lines too: each process derives the same seed (random ones would make the
    processes' steps differ, which the lockstep check stops the job for)."""
    output, _ = full_run
    two = tmp_path / "out.jsonl"
    argv = launch_argv(tiny, batch_file, two) + ["--served-model-name", MODEL]
    p = subprocess.run(argv, env=launcher_env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    got, want = ({k: _strip(r) for k, r in read_batch_output(path).items()} for path in (two, output))
    got_lp, want_lp = _logprob_values(got), _logprob_values(want)
    assert got == want  # tokens, texts, finish reasons, errors: exactly
    assert want_lp and got_lp == pytest.approx(want_lp, abs=1e-4)  # float32 on another mesh


def _logprob_values(records: dict) -> list[float]:
    """Every logprob in the records' choices, each replaced by None in place (compared apart)."""
    values = []
    for r in records.values():
        for choice in (r["response"] or {}).get("body", {}).get("choices", []):
            lp = choice["logprobs"]
            for entry in (lp or {}).get("content", []):  # chat
                values.append(entry["logprob"])
                values += [t["logprob"] for t in entry["top_logprobs"]]
                entry["logprob"] = None
                for t in entry["top_logprobs"]:
                    t["logprob"] = None
            if lp is not None and "token_logprobs" in lp:  # completions
                values += lp["token_logprobs"] + [p for top in lp["top_logprobs"] for p in top.values()]
                lp["token_logprobs"] = [None] * len(lp["token_logprobs"])
                lp["top_logprobs"] = [dict.fromkeys(top) for top in lp["top_logprobs"]]
    return values


# ----- quick: no model -----

def test_the_first_nonblank_line_decides_the_format(tmp_path):
    cases = {"batch": ("\n" + json.dumps(GOOD[0]) + "\n" + json.dumps({"id": 1, "prompt": "x"}) + "\n", True),
             "plain": (json.dumps({"id": 1, "prompt": "x"}) + "\n" + json.dumps(GOOD[0]) + "\n", False),
             "torn": ('{"custom_id": "a", "body": \n' + json.dumps(GOOD[0]) + "\n", True),
             "broken": ('{"id": 1, "prompt": \n', False)}
    for name, (text, batch) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(text)
        index = jobs.scan_input(str(path))
        assert index.batch is batch, name
    index = jobs.scan_input(str(tmp_path / "batch.jsonl"))  # keyed by custom_id; a plain line has no key
    assert index.keys[1] != 0 and index.keys[2] == 0


def test_a_record_id_carries_its_line_and_is_random_after_it():
    for number in (1, 255, 2**32 + 5):
        a, b = (jobs.BatchLine(number, error="x").record() for _ in range(2))
        assert a["id"] != b["id"] and re.fullmatch(r"batch_req_[0-9a-f]{32,}", a["id"])
        assert jobs.batch_record_line(a["id"]) == number
    assert jobs.batch_record_line("batch_req_wnaDys") == -1  # an id not of ours: no line


def test_an_output_of_the_other_format_is_refused_untouched(tmp_path):
    batch, plain = tmp_path / "batch.jsonl", tmp_path / "plain.jsonl"
    batch.write_text(json.dumps(GOOD[0]) + "\n")
    plain.write_text(json.dumps({"id": "chat-greedy", "prompt": "x"}) + "\n")
    batch_out = json.dumps(jobs.BatchLine(1, "chat-greedy", error="x").record()) + "\n"
    plain_out = json.dumps({"id": "chat-greedy", "text": "", "token_ids": [], "finish_reason": "stop",
                            "prompt_tokens": 1, "completion_tokens": 0}) + "\n"
    for given, out_text, fragment in ((batch, plain_out, "records of the shardlm job format"),
                                      (plain, batch_out, "records of the OpenAI batch format")):
        out = tmp_path / "out.jsonl"
        out.write_text(out_text)
        with pytest.raises(ValueError, match=fragment):  # refused before the model is touched
            jobs.run_job(None, str(given), str(out), progress=False)
        assert out.read_text() == out_text


class NoModel:
    """What run_job asks of an LLM when no line is left to run."""

    paged, tokenizer = False, None

    def run(self, requests, **kw):
        for r in requests:
            raise AssertionError(f"a request ran: {r.key}")
        return []


def test_a_batch_output_of_this_input_is_resumed_by_custom_id_and_line(tmp_path):
    """A response record keys its custom_id; a record without one (malformed JSON, a repeated
    custom_id) its line, read from its id: the rerun writes only the record missing."""
    path = tmp_path / "batch.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n" + "not json\n\n" + json.dumps(GOOD[0]) + "\n")
    refused = jobs.BatchLine(1, "chat-greedy", api_error=jobs.openai_api.APIError(404, "no such model", "model"))
    records = [refused.record(), jobs.BatchLine(2, error="x").record(),
               jobs.BatchLine(4, "chat-greedy", error="dup").record()]
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    s = jobs.run_job(NoModel(), str(path), str(out), progress=False)
    assert (s["prompts"], s["errors"], s["skipped"], s["pending"]) == (0, 0, 3, 0)
    out.write_text("".join(json.dumps(r) + "\n" for r in records[:2]))  # the repeat's record missing
    s = jobs.run_job(NoModel(), str(path), str(out), progress=False)
    assert (s["prompts"], s["errors"], s["skipped"]) == (0, 1, 2)
    new = json.loads(out.read_text().splitlines()[-1])
    assert jobs.batch_record_line(new["id"]) == 4 and new["custom_id"] == "chat-greedy"
    assert new["error"]["message"] == 'duplicate custom_id "chat-greedy" (first on line 1)'


def test_lone_surrogates_in_a_line_are_written_as_escapes(tmp_path):
    """JSON may hold "\\ud800", which is no text: a custom_id of it is that line's error, a model
    name of it comes back in the 404's message; both records are written (as escapes) and resumed."""
    path = tmp_path / "batch.jsonl"
    path.write_text(json.dumps({**GOOD[0], "body": {**GOOD[0]["body"], "model": "\ud800"}}) + "\n"
                    + json.dumps({**GOOD[0], "custom_id": "\ud800"}) + "\n")
    out = tmp_path / "out.jsonl"
    s = jobs.run_job(NoModel(), str(path), str(out), progress=False)
    assert (s["errors"], s["pending"]) == (2, 0)
    first, second = map(json.loads, out.read_text().splitlines())
    assert first["response"]["status_code"] == 404 and "\ud800" in first["response"]["body"]["error"]["message"]
    assert second["custom_id"] is None and "not valid Unicode" in second["error"]["message"]
    assert jobs.run_job(NoModel(), str(path), str(out), progress=False)["skipped"] == 2


def test_the_served_model_name(capsys):
    assert jobs.served_model_name(None, None) == jobs.EMBEDDED_NAME == "SmolLM2-135M-Instruct"
    assert jobs.served_model_name(None, "m.gguf") == "m.gguf" and jobs.served_model_name("x", "m.gguf") == "x"
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert jobs.EMBEDDED_NAME in " ".join(capsys.readouterr().out.split())
