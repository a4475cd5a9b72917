"""Attention over a paged KV pool: the portable pure-JAX path (CPU, GPU, TPU).

One pool per layer holds every sequence's keys and values in fixed-size pages:
k_pages, v_pages [num_pages, P, K, H] (an int8 pool: pairs of int8 [num_pages, P, K, H] and
scale [num_pages, P, K, 1], one scale per token and head as in models/quant.py). A sequence owns
the pages listed in its row of `page_tables` [B, max_pages] int32; its token at position j lives
in page page_tables[b, j // P] at offset j % P, i.e. flat slot page * P + j % P. `kv_lens` [B]
int32 counts the tokens each sequence holds. engine/kv_pages.py allocates pages and builds the
tables and slot mappings on the host.

A step that uses it, per layer: `write_kv` scatters the step's new keys/values (every token of
the step in one flat row, padding tokens at slot -1) into their slots, then `paged_attention`
reads them back with kv_lens counting the new tokens too:
- decode: q [B, 1, N, H], row b is sequence b; optionally q [B, T, N, H] with q_positions [B, T]
  (causal over positions).
- packed prefill (and prefill chunks after a cached context): q [T_total, N, H] flat, with
  q_positions [T_total] and seq_ids naming each token's page-table row (-1 for padding); a token
  at position p of sequence s sees that sequence's positions 0..p only. With `query_block` Q > 1,
  seq_ids [T_total / Q] names the row of each run of Q consecutive tokens (the caller lays each
  prompt out from a multiple of Q), and each run reads its sequence's pages once for all Q.

The kernel walks the pages in blocks of `pages_per_block` pages with an online (running max and
sum) softmax in float32, for as many blocks as the longest live sequence of the step needs; so a
step's cost grows with the live lengths, never with max_pages * P, and no [B, S] score matrix over
a dense cache is formed. Grouped-query attention: query head n reads kv head n // G, G = N / K.
Decode and [B, T] rows gather their pages once per row, packed queries once per query block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shardlm.models import quant

# Logical axes of one layer's pool [num_pages, P, K, H]: split by kv heads like the dense cache.
KV_PAGES_AXES = ("kv_pages", "page_slot", "attn_kv_heads", "head_dim")

# Keys read per loop step by default: 256 tokens' worth of pages, and on CPU at most as many as
# keep one block of every row's keys within ~1.5 MiB, about a core's L2 cache. Measured on 2 cores
# with SmolLM2: a decode step of 64 rows over 150 live tokens 290 ms against 332 in blocks of 256
# tokens (12 MiB), a packed prefill of 512 tokens 860 ms against 1012; 8 rows already fit.
BLOCK_TOKENS, CPU_BLOCK_BYTES = 256, 3 << 19
SHARED_BLOCK_TOKENS = 64


def default_pages_per_block(rows: int, page_size: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    ppb = max(1, BLOCK_TOKENS // page_size)
    if jax.default_backend() == "cpu":
        ppb = min(ppb, max(1, CPU_BLOCK_BYTES // (rows * page_size * kv_heads * head_dim * itemsize)))
    return ppb


def _values(pages):
    """(values [num_pages, P, K, H], scale [num_pages, P, K, 1] or None) of a float or int8 pool."""
    return (pages.values, pages.scale) if isinstance(pages, quant.QuantizedKV) else (pages, None)


def write_kv(k_pages, v_pages, k, v, slot_mapping):
    """k, v [T_total, K, H] written at flat slots `slot_mapping` [T_total] (page * P + offset).

    A slot outside [0, num_pages * P) (padding tokens carry -1) writes nothing. An int8 pool gets
    the new keys/values quantized per token and head. Returns (k_pages, v_pages)."""

    def write(pages, new):
        if isinstance(pages, quant.QuantizedKV):  # int8 values and their scales
            q = quant.quantize_kv(new)
            return quant.QuantizedKV(write(pages.values, q.values), write(pages.scale, q.scale))
        num_pages, P = pages.shape[:2]
        # Indexed by (page, offset): a write through a flat [num_pages * P] view made XLA:CPU copy
        # the whole pool every step. A page past the pool (padding) writes nothing.
        inside = (slot_mapping >= 0) & (slot_mapping < num_pages * P)
        page = jnp.where(inside, slot_mapping // P, num_pages)
        return pages.at[page, slot_mapping % P].set(new.astype(pages.dtype), mode="drop")

    return write(k_pages, k), write(v_pages, v)


def paged_attention(q, k_pages, v_pages, page_tables, kv_lens, q_positions=None, seq_ids=None, shared_pages=None, *,
                    scale: float | None = None, pages_per_block: int | None = None, query_block: int = 1,
                    window: int = 0, softcap: float = 0.0):
    """Attention of q over the pool; returns q's shape and dtype.

    q [B, T, N, H] (row b reads page_tables[b]) with q_positions [B, T], which may be omitted for
    decode (T = 1: each row sees all kv_lens[b] tokens); or q [T_total, N, H] with q_positions
    [T_total] and seq_ids [T_total / query_block] (packed). page_tables [B, max_pages] int32,
    kv_lens [B] int32. A query with seq_id < 0 or position < 0 sees nothing and returns zeros.
    `scale` defaults to H**-0.5; `pages_per_block` (static) is the number of pages read per loop
    step, default `default_pages_per_block`. `shared_pages` (q [B, T, N, H] only; int32 scalar): the
    first shared_pages pages are the same full pages in every row that holds tokens (a prefix they
    share); they are read once for all rows (cascade attention), the rest row by row.
    `window` (static) W > 0: a query at position p sees only positions p - W < j <= p (a sliding-window
    layer), and the pages before every query's window are not read; the shared pages are then read
    row by row like the rest. `softcap` (static) c > 0: scores -> c * tanh(scores / c) before the mask.
    """
    packed = q.ndim == 3
    if packed:
        T_total, N, H = q.shape
        if seq_ids is None or q_positions is None:
            raise ValueError("packed q [T_total, N, H] needs seq_ids and q_positions")
        if T_total % query_block or seq_ids.shape != (T_total // query_block,):
            raise ValueError(f"packed q of {T_total} tokens in query blocks of {query_block} needs seq_ids "
                             f"[{T_total / query_block:g}], got {seq_ids.shape}")
        rows = q.reshape(T_total // query_block, query_block, N, H)  # [R, Q, N, H]: one row per query block
        row_seq, pos = seq_ids.astype(jnp.int32), q_positions.reshape(rows.shape[:2]).astype(jnp.int32)
    else:
        if seq_ids is not None:
            raise ValueError("seq_ids is for packed q [T_total, N, H]; q [B, T, N, H] row b is sequence b")
        if shared_pages is not None and packed:
            raise ValueError("shared_pages is for q [B, T, N, H]")
        rows, row_seq = q, jnp.arange(q.shape[0], dtype=jnp.int32)  # [R = B, T, N, H]
        if q_positions is None:
            if q.shape[1] != 1:
                raise ValueError(f"q of shape {q.shape} (T > 1) needs q_positions [B, T]")
            pos = kv_lens[:, None].astype(jnp.int32) - 1
        else:
            pos = q_positions.astype(jnp.int32)
    out = _attend(rows, k_pages, v_pages, page_tables, kv_lens, row_seq, pos,
                  q.shape[-1] ** -0.5 if scale is None else scale, pages_per_block, shared_pages, window, softcap)
    return out.reshape(q.shape) if packed else out


def _attend(q, k_pages, v_pages, page_tables, kv_lens, row_seq, pos, scale, pages_per_block, shared_pages=None,
            window=0, softcap=0.0):
    """q [R, T, N, H] with row_seq [R] (page-table row of each query row) and pos [R, T]; the first
    shared_pages pages of page_tables[0] (the same in every row holding tokens) read once for all
    (not under a window, whose rows read only their windows' pages)."""
    R, T, N, H = q.shape
    k_vals, _ = _values(k_pages)
    num_pages, P, K, _ = k_vals.shape
    G = N // K
    B, max_pages = page_tables.shape
    ppb = max(1, min(pages_per_block or default_pages_per_block(R, P, K, H, k_vals.dtype.itemsize), max_pages))
    S_blk = ppb * P  # keys per loop step

    valid_row = (row_seq >= 0) & (row_seq < B)
    seq = jnp.clip(row_seq, 0, B - 1)
    tables = jnp.clip(page_tables[seq], 0, num_pages - 1)  # [R, max_pages]
    # Room for a block starting at any page: the row loop may start after the shared pages.
    tables = jnp.pad(tables, ((0, 0), (0, ppb)))
    lens = jnp.where(valid_row, kv_lens[seq], 0)  # [R]
    # Keys visible to query (r, t): positions j < lens[r] and j <= pos[r, t].
    limit = jnp.minimum(pos + 1, lens[:, None])  # [R, T]
    n_live = jnp.max(limit, initial=0)
    if window:  # and positions j > pos[r, t] - window
        first = jnp.maximum(pos - window + 1, 0)  # [R, T]
        live = limit > first
        # the first page any query's window reaches: the row loop starts there
        first_page = jnp.min(jnp.where(live, first, n_live), initial=n_live) // P
    qg = q.reshape(R, T, K, G, H)

    def update(carry, kb, ks, vb, vs, j, spec):
        """The online softmax over one block of keys kb/vb (spec "rskh": a block per row, "skh": one
        block for every row) at positions j [S]."""
        m, denom, acc = carry  # [R, K, G, T], [R, K, G, T], [R, K, G, T, H] float32
        s = jnp.einsum(f"rtkgh,{spec}->rkgts", qg, kb.astype(q.dtype), preferred_element_type=jnp.float32)
        scales = lambda x: jnp.moveaxis(x[..., 0], -1, -2)[..., :, None, None, :]  # noqa: E731 - [.., K, 1, 1, S]
        if ks is not None:  # per-(token, head) scales factor out of the sum over H
            s = s * scales(ks)
        s = s * scale
        if softcap:
            s = softcap * jnp.tanh(s / softcap)
        visible = j[None, None, :] < limit[:, :, None]  # [R, T, S]
        if window:
            visible &= j[None, None, :] >= first[:, :, None]
        s = jnp.where(visible[:, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing visible yet
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[..., None])  # [R, K, G, T, S]; masked keys give exactly 0
        denom = alpha * denom + jnp.sum(p, axis=-1)
        if vs is not None:  # and out of the sum over S, as weights on the probabilities
            p = p * scales(vs)
        pv_dtype = q.dtype if vs is not None else vb.dtype
        pv = jnp.einsum(f"rkgts,{spec}->rkgth", p.astype(pv_dtype), vb.astype(pv_dtype),
                        preferred_element_type=jnp.float32)
        return m_new, denom, alpha[..., None] * acc + pv

    def blocks(ids):  # ids [..., n] -> ((k, k scale), (v, v scale)) [..., n * P, K, h]
        def gather(pages):
            return pages[ids].reshape(ids.shape[:-1] + (ids.shape[-1] * P,) + pages.shape[2:])
        return (jax.tree.map(gather, _values(x)) for x in (k_pages, v_pages))

    carry = (jnp.full((R, K, G, T), -jnp.inf, jnp.float32), jnp.zeros((R, K, G, T), jnp.float32),
             jnp.zeros((R, K, G, T, H), jnp.float32))
    start = first_page if window else 0  # the first page the row loop reads
    if shared_pages is not None and not window:
        # One gather per block for all rows, and a [R * G, H] x [H, S] product per kv head; blocks of
        # SHARED_BLOCK_TOKENS, so a short shared prefix (a chat template's system line) costs little.
        sppb = max(1, SHARED_BLOCK_TOKENS // P)
        shared = jnp.pad(tables[0], (0, sppb))
        start = jnp.clip(shared_pages.astype(jnp.int32), 0, max_pages)

        def shared_body(i, carry):
            (kb, ks), (vb, vs) = blocks(jax.lax.dynamic_slice_in_dim(shared, i * sppb, sppb))
            j = i * sppb * P + jnp.arange(sppb * P)
            j = jnp.where(j < start * P, j, jnp.iinfo(jnp.int32).max)  # past the shared pages: the rows' own
            return update(carry, kb, ks, vb, vs, j, "skh")

        carry = jax.lax.fori_loop(0, (start + sppb - 1) // sppb, shared_body, carry)

    def body(i, carry):
        first = start + i * ppb
        (kb, ks), (vb, vs) = blocks(jax.lax.dynamic_slice_in_dim(tables, first, ppb, axis=1))  # [R, S_blk, ..]
        return update(carry, kb, ks, vb, vs, first * P + jnp.arange(S_blk), "rskh")

    n_blocks = jnp.maximum(n_live - start * P + S_blk - 1, 0) // S_blk
    _, denom, acc = jax.lax.fori_loop(0, n_blocks, body, carry)
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]  # nothing visible -> zeros
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(R, T, N, H).astype(q.dtype)
