"""The paged engine: a KV page pool per layer, packed and chunked prefill, decode over the pages.

Every layer's keys and values live in one pool [num_pages, P, K, H]; engine/kv_pages.py's PagePool
(owned by the scheduler, engine/scheduler.py) says which pages each sequence holds, and each step
gets that as a `PageMeta` (slot mapping, page tables, kv_lens) beside the pools, which it donates
and returns. The model attends through `PagedKVCache`'s per-layer view (models/kv_views.py), so
it runs unchanged; attention reads only the pages each sequence uses (models/paged_attention.py),
so a step's cost follows the live lengths, not max_seq_len.

Two steps, module-level jitted functions with a static engine.Step as in engine/engine.py:
- `prefill`: the scheduler's chunks concatenated into one row [1, T] of a token bucket (powers of
  two from 32 up to max_num_batched_tokens, and the budget itself), positions restarting per
  prompt (a later chunk continues at its start), each token attending only its own sequence
  (seq_ids) including the pages earlier chunks wrote. Each chunk that completes its prompt samples
  the prompt's first token at its own last position with its own SamplingParams, keyed by
  (seed, prompt length) exactly as Engine.prefill does, so tokens equal the dense engine's.
  Rows: up to max_num_seqs chunks per step (a fixed Bp, so one program per token bucket).
- `decode`: one token for each running sequence, the batch padded to a power of two up to
  max_num_seqs (padding rows hold no pages and write nothing); keys (seed, position + 1) as
  Engine.generate's.
The scheduler alternates the two (see engine/scheduler.py for why). `scheduler.run(engine, params,
requests)` is the generation loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shardlm.engine.engine import TRACES, Step, check_prompt
from shardlm.engine.kv_cache import PagedKVCache
from shardlm.engine.kv_pages import PagePool
from shardlm.engine.sampling import row_keys, sample
from shardlm.engine.scheduler import DecodeBatch, PrefillBatch
from shardlm.models import quant
from shardlm.models.kv_views import PageMeta
from shardlm.models.paged_attention import KV_PAGES_AXES
from shardlm.sharding.placement import Placement
from shardlm.sharding.rules import shard, use_rules


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


def _sampling(samplings, rows: int):
    """temperature, top_k, top_p, seeds [rows] of per-row SamplingParams (padding rows greedy)."""
    t, k, p, s = np.zeros(rows, np.float32), np.zeros(rows, np.int32), np.ones(rows, np.float32), np.zeros(rows, np.int32)
    for i, sp in enumerate(samplings):
        t[i], k[i], p[i], s[i] = sp.temperature, sp.top_k, sp.top_p, sp.seed
    return t, k, p, s


def _shard_pools(k, v):
    constrain = lambda a: shard(a, KV_PAGES_AXES)  # noqa: E731
    return jax.tree.map(constrain, k), jax.tree.map(constrain, v)


# ----- the steps (traced; each enters its own rules) -----

def _init_pools(step: Step, num_pages: int, page_size: int):
    with use_rules(step.mesh, step.rules):
        cfg = step.cfg
        return _shard_pools(*PagedKVCache.zero_pools(cfg.n_layers, num_pages, page_size, cfg.n_kv_heads, cfg.head_dim,
                                                     step.cache_dtype))


def _prefill(step: Step, params, k, v, tokens, positions, meta: PageMeta, last_index, temperature, top_k, top_p, seeds):
    """tokens, positions [1, T]; meta packed over Bp rows; last_index [Bp] -> (k, v, tokens [Bp], logits [Bp, V])."""
    TRACES["paged_prefill", step] += 1
    with use_rules(step.mesh, step.rules):
        logits, cache = step.forward(params, tokens, positions, PagedKVCache(k, v, meta), logits_index=last_index[None])
        logits = logits[0]  # [Bp, V]
        out = sample(logits, temperature, top_k, top_p, row_keys(seeds, meta.kv_lens))
        return *_shard_pools(cache.k, cache.v), out, logits


def _decode(step: Step, params, k, v, tokens, positions, meta: PageMeta, temperature, top_k, top_p, seeds):
    """tokens, positions [B]; meta over B rows -> (k, v, tokens [B], logits [B, V])."""
    TRACES["paged_decode", step] += 1
    with use_rules(step.mesh, step.rules):
        logits, cache = step.forward(params, tokens[:, None], positions[:, None], PagedKVCache(k, v, meta))
        logits = logits[:, 0]  # [B, V]
        out = sample(logits, temperature, top_k, top_p, row_keys(seeds, positions + 1))
        return *_shard_pools(cache.k, cache.v), shard(out, ("batch",)), logits


init_pools_step = jax.jit(_init_pools, static_argnums=(0, 1, 2))
paged_prefill_step = jax.jit(_prefill, static_argnums=0, donate_argnames=("k", "v"))
paged_decode_step = jax.jit(_decode, static_argnums=0, donate_argnames=("k", "v"))


class PagedEngine:
    """A model on a placement with a paged KV pool. `PagedEngine(model, page_size=P, num_pages=...,
    max_num_seqs=..., max_num_batched_tokens=...)`; `scheduler.run(engine, engine.params,
    requests)` generates. num_pages defaults to max_num_seqs sequences of max_seq_len tokens."""

    def __init__(self, model: nnx.Module, *, placement: Placement | None = None, page_size: int = 16,
                 num_pages: int | None = None, max_num_seqs: int = 8, max_num_batched_tokens: int = 512,
                 max_seq_len: int | None = None, cache_dtype=None):
        cfg = model.cfg
        max_seq_len = cfg.max_seq_len if max_seq_len is None else max_seq_len
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page size must be an integer >= 1 token, got {page_size!r}")
        if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be an integer >= 1, got {max_num_seqs!r}")
        if max_num_batched_tokens < page_size:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) is smaller than the page size "
                             f"({page_size}); give a budget of at least one page")
        if not 1 < max_seq_len <= cfg.max_seq_len:
            raise ValueError(f"max_seq_len must be in [2, {cfg.max_seq_len}] for {cfg.name}, got {max_seq_len}")
        self.cfg = cfg
        self.page_size, self.max_seq_len = page_size, max_seq_len
        self.max_pages = -(-max_seq_len // page_size)  # page-table width: one sequence of max_seq_len
        self.num_pages = max_num_seqs * self.max_pages if num_pages is None else num_pages
        if self.num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.token_buckets, self.batch_buckets = token_buckets(max_num_batched_tokens), batch_buckets(max_num_seqs)
        self.placement = placement or Placement.make(cfg, batch_size=max_num_seqs)
        self.strategy, self.mesh = self.placement.strategy, self.placement.mesh
        if self.strategy.stacked:
            raise ValueError("the paged engine does not run pipeline stages yet; use Engine")
        self.cache_dtype = cache_dtype or quant.compute_dtype(model)
        if jnp.dtype(self.cache_dtype) == jnp.int8:
            raise ValueError("the paged engine has no int8 KV pages yet; use Engine for --kv-cache int8")
        self.graphdef, self.params = self.strategy.split(self.placement.place(model), self.mesh,
                                                         self.placement.decode_rules)
        step = lambda rules: Step(cfg, self.graphdef, self.strategy, self.mesh, rules, self.cache_dtype,  # noqa: E731
                                  max_num_seqs, max_seq_len)
        self.prefill_spec, self.decode_spec = step(self.placement.prefill_rules), step(self.placement.decode_rules)
        self.k, self.v = init_pools_step(self.decode_spec, self.num_pages, page_size)

    def model(self) -> nnx.Module:
        return self.strategy.merge(self.graphdef, self.params)

    def check_prompt(self, tokens) -> None:
        check_prompt(tokens, self.max_seq_len, self.cfg.vocab_size)

    def new_pool(self) -> PagePool:
        """A host PagePool for this engine's pools (scheduler.run makes its own)."""
        return PagePool(self.num_pages, self.page_size)

    def prefill(self, params, batch: PrefillBatch, pool: PagePool):
        """Run the batch's chunks (their pages allocated in `pool`) in one packed row. Returns
        (tokens [Bp], logits [Bp, V]) on device: row i is chunk i's first token (meaningful where
        chunk.last) and the logits at its last position."""
        chunks, Bp = batch.chunks, self.max_num_seqs
        n_tokens = sum(len(c.token_ids) for c in chunks)
        if not 0 < len(chunks) <= Bp or n_tokens > self.max_num_batched_tokens:
            raise ValueError(f"a prefill step takes 1..{Bp} chunks of {self.max_num_batched_tokens} tokens in all, "
                             f"got {len(chunks)} of {n_tokens}")
        T = _pick(self.token_buckets, n_tokens)
        tokens, positions = np.zeros((1, T), np.int32), np.zeros((1, T), np.int32)
        seq_ids, q_pos, slots = (np.full(T, -1, np.int32) for _ in range(3))
        last = np.zeros(Bp, np.int32)
        at = 0
        for r, c in enumerate(chunks):
            n = len(c.token_ids)
            tokens[0, at:at + n] = c.token_ids
            positions[0, at:at + n] = q_pos[at:at + n] = np.arange(c.start, c.start + n)
            seq_ids[at:at + n] = r
            slots[at:at + n] = pool.slot_mapping(c.seq_id, c.start, n)
            last[r] = at + n - 1
            at += n
        rows = [c.seq_id for c in chunks] + [None] * (Bp - len(chunks))
        meta = PageMeta(slots, pool.page_table_array(rows, self.max_pages), pool.lengths_array(rows), seq_ids, q_pos)
        self.k, self.v, out, logits = paged_prefill_step(self.prefill_spec, params, self.k, self.v, tokens, positions,
                                                         meta, last, *_sampling([c.sampling for c in chunks], Bp))
        return out, logits

    def decode(self, params, batch: DecodeBatch, pool: PagePool):
        """One token for each sequence of the batch (its new token's page allocated in `pool`).
        Returns (tokens [B], logits [B, V]) on device, rows past len(batch.seq_ids) padding."""
        n = len(batch.seq_ids)
        if not 0 < n <= self.max_num_seqs:
            raise ValueError(f"a decode step takes 1..{self.max_num_seqs} sequences, got {n}")
        B = _pick(self.batch_buckets, n)
        rows = list(batch.seq_ids) + [None] * (B - n)
        tokens, positions, slots = np.zeros(B, np.int32), np.zeros(B, np.int32), np.full(B, -1, np.int32)
        tokens[:n], positions[:n] = batch.tokens, batch.positions
        for i, (seq_id, pos) in enumerate(zip(batch.seq_ids, batch.positions)):
            slots[i] = pool.slot_mapping(seq_id, pos, 1)[0]
        meta = PageMeta(slots, pool.page_table_array(rows, self.max_pages), pool.lengths_array(rows))
        self.k, self.v, out, logits = paged_decode_step(self.decode_spec, params, self.k, self.v, tokens, positions,
                                                        meta, *_sampling(batch.samplings, B))
        return out, logits

    def pool_bytes(self) -> int:
        """Bytes of every layer's k and v pools."""
        return sum(a.nbytes for a in jax.tree.leaves((self.k, self.v)))

    def compiled_count(self) -> dict[str, int]:
        """Programs traced for this engine's steps (one per token bucket, one per batch bucket)."""
        return {"prefill": TRACES["paged_prefill", self.prefill_spec], "decode": TRACES["paged_decode", self.decode_spec]}
