"""`shardlm serve` as a real server process on a loopback port, driven by the official openai client."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")

from test_jobs import WORDS, write_tiny_gguf  # noqa: E402

from shardlm.engine.launch import free_port  # noqa: E402

KEY = "test-key"
TINY = "tiny"
CONTEXT = 1024


def _env(cache_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PLATFORMS"] = "cpu"
    return env


class Server:
    """A `shardlm serve` (or `shardlm launch -- serve`) process; stopped by `stop` (SIGTERM)."""

    def __init__(self, argv: list[str], env: dict, launch: str | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "shardlm.engine.cli"]
        if launch:
            cmd += ["launch", "--num-processes", "2", "--devices-per-process", "4", "--"]
        self.proc = subprocess.Popen(cmd + ["serve", "--port", str(self.port), *argv], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "".join(self.stderr)[-3000:]
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.kill()
        raise AssertionError("the server did not become healthy: " + "".join(self.stderr)[-3000:])

    def client(self, key: str = KEY, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, **kw)

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.base + "/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + (("{" + labels) if labels else "")) and (labels or line.startswith(name + " ")):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return _env(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    write_tiny_gguf(path, context=CONTEXT)
    return path


@pytest.fixture(scope="module")
def tiny_server(tiny_model, env):
    server = Server(["--model", tiny_model, "--served-model-name", TINY, "--max-num-seqs", "16", "--api-key", KEY],
                    env)
    yield server
    assert server.stop() == 0, "".join(server.stderr)[-2000:]


@pytest.fixture(scope="module")
def smol_server(env):
    server = Server(["--max-seq-len", "512", "--max-num-seqs", "8"], env)
    yield server
    assert server.stop() == 0, "".join(server.stderr)[-2000:]


# ----- one request's answer, normalised, whether streamed or not -----

def _ask(client, spec: dict) -> dict:
    """{"choices": [(index, text, finish_reason, token_ids)], "usage": (prompt, completion)}."""
    spec = dict(spec)
    kind = spec.pop("kind")
    create = client.chat.completions.create if kind == "chat" else client.completions.create
    extra = {"return_token_ids": True}
    if spec.get("stream"):
        spec["stream_options"] = {"include_usage": True}
        texts, finish, ids, usage = {}, {}, {}, None
        for chunk in create(extra_body=extra, **spec):
            if chunk.usage is not None:
                usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
            for c in chunk.choices:
                piece = c.delta.content if kind == "chat" else c.text
                texts[c.index] = texts.get(c.index, "") + (piece or "")
                if c.finish_reason is not None:
                    finish[c.index], ids[c.index] = c.finish_reason, c.model_extra["token_ids"]
        choices = [(i, texts[i], finish[i], ids[i]) for i in sorted(texts)]
    else:
        r = create(extra_body=extra, **spec)
        choices = sorted((c.index, c.message.content if kind == "chat" else c.text, c.finish_reason,
                          c.model_extra["token_ids"]) for c in r.choices)
        usage = (r.usage.prompt_tokens, r.usage.completion_tokens)
    return {"choices": choices, "usage": usage}


def _all_at_once(client, specs: list[dict], timeout: float) -> list:
    """Each request from a thread of its own, all started together; their answers (None: lost)."""
    answers = [None] * len(specs)

    def run(i):
        answers[i] = _ask(client, specs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return answers


def _words(i: int, n: int) -> str:
    return " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n))


def _spec(i: int, model: str = TINY) -> dict:
    """Request i of a mixed load: chat or completions, 3 to 45 words, greedy or seeded sampling (some
    with top-p), streamed or not, n = 1 or 3, 4 to 12 new tokens."""
    text = _words(i, 3 + (i * 7) % 43)
    spec = {"kind": "chat" if i % 2 else "completion", "model": model, "max_tokens": 4 + i % 9,
            "stream": (i // 2) % 2 == 0}
    if spec["kind"] == "chat":
        spec["messages"] = [{"role": "user", "content": text}]
    else:
        spec["prompt"] = text
    if i % 3:
        spec.update(temperature=0.8, seed=i)
        if i % 4 == 0:
            spec["top_p"] = 0.9
    else:
        spec["temperature"] = 0
    if i % 5 == 0:
        spec["n"] = 3
    return spec


# ----- tests -----

@pytest.mark.slow
def test_chat_answers_paris_streamed_equals_whole_and_generate(smol_server, capsys):
    from shardlm.engine.cli import main

    client = smol_server.client()
    question = {"kind": "chat", "model": "SmolLM2-135M-Instruct", "temperature": 0, "max_tokens": 64,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    whole, streamed = _ask(client, question), _ask(client, {**question, "stream": True})
    (_, text, finish, ids), = whole["choices"]
    assert "Paris" in text and finish == "stop"
    assert streamed == whole
    assert main(["generate", "--chat", "--json", "--quiet", "--max-new-tokens", "64",
                 "What is the capital of France?"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["token_ids"] == ids and record["text"] == text


@pytest.mark.slow
def test_top_logprobs_equal_hf_log_softmax(smol_server, gguf_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from shardlm.checkpoints.gguf import read_metadata
    from shardlm.checkpoints.tokenizer import tokenizer_from_gguf_metadata

    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path),
                                                           gguf_file=os.path.basename(gguf_path),
                                                           dtype=torch.float32).eval()
    tokenizer = tokenizer_from_gguf_metadata(read_metadata(gguf_path))
    client = smol_server.client()
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=3,
                                  temperature=0, logprobs=5, extra_body={"return_token_ids": True})
    c = r.choices[0]
    prompt, generated = c.model_extra["prompt_token_ids"], c.model_extra["token_ids"]
    chat = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=3, logprobs=True,
                                          top_logprobs=20, messages=[{"role": "user", "content": "Name a color."}],
                                          extra_body={"return_token_ids": True})
    chat_prompt, chat_generated = chat.choices[0].model_extra["prompt_token_ids"], chat.choices[0].model_extra["token_ids"]

    def hf_logprobs(ids):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].double()
        return torch.log_softmax(logits, -1).numpy()

    for t in range(3):
        want = hf_logprobs(prompt + generated[:t])
        top = np.argsort(-want)[:5]
        assert c.logprobs.top_logprobs[t].keys() == {tokenizer.token_text(int(i)) for i in top}
        for i in top:
            assert abs(c.logprobs.top_logprobs[t][tokenizer.token_text(int(i))] - want[i]) < 1e-3
        assert abs(c.logprobs.token_logprobs[t] - want[generated[t]]) < 1e-3
        want = hf_logprobs(chat_prompt + chat_generated[:t])
        entry = chat.choices[0].logprobs.content[t]
        assert abs(entry.logprob - want[chat_generated[t]]) < 1e-3
        got = np.asarray([e.logprob for e in entry.top_logprobs])
        assert np.allclose(got, np.sort(want)[::-1][:20], atol=1e-3)


@pytest.mark.slow
def test_32_concurrent_clients_equal_each_request_alone(tiny_server):
    client = tiny_server.client(timeout=300)
    specs = [_spec(i) for i in range(32)]
    requests_before = tiny_server.metric("shardlm_requests_total", 'endpoint="/v1/')
    tokens_before = tiny_server.metric("shardlm_generation_tokens_total")
    together = _all_at_once(client, specs, 300)
    assert all(r is not None for r in together)  # none lost
    alone = [_ask(client, s) for s in specs]
    for i, (a, b) in enumerate(zip(together, alone)):
        assert a == b, f"request {i}: {specs[i]}"
        assert len(a["choices"]) == specs[i].get("n", 1)
        assert all(len(ids) <= specs[i]["max_tokens"] for _, _, _, ids in a["choices"])
    assert tiny_server.metric("shardlm_requests_total", 'endpoint="/v1/') - requests_before == 64
    generated = sum(r["usage"][1] for r in together + alone)
    assert tiny_server.metric("shardlm_generation_tokens_total") - tokens_before == generated
    assert tiny_server.metric("shardlm_time_to_first_token_seconds_count") >= 64


def _running(server) -> float:
    return server.metric("shardlm_running_sequences")


def _generated(server) -> float:
    return server.metric("shardlm_generation_tokens_total")


def _dropped_early(server, generated_before: float, max_tokens: int) -> None:
    """The running-sequences gauge drops, and fewer than `max_tokens` were generated: it was freed, not finished."""
    t0 = time.monotonic()
    while _running(server) > 0:
        assert time.monotonic() - t0 < 60, "the running-sequences gauge did not drop"
        time.sleep(0.05)
    generated = _generated(server) - generated_before
    assert generated < max_tokens, f"the sequence ran to its end ({generated:.0f} tokens) instead of being freed"


def test_client_disconnect_frees_its_sequence(tiny_server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": TINY, "prompt": "the quick brown fox", "max_tokens": 900, "ignore_eos": True, "temperature": 0}
    before = _generated(tiny_server)
    with httpx.stream("POST", tiny_server.base + "/v1/completions", json={**body, "stream": True}, headers=headers,
                      timeout=60) as r:
        assert r.status_code == 200
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data: {")
            if chunks == 3:
                assert _running(tiny_server) == 1
                break  # closes the connection
    _dropped_early(tiny_server, before, 900)
    # Not streamed: the client gives up waiting, long before its tokens could be done.
    before = _generated(tiny_server)
    try:
        r = httpx.post(tiny_server.base + "/v1/completions", json={**body, "max_tokens": CONTEXT - 16},
                       headers=headers, timeout=0.3)
    except httpx.ReadTimeout:
        pass
    else:
        pytest.fail(f"the request was answered before the client gave up: {r.status_code} {r.text[:300]}")
    _dropped_early(tiny_server, before, CONTEXT - 16)
    r = tiny_server.client().completions.create(model=TINY, prompt="next", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def _error(e_info, status: int, param=None):
    e = e_info.value
    assert e.status_code == status, e
    error = e.body if "message" in (e.body or {}) else (e.body or {}).get("error")
    assert set(error) == {"message", "type", "param", "code"} and error["message"], e.body
    if param is not None:
        assert error["param"] == param, error
    return error


def test_bad_requests_get_openai_errors_and_the_server_goes_on(tiny_server):
    client = tiny_server.client()
    chat = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for raw in (b'{"model": "tiny", "messages": [', b'{"model": "tiny", "messages": "\xff\xfe"}'):
        r = httpx.post(tiny_server.base + "/v1/chat/completions", content=raw, headers=headers)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    r = httpx.post(tiny_server.base + "/v1/chat/completions", json={"model": TINY}, headers=headers)  # the client
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text  # refuses to send it
    cases = [  # (changes to the request, status, param)
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
        ({"model": "no-such-model"}, 404, "model"),
        ({"temperature": -0.5}, 400, "temperature"),
        ({"top_p": 0}, 400, "top_p"),
        ({"top_p": 1.5}, 400, "top_p"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"n": 17}, 400, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"messages": [{"role": "user", "content": "word " * (CONTEXT + 50)}]}, 400, "messages"),
    ]
    for change, status, param in cases:
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(**{**chat, **change})
        _error(e, status, param)
    with pytest.raises(openai.AuthenticationError) as e:
        tiny_server.client(key="wrong").chat.completions.create(**chat)
    assert _error(e, 401)["code"] == "invalid_api_key"
    r = httpx.get(tiny_server.base + "/v1/no-such-endpoint", headers=headers)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert httpx.get(tiny_server.base + "/health").json() == {"status": "ok"}
    r = client.chat.completions.create(**chat, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    models = client.models.list()
    assert [m.id for m in models.data] == [TINY]


@pytest.mark.slow
def test_full_queue_answers_429_and_sigterm_lets_running_requests_finish(tiny_model, env):
    server = Server(["--model", tiny_model, "--served-model-name", TINY, "--max-num-seqs", "1", "--max-queue", "1"],
                    env)
    try:
        client = server.client(timeout=120)
        long = {"model": TINY, "prompt": "the quick brown fox", "max_tokens": 600, "temperature": 0,
                "extra_body": {"ignore_eos": True}}
        out = {}
        first = threading.Event()

        def streamed():
            text, finish = "", None
            for chunk in client.completions.create(stream=True, **long):
                first.set()
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            out["a"] = finish

        def queued():
            out["b"] = client.completions.create(**{**long, "max_tokens": 5}).choices[0].finish_reason

        a = threading.Thread(target=streamed)
        a.start()
        assert first.wait(60)
        b = threading.Thread(target=queued)
        b.start()
        deadline = time.monotonic() + 10
        while server.metric("shardlm_waiting_sequences") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(server.base + "/v1/completions", json={"model": TINY, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["type"] == \
            "rate_limit_error"
        assert server.stop() == 0, "".join(server.stderr)[-2000:]
        a.join(60), b.join(60)
        assert out == {"a": "length", "b": "length"}
    finally:
        if server.proc.poll() is None:
            server.kill()


@pytest.mark.slow
def test_two_processes_serve_what_one_does(tiny_model, tiny_server, env):
    server = Server(["--model", tiny_model, "--served-model-name", TINY, "--max-num-seqs", "16",
                     "--mesh", "x=2,y=2,z=2", "--layout", "2d_weight_stationary"], env, launch="2x4")
    try:
        specs = [_spec(i) for i in (0, 1, 2, 5, 10, 11)]
        client = server.client(timeout=120)
        results = _all_at_once(client, specs, 180)
        assert results == [_ask(tiny_server.client(), s) for s in specs]
        assert server.stop() == 0, "".join(server.stderr)[-3000:]
    finally:
        if server.proc.poll() is None:
            server.kill()


def _same(a, b) -> bool:
    """Equal JSON, floats (logprobs, computed beside other rows of a step) within 1e-4."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) < 1e-4
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


@pytest.mark.slow
def test_batch_file_bodies_equal_the_servers_responses(tiny_server, tiny_model, tmp_path):
    """An OpenAI batch file through `shardlm run`: its records are the Batch API's, and each body
    equals the server's answer to the same request (but for id and created)."""
    from shardlm.engine.cli import main

    bodies = [_spec(i) for i in (0, 1, 3, 5, 10)]
    for b in bodies:
        b.pop("stream")
    bodies.append({"kind": "completion", "model": TINY, "prompt": ["the lazy dog", "seven cats"], "max_tokens": 5,
                   "temperature": 0, "logprobs": 2})
    bodies.append({"kind": "chat", "model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                   "temperature": 0.7, "seed": 11, "logprobs": True, "top_logprobs": 3, "stop": ["e"]})
    lines = [{"custom_id": f"r{i}", "method": "POST",
              "url": "/v1/chat/completions" if b["kind"] == "chat" else "/v1/completions",
              "body": {k: v for k, v in b.items() if k != "kind"}} for i, b in enumerate(bodies)]
    lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}})
    src, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines) + "{not json\n")
    assert main(["run", "--model", tiny_model, "--served-model-name", TINY, "--input", str(src), "--output", str(out),
                 "--max-num-seqs", "16"]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(set(r) == {"id", "custom_id", "response", "error"} and r["id"].startswith("batch_req_")
               for r in records)
    by_id = {r["custom_id"]: r for r in records}
    headers = {"Authorization": f"Bearer {KEY}"}
    for line in lines:
        record = by_id[line["custom_id"]]
        assert record["error"] is None and set(record["response"]) == {"status_code", "request_id", "body"}
        served = httpx.post(tiny_server.base + line["url"], json=line["body"], headers=headers, timeout=120)
        assert record["response"]["status_code"] == served.status_code
        want, got = served.json(), record["response"]["body"]
        if served.status_code == 200:
            for body in (want, got):
                assert body.pop("id").startswith("chatcmpl-" if "chat" in line["url"] else "cmpl-")
                body.pop("created")
        assert _same(got, want), (line["custom_id"], got, want)
    (broken,) = [r for r in records if r["custom_id"] is None]
    assert broken["response"] is None and broken["error"]["code"] == "invalid_request"
