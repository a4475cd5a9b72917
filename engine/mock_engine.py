"""A tiny arithmetic engine with the Engine contract, for testing the batching loop in milliseconds.

Each request's tokens are a pure function of its prompt and position: the first token is
(sum(prompt) + len(prompt)) % V and each next token is (previous * 3 + position) % V. So a
request's output must not depend on its slot, its neighbours or the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shardlm.engine.engine import prefill_buckets
from shardlm.engine.sampling import SamplingParams


@dataclass
class MockPrefix:
    token: int
    length: int


@dataclass
class MockState:
    tokens: np.ndarray  # [B]
    lengths: np.ndarray  # [B]


class MockEngine:
    def __init__(self, batch_size: int = 4, max_seq_len: int = 64, vocab_size: int = 97):
        self.batch_size, self.max_seq_len, self.vocab_size = batch_size, max_seq_len, vocab_size
        self.prefill_calls = self.generate_calls = 0

    @staticmethod
    def expected(prompt, n: int, vocab_size: int = 97) -> list[int]:
        """The tokens MockEngine generates for `prompt` (no stop tokens)."""
        token, pos, out = (sum(prompt) + len(prompt)) % vocab_size, len(prompt), []
        for _ in range(n):
            out.append(token)
            pos += 1
            token = (token * 3 + pos) % vocab_size
        return out

    def bucket(self, length: int) -> int:
        """The prefill bucket of a prompt (admission order), as engine.Engine's."""
        return next(b for b in prefill_buckets(self.max_seq_len) if length <= b)

    def init_decode_state(self) -> MockState:
        return MockState(np.zeros(self.batch_size, np.int64), np.zeros(self.batch_size, np.int64))

    def prefill(self, params, tokens, sampling: SamplingParams = SamplingParams()) -> MockPrefix:
        self.prefill_calls += 1
        return MockPrefix((sum(tokens) + len(tokens)) % self.vocab_size, len(tokens))

    def insert(self, prefix: MockPrefix, state: MockState, slot: int, sampling=None) -> MockState:
        state.tokens[slot], state.lengths[slot] = prefix.token, prefix.length
        return state

    def generate(self, params, state: MockState):
        self.generate_calls += 1
        state.lengths += 1
        state.tokens = (state.tokens * 3 + state.lengths) % self.vocab_size
        return state, state.tokens.copy()
