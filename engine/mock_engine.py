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


class MockPagedEngine:
    """The paged engine's contract (prefill / decode of scheduler batches over a PagePool) with
    MockEngine's arithmetic: a request's tokens equal MockEngine.expected(prompt, n) however its
    prompt is chunked and whatever runs beside it. It checks that each chunk continues where its
    sequence's last one ended and that every token it is given a slot for lies in a page the
    sequence holds. `steps` logs ("prefill", [(seq_id, start, n), ...]) / ("decode", [seq_id, ...])."""

    def __init__(self, *, page_size: int = 4, num_pages: int = 64, max_num_seqs: int = 4,
                 max_num_batched_tokens: int = 16, max_seq_len: int = 64, vocab_size: int = 97):
        self.page_size, self.num_pages, self.max_num_seqs = page_size, num_pages, max_num_seqs
        self.max_num_batched_tokens, self.max_seq_len, self.vocab_size = max_num_batched_tokens, max_seq_len, vocab_size
        self.query_block = 1  # chunks take exactly their own tokens of the budget
        self.steps: list = []
        self._sums: dict = {}  # seq_id -> (sum of prompt tokens seen, count)

    def check_prompt(self, tokens) -> None:
        if not tokens:
            raise ValueError("prompt is empty: give at least one token")

    def _check_slots(self, pool, seq_id, start, n):
        pages = set(pool.pages(seq_id))
        assert all(int(s) // pool.page_size in pages for s in pool.slot_mapping(seq_id, start, n))

    def prefill(self, params, batch, pool):
        out = []
        for c in batch.chunks:
            total, count = self._sums.get(c.seq_id, (0, 0))
            assert c.start == count, f"chunk of sequence {c.seq_id} starts at {c.start}, {count} tokens done"
            self._check_slots(pool, c.seq_id, c.start, len(c.token_ids))
            total, count = total + sum(c.token_ids), count + len(c.token_ids)
            self._sums[c.seq_id] = (total, count)
            out.append((total + count) % self.vocab_size)
            if c.last:
                del self._sums[c.seq_id]
        self.steps.append(("prefill", [(c.seq_id, c.start, len(c.token_ids)) for c in batch.chunks]))
        return np.asarray(out), None

    def decode(self, params, batch, pool):
        for seq_id, pos in zip(batch.seq_ids, batch.positions):
            self._check_slots(pool, seq_id, pos, 1)
        self.steps.append(("decode", list(batch.seq_ids)))
        return np.asarray([(t * 3 + p + 1) % self.vocab_size for t, p in zip(batch.tokens, batch.positions)]), None
