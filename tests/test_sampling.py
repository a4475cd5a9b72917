"""The per-row sampler on known logit vectors: validation, greedy, top-k, top-p, temperature, keys.

Distributions are checked empirically: N draws of one logit row are one batch of N identical rows
with N different keys (the sampler is per row), compared with the softmax the filters should leave.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shardlm.engine.sampling import SamplingParams, filtered_logits, row_keys, sample

sample_jit = jax.jit(sample)


def draws(logits_row, n, *, temperature=1.0, top_k=0, top_p=1.0, seed=0) -> np.ndarray:
    """n tokens sampled from one logit row, with the engine's keys for positions 0..n-1."""
    logits = jnp.broadcast_to(jnp.asarray(logits_row, jnp.float32), (n, len(logits_row)))
    keys = row_keys(jnp.full((n,), seed, jnp.int32), jnp.arange(n, dtype=jnp.int32))
    tokens = sample_jit(logits, jnp.full((n,), temperature, jnp.float32), jnp.full((n,), top_k, jnp.int32),
                        jnp.full((n,), top_p, jnp.float32), keys)
    return np.asarray(tokens)


def freqs(tokens: np.ndarray, V: int) -> np.ndarray:
    return np.bincount(tokens, minlength=V) / len(tokens)


def softmax(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


# ----- SamplingParams -----


@pytest.mark.parametrize("kwargs, field, allowed", [
    ({"max_new_tokens": 0}, "max_new_tokens", ">= 1"),
    ({"max_new_tokens": -3}, "max_new_tokens", ">= 1"),
    ({"max_new_tokens": 2.5}, "max_new_tokens", ">= 1"),
    ({"temperature": -0.1}, "temperature", ">= 0"),
    ({"temperature": float("nan")}, "temperature", ">= 0"),
    ({"top_p": 0.0}, "top_p", "(0, 1]"),
    ({"top_p": -0.5}, "top_p", "(0, 1]"),
    ({"top_p": 1.5}, "top_p", "(0, 1]"),
    ({"top_p": float("nan")}, "top_p", "(0, 1]"),
    ({"top_k": -1}, "top_k", ">= 0"),
    ({"top_k": 2.0}, "top_k", ">= 0"),
    ({"seed": 1.5}, "seed", "integer"),
    ({"seed": 2**31}, "seed", "32-bit"),  # the device takes int32: refused here, not overflowing there
    ({"top_k": 3 * 10**9}, "top_k", "32-bit"),
    ({"temperature": float("inf")}, "temperature", "finite"),
    ({"temperature": "hot"}, "temperature", "a number"),
    ({"stop_token_ids": "198"}, "stop_token_ids", "list of integers"),  # not (1, 9, 8)
])
def test_params_reject_out_of_range(kwargs, field, allowed):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    msg = str(e.value)
    assert msg.startswith(field + " ")
    assert allowed in msg
    assert repr(next(iter(kwargs.values()))) in msg  # the offending value is shown


def test_params_accept_the_edges_of_each_range():
    sp = SamplingParams(max_new_tokens=1, temperature=0.0, top_p=1.0, top_k=0)
    assert (sp.max_new_tokens, sp.temperature, sp.top_p, sp.top_k) == (1, 0.0, 1.0, 0)
    assert SamplingParams(top_p=1e-6).top_p == 1e-6


def test_params_stop_token_ids_become_a_hashable_tuple_of_ints():
    sp = SamplingParams(stop_token_ids=[np.int64(5), 7])
    assert sp.stop_token_ids == (5, 7)
    assert all(type(t) is int for t in sp.stop_token_ids)
    assert hash(sp) == hash(SamplingParams(stop_token_ids=(5, 7)))


# ----- greedy -----


def test_greedy_is_argmax_per_row_whatever_top_k_and_top_p():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 1000)).astype(np.float32)
    logits[3, 17] = logits[3, 400] = 50.0  # a tie: argmax takes the first
    B = logits.shape[0]
    for seed in range(3):
        tokens = sample_jit(jnp.asarray(logits), jnp.zeros(B), jnp.array([0, 1, 5, 0, 50, 3], jnp.int32),
                            jnp.array([1.0, 0.1, 0.5, 1.0, 0.9, 0.01]),
                            row_keys(jnp.full((B,), seed, jnp.int32), jnp.arange(B, dtype=jnp.int32)))
        np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))
    assert int(tokens[3]) == 17


def test_greedy_on_bfloat16_logits():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(3, 300)), jnp.bfloat16)
    tokens = sample(logits, jnp.zeros(3), jnp.zeros(3, jnp.int32), jnp.ones(3), row_keys(jnp.zeros(3, jnp.int32), jnp.arange(3)))
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(logits.astype(jnp.float32)).argmax(-1))


def test_greedy_and_sampling_rows_mix_in_one_batch():
    rng = np.random.default_rng(2)
    V, N = 8, 2000
    # Row 0 is flat enough that a draw (rather than argmax) would vary; row 1 is uniform.
    logits = jnp.asarray(np.stack([0.3 * rng.normal(size=V), np.zeros(V)]), jnp.float32)
    temperature, top_k, top_p = jnp.array([0.0, 1.0]), jnp.array([5, 0], jnp.int32), jnp.array([0.95, 1.0])
    keys = jax.vmap(lambda i: row_keys(jnp.array([7, 7], jnp.int32), jnp.array([i, i])))(jnp.arange(N))  # [N, 2, 2]
    tokens = np.asarray(jax.vmap(lambda k: sample(logits, temperature, top_k, top_p, k))(keys))  # [N, 2]
    assert (tokens[:, 0] == int(np.argmax(logits[0]))).all()  # greedy row: always argmax, filters ignored
    assert np.abs(freqs(tokens[:, 1], V) - 1 / V).max() < 0.03  # sampling row: about uniform
    assert len(set(tokens[:, 1])) == V


@pytest.mark.parametrize("temperature", [0.3, 1.0, 3.0, 100.0])
def test_top_k_1_is_greedy_at_any_temperature(temperature):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(8, 500)).astype(np.float32)
    for seed in range(5):
        tokens = sample_jit(jnp.asarray(logits), jnp.full(8, temperature), jnp.ones(8, jnp.int32), jnp.ones(8),
                            row_keys(jnp.full(8, seed, jnp.int32), jnp.arange(8, dtype=jnp.int32)))
        np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))


# ----- keys and reproducibility -----


def test_row_keys_differ_per_position_and_seed_and_repeat_for_the_same_pair():
    keys = np.asarray(row_keys(jnp.array([3, 3, 3, 4, 3], jnp.int32), jnp.array([0, 1, 2, 0, 1], jnp.int32)))
    assert keys.shape == (5, 2)
    assert len({tuple(k) for k in keys[:4]}) == 4  # (3,0) (3,1) (3,2) (4,0) all different
    np.testing.assert_array_equal(keys[4], keys[1])  # (3,1) again, in another row
    again = np.asarray(row_keys(jnp.array([3], jnp.int32), jnp.array([1], jnp.int32)))
    np.testing.assert_array_equal(again[0], keys[1])  # and in another call and batch size


def test_a_row_samples_the_same_token_whatever_its_slot_and_neighbours():
    rng = np.random.default_rng(4)
    V = 1000
    row = rng.normal(size=V).astype(np.float32)
    others = rng.normal(size=(3, V)).astype(np.float32)
    for seed in range(20):
        a = sample_jit(jnp.asarray(np.stack([row, others[0]])), jnp.array([1.0, 0.7]), jnp.array([0, 5], jnp.int32),
                       jnp.array([1.0, 0.9]), row_keys(jnp.array([seed, 99], jnp.int32), jnp.array([12, 3])))
        b = sample_jit(jnp.asarray(np.stack([others[1], others[2], row])), jnp.array([0.0, 2.0, 1.0]),
                       jnp.array([0, 0, 0], jnp.int32), jnp.array([1.0, 0.3, 1.0]),
                       row_keys(jnp.array([5, 6, seed], jnp.int32), jnp.array([40, 1, 12])))
        assert int(a[0]) == int(b[2])
        # Alone (no row in the batch filters, so no sort runs) it draws the same token too.
        c = sample_jit(jnp.asarray(row[None]), jnp.array([1.0]), jnp.array([0], jnp.int32), jnp.array([1.0]),
                       row_keys(jnp.array([seed], jnp.int32), jnp.array([12])))
        assert int(c[0]) == int(a[0])
        # And a filtering row draws the same beside a plain row as alone.
        d = sample_jit(jnp.asarray(others[:1]), jnp.array([0.7]), jnp.array([5], jnp.int32), jnp.array([0.9]),
                       row_keys(jnp.array([99], jnp.int32), jnp.array([3])))
        assert int(d[0]) == int(a[1])


def test_same_key_same_tokens_other_seed_other_tokens_same_distribution():
    logits = [1.0, 0.5, 0.0, -0.5, -1.0]
    p = softmax(logits)
    n = 5000
    a, a_again, b = draws(logits, n, seed=0), draws(logits, n, seed=0), draws(logits, n, seed=1)
    np.testing.assert_array_equal(a, a_again)
    # Independent draws agree with probability sum(p^2) (about 0.26), not nearly always.
    assert abs((a == b).mean() - (p ** 2).sum()) < 0.03
    assert np.abs(freqs(a, 5) - p).max() < 0.025
    assert np.abs(freqs(b, 5) - p).max() < 0.025


# ----- filters -----


def test_filtered_logits_sorts_scales_and_filters_each_row():
    logits = jnp.array([[1.0, 3.0, 2.0, 0.0],
                        [0.0, -1.0, 5.0, 4.0],
                        [0.0, -1.0, 5.0, 4.0]])
    # row 0: top-k 2; row 1: T=2 then top-p 0.9; row 2: T=2, no filter.
    out, order = filtered_logits(logits, jnp.array([1.0, 2.0, 2.0]), jnp.array([2, 0, 0]), jnp.array([1.0, 0.9, 1.0]))
    np.testing.assert_array_equal(np.asarray(order), [[1, 2, 0, 3], [2, 3, 0, 1], [2, 3, 0, 1]])
    # Row 1 at T=2: sorted [2.5, 2, 0, -0.5] -> probs [.575, .349, .047, .029]; mass before [0, .575, .924, .971].
    inf = -np.inf
    np.testing.assert_allclose(np.asarray(out), [[3.0, 2.0, inf, inf], [2.5, 2.0, inf, inf], [2.5, 2.0, 0.0, -0.5]])


def test_filtered_logits_top_k_larger_than_vocab_keeps_everything():
    logits = jnp.array([[0.3, -2.0, 1.0]])
    out, order = filtered_logits(logits, jnp.ones(1), jnp.array([10]), jnp.ones(1))
    np.testing.assert_array_equal(np.asarray(order), [[2, 0, 1]])
    np.testing.assert_allclose(np.asarray(out), [[1.0, 0.3, -2.0]])


def test_top_k_draws_only_the_k_largest_in_softmax_proportion():
    logits = np.array([0.1, 1.5, -0.3, 1.2, 0.0, 1.0, -1.0, 0.5, -np.inf, 0.9], np.float32)
    tokens = draws(logits, 20000, top_k=3, seed=11)
    assert set(tokens.tolist()) == {1, 3, 5}
    target = np.zeros(10)
    target[[1, 3, 5]] = softmax(logits[[1, 3, 5]])
    assert np.abs(freqs(tokens, 10) - target).max() < 0.02


def test_masked_tokens_are_never_drawn():
    logits = np.array([0.0, -np.inf, 0.0, -np.inf], np.float32)
    tokens = draws(logits, 4000, temperature=5.0, seed=2)
    assert set(tokens.tolist()) == {0, 2}


@pytest.mark.parametrize("top_p, support", [(0.5, {0}), (0.7, {0, 1}), (0.9, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_nucleus(top_p, support):
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    perm = np.array([2, 0, 3, 1])  # shuffle positions so the sort matters: token perm[i] has probs[i]
    logits = np.empty(4, np.float32)
    logits[perm] = np.log(probs)
    tokens = draws(logits, 20000, top_p=top_p, seed=5)
    want = {int(perm[i]) for i in support}
    assert set(tokens.tolist()) == want
    target = np.zeros(4)
    kept = sorted(support)
    target[perm[kept]] = probs[kept] / probs[kept].sum()  # renormalised inside the nucleus
    assert np.abs(freqs(tokens, 4) - target).max() < 0.02


def test_top_p_applies_after_top_k_and_temperature():
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    logits = np.log(probs).astype(np.float32)
    # Alone, top-p 0.5 needs two tokens (0.4 < 0.5) ...
    assert set(draws(logits, 3000, top_p=0.5).tolist()) == {0, 1}
    # ... after top-k 2 the first holds 0.4/0.7 = 0.57 >= 0.5, so it is alone.
    assert set(draws(logits, 3000, top_k=2, top_p=0.5).tolist()) == {0}
    # At T=0.2 the first token's share is 0.4^5 / sum(p^5) = 0.79 >= 0.6: alone; at T=1, 0.4 < 0.6.
    assert set(draws(logits, 3000, temperature=0.2, top_p=0.6).tolist()) == {0}
    assert set(draws(logits, 3000, temperature=1.0, top_p=0.6).tolist()) == {0, 1}


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_frequencies_match_softmax_of_scaled_logits(temperature):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0], np.float32)
    n = 20000
    tokens = draws(logits, n, temperature=temperature, seed=3)
    f = freqs(tokens, 5)
    target = softmax(logits / temperature)
    assert np.abs(f - target).max() < 0.02
    # Chi-square with 4 degrees of freedom: 18.5 is the 0.999 quantile.
    chi2 = (n * (f - target) ** 2 / target).sum()
    assert chi2 < 18.5
    # And the temperature matters: T=1 frequencies are far off.
    assert np.abs(f - softmax(logits)).max() > 0.05
    assert math.isclose(f.sum(), 1.0)
