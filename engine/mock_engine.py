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


def _key(sampling, seed: int) -> int:
    """What the seed adds to a token: greedy (temperature 0) draws nothing from its key."""
    return seed if sampling.temperature > 0 else 0


class MockPagedEngine:
    """The paged engine's contract (prefill / decode of scheduler batches over a PagePool) with
    MockEngine's arithmetic, seeded: a request's tokens equal MockEngine.expected(prompt, n, seed)
    (seed 0 when greedy)
    however its prompt is chunked and whatever runs beside it. It keeps a "KV cache", the token and
    position written at each flat slot, and computes from what it reads back through the pool's
    pages (a prefix from the cache, a forked sample's copied page), so a page shared or copied
    wrongly changes the tokens; a read of a slot never written, or written for another position,
    fails at once. `steps` logs ("prefill", [(seq_id, start, n), ...]) / ("decode", [seq_id, ...]);
    `prefill_tokens` counts the tokens it computed."""

    def __init__(self, *, page_size: int = 4, num_pages: int = 64, max_num_seqs: int = 4,
                 max_num_batched_tokens: int = 16, max_seq_len: int = 64, vocab_size: int = 97,
                 prefix_cache: bool = True):
        self.page_size, self.num_pages, self.max_num_seqs = page_size, num_pages, max_num_seqs
        self.max_num_batched_tokens, self.max_seq_len, self.vocab_size = max_num_batched_tokens, max_seq_len, vocab_size
        self.prefix_cache = prefix_cache
        self.query_block = 1  # chunks take exactly their own tokens of the budget
        self.steps: list = []
        self.prefill_tokens = 0
        self.kv: dict[int, tuple[int, int]] = {}  # flat slot -> (token, position)

    @staticmethod
    def expected(prompt, n: int, seed: int = 0, vocab_size: int = 97) -> list[int]:
        """The tokens MockPagedEngine generates for `prompt` with this key (no stop tokens)."""
        x, out = list(prompt), []
        weighted = sum((j + 1) * t for j, t in enumerate(x))
        for _ in range(n):
            token = (weighted + len(x) + seed) % vocab_size
            out.append(token)
            x.append(token)
            weighted += len(x) * token
        return out

    def _next(self, x, sampling, seed) -> int:
        return (sum((j + 1) * t for j, t in enumerate(x)) + len(x) + _key(sampling, seed)) % self.vocab_size

    def check_prompt(self, tokens) -> None:
        if not tokens:
            raise ValueError("prompt is empty: give at least one token")

    def _copy(self, copies) -> None:
        P = self.page_size
        for src, dst in copies:
            for o in range(P):
                if src * P + o in self.kv:
                    self.kv[dst * P + o] = self.kv[src * P + o]
                else:
                    self.kv.pop(dst * P + o, None)

    def _write(self, pool, seq_id, start, token_ids) -> None:
        pages = set(pool.pages(seq_id))
        for j, (slot, token) in enumerate(zip(pool.slot_mapping(seq_id, start, len(token_ids)), token_ids)):
            assert int(slot) // pool.page_size in pages
            self.kv[int(slot)] = (int(token), start + j)

    def _read(self, pool, seq_id, n) -> list[int]:
        out = []
        for j, slot in enumerate(pool.slot_mapping(seq_id, 0, n)):
            token, pos = self.kv.get(int(slot), (None, None))
            assert pos == j, f"sequence {seq_id} reads position {j} from slot {slot}, which holds position {pos}"
            out.append(token)
        return out

    def prefill(self, params, batch, pool):
        from shardlm.engine.scheduler import sample_seed

        self._copy(batch.copies)
        out = []
        for c in batch.chunks:
            self._write(pool, c.seq_id, c.start, c.token_ids)
            self.prefill_tokens += len(c.token_ids)
            if not c.last:
                out.append(-1)
                continue
            prompt = self._read(pool, c.seq_id, c.start + len(c.token_ids))
            out += [self._next(prompt, c.sampling, sample_seed(c.sampling.seed, i)) for i in range(c.samples)]
        self.steps.append(("prefill", [(c.seq_id, c.start, len(c.token_ids)) for c in batch.chunks]))
        return np.asarray(out), None, None

    def decode(self, params, batch, pool):
        self._copy(batch.copies)
        out = []
        for seq_id, token, pos, sp in zip(batch.seq_ids, batch.tokens, batch.positions, batch.samplings):
            self._write(pool, seq_id, pos, [token])
            out.append(self._next(self._read(pool, seq_id, pos + 1), sp, sp.seed))
        self.steps.append(("decode", list(batch.seq_ids)))
        return np.asarray(out), None, None
