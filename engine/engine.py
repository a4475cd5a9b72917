"""The engine contract (JetStream-shaped): prefill -> insert -> generate, each one jitted step.

- `prefill(params, tokens, sampling) -> Prefix`: runs the prompt (padded to a length bucket, so a
  new prompt length inside a bucket never recompiles) and samples the first token.
- `insert(prefix, state, slot) -> state`: copies the prefix's KV rows into one slot of the decode
  state (donated, so in place), with the request's sampling parameters.
- `generate(params, state) -> (state, tokens [B])`: one decode step for every slot.

The model is split once into graph and parameters (by the placement's forward strategy); the
parameters are traced arguments of every step, never constants. Each step is one module-level
jitted function with a static `Step` (graph, strategy, mesh, rules, shapes) that enters its rules
inside the traced function, so engines share compiled programs exactly when they would trace the
same one. Prefill and decode may use different sharding rules (layouts); `insert` reshards the
prefix from one to the other.
"""

from __future__ import annotations

import collections
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
from shardlm.sharding.placement import Placement
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


def sampling_arrays(sp: SamplingParams):
    """A request's sampling parameters as the step functions take them."""
    return (np.float32(sp.temperature), np.int32(sp.top_k), np.float32(sp.top_p), np.int32(sp.seed))


def check_prompt(tokens, max_seq_len: int, vocab_size: int) -> None:
    """A prompt an engine can run: 1 to max_seq_len - 1 token ids inside the vocabulary."""
    n = len(tokens)
    if n == 0:
        raise ValueError("prompt is empty: give at least one token")
    if n >= max_seq_len:
        raise ValueError(f"prompt has {n} tokens; the context holds {max_seq_len} tokens in all "
                         f"(prompt plus generated), so a prompt may have at most {max_seq_len - 1}")
    bad = [t for t in tokens if not 0 <= int(t) < vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")


@dataclass(frozen=True, eq=False)
class Step:
    """Everything a traced step depends on besides its array arguments: a static jit argument, so a
    compiled program is reused only for an equal Step (same model graph, strategy, mesh and rules)
    and never under other rules. Hashed once (a model's graphdef is slow to hash)."""

    cfg: Any
    graphdef: Any
    strategy: Any  # sharding.pipeline.UnrolledLayers or Pipeline
    mesh: jax.sharding.Mesh
    rules: ShardingRules
    cache_dtype: Any
    batch_size: int
    max_seq_len: int
    _key: tuple = dataclasses.field(init=False, repr=False)
    _hash: int = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        key = (self.cfg, self.graphdef, self.strategy, self.mesh, self.rules, str(jnp.dtype(self.cache_dtype)),
               self.batch_size, self.max_seq_len)
        object.__setattr__(self, "_step_key", key)
        object.__setattr__(self, "_hash", hash(key))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return self is other or (isinstance(other, Step) and self._hash == other._hash and self._step_key == other._step_key)

    def zeros_cache(self, batch: int, seq: int) -> KVCache:
        cfg = self.cfg
        return KVCache.zeros(self.strategy.cache_layers, batch, seq, cfg.n_kv_heads, cfg.head_dim, self.cache_dtype,
                             stacked=self.strategy.stacked)

    def forward(self, params, tokens, positions, cache, logits_index=None):
        return self.strategy.forward(self.graphdef, params, tokens, positions, cache, logits_index)


# ----- the steps (traced; each enters its own rules, so the rules are part of what it was traced with) -----

# (step name, Step) -> times traced: each trace of a jitted step is one compiled program.
TRACES: collections.Counter = collections.Counter()

def _shard_state(state: DecodeState) -> DecodeState:
    cache = state.cache
    constrain = lambda a: shard(a, kv_axes(a))  # noqa: E731
    cache = cache.replace(k=jax.tree.map(constrain, cache.k), v=jax.tree.map(constrain, cache.v),
                          lengths=shard(cache.lengths, LENGTHS_AXES))
    fields = {name: shard(getattr(state, name), axes) for name, axes in STATE_AXES.items()}
    return DecodeState(cache=cache, **fields)


def _prefill(step: Step, params, tokens, true_length, temperature, top_k, top_p, seed) -> Prefix:
    TRACES["prefill", step] += 1
    with use_rules(step.mesh, step.rules):
        P = tokens.shape[1]
        positions = jnp.arange(P, dtype=jnp.int32)[None, :]
        last = (true_length - 1)[None]
        logits, cache = step.forward(params, tokens, positions, step.zeros_cache(1, P), logits_index=last)
        logits = logits[:, 0]  # [1, V]
        keys = row_keys(seed[None], true_length[None])
        token = sample(logits, temperature[None], top_k[None], top_p[None], keys)[0]
        return Prefix(cache=cache.replace(lengths=true_length[None]), token=token, logits=logits[0])


def _forward(step: Step, params, tokens):
    """tokens [B,T] from position 0 with a fresh cache of T slots -> logits [B,T,V] float32."""
    with use_rules(step.mesh, step.rules):
        B, T = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        logits, _ = step.forward(params, tokens, positions, step.zeros_cache(B, T))
        return logits.astype(jnp.float32)


def _init_state(step: Step) -> DecodeState:
    with use_rules(step.mesh, step.rules):
        B = step.batch_size
        state = DecodeState(cache=step.zeros_cache(B, step.max_seq_len), tokens=jnp.zeros((B,), jnp.int32),
                            seeds=jnp.zeros((B,), jnp.int32), temperature=jnp.zeros((B,), jnp.float32),
                            top_k=jnp.zeros((B,), jnp.int32), top_p=jnp.ones((B,), jnp.float32))
        return _shard_state(state)


def _insert(step: Step, prefix: Prefix, state: DecodeState, slot, temperature, top_k, top_p, seed) -> DecodeState:
    TRACES["insert", step] += 1

    def put(dst, src):  # src [(L,) 1, P, K, H] into dst [(L,) B, S, K, H] at row `slot`
        start = (0,) * (dst.ndim - 4) + (slot, 0, 0, 0)
        return jax.lax.dynamic_update_slice(dst, src.astype(dst.dtype), start)

    with use_rules(step.mesh, step.rules):
        cache = state.cache
        cache = cache.replace(k=jax.tree.map(put, cache.k, prefix.cache.k),
                              v=jax.tree.map(put, cache.v, prefix.cache.v),
                              lengths=cache.lengths.at[slot].set(prefix.cache.lengths[0]))
        state = DecodeState(cache=cache, tokens=state.tokens.at[slot].set(prefix.token),
                            seeds=state.seeds.at[slot].set(seed), temperature=state.temperature.at[slot].set(temperature),
                            top_k=state.top_k.at[slot].set(top_k), top_p=state.top_p.at[slot].set(top_p))
        return _shard_state(state)


def _generate(step: Step, params, state: DecodeState):
    TRACES["generate", step] += 1
    with use_rules(step.mesh, step.rules):
        positions = state.cache.lengths  # [B]
        logits, cache = step.forward(params, state.tokens[:, None], positions[:, None], state.cache)
        next_positions = positions + 1
        keys = row_keys(state.seeds, next_positions)
        tokens = sample(logits[:, 0], state.temperature, state.top_k, state.top_p, keys)
        state = dataclasses.replace(state, cache=cache.replace(lengths=next_positions), tokens=tokens)
        return _shard_state(state), shard(tokens, ("batch",))


# One jitted function per step for every engine: the Step argument keys their compiled programs.
prefill_step = jax.jit(_prefill, static_argnums=0)
forward_step = jax.jit(_forward, static_argnums=0)
init_state_step = jax.jit(_init_state, static_argnums=0)
insert_step = jax.jit(_insert, static_argnums=0, donate_argnames=("state",))
generate_step = jax.jit(_generate, static_argnums=0, donate_argnames=("state",))


class Engine:
    """A model on a placement, with its jitted steps. `Engine(model, batch_size=B, max_seq_len=S,
    placement=Placement.make(...))` places the model's parameters (device to device where they are
    not there already); without a placement, one device."""

    def __init__(self, model: nnx.Module, *, batch_size: int, max_seq_len: int, placement: Placement | None = None,
                 cache_dtype=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        cfg = model.cfg
        if not 1 < max_seq_len <= cfg.max_seq_len:
            raise ValueError(f"max_seq_len must be in [2, {cfg.max_seq_len}] for {cfg.name}, got {max_seq_len}")
        self.cfg = cfg
        self.placement = placement or Placement.make(cfg, batch_size=batch_size)
        self.strategy = self.placement.strategy
        self.mesh = self.placement.mesh
        self.prefill_rules, self.decode_rules = self.placement.prefill_rules, self.placement.decode_rules
        self.cache_dtype = cache_dtype or quant.compute_dtype(model)  # jnp.int8: an int8 KV cache
        self.graphdef, self.params = self.strategy.split(self.placement.place(model), self.mesh, self.decode_rules)
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.buckets = prefill_buckets(max_seq_len)
        step = lambda rules: Step(cfg, self.graphdef, self.strategy, self.mesh, rules, self.cache_dtype,  # noqa: E731
                                  batch_size, max_seq_len)
        self.prefill_spec, self.decode_spec = step(self.prefill_rules), step(self.decode_rules)

    def model(self) -> nnx.Module:
        """The plain model (one module per layer) on this engine's arrays."""
        return self.strategy.merge(self.graphdef, self.params)

    # ----- public API -----

    def bucket(self, length: int) -> int:
        for b in self.buckets:
            if length <= b:
                return b
        raise ValueError(f"prompt of {length} tokens is longer than the context ({self.max_seq_len} tokens)")

    def check_prompt(self, tokens) -> None:
        check_prompt(tokens, self.max_seq_len, self.cfg.vocab_size)

    def _padded(self, tokens) -> np.ndarray:
        self.check_prompt(tokens)
        padded = np.zeros((1, self.bucket(len(tokens))), np.int32)
        padded[0, :len(tokens)] = tokens
        return padded

    def prefill(self, params, tokens, sampling: SamplingParams = SamplingParams()) -> Prefix:
        return prefill_step(self.prefill_spec, params, self._padded(tokens), np.int32(len(tokens)),
                            *sampling_arrays(sampling))

    def forward(self, params, tokens) -> jax.Array:
        """Logits [B, T, V] (float32) of whole sequences tokens [B, T] from position 0, through a fresh
        cache of T slots (so an int8 cache is written and read back), under the prefill rules."""
        return forward_step(self.prefill_spec, params, np.asarray(tokens, np.int32))

    def init_decode_state(self) -> DecodeState:
        return init_state_step(self.decode_spec)

    def insert(self, prefix: Prefix, state: DecodeState, slot: int, sampling: SamplingParams = SamplingParams()) -> DecodeState:
        if not 0 <= slot < self.batch_size:
            raise ValueError(f"slot {slot} outside [0, {self.batch_size})")
        return insert_step(self.decode_spec, prefix, state, np.int32(slot), *sampling_arrays(sampling))

    def generate(self, params, state: DecodeState) -> tuple[DecodeState, jax.Array]:
        return generate_step(self.decode_spec, params, state)

    def compiled_text(self, phase: str = "decode", bucket: int | None = None) -> str:
        """The optimized HLO of one step: "decode", or "prefill" at `bucket` positions (default the
        smallest bucket). The engine's own calls reuse the compiled step."""
        if phase == "decode":
            lowered = generate_step.lower(self.decode_spec, self.params, self.init_decode_state())
        elif phase == "prefill":
            tokens = np.zeros((1, bucket or self.buckets[0]), np.int32)
            lowered = prefill_step.lower(self.prefill_spec, self.params, tokens, np.int32(1),
                                         *sampling_arrays(SamplingParams()))
        else:
            raise ValueError(f"phase must be decode or prefill, got {phase!r}")
        return lowered.compile().as_text()

    def compiled_count(self) -> dict[str, int]:
        """Programs compiled for this engine's steps (shared with any engine of an equal Step; for
        tests: steady state must not grow these)."""
        return {"prefill": TRACES["prefill", self.prefill_spec], "insert": TRACES["insert", self.decode_spec],
                "generate": TRACES["generate", self.decode_spec]}
