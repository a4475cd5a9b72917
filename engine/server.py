"""`shardlm serve`: an OpenAI-compatible HTTP server on the paged engine, one host or many.

Two threads share one process: uvicorn runs the FastAPI app (the event loop), and `ServeLoop`
runs the engine's steps. A request is checked and tokenized on the event loop
(engine/openai_api.py), then handed to the loop's inbox; at the top of every step the loop takes
what the inbox holds, adds it to the one scheduler (engine/scheduler.py), so requests from every
client join the same continuous batch, and runs the step. Each step's tokens become OpenAI chunks
(streamed) or, once a request is done, its response body, handed back to the event loop. Every
Result is read on the engine thread only.

Multi-host: process 0 serves HTTP. Before each step it broadcasts what it took from the inbox (new
requests as token ids and sampling, aborts, stop) to every process (jax's multihost_utils), and
every process applies the same events to its own scheduler in the same order, so all of them run
the same steps; idle, process 0 still broadcasts every IDLE_S seconds so the others wait in
step with it.

A client that goes away (a stream whose send fails, or a waiting request whose connection closes)
has its request aborted at the next step: its sequences leave the batch and free their pages. A
bounded inbox-plus-queue answers 429 with Retry-After. SIGTERM: uvicorn stops accepting, running
requests finish within the grace period, the loop stops, exit 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from shardlm.engine import openai_api, scheduler
from shardlm.engine.batching import Request
from shardlm.engine.jobs import EMBEDDED_NAME
from shardlm.engine.openai_api import APIError, ChunkWriter, Parsed
from shardlm.engine.sampling import SamplingParams

IDLE_S = 0.05  # multi-host: how often process 0 tells the others, while idle, that nothing came


class QueueFull(Exception):
    pass


@dataclass(eq=False)
class _Job:
    """One HTTP request inside the loop (process 0)."""

    number: int
    parsed: Parsed
    deliver: Callable[[tuple], None]  # thread-safe: hands an event to the request's handler
    writer: ChunkWriter | None
    submitted: float
    model_name: str
    request_id: str
    results: list = dataclasses.field(default_factory=list)
    open: int = 0
    last_token: float | None = None


def _request_json(req: Request) -> dict:
    return {"prompt_ids": req.prompt_ids, "sampling": dataclasses.asdict(req.sampling), "stop_ids": sorted(req.stop_ids),
            "text": req.tokenizer is not None}


def _request_from_json(d: dict, key, tokenizer) -> Request:
    sp = d["sampling"]
    sampling = SamplingParams(**{**sp, "stop_token_ids": tuple(sp["stop_token_ids"]), "stop": tuple(sp["stop"])})
    return Request(d["prompt_ids"], sampling, frozenset(d["stop_ids"]), key=key,
                   tokenizer=tokenizer if d["text"] else None)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self):
        import prometheus_client as pc

        self.registry = r = pc.CollectorRegistry()
        self.requests = pc.Counter("shardlm_requests", "HTTP requests by endpoint and status code",
                                   ["endpoint", "status"], registry=r)
        self.running = pc.Gauge("shardlm_running_sequences", "sequences in the running batch", registry=r)
        self.waiting = pc.Gauge("shardlm_waiting_sequences", "requests waiting for the batch", registry=r)
        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = pc.Histogram("shardlm_time_to_first_token_seconds", "request received to its first token",
                                 buckets=latency, registry=r)
        self.itl = pc.Histogram("shardlm_inter_token_latency_seconds", "between a request's successive tokens",
                                buckets=latency, registry=r)
        self.prompt_tokens = pc.Counter("shardlm_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = pc.Counter("shardlm_generation_tokens", "tokens generated", registry=r)
        self.pages_in_use = pc.Gauge("shardlm_kv_pages_in_use", "KV cache pages held by sequences", registry=r)
        self.pages_total = pc.Gauge("shardlm_kv_pages_total", "KV cache pages in the pool", registry=r)
        self.hit_rate = pc.Gauge("shardlm_prefix_cache_hit_rate",
                                 "share of prompt positions read from the prefix cache", registry=r)

    def text(self) -> bytes:
        import prometheus_client as pc

        return pc.generate_latest(self.registry)


class ServeLoop:
    """The engine's step loop: `submit` and `abort` from any thread, `run` on the engine's own (on
    every process of a multi-host server; only process 0 submits)."""

    def __init__(self, llm, *, max_queue: int = 1024, metrics: Metrics | None = None):
        import jax

        if not llm.paged:
            raise ValueError("shardlm serve runs the paged KV cache; pipeline stages (a stage axis in --mesh) "
                             "are for jobs: give a mesh without a stage axis")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"--max-queue must be an integer >= 0, got {max_queue!r}")
        e = llm.engine
        self.llm, self.engine, self.max_queue = llm, e, max_queue
        self.metrics = metrics or Metrics()
        self.stats = scheduler.Stats()
        self.sched = scheduler.Scheduler(num_pages=e.num_pages, page_size=e.page_size, max_num_seqs=e.max_num_seqs,
                                         max_num_batched_tokens=e.max_num_batched_tokens, max_seq_len=e.max_seq_len,
                                         query_block=e.query_block, keep_results=False, prefix_cache=e.prefix_cache,
                                         stats=self.stats)
        self.processes, self.leader = jax.process_count(), jax.process_index() == 0
        self.inbox: queue.Queue = queue.Queue()
        self.jobs: dict[int, _Job] = {}
        self._numbers = itertools.count()
        self._waiting = 0  # requests in the scheduler's queue, as of the last step
        self.stopping = False  # the HTTP side is done: the loop ends at its next step
        self.failed: str | None = None  # a step raised: the engine cannot go on
        self.steps = 0
        self.metrics.pages_total.set(e.num_pages)

    # ----- from the HTTP side -----

    def submit(self, parsed: Parsed, deliver: Callable[[tuple], None], writer: ChunkWriter | None,
               model_name: str, request_id: str) -> int:
        if self.failed:
            raise APIError(503, f"the engine failed: {self.failed}")
        if self.inbox.qsize() + self._waiting >= self.max_queue + (self.max_queue == 0):
            raise QueueFull(f"the server's queue is full ({self.max_queue} requests wait for the batch); retry later")
        number = next(self._numbers)
        self.inbox.put(("add", _Job(number, parsed, deliver, writer, time.monotonic(), model_name, request_id)))
        return number

    def abort(self, number: int, prompts: int) -> None:
        """Stop request `number` (its `prompts` engine requests) at the next step."""
        self.inbox.put(("abort", [number, prompts]))

    def stop(self) -> None:
        """End the loop at its next step (the HTTP side is done: requests still running are dropped)."""
        self.inbox.put(("stop", None))

    @property
    def waiting(self) -> int:
        return self.inbox.qsize() + self._waiting

    # ----- the loop -----

    def _take(self, idle: bool) -> list:
        events = []
        try:
            if idle:
                events.append(self.inbox.get(timeout=IDLE_S if self.processes > 1 else 1.0))
            while True:
                events.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        return events

    def _share(self, events: list) -> list:
        """Multi-host: process 0's events, as JSON, to every process (each applies the same)."""
        from jax.experimental import multihost_utils

        data = b""
        if self.leader:
            wire = []
            for kind, payload in events:
                if kind == "add":
                    wire.append({"add": payload.number, "requests": [_request_json(r) for r in payload.parsed.requests]})
                else:
                    wire.append({kind: payload})
            data = json.dumps(wire).encode() if wire else b""
        n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
        if n == 0:
            return []
        size = 1 << max(12, (n - 1).bit_length())  # a few buffer sizes, each compiled once
        buf = np.zeros(size, np.uint8)
        buf[:len(data)] = np.frombuffer(data, np.uint8)
        data = bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))[:n])
        if self.leader:
            return events
        out = []
        for e in json.loads(data):
            if "add" in e:
                out.append(("add_remote", e))
            else:
                ((kind, payload),) = e.items()
                out.append((kind, payload))
        return out

    def _apply(self, kind: str, payload) -> None:
        if kind == "add":
            job: _Job = payload
            self.jobs[job.number] = job
            job.results = [None] * len(job.parsed.requests)
            job.open = len(job.parsed.requests)
            for i, r in enumerate(job.parsed.requests):
                result = self.sched.add(dataclasses.replace(r, key=(job.number, i)))
                if result.finish_reason == "error":
                    self._apply("abort", [job.number, i])
                    job.deliver(("error", APIError(400, result.error, "messages" if job.parsed.kind == "chat" else "prompt")))
                    return
        elif kind == "add_remote":
            for i, r in enumerate(payload["requests"]):
                self.sched.add(_request_from_json(r, (payload["add"], i), self.llm.tokenizer))
        elif kind == "abort":
            number, prompts = payload
            for i in range(prompts):
                self.sched.abort((number, i))
            job = self.jobs.pop(number, None)
            if job is not None:
                self._count_tokens(job)
        elif kind == "stop":  # the HTTP side has finished (after its grace period): nobody waits any more
            self.stopping = True

    def run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # a step failed: every waiting client hears it; /health turns 503
            self.failed = f"{type(e).__name__}: {e}"
            for job in self.jobs.values():
                job.deliver(("error", APIError(500, f"the engine failed: {self.failed}")))
            raise

    def _loop(self) -> None:
        while True:
            idle = not self.sched.running and not self.sched.waiting
            events = self._take(idle) if self.leader else []
            if self.processes > 1:
                events = self._share(events)
            for kind, payload in events:
                self._apply(kind, payload)
            if self.stopping:  # every process takes the stop at the same step
                return
            batch = self.sched.schedule()
            if batch is not None:
                _, finished = scheduler.step(self.engine, self.engine.params, self.sched, batch)
                self.steps += 1
                if self.leader:
                    self._deliver(finished)
                self.sched.forget_finished()
            self._gauges()

    def _gauges(self) -> None:
        m = self.metrics
        self._waiting = sum(1 for _ in self.sched.waiting)
        m.running.set(sum(s.samples for s in self.sched.running))
        m.waiting.set(self.waiting)
        m.pages_in_use.set(self.sched.pool.pages_in_use)
        m.hit_rate.set(self.stats.hit_rate)

    def _deliver(self, finished: list) -> None:
        now = time.monotonic()
        sampled = {}
        for rid in dict.fromkeys(self.sched.last_sampled):
            result = self.sched.results.get(rid)
            if result is not None:
                sampled[result.key] = result
        for r in finished:
            sampled[r.key] = r
        stepped = set()
        for (number, i), result in sampled.items():
            job = self.jobs.get(number)
            if job is None:
                continue
            if number not in stepped:
                stepped.add(number)
                if job.last_token is None:
                    self.metrics.ttft.observe(now - job.submitted)
                else:
                    self.metrics.itl.observe(now - job.last_token)
                job.last_token = now
            if job.writer is not None:
                chunks = job.writer.update(i, result)
                if chunks:
                    job.deliver(("chunks", chunks))
        for r in finished:
            number, i = r.key
            job = self.jobs.get(number)
            if job is None:
                continue
            job.results[i] = r
            job.open -= 1
            if job.open == 0:
                del self.jobs[number]
                self._count_tokens(job)
                if job.writer is not None:
                    if job.parsed.include_usage:
                        job.deliver(("chunks", [job.writer.usage_chunk(job.results)]))
                    job.deliver(("done", None))
                else:
                    body = openai_api.response(job.parsed, [self.llm.completion(r) for r in job.results],
                                               self.llm.tokenizer, job.model_name, job.request_id)
                    job.deliver(("response", body))

    def _count_tokens(self, job: _Job) -> None:
        done = [r for r in job.results if r is not None]
        self.metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in done))
        self.metrics.generation_tokens.inc(sum(len(s.token_ids) for r in done for s in (r.samples or [r])))

# ----- the HTTP side -----

def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(loop: ServeLoop, *, model_name: str, api_key: str | None = None):
    """The FastAPI app over a running ServeLoop."""
    llm, metrics, created = loop.llm, loop.metrics, int(time.time())
    app = FastAPI(title="shardlm", docs_url=None, redoc_url=None, openapi_url=None)

    def error(e: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return error(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error(APIError(e.status_code, message, type="not_found_error" if e.status_code == 404
                              else "invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):
        return error(APIError(400, f"invalid request: {e}"))

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):
        return error(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    @app.middleware("http")
    async def auth_and_count(request: HTTPRequest, call_next):
        path = request.url.path
        if api_key is not None and path.startswith("/v1/") and \
                request.headers.get("authorization", "") != f"Bearer {api_key}":
            given = "no API key was given" if "authorization" not in request.headers else "the API key is wrong"
            response = error(APIError(401, f"{given}: send the server's --api-key as 'Authorization: Bearer KEY'",
                                      code="invalid_api_key"))
        else:
            response = await call_next(request)
        if path.startswith("/v1/"):
            metrics.requests.labels(path if path in openai_api.ROUTES or path == "/v1/models" else "other",
                                    str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health():
        if loop.failed:
            return JSONResponse({"status": "failed", "error": loop.failed}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "shardlm", "max_model_len": llm.engine.max_seq_len}]}

    async def complete(request: HTTPRequest, kind: str):
        raw = await request.body()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start + 1})") from None
        try:
            body = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        parsed = openai_api.parse(kind, body, llm, model_name)
        request_id = openai_api.new_id(kind)
        writer = ChunkWriter(parsed, llm.tokenizer, model_name, request_id) if parsed.stream else None
        events: asyncio.Queue = asyncio.Queue()
        aio = asyncio.get_running_loop()

        def deliver(event) -> None:
            try:
                aio.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed (shutdown): nobody is waiting
                pass
        try:
            number = loop.submit(parsed, deliver, writer, model_name, request_id)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full") from None
        prompts = len(parsed.requests)
        if parsed.stream:
            return StreamingResponse(_stream(loop, number, prompts, writer, events), media_type="text/event-stream")
        # The body is read, so the next ASGI message is the client leaving: it aborts the request at once.
        left = asyncio.ensure_future(_disconnect(request))
        try:
            while True:
                event = asyncio.ensure_future(events.get())
                await asyncio.wait({event, left}, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()
                    loop.abort(number, prompts)
                    return Response(status_code=499)
                kind_, payload = event.result()
                if kind_ == "response":
                    return JSONResponse(payload)
                if kind_ == "error":
                    return error(payload)
        except asyncio.CancelledError:
            loop.abort(number, prompts)
            raise
        finally:
            left.cancel()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await complete(request, openai_api.CHAT)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await complete(request, openai_api.COMPLETION)

    return app


async def _disconnect(request: HTTPRequest) -> None:
    """Returns when the client has gone (uvicorn sends http.disconnect once the body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(loop: ServeLoop, number: int, prompts: int, writer: ChunkWriter, events: asyncio.Queue):
    """The SSE body of a streamed request; closed early (the client left), it aborts the request."""
    done = False
    try:
        for chunk in writer.role_chunks():
            yield _sse(chunk)
        while True:
            kind, payload = await events.get()
            if kind == "chunks":
                yield "".join(_sse(c) for c in payload)
            elif kind == "error":
                yield _sse(payload.body())
                done = True
                yield "data: [DONE]\n\n"
                return
            elif kind == "done":
                done = True
                yield "data: [DONE]\n\n"
                return
    finally:
        if not done:
            loop.abort(number, prompts)


def serve(llm, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          api_key: str | None = None, max_queue: int = 1024, grace_s: float = 30.0,
          on_ready: Callable[[], None] | None = None) -> int:
    """Serve `llm` until SIGTERM or SIGINT (then requests already running get grace_s seconds to
    finish); on every process of a multi-host server (process 0 listens). Returns the exit code."""
    import jax

    loop = ServeLoop(llm, max_queue=max_queue)
    engine_thread = threading.Thread(target=loop.run, name="shardlm-engine", daemon=True)
    if jax.process_index() != 0:  # the engine's steps only, in step with process 0
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # process 0 decides when to stop and says so
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        loop.run()
        return 0
    import uvicorn

    app = create_app(loop, model_name=model_name or EMBEDDED_NAME, api_key=api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace_s,
                            lifespan="off")
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM/SIGINT while it runs (stop accepting, let running requests finish),
    # then raises the signal again for the handler it found: that one only notes it, so the
    # engine's loop is stopped (in every process) before this returns.
    stopped_by = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopped_by.append(signum))
    engine_thread.start()
    if on_ready is not None:
        threading.Thread(target=_when_started, args=(server, on_ready), daemon=True).start()
    try:
        server.run()
    finally:
        loop.stop()
        engine_thread.join(timeout=grace_s + 5)
    if not server.started:
        return 1  # the port could not be bound (uvicorn said why)
    return 0 if loop.failed is None else 1


def _when_started(server, on_ready) -> None:
    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if server.started:
        on_ready()
