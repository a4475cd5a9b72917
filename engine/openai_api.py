"""OpenAI's chat and text completions, as request bodies in and response bodies out.

`parse(kind, body, llm, model_name)` checks a request body the way the OpenAI API does and turns it
into engine requests (batching.Request, one per prompt: a completions body may hold several);
`response(...)`, `chunks(...)` shape the results as OpenAI's non-streamed body and streamed chunks.
The server (engine/server.py) and OpenAI batch files in jobs (engine/jobs.py) both go through
here, so a batch line's body equals what the server answers to the same request.

A bad body raises APIError: status, OpenAI's error `type`, the `param` at fault and a message that
says what was wrong and what is allowed; `error_body` is OpenAI's {"error": {...}} for it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import secrets
import time
import uuid
from dataclasses import dataclass

from shardlm.engine import batching
from shardlm.engine.sampling import INT32_MAX, INT32_MIN, MAX_LOGPROBS, MAX_STOP, SamplingParams

CHAT, COMPLETION = "chat", "completion"
ROUTES = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION}
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_COMPLETION_LOGPROBS = 5  # the completions API's limit on `logprobs`
# Fields not named here or below ("user", "metadata", ...) are ignored, as vLLM does. Features
# shardlm does not have are accepted only at their neutral value.
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "repetition_penalty": 1, "logit_bias": None,
           "tools": None, "tool_choice": None, "response_format": None, "functions": None, "function_call": None,
           "suffix": None, "echo": False, "best_of": None, "min_tokens": 0}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             429: "rate_limit_error"}.get(status, "server_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class Parsed:
    """A checked request: what to run and how to answer."""

    kind: str  # CHAT or COMPLETION
    requests: list[batching.Request]  # one per prompt; key: (prompt index)
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # alternatives per token (chat: top_logprobs; completions: logprobs), None: off
    return_token_ids: bool


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code=code)


def _integer(body: dict, name: str, low: int, high: int | None = None, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise _bad(f"'{name}' must be an integer {bounds}, got {value!r}", name)
    return int(value)


def _number(body: dict, name: str, low: float, high: float, default: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (low_open and value == low):
        bounds = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise _bad(f"'{name}' must be a number in {bounds}, got {value!r}", name)
    return float(value)


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"'{name}' must be true or false, got {value!r}", name)
    return value


def _content(message: dict, i: int) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    if content is None and message.get("role") == "assistant":
        return ""
    raise _bad(f"messages[{i}].content must be a string or a list of text parts "
               f"({{\"type\": \"text\", \"text\": ...}}); this model takes text only", f"messages[{i}].content")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise _bad("'messages' is a required property", "messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of {\"role\", \"content\"}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with \"role\" and \"content\"", f"messages[{i}]")
        if m.get("role") not in ROLES:
            raise _bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}",
                       f"messages[{i}].role")
        out.append({"role": m["role"], "content": _content(m, i)})
    return out


def _prompts(body: dict) -> list:
    """A completions body's prompts: a string, a list of strings, a list of token ids, or a list of
    lists of token ids."""
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("'prompt' is a required property", "prompt")
    integer = lambda t: isinstance(t, numbers.Integral) and not isinstance(t, bool)  # noqa: E731
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(integer(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) and p and all(map(integer, p))
                                                          for p in prompt):
            return list(prompt)
    raise _bad("'prompt' must be a string, a list of strings, a list of token ids or a list of lists of token ids "
               "(none empty)", "prompt")


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad("'stop' must be a string or a list of non-empty strings", "stop")
    if len(stop) > MAX_STOP:
        raise _bad(f"'stop' takes at most {MAX_STOP} strings, got {len(stop)}", "stop")
    return tuple(stop)


def check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("'model' is a required property (a string: see GET /v1/models)", "model")
    if model != model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{model_name}'", "model",
                       code="model_not_found")


def parse(kind: str, body, llm, model_name: str) -> Parsed:
    """Check an OpenAI request body (CHAT or COMPLETION) and encode its prompts for `llm`."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}")
    check_model(body, model_name)
    for name, neutral in NEUTRAL.items():
        value = body.get(name)
        if value is not None and value != neutral and not (name == "logit_bias" and value == {}):
            raise _bad(f"'{name}' is not supported by this server (give {neutral!r} or leave it out)", name)
    if kind == CHAT:
        prompts, chat = [_messages(body)], True
        if _boolean(body, "logprobs"):
            logprobs = _integer(body, "top_logprobs", 0, MAX_LOGPROBS, default=0)
        elif body.get("top_logprobs") is not None:
            raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        else:
            logprobs = None
    else:
        prompts, chat = _prompts(body), False
        logprobs = _integer(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise _bad("'stream_options' must be an object, and only given with 'stream': true", "stream_options")
    include_usage = _boolean(options or {}, "include_usage")
    max_tokens = _integer(body, "max_completion_tokens", 1) if kind == CHAT else None
    max_tokens = max_tokens if max_tokens is not None else _integer(body, "max_tokens", 1)
    n = _integer(body, "n", 1, default=1)
    top_k = _integer(body, "top_k", -1, INT32_MAX, default=0)
    sampling = SamplingParams(
        temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0, low_open=True),
        top_k=max(top_k, 0),  # -1 (vLLM's) and 0 both disable it
        # No seed: a random one (as OpenAI's API samples), drawn here, so every process of a
        # multi-host server gets the same one with the request.
        seed=_integer(body, "seed", INT32_MIN, INT32_MAX, default=secrets.randbelow(INT32_MAX)),
        n=n, stop=_stop(body), logprobs=logprobs, ignore_eos=_boolean(body, "ignore_eos"))
    try:
        llm.engine.check_samples(n) if llm.paged else None
    except ValueError as e:
        raise _bad(str(e), "n") from None
    requests = []
    for i, prompt in enumerate(prompts):
        param = "messages" if chat else "prompt"
        try:
            ids = llm.encode(prompt, chat=False)
        except ValueError as e:
            code = "context_length_exceeded" if "context" in str(e) or "longer" in str(e) else None
            raise _bad(str(e), param, code) from None
        room = llm.engine.max_seq_len - len(ids)
        if max_tokens is not None and max_tokens > room:
            raise _bad(f"this model's context is {llm.engine.max_seq_len} tokens; the prompt has {len(ids)} and "
                       f"max_tokens asks for {max_tokens} more: give max_tokens <= {room} or a shorter prompt",
                       "max_tokens", "context_length_exceeded")
        sp = dataclasses.replace(sampling, max_new_tokens=max_tokens or room)
        try:
            request = llm.request(ids, sp, key=i, text_stream=True)
        except ValueError as e:
            raise _bad(str(e), param) from None
        requests.append(request)
    return Parsed(kind, requests, n, stream, include_usage, logprobs, _boolean(body, "return_token_ids"))


# ----- responses -----

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == CHAT else "cmpl-") + uuid.uuid4().hex


def _token_logprobs(tokenizer, kind: str, logprobs: list, text_offset: int = 0):
    """Logprobs of tokens as OpenAI shapes them: chat {"content": [...]}, completions the four lists."""
    def text(i):
        return tokenizer.token_text(i) if tokenizer is not None else str(i)

    if kind == CHAT:
        entry = lambda i, p: {"token": text(i), "logprob": p, "bytes": list(text(i).encode("utf-8", "replace"))}  # noqa: E731
        return {"content": [{**entry(tid, lp), "top_logprobs": [entry(i, p) for i, p in top]}
                            for tid, (lp, top) in logprobs]}
    tokens = [text(tid) for tid, _ in logprobs]
    offsets, at = [], text_offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [lp for _, (lp, _) in logprobs],
            "top_logprobs": [{text(i): p for i, p in top} for _, (_, top) in logprobs], "text_offset": offsets}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(parsed: Parsed, completions: list, tokenizer, model_name: str, request_id: str,
             created: int | None = None) -> dict:
    """The non-streamed body for the llm.Completion of each of parsed.requests (in their order)."""
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for p, c in enumerate(completions):
        prompt_tokens += len(c.prompt_token_ids)
        for j, s in enumerate(c.outputs):
            completion_tokens += len(s.token_ids)
            lp = None
            if parsed.logprobs is not None:
                lp = _token_logprobs(tokenizer, parsed.kind, list(zip(s.token_ids, s.logprobs or [])))
            choice = {"index": p * parsed.n + j}
            if parsed.kind == CHAT:
                choice["message"] = {"role": "assistant", "content": s.text}
            else:
                choice["text"] = s.text
            choice.update(logprobs=lp, finish_reason=s.finish_reason)
            if parsed.return_token_ids:
                choice["token_ids"] = list(s.token_ids)
                choice["prompt_token_ids"] = list(c.prompt_token_ids)
            choices.append(choice)
    return {"id": request_id, "object": "chat.completion" if parsed.kind == CHAT else "text_completion",
            "created": int(created or time.time()), "model": model_name, "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens)}


class ChunkWriter:
    """The streamed chunks of one request: `delta(prompt, sample, result)` after tokens arrive,
    the finish chunk once a sample ends, and `usage_chunk` at the end (stream_options.include_usage)."""

    def __init__(self, parsed: Parsed, tokenizer, model_name: str, request_id: str):
        self.parsed, self.tokenizer, self.model_name, self.id = parsed, tokenizer, model_name, request_id
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if parsed.kind == CHAT else "text_completion"
        self._sent_tokens: dict[int, int] = {}  # choice index -> tokens whose logprobs went out
        self._text_at: dict[int, int] = {}  # choice index -> characters sent (completions' text_offset)
        self._finished: set[int] = set()

    def _chunk(self, choices: list, usage=None) -> dict:
        chunk = {"id": self.id, "object": self.object, "created": self.created, "model": self.model_name,
                 "choices": choices}
        if self.parsed.include_usage:
            chunk["usage"] = usage
        return chunk

    def role_chunks(self) -> list[dict]:
        """Chat: the first chunk of each choice names the assistant role."""
        if self.parsed.kind != CHAT:
            return []
        count = len(self.parsed.requests) * self.parsed.n
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(count)]

    def update(self, prompt: int, result: batching.Result) -> list[dict]:
        """Chunks for what the result's samples added since the last call (text that can no longer
        change, never splitting a UTF-8 character; the logprobs of the tokens so far), and a finish
        chunk for each sample that ended."""
        chunks = []
        for j, s in enumerate(result.samples or [result]):
            index = prompt * self.parsed.n + j
            if index in self._finished:
                continue
            text = s.stream.take() if s.stream is not None else ""
            sent = self._sent_tokens.get(index, 0)
            lp = None
            if self.parsed.logprobs is not None and s.logprobs and len(s.logprobs) > sent:
                lp = _token_logprobs(self.tokenizer, self.parsed.kind,
                                     list(zip(s.token_ids[sent:], s.logprobs[sent:])), self._text_at.get(index, 0))
                self._sent_tokens[index] = len(s.logprobs)
            done = s.finish_reason in ("stop", "length")
            if text or lp is not None:
                chunks.append(self._choice(index, text, lp, None))
                self._text_at[index] = self._text_at.get(index, 0) + len(text)
            if done:
                self._finished.add(index)
                last = self._choice(index, "", None, s.finish_reason)
                if self.parsed.return_token_ids:
                    last["choices"][0]["token_ids"] = list(s.token_ids)
                chunks.append(last)
        return chunks

    def _choice(self, index: int, text: str, lp, finish_reason) -> dict:
        choice = {"index": index}
        if self.parsed.kind == CHAT:
            choice["delta"] = {"content": text} if text or finish_reason is None else {}
        else:
            choice["text"] = text
        choice.update(logprobs=lp, finish_reason=finish_reason)
        return self._chunk([choice])

    def usage_chunk(self, results: list[batching.Result]) -> dict:
        prompt_tokens = sum(len(r.prompt_ids) for r in results)
        completion_tokens = sum(len(s.token_ids) for r in results for s in (r.samples or [r]))
        return self._chunk([], _usage(prompt_tokens, completion_tokens))
