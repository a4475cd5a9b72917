"""The engine: cached decoding equals a full forward; batching and refilling change no tokens;
steady state never recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shardlm.engine import Engine, KVCache, SamplingParams
from shardlm.models.config import ModelConfig, RopeScaling
from shardlm.models.llama import Llama

TINY = ModelConfig("tiny", vocab_size=101, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
                   max_seq_len=128, rope_theta=10000.0)


def _full_logits(model, tokens):
    """Logits of one forward over the whole sequence with a fresh cache of exactly its length."""
    engine = Engine(model, batch_size=1, max_seq_len=model.cfg.max_seq_len)
    return np.asarray(engine.forward(engine.params, tokens))


def stepwise_logits(model, seq, P: int = 10, S: int = 40) -> np.ndarray:
    """Logits [B, T, V] of seq [B, T] through the model's dense cache of S slots: the first P tokens
    prefilled, the rest fed one at a time."""
    cfg = model.cfg
    B = seq.shape[0]
    cache = KVCache.zeros(cfg.n_layers, B, S, cfg.n_kv_heads, cfg.head_dim)
    logits, cache = model(jnp.asarray(seq[:, :P]), jnp.broadcast_to(jnp.arange(P), (B, P)), cache)
    got = [np.asarray(logits)]
    for t in range(P, seq.shape[1]):
        logits, cache = model(jnp.asarray(seq[:, t:t + 1]), jnp.full((B, 1), t), cache)
        got.append(np.asarray(logits))
    return np.concatenate(got, axis=1)


@pytest.mark.parametrize("cfg", [
    TINY,
    TINY.replace(n_kv_heads=1, tie_embeddings=True),  # multiquery, tied
    TINY.replace(n_kv_heads=4, qkv_bias=True),  # multihead, Qwen2-style bias
    TINY.replace(rope_scaling=RopeScaling("llama3", factor=8.0, original_max_position=32)),
])
@pytest.mark.slow
def test_prefill_then_decode_equals_full_forward(cfg):
    model = Llama(cfg, rngs=nnx.Rngs(1))
    if cfg.qkv_bias:  # non-zero biases so they are exercised
        for name in ("q_bias", "k_bias", "v_bias"):
            for layer in model.layers:
                var = getattr(layer.attn, name)
                var[...] = jax.random.normal(jax.random.key(7), var.shape) * 0.5
    rng = np.random.RandomState(0)
    seq = rng.randint(0, cfg.vocab_size, size=(2, 24)).astype(np.int32)
    full = _full_logits(model, seq)

    np.testing.assert_allclose(stepwise_logits(model, seq), full, atol=2e-5, rtol=1e-5)


def test_engine_steps_equal_full_forward():
    """Engine.prefill (padded to a bucket) + insert + generate reproduce a full forward's logits."""
    model = Llama(TINY, rngs=nnx.Rngs(3))
    engine = Engine(model, batch_size=3, max_seq_len=64)
    prompt = [5, 17, 99, 3, 42, 8, 1]
    prefix = engine.prefill(engine.params, prompt)
    state = engine.insert(prefix, engine.init_decode_state(), 1)
    tokens = prompt + [int(prefix.token)]
    for _ in range(10):
        state, out = engine.generate(engine.params, state)
        tokens.append(int(out[1]))
    full = _full_logits(model, np.asarray([tokens], np.int32))[0]
    assert tokens[len(prompt):] == [int(t) for t in full[len(prompt) - 1:-1].argmax(-1)]
    np.testing.assert_allclose(np.asarray(prefix.logits), full[len(prompt) - 1], atol=2e-5, rtol=1e-5)


PROMPTS = ["Hi", "What is the capital of France?", "Tell me a story about a dragon who learned to fly.",
           "List three prime numbers.", "1 2 3", "Why is the sky blue? Answer briefly, please, in one line.",
           "Bonjour", "Name a colour."]


@pytest.fixture(scope="module")
def alone(llm):
    sp = SamplingParams(max_new_tokens=16)
    return {p: llm.generate([p], sp, chat=True)[0].token_ids for p in PROMPTS}


@pytest.mark.slow
def test_batch_of_mixed_lengths_equals_alone(llm, alone):
    out = llm.generate(PROMPTS[:4], SamplingParams(max_new_tokens=16), chat=True)  # 4 prompts, 4 slots
    assert [c.token_ids for c in out] == [alone[p] for p in PROMPTS[:4]]


def test_more_prompts_than_slots_equals_alone(llm, alone):
    out = llm.generate(PROMPTS, SamplingParams(max_new_tokens=16), chat=True)  # 8 prompts, 4 slots
    assert [c.token_ids for c in out] == [alone[p] for p in PROMPTS]
    assert all(c.finish_reason in ("stop", "length") for c in out)


@pytest.mark.slow
def test_sampled_output_reproducible_and_independent_of_batching(llm):
    sp = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=123, max_new_tokens=12)
    first = llm.generate(PROMPTS[:6], sp)
    again = llm.generate(PROMPTS[:6], sp)
    alone = llm.generate([PROMPTS[5]], sp)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert first[5].token_ids == alone[0].token_ids
    other_seed = llm.generate(PROMPTS[:6], SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7,
                                                          max_new_tokens=12))
    assert [c.token_ids for c in other_seed] != [c.token_ids for c in first]


def test_steady_state_never_recompiles(llm):
    """After one warm-up, new prompt lengths inside a bucket and new sampling params compile nothing."""
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    # Counted from here: an earlier test (e.g. test_layouts) may have cleared JAX's caches, after
    # which the session's engine traced its programs again.
    before = llm.engine.compiled_count()
    # Warm-up: prefill rows of 32 and 64 tokens (a prompt takes whole blocks of 16), decode batch
    # buckets 1, 2 and 4 (the batch below shrinks from 3 to 1 as its requests finish).
    llm.generate(["Hello there"], SamplingParams(max_new_tokens=4))
    llm.generate(["Hello there", "Hi"], SamplingParams(max_new_tokens=4))
    llm.generate(["Hello there", "Hi", "Hey"], SamplingParams(max_new_tokens=4))
    counts = llm.engine.compiled_count()
    compiles.clear()
    llm.generate(["Hi", "A slightly longer prompt than the first one", "x y z"],
                 [SamplingParams(max_new_tokens=6), SamplingParams(temperature=0.7, top_k=5, seed=3, max_new_tokens=3),
                  SamplingParams(temperature=1.3, top_p=0.5, seed=9, max_new_tokens=5)])
    llm.generate(["Another prompt of a different length, still short"], SamplingParams(max_new_tokens=2))
    assert compiles == []
    assert llm.engine.compiled_count() == counts
    # Never more than one program per bucket.
    assert counts["decode"] - before["decode"] <= len(llm.engine.batch_buckets)
    assert counts["prefill"] - before["prefill"] <= len(llm.engine.token_buckets)


def test_context_full_finishes_with_length():
    model = Llama(TINY, rngs=nnx.Rngs(0))
    engine = Engine(model, batch_size=2, max_seq_len=16)
    from shardlm.engine import batching

    req = batching.Request(prompt_ids=list(range(1, 11)), sampling=SamplingParams(max_new_tokens=100))
    (result,) = batching.run(engine, engine.params, [req])
    assert result.finish_reason == "length"
    assert len(result.prompt_ids) + len(result.token_ids) == 16
