"""Paged attention (models/paged_attention.py) against a dense reference: a plain float64 softmax
over each sequence's contiguous keys. Pools are filled in shuffled, non-contiguous pages, with
large garbage in every slot a sequence does not own, so a read outside a sequence's pages or past
its length shows up in the result."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shardlm.models import quant
from shardlm.models.config import ModelConfig
from shardlm.models.kv_views import DenseKV
from shardlm.models.llama import Attention, apply_rope, rope_frequencies
from shardlm.models.paged_attention import paged_attention, write_kv

H = 8
ATOL = 1e-5


def _layout(rng, lens, P, spare=3):
    """Page tables [B, max_pages] (shuffled page ids; unused entries point at other sequences'
    pages) and num_pages for sequences of `lens` tokens."""
    need = [math.ceil(n / P) for n in lens]
    num_pages = sum(need) + spare
    ids = iter(rng.permutation(num_pages))
    max_pages = max(need) + 1
    tables = rng.integers(0, num_pages, (len(lens), max_pages)).astype(np.int32)
    for b, n in enumerate(need):
        tables[b, :n] = [next(ids) for _ in range(n)]
    return tables, num_pages


def _slots(tables, P, b, positions):
    positions = np.asarray(positions)
    return tables[b, positions // P] * P + positions % P


def _pool(rng, lens, P, K, h=H):
    """Contiguous keys/values per sequence k, v [B, S, K, h] and a pool holding them."""
    tables, num_pages = _layout(rng, lens, P)
    S = max(lens)
    k, v = (rng.standard_normal((len(lens), S, K, h)).astype(np.float32) for _ in range(2))
    k_pages, v_pages = (1e3 * rng.standard_normal((num_pages * P, K, h)).astype(np.float32) for _ in range(2))
    for b, n in enumerate(lens):
        s = _slots(tables, P, b, np.arange(n))
        k_pages[s], v_pages[s] = k[b, :n], v[b, :n]
    shape = (num_pages, P, K, h)
    return jnp.asarray(k_pages.reshape(shape)), jnp.asarray(v_pages.reshape(shape)), jnp.asarray(tables), k, v


def _reference(q, k, v, limit, scale=H**-0.5):
    """q [T, N, H] over contiguous k, v [S, K, H]; query t sees keys 0..limit[t]-1 (float64)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    G = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)  # [S, N, H]: head n reads kv head n // G
    out = np.zeros_like(q)
    for t, n in enumerate(limit):
        if n <= 0:
            continue
        s = np.einsum("nh,snh->ns", q[t], k[:n]) * scale
        p = np.exp(s - s.max(-1, keepdims=True))
        out[t] = np.einsum("ns,snh->nh", p / p.sum(-1, keepdims=True), v[:n])
    return out


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)))


attend = jax.jit(paged_attention, static_argnames=("scale", "pages_per_block", "query_block"))
HEADS = [(4, 1), (4, 4), (6, 2)]  # (N, K): MQA, MHA, GQA


@pytest.mark.parametrize("P", [1, 16, 64])
@pytest.mark.parametrize("N,K", HEADS)
def test_decode_equals_dense_reference(P, N, K):
    rng = np.random.default_rng(P * 10 + K)
    lens = [1, P, P + 1, 3 * P + 5, 130, 2]  # within one page, at and across page boundaries, ragged
    k_pages, v_pages, tables, k, v = _pool(rng, lens, P, K)
    q = rng.standard_normal((len(lens), 1, N, H)).astype(np.float32)
    out = attend(jnp.asarray(q), k_pages, v_pages, tables, jnp.asarray(lens, jnp.int32))
    assert out.shape == q.shape and out.dtype == jnp.float32
    for b, n in enumerate(lens):
        assert _max_err(out[b], _reference(q[b], k[b], v[b], [n])) < ATOL


@pytest.mark.parametrize("pages_per_block", [1, 3, 8, 100])
def test_pages_per_block_changes_nothing(pages_per_block):
    rng = np.random.default_rng(1)
    lens = [5, 40, 97]
    k_pages, v_pages, tables, k, v = _pool(rng, lens, 8, 2)
    q = rng.standard_normal((3, 1, 4, H)).astype(np.float32)
    out = attend(jnp.asarray(q), k_pages, v_pages, tables, jnp.asarray(lens, jnp.int32),
                 pages_per_block=pages_per_block)
    for b, n in enumerate(lens):
        assert _max_err(out[b], _reference(q[b], k[b], v[b], [n])) < ATOL


def test_rows_of_several_queries_are_causal():
    """q [B, T, N, H]: the last T tokens of each sequence, each seeing positions up to its own."""
    rng = np.random.default_rng(2)
    lens, T, P = [6, 33, 70], 6, 16
    k_pages, v_pages, tables, k, v = _pool(rng, lens, P, 2)
    q = rng.standard_normal((3, T, 6, H)).astype(np.float32)
    pos = np.array([[n - T + t for t in range(T)] for n in lens], np.int32)
    out = attend(jnp.asarray(q), k_pages, v_pages, tables, jnp.asarray(lens, jnp.int32), jnp.asarray(pos))
    for b in range(3):
        assert _max_err(out[b], _reference(q[b], k[b], v[b], pos[b] + 1)) < ATOL


@pytest.mark.parametrize("P", [4, 16])
def test_query_blocks_equal_per_token_rows(P):
    """Prompts laid out from multiples of Q = 8 tokens (padding between them), seq_ids per block:
    the same outputs as naming each token's sequence (query_block 1), padding gives 0."""
    rng = np.random.default_rng(11 + P)
    N, K, Q = 4, 2, 8
    context, new = [0, 20, 5], [7, 17, 8]
    lens = [c + n for c, n in zip(context, new)]
    k_pages, v_pages, tables, k, v = _pool(rng, lens, P, K)
    blocks = [-(-n // Q) for n in new] + [1]  # a last all-padding block
    T = Q * sum(blocks)
    seq_ids, pos, block_seq, at = np.full(T, -1, np.int32), np.full(T, -1, np.int32), [], 0
    for b, n in enumerate(new):
        seq_ids[at:at + n], pos[at:at + n] = b, context[b] + np.arange(n)
        block_seq += [b] * blocks[b]
        at += Q * blocks[b]
    block_seq = np.asarray(block_seq + [-1], np.int32)
    q = jnp.asarray(rng.standard_normal((T, N, H)).astype(np.float32))
    kv_lens = jnp.asarray(lens, jnp.int32)
    per_token = np.asarray(attend(q, k_pages, v_pages, tables, kv_lens, jnp.asarray(pos), jnp.asarray(seq_ids)))
    blocked = np.asarray(attend(q, k_pages, v_pages, tables, kv_lens, jnp.asarray(pos), jnp.asarray(block_seq),
                                query_block=Q))
    assert np.all(blocked[pos < 0] == 0) and np.abs(blocked).max() > 0
    assert _max_err(blocked, per_token) < ATOL
    for b in range(3):
        mine = seq_ids == b
        assert _max_err(blocked[mine], _reference(np.asarray(q)[mine], k[b], v[b], pos[mine] + 1)) < ATOL
    with pytest.raises(ValueError, match="needs seq_ids"):
        paged_attention(q, k_pages, v_pages, tables, kv_lens, jnp.asarray(pos), jnp.asarray(seq_ids), query_block=Q)


@pytest.mark.parametrize("P", [1, 16, 64])
@pytest.mark.slow
def test_packed_prefill_equals_each_sequence_alone(P):
    """Several prompts (some after a cached context: chunked prefill) in one flat row with padding
    tokens: each token equals the reference and attending its sequence alone; padding gives 0."""
    rng = np.random.default_rng(3 + P)
    N, K = 4, 2
    context, new = [0, 20, 0, 65, 3], [7, 30, 1, 12, 50]
    lens = [c + n for c, n in zip(context, new)]
    k_pages, v_pages, tables, k, v = _pool(rng, lens, P, K)
    order = [3, 0, 4, 1, 2]  # the row need not follow page-table order
    seq_ids = np.concatenate([[b] * new[b] for b in order] + [[-1] * 9]).astype(np.int32)
    pos = np.concatenate([context[b] + np.arange(new[b]) for b in order] + [[-1] * 9]).astype(np.int32)
    seq_ids[-3:] = 1  # padding may also carry a real sequence id with position -1
    q = rng.standard_normal((len(seq_ids), N, H)).astype(np.float32)
    kv_lens = jnp.asarray(lens, jnp.int32)
    out = np.asarray(attend(jnp.asarray(q), k_pages, v_pages, tables, kv_lens, jnp.asarray(pos), jnp.asarray(seq_ids)))
    assert np.all(out[pos < 0] == 0)
    for b in range(len(lens)):
        mine = (seq_ids == b) & (pos >= 0)
        assert _max_err(out[mine], _reference(q[mine], k[b], v[b], pos[mine] + 1)) < ATOL
        alone = attend(jnp.asarray(q[mine][None]), k_pages, v_pages, tables[b:b + 1], kv_lens[b:b + 1],
                       jnp.asarray(pos[mine][None]))
        assert _max_err(out[mine], np.asarray(alone[0], np.float64)) < ATOL


def test_write_kv_scatters_and_drops_padding():
    rng = np.random.default_rng(4)
    P, K, num_pages = 4, 2, 6
    k_pages = jnp.asarray(rng.standard_normal((num_pages, P, K, H)), jnp.float32)
    v_pages = jnp.asarray(rng.standard_normal((num_pages, P, K, H)), jnp.float32)
    slots = np.array([5, 22, -1, 0, num_pages * P, 13, -7], np.int32)  # -1, -7 and an out-of-range slot
    k, v = (rng.standard_normal((len(slots), K, H)).astype(np.float32) for _ in range(2))
    nk, nv = jax.jit(write_kv)(k_pages, v_pages, jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots))
    want_k = np.asarray(k_pages).reshape(-1, K, H).copy()
    want_v = np.asarray(v_pages).reshape(-1, K, H).copy()
    ok = (slots >= 0) & (slots < num_pages * P)
    want_k[slots[ok]], want_v[slots[ok]] = k[ok], v[ok]
    np.testing.assert_array_equal(np.asarray(nk).reshape(-1, K, H), want_k)
    np.testing.assert_array_equal(np.asarray(nv).reshape(-1, K, H), want_v)


def _write_sequences(rng, lens, P, K, int8):
    """A pool written by write_kv from contiguous k, v (one flat row of every sequence's tokens)."""
    tables, num_pages = _layout(rng, lens, P)
    k, v = (rng.standard_normal((len(lens), max(lens), K, H)).astype(np.float32) for _ in range(2))
    slots = np.concatenate([_slots(tables, P, b, np.arange(n)) for b, n in enumerate(lens)]).astype(np.int32)
    flat_k = np.concatenate([k[b, :n] for b, n in enumerate(lens)])
    flat_v = np.concatenate([v[b, :n] for b, n in enumerate(lens)])
    shape = (num_pages, P, K, H)
    if int8:
        pages = lambda: quant.QuantizedKV(jnp.zeros(shape, jnp.int8), jnp.ones(shape[:3] + (1,), jnp.float32))  # noqa: E731
    else:
        pages = lambda: jnp.asarray(1e3 * rng.standard_normal(shape), jnp.float32)  # noqa: E731
    k_pages, v_pages = jax.jit(write_kv)(pages(), pages(), jnp.asarray(flat_k), jnp.asarray(flat_v), jnp.asarray(slots))
    return k_pages, v_pages, jnp.asarray(tables), k, v


@pytest.mark.parametrize("int8", [False, True])
def test_written_pool_decodes_like_reference(int8):
    """write_kv then decode; an int8 pool equals the reference over its own dequantized values."""
    rng = np.random.default_rng(5)
    lens, P, K, N = [3, 16, 17, 50], 16, 2, 4
    k_pages, v_pages, tables, k, v = _write_sequences(rng, lens, P, K, int8)
    if int8:
        dq = lambda x: np.asarray(x.values, np.float32) * np.asarray(x.scale)  # noqa: E731
        k = np.stack([np.asarray(dq(quant.quantize_kv(jnp.asarray(kb)))) for kb in k])
        v = np.stack([np.asarray(dq(quant.quantize_kv(jnp.asarray(vb)))) for vb in v])
    q = rng.standard_normal((len(lens), 1, N, H)).astype(np.float32)
    out = attend(jnp.asarray(q), k_pages, v_pages, tables, jnp.asarray(lens, jnp.int32))
    for b, n in enumerate(lens):
        assert _max_err(out[b], _reference(q[b], k[b], v[b], [n])) < ATOL


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("P,shared,pages_per_block", [(4, 5, 3), (16, 2, None), (16, 0, None), (8, 40, 2)])
def test_shared_prefix_read_once_equals_row_by_row(int8, P, shared, pages_per_block):
    """Rows whose first `shared` pages are the same pages (a cached prefix) read them once for the
    batch (cascade): the same output as reading them row by row, and as the reference."""
    rng = np.random.default_rng(P + shared)
    K, N, S0 = 2, 4, shared * P
    lens = [S0 + 3, S0 + P, S0 + 2 * P + 1, 0, S0 + 1]  # row 3: padding
    tables, num_pages = _layout(rng, [max(n, 1) for n in lens], P)
    tables[:, :shared] = tables[0, :shared]  # every row's prefix lives in row 0's pages
    k, v = (rng.standard_normal((len(lens), max(lens), K, H)).astype(np.float32) for _ in range(2))
    k[:, :S0], v[:, :S0] = k[0, :S0], v[0, :S0]
    rows = [(b, np.arange(0 if b == 0 else S0, n)) for b, n in enumerate(lens)]
    slots = np.concatenate([_slots(tables, P, b, pos) for b, pos in rows]).astype(np.int32)
    shape = (num_pages, P, K, H)
    if int8:
        pages = lambda: quant.QuantizedKV(jnp.zeros(shape, jnp.int8), jnp.ones(shape[:3] + (1,), jnp.float32))  # noqa: E731
    else:
        pages = lambda: jnp.asarray(1e3 * rng.standard_normal(shape), jnp.float32)  # noqa: E731
    k_pages, v_pages = jax.jit(write_kv)(pages(), pages(), jnp.asarray(np.concatenate([k[b, p] for b, p in rows])),
                                         jnp.asarray(np.concatenate([v[b, p] for b, p in rows])), jnp.asarray(slots))
    q = jnp.asarray(rng.standard_normal((len(lens), 1, N, H)).astype(np.float32))
    args = (q, k_pages, v_pages, jnp.asarray(tables), jnp.asarray(lens, jnp.int32))
    from shardlm.engine.paged_engine import shared_prefix_pages

    live = [b for b, n in enumerate(lens) if n]
    assert shared_prefix_pages(tables[live], np.asarray(lens)[live], P) == shared
    once = attend(*args, shared_pages=jnp.int32(shared), pages_per_block=pages_per_block)
    by_row = attend(*args, pages_per_block=pages_per_block)
    assert _max_err(once, np.asarray(by_row)) < ATOL and not np.asarray(once[3]).any()
    if not int8:
        for b, n in enumerate(lens):
            assert _max_err(once[b], _reference(q[b], k[b], v[b], [n])) < ATOL


@pytest.mark.parametrize("int8_kv", [False, True])
@pytest.mark.slow
def test_equals_the_models_dense_attention(int8_kv):
    """models/llama.py's Attention (dense cache [B, S, K, H]) on a random tiny config: a prefill of
    ragged prompts, packed, then one decode step, equal the same steps over a paged pool."""
    cfg = ModelConfig("tiny", vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=H, d_ff=64,
                      max_seq_len=64)
    attn = Attention(cfg, jnp.float32, nnx.Rngs(0))

    @jax.jit
    def model_step(x, pos, k, v):
        out, kv = attn(x, pos, DenseKV(k, v))
        return out, kv.k, kv.v

    rng = np.random.default_rng(6)
    B, T, S, P, K = 3, 24, 64, 16, cfg.n_kv_heads
    lens = [24, 5, 17]  # prompt lengths; the model's rows are padded to T
    shape = (B, S, K, H)
    dense = (lambda: quant.QuantizedKV(jnp.zeros(shape, jnp.int8), jnp.ones(shape[:3] + (1,)))) if int8_kv else (
        lambda: jnp.zeros(shape))
    x = jnp.asarray(rng.standard_normal((B, T, cfg.d_model)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    want, k_cache, v_cache = model_step(x, positions, dense(), dense())
    x_next = jnp.asarray(rng.standard_normal((B, 1, cfg.d_model)), jnp.float32)
    next_pos = jnp.asarray(lens, jnp.int32)[:, None]
    want_next, _, _ = model_step(x_next, next_pos, k_cache, v_cache)

    tables, num_pages = _layout(rng, [n + 1 for n in lens], P)
    pool_shape = (num_pages, P, K, H)
    empty = (lambda: quant.QuantizedKV(jnp.zeros(pool_shape, jnp.int8), jnp.ones(pool_shape[:3] + (1,)))) if int8_kv else (
        lambda: jnp.zeros(pool_shape))
    inv_freq = rope_frequencies(cfg)

    @jax.jit
    def project(x, pos):  # x [T_total, D], pos [T_total] -> q [T_total, N, H], k, v [T_total, K, H]
        q = apply_rope(jnp.einsum("td,dnh->tnh", x, attn.q[...])[None], pos[None], inv_freq)[0]
        k = apply_rope(jnp.einsum("td,dkh->tkh", x, attn.k[...])[None], pos[None], inv_freq)[0]
        return q, k, jnp.einsum("td,dkh->tkh", x, attn.v[...])

    def step(x, pos, seq_ids, pools, kv_lens, packed):  # x [T_total, D], pos, seq_ids [T_total]
        q, k, v = project(x, pos)
        slots = np.concatenate([_slots(tables, P, b, [p]) for b, p in zip(seq_ids, pos)]).astype(np.int32)
        pools = jax.jit(write_kv)(*pools, k, v, jnp.asarray(slots))
        kv_lens = jnp.asarray(kv_lens, jnp.int32)
        if packed:
            out = attend(q, *pools, jnp.asarray(tables), kv_lens, pos, jnp.asarray(seq_ids))
        else:  # decode: one row per sequence
            out = attend(q[:, None], *pools, jnp.asarray(tables), kv_lens)[:, 0]
        return jnp.einsum("tnh,nhd->td", out, attn.o[...]), pools

    seq_ids = np.concatenate([[b] * n for b, n in enumerate(lens)]).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lens]).astype(np.int32)
    flat_x = jnp.concatenate([x[b, :n] for b, n in enumerate(lens)])
    got, pools = step(flat_x, jnp.asarray(pos), seq_ids, (empty(), empty()), lens, packed=True)
    want_flat = np.concatenate([np.asarray(want[b, :n]) for b, n in enumerate(lens)])
    assert _max_err(got, want_flat) < ATOL
    got_next, _ = step(x_next[:, 0], next_pos[:, 0], np.arange(B), pools, [n + 1 for n in lens], packed=False)
    assert _max_err(got_next, np.asarray(want_next[:, 0])) < ATOL


def _decode_case(seed, N, K, h, P=16, lens=(20, 50, 3), bf16_pages=False):
    """A decode case for the kernels, and our output: they take pools [K, num_pages, P, h] (ours
    transposed), a fixed pages-per-sequence (a multiple of their compute block) and no softmax
    scale (q comes pre-scaled)."""
    rng = np.random.default_rng(seed)
    k_pages, v_pages, tables, _, _ = _pool(rng, list(lens), P, K, h)
    if bf16_pages:
        k_pages, v_pages = (p.astype(jnp.bfloat16).astype(jnp.float32) for p in (k_pages, v_pages))
    tables = jnp.pad(tables, ((0, 0), (0, 8 - tables.shape[1])))
    q = jnp.asarray(rng.standard_normal((len(lens), N, h)), jnp.float32)
    lens = jnp.asarray(lens, jnp.int32)
    ours = np.asarray(attend(q[:, None], k_pages, v_pages, tables, lens)[:, 0], np.float64)
    heads_major = lambda p: jnp.transpose(p, (2, 0, 1, 3))  # noqa: E731
    return (q * h**-0.5, heads_major(k_pages), heads_major(v_pages), tables, lens), ours


def test_pallas_gpu_paged_attention_interpreted_matches():
    """jax's Pallas GPU paged attention, in interpret mode on CPU, equals the portable path."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as gpu_paged_attention

    (q, k_pages, v_pages, tables, lens), ours = _decode_case(7, N=16, K=2, h=64)
    theirs = gpu_paged_attention(q, k_pages, v_pages, tables, lens, block_h=16, pages_per_compute_block=2, k_splits=1,
                                 interpret=True)
    assert _max_err(theirs, ours) < ATOL


def test_pallas_tpu_paged_attention_interpreted_matches():
    """jax's Pallas TPU paged attention, in TPU interpret mode on CPU, equals the portable path. The
    kernel reads every page as bfloat16, so the pool is made of bfloat16 values here."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_paged_attention

    (q, k_pages, v_pages, tables, lens), ours = _decode_case(8, N=8, K=2, h=128, bf16_pages=True)
    with pltpu.force_tpu_interpret_mode():
        theirs = tpu_paged_attention(q, k_pages, v_pages, lens, tables, pages_per_compute_block=2)
    assert _max_err(theirs, ours) < ATOL
