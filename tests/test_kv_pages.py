"""The host-side page allocator (engine/kv_pages.py): accounting, growth, reuse, determinism,
the arrays a step takes, and its errors."""

import math

import numpy as np
import pytest

from shardlm.engine.kv_pages import PagePool


def test_pages_held_follow_the_tokens_in_flight():
    pool = PagePool(num_pages=64, page_size=16)
    lengths = {"a": 1, "b": 16, "c": 17, "d": 100}
    for seq, n in lengths.items():
        pool.allocate(seq, n)
    assert pool.pages_in_use == sum(math.ceil(n / 16) for n in lengths.values()) == 1 + 1 + 2 + 7
    assert pool.free_pages == 64 - pool.pages_in_use
    # Growing one token at a time adds a page only when a page boundary is crossed.
    added = [len(pool.allocate("b", 1)) for _ in range(20)]
    assert added == [1] + [0] * 15 + [1] + [0] * 3
    assert pool.length("b") == 36 and len(pool.pages("b")) == 3
    lengths["b"] = 36
    assert pool.pages_in_use == sum(math.ceil(n / 16) for n in lengths.values())
    pool.free("d")
    del lengths["d"]
    assert pool.pages_in_use == sum(math.ceil(n / 16) for n in lengths.values())
    assert "d" not in pool and "a" in pool


def test_freed_pages_are_reused_lowest_first_and_runs_agree():
    def run():
        pool = PagePool(num_pages=10, page_size=4)
        pool.allocate(0, 8)  # pages 0, 1
        pool.allocate(1, 5)  # 2, 3
        pool.allocate(2, 4)  # 4
        pool.free(1)
        pool.allocate(3, 9)  # reuses 2, 3, then 5
        pool.allocate(0, 1)  # 6
        return {s: pool.pages(s) for s in (0, 2, 3)}

    first = run()
    assert first == {0: [0, 1, 6], 2: [4], 3: [2, 3, 5]}
    assert run() == first


def test_can_fit_counts_the_partial_last_page():
    pool = PagePool(num_pages=3, page_size=4)
    pool.allocate("a", 6)  # 2 pages, 2 free slots in the second
    assert pool.can_fit(4) and not pool.can_fit(5)  # a new sequence: 1 free page
    assert pool.can_fit(6, "a") and not pool.can_fit(7, "a")  # "a" grows into its own page first
    pool.allocate("a", 6)
    assert pool.free_pages == 0 and pool.can_fit(0) and not pool.can_fit(1)


def test_slot_mapping_and_step_arrays():
    pool = PagePool(num_pages=8, page_size=4)
    pool.allocate("x", 3)  # page 0
    pool.allocate("y", 6)  # pages 1, 2
    pool.allocate("x", 3)  # page 3: x holds pages [0, 3]
    np.testing.assert_array_equal(pool.slot_mapping("x", 0, 6), [0, 1, 2, 3, 12, 13])
    np.testing.assert_array_equal(pool.slot_mapping("y", 3, 3), [7, 8, 9])
    assert pool.slot_mapping("y", 6, 0).shape == (0,)
    table = pool.page_table_array(["y", None, "x"], max_pages=3)
    assert table.dtype == np.int32
    np.testing.assert_array_equal(table, [[1, 2, 0], [0, 0, 0], [0, 3, 0]])
    np.testing.assert_array_equal(pool.page_table_array(["x"], 2, pad=-1), [[0, 3]])
    np.testing.assert_array_equal(pool.lengths_array(["y", None, "x"]), [6, 0, 6])
    # A slot of each position, through the table: page * P + offset.
    slots = pool.slot_mapping("y", 0, 6)
    np.testing.assert_array_equal(slots, table[0, np.arange(6) // 4] * 4 + np.arange(6) % 4)


def test_errors_say_what_is_allowed():
    with pytest.raises(ValueError, match="page size must be >= 1 token, got 0"):
        PagePool(num_pages=4, page_size=0)
    with pytest.raises(ValueError, match=">= 1 page"):
        PagePool(num_pages=0, page_size=16)
    pool = PagePool(num_pages=4, page_size=16)
    with pytest.raises(ValueError, match=r"needs 5 pages of 16 tokens; the pool has 4 pages in all"):
        pool.allocate("long", 65)
    pool.allocate("a", 40)  # 3 pages
    with pytest.raises(ValueError, match=r"needs 2 more pages .* the pool has 1 free of 4"):
        pool.allocate("b", 17)
    assert "b" not in pool and pool.pages_in_use == 3  # nothing half-allocated
    with pytest.raises(ValueError, match="holds no pages"):
        pool.free("b")
    with pytest.raises(ValueError, match=r"holds positions 0\.\.39"):
        pool.slot_mapping("a", 38, 3)
    with pytest.raises(ValueError, match="room for 2"):
        pool.page_table_array(["a"], max_pages=2)
    with pytest.raises(ValueError, match=">= 0"):
        pool.allocate("a", -1)


@pytest.mark.slow
def test_allocator_drives_paged_attention():
    """Pages from the allocator (one freed and reused with stale contents) through write_kv and
    paged_attention: packed prefill, then decode steps that cross page boundaries, equal a plain
    softmax over each sequence's contiguous keys."""
    import jax.numpy as jnp

    from shardlm.models.paged_attention import paged_attention, write_kv

    rng = np.random.default_rng(0)
    P, K, N, H = 4, 2, 4, 8
    pool = PagePool(num_pages=16, page_size=P)
    k_pages = v_pages = jnp.zeros((16, P, K, H), jnp.float32)
    keys, values = {}, {}

    def step(tokens):  # tokens: [(seq, n new)] -> attention output per seq [n, N, H]
        nonlocal k_pages, v_pages
        seqs, slots, pos, ids = sorted({s for s, _ in tokens}), [], [], []
        for s, n in tokens:
            start = pool.length(s) if s in pool else 0
            pool.allocate(s, n)
            slots.append(pool.slot_mapping(s, start, n))
            pos.append(np.arange(start, start + n))
            ids += [seqs.index(s)] * n
            keys[s] = np.concatenate([keys.get(s, np.zeros((0, K, H))), rng.standard_normal((n, K, H))])
            values[s] = np.concatenate([values.get(s, np.zeros((0, K, H))), rng.standard_normal((n, K, H))])
        k = np.concatenate([keys[s][-n:] for s, n in tokens])
        v = np.concatenate([values[s][-n:] for s, n in tokens])
        k_pages, v_pages = write_kv(k_pages, v_pages, jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
                                    jnp.asarray(np.concatenate(slots)))
        q = rng.standard_normal((len(ids), N, H))
        out = paged_attention(jnp.asarray(q, jnp.float32), k_pages, v_pages, jnp.asarray(pool.page_table_array(seqs, 8)),
                              jnp.asarray(pool.lengths_array(seqs)), jnp.asarray(np.concatenate(pos), jnp.int32),
                              jnp.asarray(ids, jnp.int32))
        # The reference: query at position p of s over keys[s][:p + 1], heads n reading kv head n // (N // K).
        p_all, ids = np.concatenate(pos), np.asarray(ids)
        for t in range(len(ids)):
            s = seqs[ids[t]]
            kk, vv = (np.repeat(a[:p_all[t] + 1], N // K, axis=1) for a in (keys[s], values[s]))
            w = np.einsum("nh,snh->ns", q[t], kk) / np.sqrt(H)
            w = np.exp(w - w.max(-1, keepdims=True))
            want = np.einsum("ns,snh->nh", w / w.sum(-1, keepdims=True), vv)
            assert np.max(np.abs(np.asarray(out[t]) - want)) < 1e-5

    step([("a", 6), ("b", 9), ("c", 3)])
    pool.free("b")  # its pages keep b's keys; the next sequence takes them over
    del keys["b"], values["b"]
    step([("d", 10), ("a", 1), ("c", 1)])
    for _ in range(3):
        step([("a", 1), ("c", 1), ("d", 1)])
    assert pool.pages_in_use == sum(math.ceil(pool.length(s) / P) for s in "acd")
