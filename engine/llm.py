"""What a user holds: `LLM.load(model)` and `LLM.generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import jax.numpy as jnp

from shardlm.checkpoints import loader
from shardlm.checkpoints.tokenizer import Tokenizer
from shardlm.engine import batching, scheduler
from shardlm.engine.engine import Engine
from shardlm.engine.paged_engine import PagedEngine, check_settings
from shardlm.engine.sampling import SamplingParams
from shardlm.models import quant
from shardlm.sharding.pipeline import check_not_quantized
from shardlm.sharding.placement import Placement

__all__ = ["LLM", "Completion", "Placement", "Sample", "completion_record", "parse_dtype"]

DTYPES = {"float32": jnp.float32, "f32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


def parse_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def check_max_seq_len(max_seq_len: int | None, config, default: int | None = None) -> int:
    """The tokens a sequence may hold: None is `default` (the model's context if None or longer);
    more than the context is an error, never silently less."""
    if max_seq_len is None:
        return min(default or config.max_seq_len, config.max_seq_len)
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")
    if max_seq_len > config.max_seq_len:
        raise ValueError(f"max_seq_len {max_seq_len} is more than the model's context of {config.max_seq_len} "
                         f"tokens; give at most {config.max_seq_len}")
    return max_seq_len


def check_text(text: str, what: str = "prompt") -> None:
    """Text must be Unicode the tokenizer can take: invalid UTF-8 (a command-line argument decodes it
    to surrogate escapes) or a lone surrogate (a JSON "\\ud800") is an error, not silently replaced."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid UTF-8 text (character {e.start + 1}: {text[e.start]!r})") from None


@dataclass
class Sample:
    """One of the n samples of a request (SamplingParams.n)."""

    index: int
    text: str
    token_ids: list[int]  # generated ids, without the stop token
    finish_reason: str  # "stop" (a stop token or string) or "length" (max_new_tokens or the context is full)
    # SamplingParams.logprobs set: per token, (its logprob, ((id, logprob), ...) of the top alternatives)
    logprobs: list | None = None


@dataclass
class Completion:
    """One request's result. text, token_ids and finish_reason are its first sample's; `outputs`
    holds every sample (one when n = 1)."""

    text: str
    token_ids: list[int]  # generated ids, without the stop token
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens or the context is full)
    prompt_token_ids: list[int]
    outputs: list[Sample] = dataclasses.field(default_factory=list)


def logprobs_record(logprobs: list) -> list[dict]:
    """A sample's logprobs as JSON: per token {"logprob", "top_logprobs": [{"token_id", "logprob"}]}."""
    return [{"logprob": lp, "top_logprobs": [{"token_id": i, "logprob": p} for i, p in top]} for lp, top in logprobs]


def completion_record(c: Completion) -> dict:
    """The fields every output of a completion carries (`generate --json`, job records): n = 1 its
    text, token ids and finish reason (and "logprobs" when asked for); n > 1 a "choices" list of
    them, one per sample."""
    def sample(s: Sample) -> dict:
        record = {"text": s.text, "token_ids": s.token_ids, "finish_reason": s.finish_reason}
        if s.logprobs is not None:
            record["logprobs"] = logprobs_record(s.logprobs)
        return record

    if len(c.outputs) > 1:
        choices = [{"index": s.index, **sample(s), "completion_tokens": len(s.token_ids)} for s in c.outputs]
        return {"choices": choices, "prompt_tokens": len(c.prompt_token_ids),
                "completion_tokens": sum(len(s.token_ids) for s in c.outputs)}
    return {**sample(c.outputs[0]), "prompt_tokens": len(c.prompt_token_ids), "completion_tokens": len(c.token_ids)}


Prompt = str | Sequence[int] | Sequence[dict]  # text, token ids, or chat messages [{"role", "content"}, ...]


def _seqs(batch_size: int | None, max_num_seqs: int | None) -> int | None:
    """max_num_seqs, also given by its older name batch_size."""
    if batch_size is not None and max_num_seqs is not None and batch_size != max_num_seqs:
        raise ValueError(f"batch_size ({batch_size}) and max_num_seqs ({max_num_seqs}) name the same thing; give one")
    n = max_num_seqs if max_num_seqs is not None else batch_size
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"max_num_seqs must be an integer >= 1, got {n!r}")
    return n


class LLM:
    def __init__(self, loaded: loader.LoadedModel, engine: Engine):
        self.config = loaded.config
        self.tokenizer: Tokenizer | None = loaded.tokenizer
        self.source = loaded.source
        self.engine = engine
        self.params = engine.params
        self.placement = engine.placement

    @classmethod
    def load(cls, model: str | None = None, *, mesh_shape: dict[str, int] | None = None, layout: str | None = None,
             prefill_layout: str | None = None, decode_layout: str | None = None, attention: str = "auto",
             dtype: str = "float32", batch_size: int | None = None, max_seq_len: int | None = None,
             progress: Callable[[int], None] | None = None, microbatches: int | None = None,
             quantize: str | None = None, kv_cache: str | None = None, max_num_seqs: int | None = None,
             max_num_batched_tokens: int | None = None, page_size: int | None = None,
             kv_pages: int | None = None, memory_fraction: float | None = None,
             prefix_cache: bool = True) -> "LLM":
        """Load a model onto a mesh: a GGUF file (None: the embedded SmolLM2-135M-Instruct), a Hugging
        Face folder (config.json, *.safetensors, tokenizer.json) or a shardlm checkpoint folder
        (`shardlm convert`), each array read straight into its shards.

        mesh_shape: sizes of the mesh axes (stage, x, y, z; see sharding.mesh) over all devices
        (None: one device).
        layout: one layout for both phases, or prefill_layout/decode_layout separately (see
        `shardlm layouts`); default replicated on one device, else 2d_weight_stationary.
        attention: "auto", "heads" or "batch" (batch-sharded KV cache for multiquery/GQA).
        The KV cache is a pool of pages (engine/paged_engine.py), sized from the device's memory:
        max_seq_len is the tokens (prompt plus generated) a sequence may hold (default the model's
        context; more is an error); max_num_seqs (or its older name batch_size) the sequences
        decoded together, max_num_batched_tokens the prompt tokens a prefill step takes, page_size
        the tokens a page holds, kv_pages the pool's pages, memory_fraction the share of a device's
        memory the weights and pool may take. Each None is sized by paged_engine.plan_pool;
        `llm.engine.plan.describe()` says what was chosen.
        microbatches: with a stage axis > 1 (pipeline stages; L layers over N stages, the first
        L mod N stages one layer more), the microbatches each step's tokens are split into
        (default: the number of stages; see sharding.pipeline). Pipeline stages run on the dense
        engine (engine/engine.py): batch_size slots (default 8) of max_seq_len (default 1024).
        quantize: None or "int8": int8 weights with per-output-channel scales, quantized while
        loading (projections, embedding and lm_head; see models/quant.py).
        kv_cache: None (the model's dtype) or "int8": int8 keys/values with per-token, per-head scales.
        prefix_cache: requests whose prompts begin alike share the KV pages of that prefix, computed
        once (engine/kv_pages.py); False computes every prompt whole.
        """
        dtype = None if dtype is None else parse_dtype(dtype)  # None: a shardlm checkpoint's saved dtype
        quantize, kv_cache = quant.check_mode(quantize), quant.check_kv_mode(kv_cache)
        check_not_quantized(mesh_shape, quantize or kv_cache)
        config = loader.read_config(model)
        check_max_seq_len(max_seq_len, config)  # before the (slow) load
        pool = dict(max_num_seqs=_seqs(batch_size, max_num_seqs), max_num_batched_tokens=max_num_batched_tokens,
                    page_size=page_size, kv_pages=kv_pages, memory_fraction=memory_fraction, prefix_cache=prefix_cache)
        check_settings(page_size=page_size, num_pages=kv_pages, max_num_batched_tokens=max_num_batched_tokens,
                       memory_fraction=memory_fraction)  # before the (slow) load
        placement = Placement.make(config, mesh_shape=mesh_shape, layout=layout,
                                   prefill_layout=prefill_layout, decode_layout=decode_layout, attention=attention,
                                   batch_size=pool["max_num_seqs"] or 8, microbatches=microbatches)
        loaded = loader.load(model, placement=placement, dtype=dtype, progress=progress, quantize=quantize)
        return cls._build(loaded, placement, max_seq_len, jnp.int8 if kv_cache else None, pool)

    @classmethod
    def _build(cls, loaded, placement: Placement, max_seq_len: int | None, cache_dtype=None,
               pool: dict | None = None) -> "LLM":
        pool = pool or {}
        if placement.strategy.stacked:  # pipeline stages: the dense engine, slots of max_seq_len each
            if any(pool.get(k) is not None for k in ("max_num_batched_tokens", "page_size", "kv_pages", "memory_fraction")):
                raise ValueError("page and token-budget settings are for the paged KV cache, which pipeline stages "
                                 "do not use; give --max-num-seqs and --max-seq-len only")
            engine = Engine(loaded.model, batch_size=pool.get("max_num_seqs") or 8,
                            max_seq_len=check_max_seq_len(max_seq_len, loaded.config, 1024), placement=placement,
                            cache_dtype=cache_dtype)
        else:
            engine = PagedEngine(loaded.model, placement=placement, max_seq_len=check_max_seq_len(max_seq_len, loaded.config),
                                 cache_dtype=cache_dtype, page_size=pool.get("page_size"), num_pages=pool.get("kv_pages"),
                                 max_num_seqs=pool.get("max_num_seqs"),
                                 max_num_batched_tokens=pool.get("max_num_batched_tokens"),
                                 memory_fraction=pool.get("memory_fraction"),
                                 prefix_cache=pool.get("prefix_cache", True))
        # The engine holds the parameters (stacked under a pipeline): drop the loader's module.
        return cls(dataclasses.replace(loaded, model=None), engine)

    @property
    def paged(self) -> bool:
        return isinstance(self.engine, PagedEngine)

    def relayout(self, *, mesh_shape: dict[str, int] | None = None, layout: str | None = None,
                 prefill_layout: str | None = None, decode_layout: str | None = None, attention: str = "auto",
                 batch_size: int | None = None, max_seq_len: int | None = None,
                 microbatches: int | None = None) -> "LLM":
        """The same weights on another mesh or layout, moved device to device (no reload); the same
        sequence count and context unless given, the pool sized again for the new devices."""
        batch_size = batch_size or self.engine.batch_size
        placement = Placement.make(self.config, mesh_shape=mesh_shape, layout=layout, prefill_layout=prefill_layout,
                                   decode_layout=decode_layout, attention=attention, batch_size=batch_size,
                                   microbatches=microbatches)
        loaded = loader.LoadedModel(config=self.config, model=self.engine.model(), tokenizer=self.tokenizer,
                                    source=self.source)
        pool = {"max_num_seqs": batch_size}
        if self.paged:
            pool.update(page_size=self.engine.page_size, max_num_batched_tokens=self.engine.max_num_batched_tokens,
                        prefix_cache=self.engine.prefix_cache)
        return self._build(loaded, placement, max_seq_len or self.engine.max_seq_len, self.engine.cache_dtype, pool)

    def first_layers(self, n: int) -> "LLM":
        """The same model cut to its first n layers, on one device (`relayout` moves it): its
        weights, tokenizer and shapes, for a quick look at layouts and compiled programs (a 30-layer
        program takes ~7x as long to compile as a 4-layer one). Its outputs are not the model's."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.config.n_layers:
            raise ValueError(f"layers must be an integer in [1, {self.config.n_layers}], got {n!r}")
        model = self.engine.model()
        cfg = dataclasses.replace(self.config, n_layers=n)
        model.cfg, model.layers = cfg, type(model.layers)(list(model.layers)[:n])
        loaded = loader.LoadedModel(config=cfg, model=model, tokenizer=self.tokenizer, source=self.source)
        pool = {"max_num_seqs": self.engine.batch_size}
        if self.paged:
            pool.update(page_size=self.engine.page_size, max_num_batched_tokens=self.engine.max_num_batched_tokens,
                        prefix_cache=self.engine.prefix_cache)
        return self._build(loaded, Placement.make(cfg, batch_size=self.engine.batch_size), self.engine.max_seq_len,
                           self.engine.cache_dtype, pool)

    @property
    def layouts(self) -> tuple[str, str]:
        return self.placement.prefill_layout, self.placement.decode_layout

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.stop_token_ids) if self.tokenizer else frozenset()

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """Text (optionally as one user turn of the chat template), chat messages (always through the
        chat template) or token ids -> token ids, checked against the context and the vocabulary."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty: give some text or token ids")
            check_text(prompt)
            if chat:
                prompt = [{"role": "user", "content": prompt}]
            else:
                ids = self._tokenizer_for("text").encode(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            ok = all(isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt)
            if not ok:
                raise ValueError("\"messages\" must be a non-empty list of {\"role\": str, \"content\": str}")
            for m in prompt:
                check_text(m["role"], "a message's role"), check_text(m["content"], "a message's content")
            tokenizer = self._tokenizer_for("chat messages")
            ids = tokenizer.encode(tokenizer.apply_chat_template(list(prompt)))
        elif not isinstance(prompt, str):
            if chat:
                raise ValueError("chat=True needs text prompts, not token ids")
            if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
                raise ValueError("a prompt is text, a list of token ids, or a list of chat messages "
                                 "{\"role\": str, \"content\": str}")
            ids = [int(t) for t in prompt]
        self.engine.check_prompt(ids)
        return ids

    def _tokenizer_for(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"this model has no tokenizer, so {what} cannot be encoded: give token ids")
        return self.tokenizer

    def request(self, prompt: Prompt, sampling: SamplingParams | None = None, *, chat: bool = False,
                key=None, text_stream: bool = False) -> batching.Request:
        """One request: the prompt encoded and checked once (see `encode`), with its sampling.
        text_stream: decode each sample's text as it grows (Result.stream; stop strings always do)."""
        sampling = sampling or SamplingParams()
        if not self.paged:
            for what, asked in ((f"n = {sampling.n} samples", sampling.n > 1),
                                ("logprobs", sampling.logprobs is not None)):
                if asked:
                    raise ValueError(f"{what} needs the paged KV cache, which pipeline stages do not use")
        if sampling.stop or text_stream:
            self._tokenizer_for("stop strings" if sampling.stop else "text")
        if self.paged:
            self.engine.check_samples(sampling.n)
        ids = self.encode(prompt, chat)
        if self.paged:
            self.engine.check_fits(len(ids), sampling.max_new_tokens, sampling.n)
        tokenizer = self.tokenizer if sampling.stop or text_stream else None
        return batching.Request(ids, sampling, self.stop_token_ids, key=key, tokenizer=tokenizer)

    def run(self, requests: Iterable[batching.Request], *, on_result: Callable[[object, Completion], None] | None = None,
            on_step: Callable[[int], None] | None = None,
            on_token: Callable[[object, list[int]], None] | None = None, control=None,
            stats: scheduler.Stats | None = None) -> list[Completion]:
        """Complete requests (from `request`) through continuous batching; Completions in request
        order. `on_result(key, completion)` sees each as it finishes, `on_step(n)` each step that
        makes tokens (n of them), `on_token(key, token_ids)` a request's generated ids so far after
        each token (streaming). `control`, a job_control.JobControl, may drain or stop the run
        (jobs): the requests it leaves unfinished come back with finish_reason None. `requests` as
        a list or tuple is checked whole first; any other iterable is a stream, taken as slots free
        up, its results seen only through on_result (the returned list is empty). `stats`, a
        scheduler.Stats, adds up what the paged scheduler counted (prefill tokens computed and found
        in the prefix cache, preemptions)."""
        def finished(result: batching.Result) -> None:
            if on_result is not None:
                on_result(result.key, self.completion(result))

        streamed = None if on_token is None else (lambda result: on_token(result.key, result.token_ids))
        if not self.paged:
            results = batching.run(self.engine, self.params, requests, on_result=finished, on_step=on_step,
                                   on_token=streamed, control=control)
            return [self.completion(r) for r in results]

        def stepped(batch, _sched) -> None:
            n = (len(batch.seq_ids) if isinstance(batch, scheduler.DecodeBatch)
                 else sum(c.last for c in batch.chunks))
            if on_step is not None and n:
                on_step(n)

        if isinstance(requests, (list, tuple)):  # page arithmetic only: a hand-made Request that cannot fit
            for r in requests:  # fails before any work (a stream's requests come from `request`, checked there)
                self.engine.check_samples(r.sampling.n)
                self.engine.check_fits(len(r.prompt_ids), r.sampling.max_new_tokens, r.sampling.n)
        results = scheduler.run(self.engine, self.params, requests, on_result=finished, on_step=stepped,
                                on_token=streamed, control=control, stats=stats)
        return [self.completion(r) for r in results]

    def completion(self, r: batching.Result) -> Completion:
        """A finished scheduler Result as the Completion users see (its samples' text decoded)."""
        samples = [Sample(i, s.stream.text if s.stream is not None else self.decode(s.token_ids), s.token_ids,
                          s.finish_reason, s.logprobs)
                   for i, s in enumerate(r.samples or [r])]
        return Completion(text=samples[0].text, token_ids=r.token_ids, finish_reason=r.finish_reason,
                          prompt_token_ids=r.prompt_ids, outputs=samples)

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, chat: bool = False, on_step: Callable[[int], None] | None = None) -> list[Completion]:
        """Complete each prompt (text, token ids or chat messages); one SamplingParams for all or one
        per prompt. One Completion per prompt, its n samples in `outputs`."""
        prompts = prompts if isinstance(prompts, str) else list(prompts)
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (numbers.Integral, dict))):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        sampling = sampling or SamplingParams()
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompts)
        if len(sampling) != len(prompts):
            raise ValueError(f"{len(sampling)} SamplingParams for {len(prompts)} prompts")
        requests = [self.request(p, sp, chat=chat, key=i) for i, (p, sp) in enumerate(zip(prompts, sampling))]
        return self.run(requests, on_step=on_step)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer else ""
