"""The paged engine: a KV page pool per layer, packed and chunked prefill, decode over the pages.

Every layer's keys and values live in one pool [num_pages, P, K, H]; engine/kv_pages.py's PagePool
(owned by the scheduler, engine/scheduler.py) says which pages each sequence holds, and each step
gets that as a `PageMeta` (slot mapping, page tables, kv_lens) beside the pools, which it donates
and returns. The model attends through `PagedKVCache`'s per-layer view (models/kv_views.py), so
it runs unchanged; attention reads only the pages each sequence uses (models/paged_attention.py),
so a step's cost follows the live lengths, not max_seq_len.

Two steps, module-level jitted functions with a static engine.Step as in engine/engine.py:
- `prefill`: the scheduler's chunks laid into one row [1, T] of a token bucket (powers of two from
  32 up to max_num_batched_tokens, and the budget itself), each chunk from a multiple of
  QUERY_BLOCK tokens (attention reads a block's pages once for its 16 tokens), positions restarting per
  prompt (a later chunk continues at its start), each token attending only its own sequence
  (seq_ids) including the pages earlier chunks wrote. Each chunk that completes its prompt samples
  the prompt's first token at its own last position with its own SamplingParams, keyed by
  (seed, prompt length) exactly as Engine.prefill does, so tokens equal the dense engine's.
  Rows: a row of T tokens holds at most T / QUERY_BLOCK chunks, so its step samples
  Bp = min(max_num_seqs, T / QUERY_BLOCK) rows (fixed per token bucket: one program each).
- `decode`: one token for each running sequence, the batch padded to a power of two up to
  max_num_seqs (padding rows hold no pages and write nothing); keys (seed, position + 1) as
  Engine.generate's.
The scheduler alternates the two (see engine/scheduler.py for why). `scheduler.run(engine, params,
requests)` is the generation loop. `plan_pool` sizes the pool and the scheduler's limits from the
device's memory, so the defaults are the fast path; `PoolPlan.describe` says what was chosen.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shardlm.engine import programs
from shardlm.engine.engine import TRACES, Step, check_prompt, forward_step
from shardlm.engine.kv_cache import PagedKVCache
from shardlm.engine.kv_pages import PagePool
from shardlm.engine.sampling import SamplingParams, row_keys, sample, token_logprobs
from shardlm.engine.scheduler import (
    Chunk,
    DecodeBatch,
    PrefillBatch,
    check_samples,
    max_samples,
    pages_needed,
    sample_sampling,
)
from shardlm.models import quant
from shardlm.models.kv_views import PageMeta
from shardlm.models.paged_attention import KV_PAGES_AXES
from shardlm.sharding.placement import Placement
from shardlm.sharding.rules import shard, use_rules

# Prompts start at multiples of this many tokens in a packed prefill row, so attention reads each
# run of QUERY_BLOCK tokens' pages once (models/paged_attention.py); token budgets are multiples.
QUERY_BLOCK = 16


def token_buckets(budget: int, smallest: int = 32) -> tuple[int, ...]:
    """Prefill row lengths: powers of two from `smallest` below the budget, then the budget."""
    buckets, b = [], smallest
    while b < budget:
        buckets.append(b)
        b *= 2
    return tuple(buckets) + (budget,)


def batch_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Decode batch sizes: powers of two below max_num_seqs, then max_num_seqs."""
    buckets, b = [], 1
    while b < max_num_seqs:
        buckets.append(b)
        b *= 2
    return tuple(buckets) + (max_num_seqs,)


def _pick(buckets, n: int) -> int:
    return next(b for b in buckets if n <= b)


class StepOutput(NamedTuple):
    """A step's results on device: tokens [R] (R rows), logits [R, V] at each row's position, and
    logprobs (chosen [R], top ids [R, K], top [R, K]; zeros unless a row asked for them)."""

    tokens: jax.Array
    logits: jax.Array
    logprobs: tuple


def shared_prefix_pages(tables: np.ndarray, lens: np.ndarray, page_size: int) -> np.int32:
    """The leading pages that every row of tables [n, max_pages] holds, each full in every row
    (a prefix the rows share: prefix-cached or forked pages), which decode reads once for all."""
    same = (tables == tables[0]).all(axis=0)
    n = len(same) if same.all() else int(np.argmin(same))
    return np.int32(min(n, int(lens.min()) // page_size))


def _sampling(samplings, rows: int):
    """temperature, top_k, top_p, seeds [rows] of per-row SamplingParams (padding rows greedy)."""
    t, k, p, s = np.zeros(rows, np.float32), np.zeros(rows, np.int32), np.ones(rows, np.float32), np.zeros(rows, np.int32)
    for i, sp in enumerate(samplings):
        t[i], k[i], p[i], s[i] = sp.temperature, sp.top_k, sp.top_p, sp.seed
    return t, k, p, s


def _wants_logprobs(samplings) -> np.bool_:
    return np.bool_(any(sp.logprobs is not None for sp in samplings))


def _shard_pools(k, v):
    constrain = lambda a: shard(a, KV_PAGES_AXES)  # noqa: E731
    return jax.tree.map(constrain, k), jax.tree.map(constrain, v)


# ----- sizing the pool from the device's memory -----

def _host_memory(field: str, sysconf_pages: str) -> int:
    """/proc/meminfo's `field` (MemTotal, MemAvailable) in bytes; without /proc, sysconf's pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf(sysconf_pages)


def mesh_memory(mesh) -> int:
    """Bytes this process's devices of `mesh` can hold: their allocators' limits on GPU/TPU; on CPU
    the host's available memory (its CPU devices share it)."""
    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    limits = [(d.memory_stats() or {}).get("bytes_limit") if hasattr(d, "memory_stats") else None for d in devices]
    if all(limits):
        return int(sum(limits))
    return _host_memory("MemAvailable", "SC_AVPHYS_PAGES")


def _per_device_bytes(shape, dtype, mesh, rules) -> int:
    """Bytes of one device's shard of a pool array [num_pages, P, K, H] under `rules`."""
    return int(np.prod(rules.sharding(mesh, KV_PAGES_AXES, shape).shard_shape(shape))) * jnp.dtype(dtype).itemsize


def page_bytes(cfg, page_size: int, cache_dtype, mesh, rules) -> int:
    """Bytes one page takes on this process's devices of the mesh (shards and replicas), every
    layer's k and v (an int8 page: values and scales)."""
    shape = (1, page_size, cfg.n_kv_heads, cfg.head_dim)
    one = (_per_device_bytes(shape, jnp.int8, mesh, rules) + _per_device_bytes(shape[:3] + (1,), jnp.float32, mesh, rules)
           if jnp.dtype(cache_dtype) == jnp.int8 else _per_device_bytes(shape, cache_dtype, mesh, rules))
    local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    return 2 * cfg.n_layers * one * local


def _coarse(n: int) -> int:
    """n rounded down to its 4 leading bits (at most 1/8 less): free memory moves from run to run,
    and a pool of the same shape lets the next run reuse the compiled steps from a compile cache."""
    drop = max(0, n.bit_length() - 4)
    return n >> drop << drop


def _agree(n: int) -> int:
    """The smallest n over the processes of a multi-host job, so every process sizes its pool alike."""
    if jax.process_count() == 1:
        return n
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.int64(n))))


@dataclass(frozen=True)
class PoolPlan:
    """What a paged engine holds: its pool and the scheduler's limits (`describe` says it in words)."""

    page_size: int
    num_pages: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_seq_len: int
    page_bytes: int  # one page, all layers' k and v, on this process's devices
    memory: int  # what this process's devices hold (on CPU the host's available memory)
    weight_bytes: int  # the parameters on this process's devices

    def describe(self) -> str:
        gib = 2**30
        return (f"KV pool {self.num_pages} pages of {self.page_size} tokens ({self.num_pages * self.page_size} tokens, "
                f"{self.num_pages * self.page_bytes / gib:.2f} GiB beside {self.weight_bytes / gib:.2f} GiB "
                f"of weights, of {self.memory / gib:.1f} GiB); up to {self.max_num_seqs} "
                f"sequence{'s' if self.max_num_seqs > 1 else ''} of "
                f"{self.max_seq_len} tokens, {self.max_num_batched_tokens} prompt tokens a step")


def check_settings(*, page_size=None, num_pages=None, max_num_seqs=None, max_num_batched_tokens=None,
                   memory_fraction=None) -> None:
    """The pool settings a user gives (None: a default), checked before anything loads."""
    def whole(name, value):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    if page_size is not None and (isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1):
        raise ValueError(f"page size must be an integer >= 1 token, got {page_size!r}")
    for name, value in (("kv_pages", num_pages), ("max_num_seqs", max_num_seqs),
                        ("max_num_batched_tokens", max_num_batched_tokens)):
        whole(name, value)
    if max_num_batched_tokens is not None:
        if max_num_batched_tokens % QUERY_BLOCK:
            raise ValueError(f"max_num_batched_tokens must be a multiple of {QUERY_BLOCK} (prompts are laid out in "
                             f"blocks of {QUERY_BLOCK} tokens), got {max_num_batched_tokens}")
        if max_num_batched_tokens < (page_size or 16):
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) is smaller than the page size "
                             f"({page_size or 16}); give a budget of at least one page")
    if memory_fraction is not None and (isinstance(memory_fraction, bool) or
                                        not isinstance(memory_fraction, (int, float)) or not 0 < memory_fraction <= 1):
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction!r}")


def plan_pool(cfg, *, params, mesh, rules, cache_dtype, max_seq_len: int, page_size: int | None = None,
              num_pages: int | None = None, max_num_seqs: int | None = None,
              max_num_batched_tokens: int | None = None, memory_fraction: float | None = None) -> PoolPlan:
    """The pool and limits a paged engine gets; each None is a default:
    - page_size 16 tokens;
    - num_pages: what fits in memory_fraction of the devices' memory beside the weights (default
      0.9 on GPU/TPU, whose memory the engine owns; on CPU 0.1 of the host's total memory, since
      the host's memory is shared, at most what is available once the weights are loaded: the
      total, unlike what is free, is the same from run to run), rounded down to 4 leading bits,
      capped at what max_num_seqs full sequences need when max_num_seqs is given; the same in
      every process of a multi-host job (the smallest);
    - max_num_seqs: 256, at most num_pages: the scheduler admits while the pages allow, so what
      runs at once follows the requests' lengths (decode batches are bucketed, so the bound costs
      nothing while fewer run);
    - max_num_batched_tokens: 2,048 on GPU/TPU, 512 on CPU (a prefill step stalls decoding for its
      length, and a CPU step is slow), at least one page.
    A pool that does not fit the devices is refused with the bytes it needs and they have."""
    cpu = mesh.devices.flat[0].platform == "cpu"
    page_size = 16 if page_size is None else page_size
    budget_tokens = max_num_batched_tokens or (512 if cpu else 2048)
    check_settings(page_size=page_size, num_pages=num_pages, max_num_seqs=max_num_seqs,
                   max_num_batched_tokens=budget_tokens, memory_fraction=memory_fraction)
    memory = mesh_memory(mesh)
    weights = sum(s.data.nbytes for leaf in jax.tree.leaves(params) for s in leaf.addressable_shards)
    one_page = page_bytes(cfg, page_size, cache_dtype, mesh, rules)
    pages_per_seq = -(-max_seq_len // page_size)
    # On CPU the available memory is read with the weights already in it; a GPU/TPU limit includes them.
    beside = 0 if cpu else weights
    if num_pages is None:
        fraction = memory_fraction or (0.1 if cpu else 0.9)
        free = min(int(fraction * _host_memory("MemTotal", "SC_PHYS_PAGES")), memory) if cpu else int(fraction * memory) - beside
        num_pages = _agree(_coarse(free // one_page))
        if num_pages < 1:
            raise ValueError(f"no room for KV pages: the weights take {weights / 2**30:.2f} GiB, {fraction:g} of "
                             f"the devices' memory leaves {max(free, 0) / 2**30:.2f} GiB for pages; "
                             f"give a larger memory_fraction or kv_pages")
        if max_num_seqs is not None:
            num_pages = min(num_pages, max_num_seqs * pages_per_seq)
    elif beside + num_pages * one_page > memory:
        has = (f"the host has {memory} bytes available beside the weights" if cpu else
               f"the devices have {memory} bytes, {weights} of them taken by the weights")
        raise ValueError(f"{num_pages} KV pages of {page_size} tokens need {num_pages * one_page} bytes; {has}: "
                         f"give at most {max(0, (memory - beside) // one_page)} pages")
    if max_num_seqs is None:
        max_num_seqs = min(256, num_pages)
    return PoolPlan(page_size, num_pages, max_num_seqs, budget_tokens, max_seq_len, one_page, memory, weights)


# ----- the steps (traced; each enters its own rules) -----

def _init_pools(step: Step, num_pages: int, page_size: int):
    with use_rules(step.mesh, step.rules):
        cfg = step.cfg
        return _shard_pools(*PagedKVCache.zero_pools(cfg.n_layers, num_pages, page_size, cfg.n_kv_heads, cfg.head_dim,
                                                     step.cache_dtype))


def _prefill(step: Step, params, k, v, tokens, positions, meta: PageMeta, last_index, temperature, top_k, top_p, seeds,
             want_logprobs):
    """tokens, positions [1, T]; meta packed over Bp rows; last_index [Bp]
    -> (k, v, tokens [Bp], logits [Bp, V], logprobs: sampling.token_logprobs's)."""
    TRACES["paged_prefill", step] += 1
    with use_rules(step.mesh, step.rules):
        logits, cache = step.forward(params, tokens, positions, PagedKVCache(k, v, meta), logits_index=last_index[None])
        logits = logits[0]  # [Bp, V]
        out = sample(logits, temperature, top_k, top_p, row_keys(seeds, meta.kv_lens))
        return *_shard_pools(cache.k, cache.v), out, logits, token_logprobs(logits, out, want_logprobs)


def _decode(step: Step, params, k, v, tokens, positions, meta: PageMeta, temperature, top_k, top_p, seeds,
            want_logprobs):
    """tokens, positions [B]; meta over B rows -> (k, v, tokens [B], logits [B, V], logprobs)."""
    TRACES["paged_decode", step] += 1
    with use_rules(step.mesh, step.rules):
        logits, cache = step.forward(params, tokens[:, None], positions[:, None], PagedKVCache(k, v, meta))
        logits = logits[:, 0]  # [B, V]
        out = sample(logits, temperature, top_k, top_p, row_keys(seeds, positions + 1))
        return *_shard_pools(cache.k, cache.v), shard(out, ("batch",)), logits, token_logprobs(logits, out, want_logprobs)


def _copy_pages(step: Step, k, v, src, dst):
    """Every layer's pages src [C] copied onto dst [C] (a forked sample's partial last page)."""
    with use_rules(step.mesh, step.rules):
        copy = lambda a: a.at[dst].set(a[src])  # noqa: E731
        return _shard_pools(jax.tree.map(copy, k), jax.tree.map(copy, v))


init_pools_step = jax.jit(_init_pools, static_argnums=(0, 1, 2))
copy_pages_step = jax.jit(_copy_pages, static_argnums=0, donate_argnames=("k", "v"))
paged_prefill_step = jax.jit(_prefill, static_argnums=0, donate_argnames=("k", "v"))
paged_decode_step = jax.jit(_decode, static_argnums=0, donate_argnames=("k", "v"))


class PagedEngine:
    """A model on a placement with a paged KV pool. `PagedEngine(model, placement=...)` sizes the
    pool and the scheduler's limits from the device's memory (see `plan_pool`; any of page_size,
    num_pages, max_num_seqs, max_num_batched_tokens, memory_fraction given is kept, and
    max_seq_len defaults to the model's context); `scheduler.run(engine, engine.params, requests)`
    generates. cache_dtype jnp.int8: int8 pages with per-token, per-head scales. prefix_cache:
    requests share the pages of a prefix already computed (engine/kv_pages.py)."""

    def __init__(self, model: nnx.Module, *, placement: Placement | None = None, page_size: int | None = None,
                 num_pages: int | None = None, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None, max_seq_len: int | None = None,
                 memory_fraction: float | None = None, cache_dtype=None, prefix_cache: bool = True):
        cfg = model.cfg
        self.prefix_cache = bool(prefix_cache)  # the scheduler's pool keys full pages by their prefix
        max_seq_len = cfg.max_seq_len if max_seq_len is None else max_seq_len
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or not 1 < max_seq_len <= cfg.max_seq_len:
            raise ValueError(f"max_seq_len must be an integer in [2, {cfg.max_seq_len}] for {cfg.name}, "
                             f"got {max_seq_len!r}")
        check_settings(page_size=page_size, num_pages=num_pages, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_num_batched_tokens, memory_fraction=memory_fraction)
        self.cfg = cfg
        self.placement = placement or Placement.make(cfg, batch_size=max_num_seqs or 8)
        self.strategy, self.mesh = self.placement.strategy, self.placement.mesh
        if self.strategy.stacked:
            raise ValueError("the paged engine does not run pipeline stages; use Engine")
        self.cache_dtype = cache_dtype or quant.compute_dtype(model)
        self.graphdef, self.params = self.strategy.split(self.placement.place(model), self.mesh,
                                                         self.placement.decode_rules)
        self.plan = plan_pool(cfg, params=self.params, mesh=self.mesh, rules=self.placement.decode_rules,
                              cache_dtype=self.cache_dtype, max_seq_len=max_seq_len, page_size=page_size,
                              num_pages=num_pages, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens, memory_fraction=memory_fraction)
        self.page_size, self.num_pages, self.max_seq_len = self.plan.page_size, self.plan.num_pages, max_seq_len
        self.max_num_seqs, self.max_num_batched_tokens = self.plan.max_num_seqs, self.plan.max_num_batched_tokens
        self.batch_size = self.max_num_seqs
        self.query_block = QUERY_BLOCK
        self.max_pages = -(-max_seq_len // self.page_size)  # page-table width: one sequence of max_seq_len
        self.token_buckets, self.batch_buckets = token_buckets(self.max_num_batched_tokens), batch_buckets(self.max_num_seqs)
        # Page copies of forked samples: at most one per further sample of a request.
        self.copy_buckets = batch_buckets(max(1, self.max_samples() - 1))
        step = lambda rules: Step(cfg, self.graphdef, self.strategy, self.mesh, rules, self.cache_dtype,  # noqa: E731
                                  self.max_num_seqs, max_seq_len)
        self.prefill_spec, self.decode_spec = step(self.placement.prefill_rules), step(self.placement.decode_rules)
        # Zeroing the pools first-touches all their memory (on CPU 0.6-2 s for 2.3 GiB of fresh host
        # memory, which JAX runs synchronously): a thread does it while the caller goes on, tracing
        # the first step or reading its stored program back (from the pools' shapes and shardings,
        # `_pool_args`); the first read or write of k or v waits for it.
        zero = init_pools_step.lower(self.decode_spec, self.num_pages, self.page_size).compile()
        self._pool_shapes = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                         zero.out_info, zero.output_shardings)
        executor = concurrent.futures.ThreadPoolExecutor(1)
        self._zeroed = executor.submit(zero)
        executor.shutdown(wait=False)
        # With a program store (programs.set_directory), each step's program is read back or compiled
        # once and stored, then called directly: (phase, bucket) -> jax.stages.Compiled.
        self._store, self._compiled = programs.store(), {}

    def _pools(self):
        if self._zeroed is not None:
            self._k, self._v = self._zeroed.result()
            self._zeroed = None
        return self._k, self._v

    def _pool_args(self):
        """The pools, or while they are still being zeroed their shapes and shardings (enough to find
        or compile a step's program)."""
        return self._pool_shapes if self._zeroed is not None and not self._zeroed.done() else self._pools()

    def _set(self, name, pools):
        self._pools()  # a write before the zeroing finished must not be overwritten by it
        setattr(self, name, pools)

    k = property(lambda self: self._pools()[0], lambda self, pools: self._set("_k", pools))
    v = property(lambda self: self._pools()[1], lambda self, pools: self._set("_v", pools))

    def model(self) -> nnx.Module:
        return self.strategy.merge(self.graphdef, self.params)

    def check_prompt(self, tokens) -> None:
        check_prompt(tokens, self.max_seq_len, self.cfg.vocab_size)

    def check_fits(self, n_prompt: int, max_new_tokens: int, n: int = 1) -> None:
        """A prompt of n_prompt tokens (already checked) that, with its max_new_tokens, fits the pool
        (n samples: with a copy of the prompt's partial last page for each further one)."""
        P = self.page_size
        copies = n - 1 if n > 1 and n_prompt % P else 0
        need = pages_needed(n_prompt, max_new_tokens, n, P, self.max_seq_len)
        if need > self.num_pages:
            also = f" and {copies} copies of its partial last page (n = {n})" if copies else ""
            raise ValueError(f"a prompt of {n_prompt} tokens with max_new_tokens {max_new_tokens}{also} needs {need} "
                             f"KV pages of {P} tokens; the pool has {self.num_pages} "
                             f"(give more kv_pages or a larger memory fraction)")

    def max_samples(self) -> int:
        """The most samples (SamplingParams.n) a request may ask for (scheduler.max_samples)."""
        return max_samples(self.max_num_seqs, self.max_num_batched_tokens, self.query_block)

    def check_samples(self, n: int) -> None:
        check_samples(n, self.max_num_seqs, self.max_num_batched_tokens, self.query_block)

    def new_pool(self) -> PagePool:
        """A host PagePool for this engine's pools (scheduler.run makes its own)."""
        return PagePool(self.num_pages, self.page_size, prefix_cache=self.prefix_cache)

    def _copy(self, copies) -> None:
        """Apply a step's page copies (padded to a batch bucket by repeating the first: the same
        value written twice)."""
        if not copies:
            return
        C = _pick(self.copy_buckets, len(copies))
        pairs = np.asarray(list(copies) + [copies[0]] * (C - len(copies)), np.int32)
        self.k, self.v = self._run("copy", C, copy_pages_step, self.decode_spec, (), (pairs[:, 0], pairs[:, 1]))

    def prefill(self, params, batch: PrefillBatch, pool: PagePool):
        """Run the batch's chunks (their pages allocated in `pool`) in one packed row, each chunk from
        a multiple of QUERY_BLOCK. Returns (tokens [Bp], logits [Bp, V]) on device: row i is chunk
        i's first token (meaningful where chunk.last) and the logits at its last position (a
        StepOutput)."""
        chunks, Q = batch.chunks, self.query_block
        n_rows = sum(c.rows for c in chunks)
        if not 0 < n_rows <= self.max_num_seqs:
            raise ValueError(f"a prefill step samples 1..{self.max_num_seqs} rows, got {n_rows}")
        T = self.row_bucket([len(c.token_ids) for c in chunks], [c.rows for c in chunks])
        Bp = self.prefill_rows(T)
        self._copy(batch.copies)
        tokens, positions = np.zeros((1, T), np.int32), np.zeros((1, T), np.int32)
        q_pos, slots = np.full(T, -1, np.int32), np.full(T, -1, np.int32)
        block_seq = np.full(T // Q, -1, np.int32)
        last = np.zeros(Bp, np.int32)
        rows, samplings, at = [], [], 0
        for c in chunks:
            n, r = len(c.token_ids), len(rows)
            tokens[0, at:at + n] = c.token_ids
            positions[0, at:at + n] = q_pos[at:at + n] = np.arange(c.start, c.start + n)
            slots[at:at + n] = pool.slot_mapping(c.seq_id, c.start, n)
            block_seq[at // Q:-(-(at + n) // Q)] = r
            # Row r attends; rows r + 1 .. r + rows - 1 (further samples) only sample the same last position.
            last[r:r + c.rows] = at + n - 1
            rows += [c.seq_id] * c.rows
            samplings += [c.sampling] if c.rows == 1 else [sample_sampling(c.sampling, i) for i in range(c.rows)]
            at += max(-(-n // Q), c.rows) * Q
        rows += [None] * (Bp - len(rows))
        meta = PageMeta(slots, pool.page_table_array(rows, self.max_pages), pool.lengths_array(rows), block_seq, q_pos)
        self.k, self.v, *out = self._run("prefill", T, paged_prefill_step, self.prefill_spec, (params,),
                                         (tokens, positions, meta, last, *_sampling(samplings, Bp),
                                          _wants_logprobs(samplings)))
        return StepOutput(*out)

    def decode(self, params, batch: DecodeBatch, pool: PagePool):
        """One token for each sequence of the batch (its new token's page allocated in `pool`).
        Returns a StepOutput (tokens [B], logits [B, V], logprobs) on device, rows past
        len(batch.seq_ids) padding."""
        n = len(batch.seq_ids)
        if not 0 < n <= self.max_num_seqs:
            raise ValueError(f"a decode step takes 1..{self.max_num_seqs} sequences, got {n}")
        B = _pick(self.batch_buckets, n)
        self._copy(batch.copies)
        rows = list(batch.seq_ids) + [None] * (B - n)
        tokens, positions, slots = np.zeros(B, np.int32), np.zeros(B, np.int32), np.full(B, -1, np.int32)
        tokens[:n], positions[:n] = batch.tokens, batch.positions
        for i, (seq_id, pos) in enumerate(zip(batch.seq_ids, batch.positions)):
            slots[i] = pool.slot_mapping(seq_id, pos, 1)[0]
        tables, lens = pool.page_table_array(rows, self.max_pages), pool.lengths_array(rows)
        meta = PageMeta(slots, tables, lens, shared_pages=shared_prefix_pages(tables[:n], lens[:n], self.page_size))
        self.k, self.v, *out = self._run("decode", B, paged_decode_step, self.decode_spec, (params,),
                                         (tokens, positions, meta, *_sampling(batch.samplings, B),
                                          _wants_logprobs(batch.samplings)))
        return StepOutput(*out)

    def prefill_rows(self, T: int) -> int:
        """Rows a prefill step of T tokens samples: each chunk takes at least one query block."""
        return min(self.max_num_seqs, T // self.query_block)

    def row_bucket(self, lengths, rows=None) -> int:
        """The token bucket of a prefill row holding chunks of these lengths (each whole blocks of
        QUERY_BLOCK tokens, and at least a block for each row it samples)."""
        Q = self.query_block
        rows = rows or [1] * len(lengths)
        n_tokens = sum(max(-(-n // Q), r) * Q for n, r in zip(lengths, rows))
        if n_tokens > self.max_num_batched_tokens:
            raise ValueError(f"a prefill step takes {self.max_num_batched_tokens} tokens in all (each chunk rounded "
                             f"up to {Q}), got {n_tokens}")
        return _pick(self.token_buckets, n_tokens)

    def prompt_logits(self, params, tokens) -> jax.Array:
        """Logits [V] at the last position of one prompt, prefilled alone by the packed prefill step
        (into a fresh PagePool's first pages: only for an engine with no sequence running)."""
        self.check_prompt(tokens)
        if len(tokens) > self.max_num_batched_tokens:
            raise ValueError(f"a prompt of {len(tokens)} tokens is more than one prefill step "
                             f"({self.max_num_batched_tokens} tokens)")
        pool = self.new_pool()
        pool.allocate(0, len(tokens))
        out = self.prefill(params, PrefillBatch((Chunk(0, tuple(tokens), 0, True, SamplingParams()),)), pool)
        return out.logits[0]

    def forward(self, params, tokens) -> jax.Array:
        """Logits [B, T, V] (float32) of whole sequences tokens [B, T] from position 0, through a
        fresh dense cache of T slots (in the pool's dtype), under the prefill rules."""
        return forward_step(self.prefill_spec, params, np.asarray(tokens, np.int32))

    def _run(self, phase: str, bucket: int, jitted, static, lead: tuple, rest: tuple):
        """One step: jitted(static, *lead, k, v, *rest), or with a program store its program read back
        (while the pools are still being zeroed) or compiled and stored once, then called directly
        (no tracing at all)."""
        if self._store is None:
            return jitted(static, *lead, *self._pools(), *rest)
        program = self._program(phase, bucket, jitted, static, (*lead, *self._pool_args(), *rest))
        return program(*lead, *self._pools(), *rest)

    def _program(self, phase: str, bucket: int, jitted, static, args):
        """The store's program of one step for these arguments, kept for the engine's later steps."""
        # The pools come out of a step sharded by its own rules (prefill's and decode's may differ),
        # so each step has a program per pool sharding, as jit would.
        pools = args[0] if phase == "copy" else args[1]
        key = (phase, bucket, jax.tree.leaves(pools)[0].sharding)
        if key not in self._compiled:
            self._compiled[key] = self._store.compiled(phase, jitted, static, *args)
        return self._compiled[key]

    def _example(self, phase: str, bucket: int | None = None):
        """(jitted step, static Step, padding-only arguments, bucket) of one step: "decode" at batch
        bucket `bucket` (default max_num_seqs) or "prefill" at token bucket `bucket` (default the
        smallest); "copy" of `bucket` pages (forked samples)."""
        if phase == "copy":
            C = bucket or 1
            pages = np.zeros(C, np.int32)
            return copy_pages_step, self.decode_spec, (*self._pool_args(), pages, pages), C
        if phase == "decode":
            B = bucket or self.max_num_seqs
            meta = PageMeta(np.full(B, -1, np.int32), np.zeros((B, self.max_pages), np.int32), np.zeros(B, np.int32),
                            shared_pages=np.int32(0))
            return paged_decode_step, self.decode_spec, (self.params, *self._pool_args(), np.zeros(B, np.int32),
                                                         np.zeros(B, np.int32), meta, *_sampling([], B),
                                                         np.bool_(False)), B
        if phase == "prefill":
            T = bucket or self.token_buckets[0]
            Bp = self.prefill_rows(T)
            meta = PageMeta(np.full(T, -1, np.int32), np.zeros((Bp, self.max_pages), np.int32), np.zeros(Bp, np.int32),
                            np.full(T // self.query_block, -1, np.int32), np.full(T, -1, np.int32))
            return paged_prefill_step, self.prefill_spec, (self.params, *self._pool_args(), np.zeros((1, T), np.int32),
                                                           np.zeros((1, T), np.int32), meta, np.zeros(Bp, np.int32),
                                                           *_sampling([], Bp), np.bool_(False)), T
        raise ValueError(f"phase must be decode, prefill or copy, got {phase!r}")

    def _lowered(self, phase: str, bucket: int | None = None):
        jitted, static, args, _ = self._example(phase, bucket)
        return jitted.lower(static, *args)

    def compiled_text(self, phase: str = "decode", bucket: int | None = None) -> str:
        """The optimized HLO of one step: "decode" (at batch bucket `bucket`, default max_num_seqs)
        or "prefill" (at token bucket `bucket`, default the smallest). The engine's own calls reuse
        the compiled step."""
        return self._lowered(phase, bucket).compile().as_text()

    def programs(self) -> list[tuple[str, int]]:
        """Every step program this engine can run: (phase, bucket) for each token and batch bucket,
        and the page copies of forked samples (n > 1) for each batch bucket below the samples' limit."""
        return ([("prefill", T) for T in self.token_buckets] + [("decode", B) for B in self.batch_buckets]
                + [("copy", C) for C in self.copy_buckets])

    def precompile(self, on_program=None) -> None:
        """Compile every program (`programs`) now, so no step of a run stops to compile; the run's
        calls reuse them (a compilation cache, when set, serves them too). `on_program(phase,
        bucket, seconds)` after each."""
        for phase, bucket in self.programs():
            t0 = time.perf_counter()
            if self._store is None:
                self._lowered(phase, bucket).compile()  # jit's cache keeps it for the steps
            else:
                jitted, static, args, bucket = self._example(phase, bucket)
                self._program(phase, bucket, jitted, static, args)
            if on_program is not None:
                on_program(phase, bucket, time.perf_counter() - t0)

    def pool_bytes(self) -> int:
        """Bytes of every layer's k and v pools (all devices)."""
        return sum(a.nbytes for a in jax.tree.leaves((self.k, self.v)))

    def bytes_held(self, pool: PagePool) -> int:
        """Bytes of the pages `pool` has handed out (all layers' k and v, all devices)."""
        return pool.pages_in_use * self.pool_bytes() // self.num_pages

    def compiled_count(self) -> dict[str, int]:
        """Programs traced for this engine's steps (one per token bucket, one per batch bucket)."""
        return {"prefill": TRACES["paged_prefill", self.prefill_spec], "decode": TRACES["paged_decode", self.decode_spec]}
