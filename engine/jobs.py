"""Decoding jobs: JSONL prompts in, JSONL completions out, one SPMD program on every process.

Input, one JSON object per line:
    {"id": ..., "prompt": "text"}              raw text (the chat template only with chat=True)
    {"id": ..., "messages": [{"role": ..., "content": ...}, ...]}   rendered with the chat template
plus optional sampling fields overriding the job's defaults (see SAMPLING_FIELDS). An id is a
string or an integer, unique in the file.

Output, one JSON object per line, in the order requests finish:
    {"id", "text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"}
or, for an input line that cannot run, an error record (the job goes on):
    {"id": id or null, "line": 1-based input line number, "error": "what was wrong"}

OpenAI batch files (the Batch API's format) run too; the first non-blank line decides which
format a file is in (a line with "custom_id", or one that is not JSON but names "custom_id": batch).
Input, one JSON object per line:
    {"custom_id": "...", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
     "body": {...an OpenAI request body, "model" the job's --served-model-name...}}
A custom_id is a string, unique in the file. The body is checked and answered by openai_api, the
server's code, so its fields take OpenAI's defaults (temperature 1, max_tokens the rest of the
context) and the command's sampling flags and --chat do not apply; "stream": true is refused (400).
A body without "seed" samples with one derived from its custom_id (`batch_seed`), not a random
one: every process of a job draws the same, and a rerun samples the same tokens.
Output, one JSON object per line, in the order lines finish (every prompt of a completions body's
list of prompts done), as the Batch API writes them:
    {"id": "batch_req_<hex>", "custom_id", "response": {"status_code": 200, "request_id": "<hex>",
     "body": {...the chat.completion or text_completion body the server would answer...}}, "error": null}
a body the API refuses (unknown model, a bad sampling value, a prompt too long, ...) has its status
(400, 404) and OpenAI's {"error": {...}} as "body"; a line that is no batch line (malformed JSON, a
missing or non-string custom_id, a method other than POST, another url, a body that is no object,
a repeated custom_id, a line of the shardlm format) gets
    {"id", "custom_id": custom_id or null, "response": null, "error": {"code": "invalid_request", "message"}}
and the job goes on either way. The hex of "id" begins with the input line number (all but its
last 24 digits, the rest random), so that a rerun knows the lines whose error record has no custom_id.

Every process reads the input and runs the same sequence of steps; only process 0 touches the
output. The input is read as a stream: one first pass keeps a few bytes per line (`scan_input`:
its digest, each line's id hash, repeated ids), the output's records are read the same way
(`scan_output`), and the lines still to do are parsed as the scheduler takes them, so memory does
not grow with the input's length. Each record is appended with one write() and flushed, so a job that dies leaves whole
lines (a torn last line, should the OS leave one, is cut away before appending). Rerunning the
same command skips ids that already have a result and lines that already have an error record
(batch files: custom_ids that have a record with a "response", and lines that have one without).
"""

from __future__ import annotations

import array
import codecs
import dataclasses
import hashlib
import json
import os
import re
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass

import jax
import numpy as np

from shardlm.checkpoints.orbax_io import can_create_files_in
from shardlm.engine import batching, openai_api, scheduler
from shardlm.engine.llm import completion_record
from shardlm.engine.sampling import INT32_MAX, SamplingParams

SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "ignore_eos", "stop_token_ids", "n",
                   "stop", "logprobs")
_KNOWN_FIELDS = ("id", "prompt", "messages") + SAMPLING_FIELDS
EMBEDDED_NAME = "SmolLM2-135M-Instruct"  # the embedded model's name in OpenAI bodies (batch lines, the server)


def served_model_name(served: str | None, model: str | None) -> str:
    """The name OpenAI bodies must give as "model": --served-model-name, else --model as given,
    else (the embedded model) EMBEDDED_NAME."""
    return served or model or EMBEDDED_NAME


# ----- the distributed runtime -----

def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, initialization_timeout: int = 300,
                     heartbeat_timeout: int = 100) -> None:
    """Join the job's processes with jax.distributed; must run before anything touches a device.

    With no arguments, initialise only where JAX finds its peers itself (Cloud TPU, SLURM, Open MPI);
    otherwise stay a single process.
    """
    given = [a is not None for a in (coordinator, num_processes, process_id)]
    if not any(given):
        from shardlm.sharding.compat import cluster_detected

        if cluster_detected():
            jax.distributed.initialize(initialization_timeout=initialization_timeout,
                                       heartbeat_timeout_seconds=heartbeat_timeout)
        return
    if not all(given):
        raise ValueError("give all of --coordinator HOST:PORT, --num-processes N and --process-id I, or none of them")
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"need --num-processes >= 1 and 0 <= --process-id < --num-processes, "
                         f"got {num_processes} and {process_id}")
    # A loopback coordinator binds loopback only (local runs); otherwise JAX binds all interfaces.
    bind = coordinator if host in ("127.0.0.1", "localhost", "[::1]") else None
    jax.distributed.initialize(coordinator, num_processes, process_id, coordinator_bind_address=bind,
                               initialization_timeout=initialization_timeout,
                               heartbeat_timeout_seconds=heartbeat_timeout)


def _broadcast_from_first(values: np.ndarray) -> np.ndarray:
    """Process 0's `values` on every process (same shape and dtype everywhere)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(values))


def _check_same_input(digest: bytes) -> None:
    """Every process must read the same input, or their step sequences would diverge."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    mine = np.frombuffer(digest[:8], np.uint8).astype(np.int32)
    everyone = np.asarray(multihost_utils.process_allgather(mine))  # [processes, 8]
    differ = [p for p in range(everyone.shape[0]) if not np.array_equal(everyone[p], everyone[0])]
    if differ:
        raise ValueError(f"processes {differ} read a different input file than process 0; "
                         "every process must see the same --input")


# ----- input -----

@dataclass
class Line:
    number: int  # 1-based line number in the input file
    id: object = None
    request: batching.Request | None = None  # the prompt encoded once, with its sampling; key: this Line
    error: str | None = None

    @property
    def key(self) -> str:  # ids compare by their JSON form: "1" and 1 are different ids
        return json.dumps(self.id)


def _split_lines(data: bytes) -> list[bytes]:
    """Lines split at b"\n" only (str.splitlines would also split inside a record at U+2028 and
    the like); a trailing "\r" is dropped."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def check_input(path: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"--input {path!r} is not a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ValueError(f"--input {path!r}: cannot read it: {e.strerror}") from None


def iter_lines(path: str):
    """The input's lines one at a time, as `_split_lines` splits them (blank lines kept, so line
    numbers match the file). A UTF-8 byte-order mark is skipped; bytes that are not UTF-8 are kept
    as surrogate escapes, so that parse_line makes that line an error record instead of silently
    replacing them."""
    check_input(path)
    with open(path, "rb") as f:
        for number, raw in enumerate(f):
            if number == 0:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            yield raw.removesuffix(b"\n").removesuffix(b"\r").decode("utf-8", errors="surrogateescape")


def read_lines(path: str) -> list[str]:
    """Every line of the input at once (small files)."""
    return list(iter_lines(path))


def _key_hash(key: str) -> int:
    """An id's JSON form in 64 bits: the job keeps one per input line, not the ids themselves."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


@dataclass
class InputIndex:
    """What a job knows of its input before running it, a few bytes per line (one streaming pass)."""

    n_lines: int
    digest: bytes  # of the whole file: every process must read the same
    keys: np.ndarray  # uint64 [n_lines]: each line's id hash, 0 where the line has no usable id
    nonblank: np.ndarray  # bool [n_lines]
    first_line: dict[int, int]  # 0-based line repeating an earlier id -> 1-based line of its first
    batch: bool = False  # an OpenAI batch file: lines keyed by custom_id


_NOT_JSON = object()  # scan_input's value for a line that is not JSON


def _is_batch_line(text: str, obj) -> bool:
    """Whether the first non-blank line makes its file a batch file: an object with "custom_id",
    or a line that is not JSON (its own error) naming "custom_id"."""
    if obj is _NOT_JSON:
        return '"custom_id"' in text
    return isinstance(obj, dict) and "custom_id" in obj


def scan_input(path: str) -> InputIndex:
    digest, keys, nonblank = hashlib.sha256(), array.array("Q"), array.array("b")
    batch = None  # decided by the first non-blank line
    for text in iter_lines(path):
        digest.update(text.encode("utf-8", "surrogateescape") + b"\n")
        nonblank.append(bool(text.strip()))
        key = 0
        if text.strip():
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError):
                obj = _NOT_JSON
            if batch is None:
                batch = _is_batch_line(text, obj)
            id_ = obj.get("custom_id" if batch else "id") if isinstance(obj, dict) else None
            if isinstance(id_, str) or (not batch and isinstance(id_, int) and not isinstance(id_, bool)):
                key = _key_hash(json.dumps(id_))
        keys.append(key)
    keys_np = np.frombuffer(keys, np.uint64).copy() if len(keys) else np.zeros(0, np.uint64)
    first_line = {}
    with_id = np.flatnonzero(keys_np)
    if with_id.size:
        order = with_id[np.argsort(keys_np[with_id], kind="stable")]  # equal ids in line order
        ks = keys_np[order]
        starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])  # first of each id in `order`
        repeat = np.flatnonzero(np.r_[False, ks[1:] == ks[:-1]])
        group_first = order[starts[np.searchsorted(starts, repeat, side="right") - 1]]
        first_line = {int(i): int(f) + 1 for i, f in zip(order[repeat], group_first)}
    return InputIndex(len(keys), digest.digest(), keys_np, np.frombuffer(nonblank, np.int8).astype(bool),
                      first_line, bool(batch))


_EXPECTED = {"max_new_tokens": "an integer", "top_k": "an integer", "seed": "an integer", "n": "an integer",
             "temperature": "a number", "top_p": "a number", "ignore_eos": "true or false",
             "stop_token_ids": "a list of integers", "stop": "a string or a list of strings", "logprobs": "an integer"}


def _check_json_type(name: str, value) -> None:
    """A sampling field must have its JSON type: "yes" is not a boolean, "198" not a list of ids,
    "hot" not a temperature (SamplingParams would read some of these as something else)."""
    integer = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    ok = {"an integer": integer,
          "a number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "true or false": lambda v: isinstance(v, bool),
          "a list of integers": lambda v: isinstance(v, list) and all(map(integer, v)),
          "a string or a list of strings": lambda v: isinstance(v, str) or (isinstance(v, list) and all(
              isinstance(x, str) for x in v))}[_EXPECTED[name]](value)
    if not ok:
        raise ValueError(f"\"{name}\" must be {_EXPECTED[name]}, got {json.dumps(value)[:80]}")


def _json_line(text: str) -> tuple[object, str | None]:
    """An input line's JSON value, or why it has none (not UTF-8, malformed)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # iter_lines kept undecodable bytes as surrogate escapes
        return None, f"the line is not valid UTF-8 (byte {e.start + 1} of the line)"
    try:
        return json.loads(text), None
    except (json.JSONDecodeError, RecursionError) as e:
        return None, f"malformed JSON: {e}"


def parse_line(number: int, text: str, llm, defaults: SamplingParams, chat: bool) -> Line:
    """One input line -> a Line with token ids and sampling, or with `error` set."""
    line = Line(number)
    obj, line.error = _json_line(text)
    if line.error:
        return line
    if not isinstance(obj, dict):
        line.error = f"expected a JSON object with \"id\" and \"prompt\" or \"messages\", got {type(obj).__name__}"
        return line
    line.id = obj.get("id")
    if "id" not in obj or line.id is None:
        line.error = "missing \"id\""
    elif isinstance(line.id, bool) or not isinstance(line.id, (str, int)):
        line.error, line.id = f"\"id\" must be a string or an integer, got {json.dumps(line.id)}", None
    if line.error:
        return line
    unknown = sorted(set(obj) - set(_KNOWN_FIELDS))
    if unknown:
        line.error = f"unknown fields {unknown}; allowed: {', '.join(_KNOWN_FIELDS)}"
        return line
    try:
        for k in SAMPLING_FIELDS:
            if k in obj:
                _check_json_type(k, obj[k])
        sampling = dataclasses.replace(defaults, **{k: obj[k] for k in SAMPLING_FIELDS if k in obj})
        if ("prompt" in obj) == ("messages" in obj):
            raise ValueError("give exactly one of \"prompt\" (text) and \"messages\" (chat turns)")
        if "prompt" in obj and not isinstance(obj["prompt"], str):
            raise ValueError("\"prompt\" must be a string")
        if "messages" in obj and not (isinstance(obj["messages"], list) and obj["messages"]
                                      and all(isinstance(m, dict) for m in obj["messages"])):
            raise ValueError("\"messages\" must be a non-empty list of {\"role\": str, \"content\": str}")
        prompt = obj["prompt"] if "prompt" in obj else obj["messages"]
        line.request = llm.request(prompt, sampling, chat=chat and "prompt" in obj, key=line)
    except (ValueError, TypeError, OverflowError) as e:  # whatever one line holds, it is that line's error
        line.error = str(e)
    return line


def pending_lines(path: str, index: InputIndex, done: np.ndarray, llm, defaults: SamplingParams, chat: bool = False):
    """The input's non-blank lines not done yet, each parsed as it is read (a stream); a repeat of
    an earlier id is an error."""
    for number, text in enumerate(iter_lines(path), 1):
        if not index.nonblank[number - 1] or done[number - 1]:
            continue
        line = parse_line(number, text, llm, defaults, chat)
        if line.id is not None and number - 1 in index.first_line:
            line.error = f"duplicate id {line.key} (first on line {index.first_line[number - 1]})"
            line.request = None
        yield line


# ----- OpenAI batch files -----

BATCH_METHOD = "POST"
_BATCH_ID = "batch_req_"
_RANDOM_HEX = 24  # the random tail of a record's id, after its line number in hex


def batch_seed(custom_id: str) -> int:
    """The seed of a batch line whose body gives none: from its custom_id, so that every process
    of a job (and a rerun) samples the same tokens, where the server would draw a random one."""
    digest = hashlib.blake2b(custom_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % INT32_MAX


@dataclass(eq=False)
class BatchLine:
    """One line of a batch file: its requests (key (this BatchLine, prompt index)), or why not."""

    number: int  # 1-based line number in the input file
    custom_id: str | None = None
    parsed: openai_api.Parsed | None = None  # its requests, keyed (self, i)
    error: str | None = None  # not a batch line: the message of its "error"
    api_error: openai_api.APIError | None = None  # a batch line whose body the API refuses
    completions: list | None = None  # per prompt, as they finish

    @property
    def key(self) -> str:
        return json.dumps(self.custom_id)

    def record(self, tokenizer=None, model_name: str = "") -> dict:
        """The Batch API's output record: an error, a refused body, or (all prompts done) the response."""
        record_id = f"{_BATCH_ID}{self.number:08x}{secrets.token_hex(_RANDOM_HEX // 2)}"
        if self.error is not None:
            return {"id": record_id, "custom_id": self.custom_id, "response": None,
                    "error": {"code": "invalid_request", "message": self.error}}
        if self.api_error is not None:
            status, body = self.api_error.status, self.api_error.body()
        else:
            status = 200
            body = openai_api.response(self.parsed, self.completions, tokenizer, model_name,
                                       openai_api.new_id(self.parsed.kind))
        return {"id": record_id, "custom_id": self.custom_id,
                "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body}, "error": None}


def batch_record_line(record_id: str) -> int:
    """The input line number a batch record's id begins with (-1: none)."""
    m = re.fullmatch(rf"{_BATCH_ID}([0-9a-f]+)[0-9a-f]{{{_RANDOM_HEX}}}", record_id)
    return int(m[1], 16) if m else -1


def parse_batch_line(number: int, text: str, llm, model_name: str, duplicate_of: int | None = None) -> BatchLine:
    """One line of a batch file -> a BatchLine with its parsed body, or with `error` (not a batch
    line, or a custom_id first on line `duplicate_of`) or `api_error` (a body the API refuses) set."""
    line = BatchLine(number)
    obj, line.error = _json_line(text)
    if line.error:
        return line
    shape = '{"custom_id", "method", "url", "body"}'
    if not isinstance(obj, dict):
        line.error = f"expected a JSON object {shape}, got {type(obj).__name__}"
        return line
    custom_id = obj.get("custom_id")
    if custom_id is None:
        other = " (a line of the shardlm job format: this file is an OpenAI batch file, as its first line is)" \
            if "id" in obj and ("prompt" in obj or "messages" in obj) else ""
        line.error = f'missing "custom_id": each line of a batch file is {shape}{other}'
        return line
    if not isinstance(custom_id, str):
        line.error = f'"custom_id" must be a string, got {json.dumps(custom_id)[:80]}'
        return line
    try:
        custom_id.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape ("\ud800"): not text, and not writable as UTF-8
        line.error = f'"custom_id" is not valid Unicode text: {json.dumps(custom_id)[:80]}'
        return line
    line.custom_id = custom_id
    if duplicate_of is not None:
        line.error = f"duplicate custom_id {line.key} (first on line {duplicate_of})"
        return line
    if obj.get("method") != BATCH_METHOD:
        line.error = f'"method" must be "{BATCH_METHOD}", got {json.dumps(obj.get("method"))[:80]}'
        return line
    url = obj.get("url")
    if not isinstance(url, str) or url not in openai_api.ROUTES:
        line.error = f'"url" must be {" or ".join(map(json.dumps, openai_api.ROUTES))}, got {json.dumps(url)[:80]}'
        return line
    body = obj.get("body")
    if not isinstance(body, dict):
        line.error = f'"body" must be a JSON object (the request body), got {json.dumps(body)[:80]}'
        return line
    if body.get("seed") is None:  # not a random seed: every process must sample alike
        body = {**body, "seed": batch_seed(custom_id)}
    try:
        try:
            parsed = openai_api.parse(openai_api.ROUTES[url], body, llm, model_name)
        except (ValueError, TypeError, OverflowError) as e:  # whatever a body holds, it is that line's error
            raise openai_api.APIError(400, str(e)) from None
        if parsed.stream:
            raise openai_api.APIError(400, "batch lines are not streamed: give \"stream\": false or leave it out",
                                      "stream")
    except openai_api.APIError as e:
        line.api_error = e
        return line
    parsed.requests = [dataclasses.replace(r, key=(line, i)) for i, r in enumerate(parsed.requests)]
    line.parsed, line.completions = parsed, [None] * len(parsed.requests)
    return line


def pending_batch_lines(path: str, index: InputIndex, done: np.ndarray, llm, model_name: str):
    """A batch file's non-blank lines not done yet, each parsed as it is read (a stream); a repeat
    of an earlier custom_id is an error."""
    for number, text in enumerate(iter_lines(path), 1):
        if not index.nonblank[number - 1] or done[number - 1]:
            continue
        yield parse_batch_line(number, text, llm, model_name, index.first_line.get(number - 1))


# ----- output -----

_RECORD_START = b'{"id": '  # how every record Appender writes begins (json.dumps, "id" first)


def _job_record(raw: bytes) -> dict | None:
    """The record a whole output line holds, or None if it is not one of ours."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or "id" not in record:
        return None
    if _is_batch_record(record):
        return record
    return record if {"error", "line"} <= record.keys() or "token_ids" in record else None


_BATCH_RECORD_KEYS = frozenset({"id", "custom_id", "response", "error"})


def _is_batch_record(record: dict) -> bool:
    return (record.keys() == _BATCH_RECORD_KEYS and isinstance(record["id"], str)
            and record["id"].startswith(_BATCH_ID))


def _record_key(record: dict) -> tuple[str | None, int]:
    """What resuming keys a record by: (the JSON of its id, or of its custom_id if it is a batch
    record with a response) for a result, else (None, its input line number, -1 if none)."""
    if _is_batch_record(record):
        if record["response"] is None:
            return None, batch_record_line(record["id"])
        return (json.dumps(record["custom_id"]), 0) if isinstance(record["custom_id"], str) else (None, -1)
    if "error" in record:
        line = record.get("line")
        return None, line if isinstance(line, int) and not isinstance(line, bool) else -1
    return json.dumps(record["id"]), 0


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (symlinks, hard links, ./x and x): device and inode."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _file_path(flag: str, path: str, kind: str) -> tuple[str, str]:
    """(absolute path, its folder) of a file to write: not a folder, in a folder that exists."""
    out = os.path.abspath(path)
    if os.path.isdir(out):
        raise ValueError(f"{flag} {path!r} is a folder; give the path of {kind}")
    folder = os.path.dirname(out)
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path!r}: its folder does not exist")
    return out, folder


def check_output(output_path: str, input_path: str) -> None:
    """What can be known of --output before the model loads, touching nothing: a writable file (or
    a new one in an existing, writable folder), not --input, and holding only job records."""
    out, folder = _file_path("--output", output_path, "a JSONL file")
    if _same_file(out, input_path):
        raise ValueError(f"--output {output_path!r} is the same file as --input {input_path!r}; give another path")
    if os.path.exists(out):
        if not os.path.isfile(out):
            raise ValueError(f"--output {output_path!r} is not a regular file")
        try:  # opening for append writes nothing
            os.close(os.open(out, os.O_WRONLY | os.O_APPEND))
        except OSError as e:
            raise ValueError(f"--output {output_path!r} cannot be written: {e.strerror}") from None
        scan_output(out)
    elif not can_create_files_in(folder):
        raise ValueError(f"--output {output_path!r}: its folder {folder} is not writable")


_NOT_OURS = "is not a job record; is it another file? (give a new path, or the output of an earlier run of this job)"


@dataclass
class OutputIndex:
    """What an output holds, 8 bytes a record: its result ids' hashes and its error records' lines."""

    results: np.ndarray  # uint64 id hashes (batch records with a response: custom_id hashes)
    error_lines: np.ndarray  # int64 input line numbers (-1: not a line number)
    cut: int | None  # the length to cut a torn last line at
    batch_records: int = 0  # records of the OpenAI batch format
    job_records: int = 0  # records of the shardlm format


def _records(path: str):
    """(line number, record or None, bytes before the line, whole) for each line, read one at a time."""
    with open(path, "rb") as f:
        at = 0
        for n, raw in enumerate(f, 1):
            whole = raw.endswith(b"\n")
            record = _job_record(raw.removesuffix(b"\n").removesuffix(b"\r")) if whole else None
            yield n, record, at, whole, raw
            at += len(raw)


def scan_output(path: str) -> OutputIndex:
    """The records in `path`, read in one pass holding 8 bytes each. Every whole line must be a
    job record and a torn tail must begin like one; otherwise this is some other file and it is
    refused before anything is written to it."""
    results, errors, cut, batch, plain = array.array("Q"), array.array("q"), None, 0, 0
    if os.path.exists(path):
        for n, record, at, whole, raw in _records(path):
            if not whole:
                if not (_RECORD_START.startswith(raw) or raw.startswith(_RECORD_START)):
                    raise ValueError(f"--output {path!r} line {n} {_NOT_OURS}")
                cut = at
                continue
            if record is None:
                raise ValueError(f"--output {path!r} line {n} {_NOT_OURS}")
            if _is_batch_record(record):
                batch += 1
            else:
                plain += 1
            key, line = _record_key(record)
            if key is not None:
                results.append(_key_hash(key))
            else:
                errors.append(line)
    return OutputIndex(np.frombuffer(results, np.uint64).copy(), np.frombuffer(errors, np.int64).copy(), cut,
                       batch, plain)


def recover_output(path: str, index: InputIndex | None = None) -> OutputIndex:
    """The records already in `path`, checked against this job's input (`index`) when given; only
    then is a torn last line (no newline) cut off the file."""
    out = scan_output(path)
    if index is not None:
        other = out.job_records if index.batch else out.batch_records
        if other:
            formats = ("shardlm job", "OpenAI batch") if index.batch else ("OpenAI batch", "shardlm job")
            raise ValueError(f"--output {path!r} holds {other} records of the {formats[0]} format and --input is "
                             f"in the {formats[1]} format; is it the output of another job? (give a new path)")
        strange = ~np.isin(out.results, index.keys)
        bad_lines = (out.error_lines < 1) | (out.error_lines > index.n_lines)
        if strange.any() or bad_lines.any():
            stray = set(out.results[strange].tolist())
            names = [key for _, r, _, whole, _ in _records(path) if r is not None and whole
                     for key in [_record_key(r)[0]] if key is not None and _key_hash(key) in stray][:3]
            names += [f"line {n}" for n in out.error_lines[bad_lines][:3].tolist()]
            raise ValueError(f"--output {path!r} holds records that are not of this --input ({', '.join(names[:3])}); "
                             "is it the output of another job? (give a new path)")
    if out.cut is not None:
        with open(path, "r+b") as f:
            f.truncate(out.cut)
    return out


class Appender:
    """Appends records to a file, each as one whole line with one write()."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict) -> None:
        try:
            data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        except UnicodeEncodeError:  # a lone surrogate from the input's JSON ("\ud800"): written as its escape
            data = (json.dumps(record) + "\n").encode()
        while data:  # a regular file takes it in one write; loop only for the letter of POSIX
            data = data[os.write(self.fd, data):]

    def close(self) -> None:
        os.close(self.fd)


def _done_mask(index: InputIndex, out: OutputIndex) -> np.ndarray:
    """1 for each input line that already has its record in the output: an error record for its
    line, or a result for its id (a line repeating an earlier id has only its error record)."""
    done = np.zeros(index.n_lines, bool)
    done[out.error_lines[(out.error_lines >= 1) & (out.error_lines <= index.n_lines)] - 1] = True
    repeat = np.zeros(index.n_lines, bool)
    repeat[list(index.first_line)] = True
    done |= (index.keys != 0) & ~repeat & np.isin(index.keys, out.results)
    return done.astype(np.int8)


def _lines_done(index: InputIndex, output_path: str, input_path: str) -> np.ndarray:
    """Process 0 checks the output and finds the lines already done; every process gets its answer
    (only process 0 may see the file), and all stop together if it refused the file."""
    view = np.zeros(index.n_lines + 1, np.int8)  # [done per line..., 1 if process 0 refused the output]
    error = None
    if jax.process_index() == 0:
        try:
            check_output(output_path, input_path)
            view[:-1] = _done_mask(index, recover_output(output_path, index))
        except ValueError as e:
            error, view[-1] = e, 1
    view = _broadcast_from_first(view)
    if view[-1]:
        raise error or ValueError("process 0 refused --output (its message says why)")
    return view[:-1]


# ----- the job -----

def run_job(llm, input_path: str, output_path: str, defaults: SamplingParams = SamplingParams(), *,
            chat: bool = False, progress: bool = True, control=None, model_name: str = EMBEDDED_NAME) -> dict:
    """Run every pending line of `input_path`, appending records to `output_path`; returns a summary
    (`summary_record` lists its fields). `control`, a job_control.JobControl, may drain the job (a
    signal): then the lines it did not finish stay pending, counted in the summary, for a rerun.
    An OpenAI batch file (see the module's docstring) runs its bodies as `model_name`, which their
    "model" must name; `defaults` and `chat` are for the shardlm format only. The summary counts
    lines either way: a batch line is one prompt done (all of its prompts) or one error.

    Call it on every process of a multi-host job with the same arguments.
    """
    writer = jax.process_index() == 0
    index = scan_input(input_path)  # one pass, a few bytes a line: the input is then read as a stream
    _check_same_input(index.digest)
    done = _lines_done(index, output_path, input_path)
    to_do = int((index.nonblank & (done == 0)).sum())

    out = Appender(output_path) if writer else None
    bar = _progress_bar(to_do, enabled=writer and progress)
    t0 = time.perf_counter()
    stats = {"generated": 0, "prompt_tokens": 0, "completion_tokens": 0, "finished": 0, "errors": 0}
    counts = scheduler.Stats()  # the paged scheduler's: prefill computed and cached, preemptions

    def on_step(n_tokens: int) -> None:
        stats["generated"] += n_tokens
        if bar is not None:
            cache = ""
            if counts.prompt_tokens:
                hit = f"prefix cache hit {counts.hit_rate:.0%}, " if llm.paged and llm.engine.prefix_cache else ""
                cache = f", {hit}{counts.computed_tokens}/{counts.prompt_tokens} prompt tokens computed"
            bar.set_postfix_str(f"{stats['generated'] / (time.perf_counter() - t0):.1f} tok/s{cache}", refresh=False)

    def on_result(key, completion) -> None:
        if isinstance(key, tuple):  # a prompt of a batch line: its record once all of them are done
            line, i = key
            line.completions[i] = completion
            if any(c is None for c in line.completions):
                return
            completions = line.completions
            make = lambda: line.record(llm.tokenizer, model_name)  # noqa: E731
        else:
            completions = [completion]
            make = lambda: {"id": key.id, **completion_record(completion)}  # noqa: E731
        stats["finished"] += 1
        stats["prompt_tokens"] += sum(len(c.prompt_token_ids) for c in completions)
        stats["completion_tokens"] += sum(len(s.token_ids) for c in completions for s in c.outputs)
        if out is not None:
            record = make()
            if control is None:
                out.write(record)
            else:  # written once the processes' steps are known to agree (at once in one process)
                control.hold(lambda: out.write(record))
        if bar is not None:
            bar.update(1)

    def errored(record: dict) -> None:
        stats["errors"] += 1
        if out is not None:
            out.write(record)
        if bar is not None:
            bar.update(1)

    def requests():  # the pending lines as a stream: a bad line's error record is written as it is read
        if index.batch:
            for line in pending_batch_lines(input_path, index, done, llm, model_name):
                if line.parsed is not None:
                    yield from line.parsed.requests
                else:
                    errored(line.record() if out is not None else {})
            return
        for line in pending_lines(input_path, index, done, llm, defaults, chat):
            if line.error is None:
                yield line.request
                continue
            errored({"id": line.id, "line": line.number, "error": line.error})

    try:
        llm.run(requests(), on_result=on_result, on_step=on_step, control=control, stats=counts)
        if control is not None:
            control.finish()
    finally:
        if bar is not None:
            bar.close()
        if out is not None:
            out.close()
    wall = time.perf_counter() - t0
    finished, pending = stats["finished"], to_do - stats["finished"] - stats["errors"]
    return {"prompts": finished, "errors": stats["errors"], "pending": pending, "skipped": int(done.sum()),
            "prompt_tokens": stats["prompt_tokens"], "completion_tokens": stats["completion_tokens"], "wall_s": wall,
            "completions_per_s": finished / wall if wall > 0 else 0.0,
            "tokens_per_s": stats["completion_tokens"] / wall if wall > 0 else 0.0,
            "preempted": bool(pending and control is not None and control.drained),
            **prefill_record(counts, llm.paged and llm.engine.prefix_cache)}


def _progress_bar(total: int, enabled: bool):
    """A tqdm bar on a terminal; elsewhere (logs, `shardlm launch`, ssh without a tty) a line every 10 s."""
    if not enabled:
        return None
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc="job", unit=" prompts", file=sys.stderr)
    return _ProgressLines(total)


class _ProgressLines:
    """The tqdm calls run_job makes, printed as a whole line every `every_s` seconds by a timer
    thread: also while no prompt finishes (long generations), which a check in update() missed."""

    def __init__(self, total: int, every_s: float = 10.0):
        self.total, self.n, self.postfix, self.every_s = total, 0, "", every_s
        self.t0 = time.perf_counter()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._tick, daemon=True, name="job-progress")
        self.thread.start()

    def _tick(self) -> None:
        while not self.stopped.wait(self.every_s):
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        eta = f"ETA {elapsed / self.n * (self.total - self.n):.0f} s" if self.n else "ETA unknown (none done yet)"
        return f"job: {self.n}/{self.total} prompts, {self.postfix or '0.0 tok/s'}, {elapsed:.0f} s, {eta}"

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.postfix = text

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()


def check_summary_path(path: str) -> None:
    """--summary: a file that can be created or replaced (it is written whole at the end)."""
    _, folder = _file_path("--summary", path, "a JSON file")
    if not can_create_files_in(folder):
        raise ValueError(f"--summary {path!r}: its folder {folder} is not writable")


PREFILL_FIELDS = ("prefix_cache_hit_rate", "prompt_tokens_submitted", "prefill_tokens_computed",
                  "prefill_tokens_cached", "kv_preemptions")


def prefill_record(counts: scheduler.Stats, prefix_cache: bool) -> dict:
    """What the scheduler counted, for the summary: the prefix cache's hit rate (None when it is
    off), prompt tokens submitted against prefill tokens computed and read from the cache, and the
    sequences preempted for KV pages and recomputed."""
    return {"prefix_cache_hit_rate": round(counts.hit_rate, 4) if prefix_cache else None,
            "prompt_tokens_submitted": counts.prompt_tokens, "prefill_tokens_computed": counts.computed_tokens,
            "prefill_tokens_cached": counts.cached_tokens, "kv_preemptions": counts.preemptions}


def summary_record(s: dict, *, input_path: str, output_path: str, compile_s: float, previous: str | None = None) -> dict:
    """The --summary JSON of a run_job summary: what is done, errored and pending, tokens, time,
    throughput, compile time, and the preemptions of this job so far (counted across reruns that
    write the same summary file for the same output)."""
    preemptions = int(s["preempted"])
    if previous and os.path.isfile(previous):
        try:
            with open(previous) as f:
                old = json.load(f)
            if isinstance(old, dict) and old.get("output") == os.path.abspath(output_path):
                preemptions += int(old.get("preemptions", 0))
        except (OSError, ValueError, TypeError):
            pass  # not a summary of ours: replaced
    return {"input": os.path.abspath(input_path), "output": os.path.abspath(output_path),
            "done": s["prompts"], "errors": s["errors"], "pending": s["pending"], "skipped": s["skipped"],
            "prompt_tokens": s["prompt_tokens"], "completion_tokens": s["completion_tokens"],
            "wall_s": round(s["wall_s"], 3), "completions_per_s": round(s["completions_per_s"], 3),
            "tokens_per_s": round(s["tokens_per_s"], 2), "compile_s": round(compile_s, 3),
            **{k: s[k] for k in PREFILL_FIELDS},
            "preempted": s["preempted"], "preemptions": preemptions}


def write_summary(path: str, record: dict) -> None:
    """Written whole: a temporary file beside it, then renamed over it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def format_summary(s: dict) -> str:
    pending = f", {s['pending']} pending" if s.get("pending") else ""
    cache = ""
    if s.get("prompt_tokens_submitted"):
        hit = s["prefix_cache_hit_rate"]
        cache = (f"; {'' if hit is None else f'prefix cache hit {hit:.0%}, '}{s['prefill_tokens_computed']} of "
                 f"{s['prompt_tokens_submitted']} prompt tokens computed"
                 + (f", {s['kv_preemptions']} sequences preempted and recomputed" if s["kv_preemptions"] else ""))
    return (f"{s['prompts']} prompts done, {s['errors']} error records{pending}, {s['skipped']} already done; "
            f"{s['prompt_tokens']} prompt and {s['completion_tokens']} generated tokens in {s['wall_s']:.1f} s: "
            f"{s['completions_per_s']:.2f} completions/s, {s['tokens_per_s']:.1f} generated tokens/s{cache}")
