"""The engine contract (JetStream-shaped): prefill -> insert -> generate, each one jitted step.

- `prefill(params, tokens, sampling) -> Prefix`: runs the prompt (padded to a length bucket, so a
  new prompt length inside a bucket never recompiles) and samples the first token.
- `insert(prefix, state, slot) -> state`: copies the prefix's KV rows into one slot of the decode
  state (donated, so in place), with the request's sampling parameters.
- `generate(params, state) -> (state, tokens [B])`: one decode step for every slot.

The model is split once into graph and parameters (`nnx.split`); the parameters are traced
arguments of every step, never constants. Prefill and decode may use different sharding rules
(layouts); `insert` reshards the prefix from one to the other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shardlm.engine.kv_cache import LENGTHS_AXES, KVCache, kv_axes
from shardlm.engine.sampling import SamplingParams, row_keys, sample
from shardlm.models import quant
from shardlm.sharding.mesh import make_mesh
from shardlm.sharding.rules import ShardingRules, shard, use_rules


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Prefix:
    cache: KVCache  # k, v per layer [1, P, K, H]; lengths [1]
    token: jax.Array  # [] int32, the first generated token
    logits: jax.Array  # [V] float32 at the last prompt position (for tests and scoring)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class DecodeState:
    cache: KVCache  # [B, S, K, H] per layer; lengths [B] = position of `tokens`
    tokens: jax.Array  # [B] int32, the last token of each slot (fed at the next step)
    seeds: jax.Array  # [B] int32
    temperature: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32
    top_p: jax.Array  # [B] float32


STATE_AXES = {"tokens": ("batch",), "seeds": ("batch",), "temperature": ("batch",), "top_k": ("batch",),
              "top_p": ("batch",)}


def prefill_buckets(max_seq_len: int, smallest: int = 32) -> tuple[int, ...]:
    """Powers of two from `smallest` and 1.5x each between (32, 48, 64, 96, ...), ending with
    max_seq_len itself: a prompt is padded by at most a third, not a half, for twice the
    (lazily compiled) prefill shapes. Every bucket stays a multiple of smallest / 2."""
    buckets, b = [], smallest
    while b < max_seq_len:
        buckets += [n for n in (b, b * 3 // 2) if n < max_seq_len]
        b *= 2
    return tuple(buckets) + (max_seq_len,)


def _sampling_arrays(sp: SamplingParams):
    return (np.float32(sp.temperature), np.int32(sp.top_k), np.float32(sp.top_p), np.int32(sp.seed))


class Engine:
    def __init__(self, model: nnx.Module, *, batch_size: int, max_seq_len: int, mesh=None,
                 prefill_rules: ShardingRules | None = None, decode_rules: ShardingRules | None = None,
                 cache_dtype=None, pipeline=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        cfg = model.cfg
        if not 1 < max_seq_len <= cfg.max_seq_len:
            raise ValueError(f"max_seq_len must be in [2, {cfg.max_seq_len}] for {cfg.name}, got {max_seq_len}")
        self.cfg = cfg
        # A pipeline (sharding/pipeline.py) holds the layers stacked over its stages, and the cache too.
        self.pipeline = pipeline
        self.cache_dtype = cache_dtype or quant.compute_dtype(model)  # jnp.int8: an int8 KV cache
        if pipeline is None:
            self.graphdef, self.params = nnx.split(model)
        else:
            self.graphdef, self.params = pipeline.split(model, mesh, decode_rules)
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.buckets = prefill_buckets(max_seq_len)
        self.mesh = mesh if mesh is not None else make_mesh(devices=jax.devices()[:1])
        self.prefill_rules = prefill_rules or ShardingRules()
        self.decode_rules = decode_rules or ShardingRules()
        # Per-instance jitted steps: each engine (mesh, layouts) keeps its own compilation cache.
        self._prefill = jax.jit(self._prefill_step)
        state_shardings = self._state_shardings()
        tokens_sharding = self.decode_rules.sharding(self.mesh, ("batch",), (batch_size,))
        self._insert = jax.jit(self._insert_step, donate_argnames=("state",), out_shardings=state_shardings)
        self._generate = jax.jit(self._generate_step, donate_argnames=("state",),
                                 out_shardings=(state_shardings, tokens_sharding))
        self._init_state = jax.jit(self._init_state_step, out_shardings=state_shardings)

    def _state_shardings(self):
        """Shardings of the decode state under the decode rules (committed arrays on the mesh)."""
        abstract = jax.eval_shape(self._init_state_step)
        rules = self.decode_rules
        c = abstract.cache
        axes = DecodeState(cache=KVCache(k=jax.tree.map(kv_axes, c.k), v=jax.tree.map(kv_axes, c.v),
                                         lengths=LENGTHS_AXES), **STATE_AXES)
        return jax.tree.map(lambda a, x: rules.sharding(self.mesh, a, x.shape), axes, abstract,
                            is_leaf=lambda a: isinstance(a, tuple) and all(isinstance(n, str) for n in a))

    # ----- steps (traced) -----

    def _forward(self, params, tokens, positions, cache, logits_index=None):
        if self.pipeline is not None:
            return self.pipeline.forward(self.graphdef, params, tokens, positions, cache, logits_index)
        model = nnx.merge(self.graphdef, params)
        return model(tokens, positions, cache, logits_index=logits_index)

    def _prefill_step(self, params, tokens, true_length, temperature, top_k, top_p, seed):
        cfg = self.cfg
        P = tokens.shape[1]
        cache = KVCache.zeros(cfg.n_layers, 1, P, cfg.n_kv_heads, cfg.head_dim, self.cache_dtype,
                              stacked=self.pipeline is not None)
        positions = jnp.arange(P, dtype=jnp.int32)[None, :]
        last = (true_length - 1)[None]
        logits, cache = self._forward(params, tokens, positions, cache, logits_index=last)
        logits = logits[:, 0]  # [1, V]
        keys = row_keys(seed[None], true_length[None])
        token = sample(logits, temperature[None], top_k[None], top_p[None], keys)[0]
        return Prefix(cache=cache.replace(lengths=true_length[None]), token=token, logits=logits[0])

    def _init_state_step(self):
        cfg = self.cfg
        B, S = self.batch_size, self.max_seq_len
        cache = KVCache.zeros(cfg.n_layers, B, S, cfg.n_kv_heads, cfg.head_dim, self.cache_dtype,
                              stacked=self.pipeline is not None)
        state = DecodeState(cache=cache, tokens=jnp.zeros((B,), jnp.int32), seeds=jnp.zeros((B,), jnp.int32),
                            temperature=jnp.zeros((B,), jnp.float32), top_k=jnp.zeros((B,), jnp.int32),
                            top_p=jnp.ones((B,), jnp.float32))
        return self._shard_state(state)

    def _shard_state(self, state: DecodeState) -> DecodeState:
        cache = state.cache
        constrain = lambda a: shard(a, kv_axes(a))  # noqa: E731
        cache = cache.replace(k=jax.tree.map(constrain, cache.k), v=jax.tree.map(constrain, cache.v),
                              lengths=shard(cache.lengths, LENGTHS_AXES))
        fields = {name: shard(getattr(state, name), axes) for name, axes in STATE_AXES.items()}
        return DecodeState(cache=cache, **fields)

    def _insert_step(self, prefix: Prefix, state: DecodeState, slot, temperature, top_k, top_p, seed):
        def put(dst, src):  # src [(L,) 1, P, K, H] into dst [(L,) B, S, K, H] at row `slot`
            start = (0,) * (dst.ndim - 4) + (slot, 0, 0, 0)
            return jax.lax.dynamic_update_slice(dst, src.astype(dst.dtype), start)

        cache = state.cache
        cache = cache.replace(k=jax.tree.map(put, cache.k, prefix.cache.k),
                              v=jax.tree.map(put, cache.v, prefix.cache.v),
                              lengths=cache.lengths.at[slot].set(prefix.cache.lengths[0]))
        state = DecodeState(cache=cache, tokens=state.tokens.at[slot].set(prefix.token),
                            seeds=state.seeds.at[slot].set(seed), temperature=state.temperature.at[slot].set(temperature),
                            top_k=state.top_k.at[slot].set(top_k), top_p=state.top_p.at[slot].set(top_p))
        return self._shard_state(state)

    def _generate_step(self, params, state: DecodeState):
        positions = state.cache.lengths  # [B]
        logits, cache = self._forward(params, state.tokens[:, None], positions[:, None], state.cache)
        next_positions = positions + 1
        keys = row_keys(state.seeds, next_positions)
        tokens = sample(logits[:, 0], state.temperature, state.top_k, state.top_p, keys)
        state = dataclasses.replace(state, cache=cache.replace(lengths=next_positions), tokens=tokens)
        return self._shard_state(state), tokens

    # ----- public API -----

    def bucket(self, length: int) -> int:
        for b in self.buckets:
            if length <= b:
                return b
        raise ValueError(f"prompt of {length} tokens is longer than the context ({self.max_seq_len} tokens)")

    def check_prompt(self, tokens) -> None:
        n = len(tokens)
        if n == 0:
            raise ValueError("prompt is empty: give at least one token")
        if n >= self.max_seq_len:
            raise ValueError(f"prompt has {n} tokens; the context holds {self.max_seq_len} tokens in all "
                             f"(prompt plus generated), so a prompt may have at most {self.max_seq_len - 1}")
        bad = [t for t in tokens if not 0 <= int(t) < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.cfg.vocab_size})")

    def prefill(self, params, tokens, sampling: SamplingParams = SamplingParams()) -> Prefix:
        self.check_prompt(tokens)
        n = len(tokens)
        padded = np.zeros((1, self.bucket(n)), np.int32)
        padded[0, :n] = tokens
        with use_rules(self.mesh, self.prefill_rules):
            return self._prefill(params, padded, np.int32(n), *_sampling_arrays(sampling))

    def init_decode_state(self) -> DecodeState:
        with use_rules(self.mesh, self.decode_rules):
            return self._init_state()

    def insert(self, prefix: Prefix, state: DecodeState, slot: int, sampling: SamplingParams = SamplingParams()) -> DecodeState:
        if not 0 <= slot < self.batch_size:
            raise ValueError(f"slot {slot} outside [0, {self.batch_size})")
        with use_rules(self.mesh, self.decode_rules):
            return self._insert(prefix, state, np.int32(slot), *_sampling_arrays(sampling))

    def generate(self, params, state: DecodeState) -> tuple[DecodeState, jax.Array]:
        with use_rules(self.mesh, self.decode_rules):
            return self._generate(params, state)

    def compiled_count(self) -> dict[str, Any]:
        """Number of compiled variants of each step (for tests: steady state must not grow these)."""
        return {name: f._cache_size() for name, f in
                [("prefill", self._prefill), ("insert", self._insert), ("generate", self._generate)]}
