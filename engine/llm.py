"""What a user holds: `LLM.load(model)` and `LLM.generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from shardlm.checkpoints import loader
from shardlm.checkpoints.tokenizer import Tokenizer
from shardlm.engine import batching
from shardlm.engine.engine import Engine
from shardlm.engine.sampling import SamplingParams
from shardlm.models import quant
from shardlm.sharding.layouts import get_layout
from shardlm.sharding.mesh import make_mesh
from shardlm.sharding.pipeline import Pipeline, check_not_quantized, pipeline_for
from shardlm.sharding.rules import ShardingRules

DTYPES = {"float32": jnp.float32, "f32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


def parse_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # generated ids, without the stop token
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens or the context is full)
    prompt_token_ids: list[int]


Prompt = str | Sequence[int]


@dataclass(frozen=True)
class Placement:
    """Where a model runs: the mesh, and the sharding rules of each phase."""

    mesh: jax.sharding.Mesh
    prefill_layout: str
    decode_layout: str
    prefill_rules: ShardingRules
    decode_rules: ShardingRules
    pipeline: Pipeline | None = None  # layers split into stages over the mesh's stage axis

    @classmethod
    def make(cls, config, *, mesh_shape=None, layout=None, prefill_layout=None, decode_layout=None,
             attention="auto", batch_size=8, microbatches=None) -> "Placement":
        mesh = make_mesh(mesh_shape) if mesh_shape else make_mesh(devices=jax.devices()[:1])
        pipe = pipeline_for(config, mesh, microbatches)
        if layout is not None and (prefill_layout is not None or decode_layout is not None):
            raise ValueError("give either layout (both phases) or prefill_layout/decode_layout, not both")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        default = "replicated" if mesh.size == 1 else "2d_weight_stationary"
        if "auto" in (layout, prefill_layout, decode_layout):  # the planner's best for these devices
            from shardlm.sharding import planner

            pick = planner.auto_layouts(config, mesh, batch_size)
            prefill_layout = pick["prefill"] if "auto" in (layout, prefill_layout) else prefill_layout
            decode_layout = pick["decode"] if "auto" in (layout, decode_layout) else decode_layout
            layout = None
        prefill = get_layout(prefill_layout or layout or default).effective(mesh, "prefill", 1)
        decode = get_layout(decode_layout or layout or default).effective(mesh, "decode", batch_size)
        prefill_rules = prefill.rules(mesh, "prefill", 1, config.n_kv_heads, attention)
        decode_rules = decode.rules(mesh, "decode", batch_size, config.n_kv_heads, attention)
        if pipe is not None:
            prefill_rules, decode_rules = pipe.rules(prefill_rules), pipe.rules(decode_rules)
        return cls(mesh, prefill.name, decode.name, prefill_rules, decode_rules, pipe)


    def place(self, model: nnx.Module) -> nnx.Module:
        """The model with every parameter moved (device to device) to its decode-layout sharding."""
        plain = self.decode_rules.sharding_fn(self.mesh)
        to = (self.pipeline.sharding_fn(self.mesh, self.decode_rules, len(model.layers)) if self.pipeline
              else lambda axes, shape, path: plain(axes, shape))
        graphdef, state = nnx.split(model)
        flat = [(path, var.replace(jax.device_put(var[...], to(var.get_metadata()["axes"], var.shape, path))))
                for path, var in nnx.to_flat_state(state)]
        return nnx.merge(graphdef, nnx.from_flat_state(flat))

    def engine(self, model: nnx.Module, batch_size: int, max_seq_len: int, cache_dtype=None) -> Engine:
        """An Engine for `model` on this placement (parameters placed first); cache_dtype jnp.int8: int8 KV."""
        return Engine(self.place(model), batch_size=batch_size, max_seq_len=max_seq_len, mesh=self.mesh,
                      prefill_rules=self.prefill_rules, decode_rules=self.decode_rules, pipeline=self.pipeline,
                      cache_dtype=cache_dtype)


class LLM:
    def __init__(self, loaded: loader.LoadedModel, engine: Engine, placement: Placement):
        self.config = loaded.config
        self.tokenizer: Tokenizer | None = loaded.tokenizer
        self.source = loaded.source
        self.engine = engine
        self.params = engine.params
        self.placement = placement
        self._loaded = loaded

    @classmethod
    def load(cls, model: str | None = None, *, mesh_shape: dict[str, int] | None = None, layout: str | None = None,
             prefill_layout: str | None = None, decode_layout: str | None = None, attention: str = "auto",
             dtype: str = "float32", batch_size: int = 8, max_seq_len: int = 1024,
             progress: Callable[[int], None] | None = None, microbatches: int | None = None,
             quantize: str | None = None, kv_cache: str | None = None) -> "LLM":
        """Load a model onto a mesh: a GGUF file (None: the embedded SmolLM2-135M-Instruct), a Hugging
        Face folder (config.json, *.safetensors, tokenizer.json) or a shardlm checkpoint folder
        (`shardlm convert`), each array read straight into its shards.

        mesh_shape: sizes of the mesh axes (stage, x, y, z; see sharding.mesh) over all devices
        (None: one device).
        layout: one layout for both phases, or prefill_layout/decode_layout separately (see
        `shardlm layouts`); default replicated on one device, else 2d_weight_stationary.
        attention: "auto", "heads" or "batch" (batch-sharded KV cache for multiquery/GQA).
        batch_size is the number of decode slots; max_seq_len the tokens (prompt plus generated)
        each slot holds, capped at the model's context length.
        microbatches: with a stage axis > 1 (pipeline stages, layers split evenly), the microbatches
        each step's tokens are split into (default: the number of stages; see sharding.pipeline).
        quantize: None or "int8": int8 weights with per-output-channel scales, quantized while
        loading (projections, embedding and lm_head; see models/quant.py).
        kv_cache: None (the model's dtype) or "int8": int8 keys/values with per-token, per-head scales.
        """
        dtype = None if dtype is None else parse_dtype(dtype)  # None: a shardlm checkpoint's saved dtype
        quantize, kv_cache = quant.check_mode(quantize), quant.check_kv_mode(kv_cache)
        check_not_quantized(mesh_shape, quantize or kv_cache)
        kw = dict(mesh_shape=mesh_shape, layout=layout, prefill_layout=prefill_layout, decode_layout=decode_layout,
                  attention=attention, batch_size=batch_size, microbatches=microbatches)
        # The placement needs the config; the loader asks for it before reading any weight.
        placements = {}

        def sharding_for(config):
            placements["p"] = Placement.make(config, **kw)
            return placements["p"].decode_rules.sharding_fn(placements["p"].mesh)

        loaded = loader.load(model, dtype=dtype, progress=progress, sharding_for=sharding_for, quantize=quantize)
        return cls._build(loaded, placements["p"], batch_size, max_seq_len, jnp.int8 if kv_cache else None)

    @classmethod
    def _build(cls, loaded, placement: Placement, batch_size: int, max_seq_len: int, cache_dtype=None) -> "LLM":
        engine = Engine(loaded.model, batch_size=batch_size, max_seq_len=min(max_seq_len, loaded.config.max_seq_len),
                        mesh=placement.mesh, prefill_rules=placement.prefill_rules, decode_rules=placement.decode_rules,
                        pipeline=placement.pipeline, cache_dtype=cache_dtype)
        if placement.pipeline is not None:  # the engine holds the layers stacked; drop the per-layer copies
            loaded = dataclasses.replace(loaded, model=None)
        return cls(loaded, engine, placement)

    def relayout(self, *, mesh_shape: dict[str, int] | None = None, layout: str | None = None,
                 prefill_layout: str | None = None, decode_layout: str | None = None, attention: str = "auto",
                 batch_size: int | None = None, max_seq_len: int | None = None,
                 microbatches: int | None = None) -> "LLM":
        """The same weights on another mesh or layout, moved device to device (no reload)."""
        batch_size = batch_size or self.engine.batch_size
        placement = Placement.make(self.config, mesh_shape=mesh_shape, layout=layout, prefill_layout=prefill_layout,
                                   decode_layout=decode_layout, attention=attention, batch_size=batch_size,
                                   microbatches=microbatches)
        pipe = self.engine.pipeline
        model = pipe.merge(self.engine.graphdef, self.params) if pipe else nnx.merge(self.engine.graphdef, self.params)
        model = placement.place(model)
        loaded = dataclasses.replace(self._loaded, model=model)
        return self._build(loaded, placement, batch_size, max_seq_len or self.engine.max_seq_len,
                           self.engine.cache_dtype)

    @property
    def layouts(self) -> tuple[str, str]:
        return self.placement.prefill_layout, self.placement.decode_layout

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.stop_token_ids) if self.tokenizer else frozenset()

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """Text (optionally as one user turn of the chat template) or token ids -> token ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty: give some text or token ids")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: give token ids instead of text")
            if chat:
                prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            ids = self.tokenizer.encode(prompt)
        else:
            if chat:
                raise ValueError("chat=True needs text prompts, not token ids")
            ids = [int(t) for t in prompt]
        self.engine.check_prompt(ids)
        return ids

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, chat: bool = False, on_step: Callable[[int], None] | None = None) -> list[Completion]:
        """Complete each prompt (text or token ids); one SamplingParams for all or one per prompt."""
        prompts = prompts if isinstance(prompts, str) else list(prompts)
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], numbers.Integral)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        sampling = sampling or SamplingParams()
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompts)
        if len(sampling) != len(prompts):
            raise ValueError(f"{len(sampling)} SamplingParams for {len(prompts)} prompts")
        requests = [batching.Request(self.encode(p, chat), sp, self.stop_token_ids, key=i)
                    for i, (p, sp) in enumerate(zip(prompts, sampling))]
        results = batching.run(self.engine, self.params, requests, on_step=on_step)
        return [Completion(text=self.decode(r.token_ids), token_ids=r.token_ids, finish_reason=r.finish_reason,
                           prompt_token_ids=r.prompt_ids) for r in results]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer else ""
