"""Text streams and stop strings, logprobs from the jitted steps, and OpenAI request bodies -> engine
requests, without a server (tests/test_server.py runs the real one)."""

import json

import numpy as np
import pytest
from test_jobs import write_tiny_gguf

from shardlm.checkpoints.gguf import read_metadata
from shardlm.checkpoints.tokenizer import tokenizer_from_gguf_metadata
from shardlm.engine import LLM, SamplingParams, jobs
from shardlm.engine.detokenize import TextStream
from shardlm.engine.openai_api import CHAT, COMPLETION, APIError, parse

CONTEXT = 256


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    return tokenizer_from_gguf_metadata(read_metadata(gguf_path))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> LLM:
    path = str(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    write_tiny_gguf(path, context=CONTEXT)
    return LLM.load(path, max_num_seqs=8)


def _stream(tokenizer, ids, stop=()):
    """Feed ids one at a time: (the deltas taken after each, the stream)."""
    s, deltas = TextStream(tokenizer, stop), []
    for t in ids:
        stopped = s.add(t)
        deltas.append(s.take())
        if stopped:
            break
    else:
        s.finish()
        deltas.append(s.take())
    return deltas, s


def test_deltas_never_split_a_utf8_character_and_add_up_to_the_text(tokenizer):
    text = "café ☕ naïve 日本語 — 🦊 fox"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # some tokens hold part of a character
    deltas, s = _stream(tokenizer, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == s.text == tokenizer.decode(ids) == text


@pytest.mark.parametrize("stop", ["lo wor", "world,", "d, th", "end."])
def test_a_stop_string_ends_the_text_where_it_first_appears_across_token_boundaries(tokenizer, stop):
    text = "hello world, the end. hello world, the end."
    ids = tokenizer.encode(text)
    deltas, s = _stream(tokenizer, ids, (stop, "never there"))
    assert s.stopped and s.text == text[:text.find(stop)]
    assert "".join(deltas) == s.text  # nothing of the stop string was ever handed out
    # It stopped at the token that completed the stop string, not later.
    consumed = len(s.ids)
    assert stop in tokenizer.decode(ids[:consumed]) and stop not in tokenizer.decode(ids[:consumed - 1])


def test_sampling_params_check_stop_and_logprobs():
    assert SamplingParams(stop="x").stop == ("x",)
    for bad in (dict(stop=["a"] * 5), dict(stop=[""]), dict(stop=[1]), dict(logprobs=21), dict(logprobs=-1),
                dict(logprobs=True)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_logprobs_equal_a_full_forwards_log_softmax(tiny):
    import jax

    prompt = tiny.encode("the quick brown fox jumps")
    c = tiny.generate(prompt, SamplingParams(max_new_tokens=6, logprobs=5))[0]
    sampled = tiny.generate(prompt, SamplingParams(max_new_tokens=6, logprobs=5, temperature=1.0, seed=3))[0]
    for out in (c, sampled):
        s = out.outputs[0]
        assert len(s.logprobs) == len(s.token_ids) == 6
        logits = np.asarray(tiny.engine.forward(tiny.params, np.asarray([prompt + s.token_ids], np.int32)))[0]
        want = np.asarray(jax.nn.log_softmax(logits.astype(np.float64), axis=-1))
        for t, (lp, top) in enumerate(s.logprobs):
            row = want[len(prompt) - 1 + t]
            assert abs(lp - row[s.token_ids[t]]) < 1e-4
            assert [i for i, _ in top] == list(np.argsort(-row)[:5])
            assert np.allclose([p for _, p in top], np.sort(row)[::-1][:5], atol=1e-4)
    assert c.outputs[0].token_ids[0] == c.outputs[0].logprobs[0][1][0][0]  # greedy: the top token


def test_stop_strings_through_generate(tiny):
    prompt = "the quick brown fox jumps"
    whole = tiny.generate(prompt, SamplingParams(max_new_tokens=12))[0]
    stop = whole.text[len(whole.text) // 3: len(whole.text) // 3 + 4]
    c = tiny.generate(prompt, SamplingParams(max_new_tokens=12, stop=[stop]))[0]
    assert c.finish_reason == "stop" and c.text == whole.text[:whole.text.find(stop)]
    assert c.token_ids == whole.token_ids[:len(c.token_ids)] and len(c.token_ids) < len(whole.token_ids)


def test_job_lines_take_stop_and_logprobs(tiny, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": 1, "prompt": "the quick brown fox", "logprobs": 2, "max_new_tokens": 5},
             {"id": 2, "prompt": "the lazy dog", "stop": "zzz", "max_new_tokens": 4},
             {"id": 3, "prompt": "x", "logprobs": 30}, {"id": 4, "prompt": "x", "stop": 7}]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    jobs.run_job(tiny, str(src), str(out), progress=False)
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    want = tiny.generate("the quick brown fox", SamplingParams(max_new_tokens=5, logprobs=2))[0].outputs[0]
    got = records[1]["logprobs"]  # beside other lines in the job's steps: the same to float32 rounding
    assert [[t["token_id"] for t in e["top_logprobs"]] for e in got] == [[i for i, _ in top] for _, top in want.logprobs]
    assert np.allclose([[e["logprob"]] + [t["logprob"] for t in e["top_logprobs"]] for e in got],
                       [[lp] + [p for _, p in top] for lp, top in want.logprobs], atol=1e-5)
    assert records[2]["finish_reason"] == "length" and "logprobs" not in records[2]
    assert "logprobs" in records[3]["error"] and "stop" in records[4]["error"]


def _error(kind, body, llm, status=400):
    with pytest.raises(APIError) as e:
        parse(kind, body, llm, "tiny")
    assert e.value.status == status
    return e.value


def test_request_bodies_to_engine_requests(tiny):
    p = parse(COMPLETION, {"model": "tiny", "prompt": ["a b c", "d e"], "max_tokens": 3, "n": 2, "top_k": -1,
                           "seed": 5, "temperature": 0.5, "stop": "\n", "logprobs": 2}, tiny, "tiny")
    assert len(p.requests) == 2 and p.n == 2 and p.logprobs == 2
    sp = p.requests[0].sampling
    assert (sp.max_new_tokens, sp.n, sp.top_k, sp.seed, sp.temperature, sp.stop, sp.logprobs) == \
        (3, 2, 0, 5, 0.5, ("\n",), 2)
    p = parse(CHAT, {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
              tiny, "tiny")
    (r,) = p.requests
    assert r.sampling.max_new_tokens == CONTEXT - len(r.prompt_ids)  # no max_tokens: the rest of the context
    assert r.sampling.temperature == 1.0 and p.logprobs is None and not p.stream
    assert r.prompt_ids == tiny.encode([{"role": "user", "content": "hi"}])
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    for change, param in [({"top_logprobs": 3}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                          ({"max_completion_tokens": 0}, "max_completion_tokens"), ({"max_tokens": CONTEXT}, "max_tokens"),
                          ({"n": 0}, "n"), ({"n": 9}, "n"), ({"stream_options": {"include_usage": True}}, "stream_options"),
                          ({"frequency_penalty": 0.5}, "frequency_penalty"), ({"seed": 2**40}, "seed"),
                          ({"temperature": "hot"}, "temperature"), ({"stop": [""]}, "stop"),
                          ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content")]:
        assert _error(CHAT, {**chat, **change}, tiny).param == param, change
    assert _error(CHAT, {**chat, "model": "other"}, tiny, 404).code == "model_not_found"
    assert _error(COMPLETION, {"model": "tiny", "prompt": []}, tiny).param == "prompt"
    assert _error(COMPLETION, {"model": "tiny", "prompt": "x", "logprobs": 6}, tiny).param == "logprobs"
    assert _error(CHAT, [1, 2], tiny).param is None
