"""The host side of the paged KV cache: which pages each sequence owns (pure Python and numpy).

One `PagePool` describes every layer's pool at once (the same page ids index each layer's
k_pages, v_pages [num_pages, P, K, H]; models/paged_attention.py reads them). A sequence's token
at position j lives in its (j // P)-th page at offset j % P, flat slot page * P + j % P.

A step uses it on the host before it runs: the scheduler asks `can_fit` before admitting or
growing a sequence, `allocate` gives the sequence room for the step's new tokens, `slot_mapping`
says where write_kv puts each new token, `page_table_array` and `lengths_array` are the step's
page tables [B, max_pages] and kv_lens [B]; `free` returns a finished sequence's pages.

Deterministic: free pages are handed out lowest id first, so the same calls give the same page
ids in every process of a multi-host job. Memory held is ceil(length / P) pages per sequence.
"""

from __future__ import annotations

import heapq

import numpy as np


class PagePool:
    def __init__(self, num_pages: int, page_size: int):
        if page_size < 1:
            raise ValueError(f"page size must be >= 1 token, got {page_size}")
        if num_pages < 1:
            raise ValueError(f"a page pool needs >= 1 page, got {num_pages}")
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages))  # a heap: the lowest free id goes first
        self._pages: dict = {}  # seq_id -> [page ids] in position order
        self._lengths: dict = {}  # seq_id -> tokens held

    # ----- accounting -----

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, n_tokens: int) -> int:
        """Pages that hold n_tokens tokens."""
        return -(-n_tokens // self.page_size)

    def _new_pages(self, seq_id, n_tokens: int) -> int:
        """Pages seq_id (new or held) needs to take on n_tokens more tokens."""
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        return self.pages_for(self._lengths.get(seq_id, 0) + n_tokens) - len(self._pages.get(seq_id, ()))

    def can_fit(self, n_tokens: int, seq_id=None) -> bool:
        """Whether n_tokens more tokens fit now: for a new sequence, or for held `seq_id` to grow."""
        return self._new_pages(seq_id, n_tokens) <= len(self._free)

    def length(self, seq_id) -> int:
        return self._lengths[seq_id]

    def pages(self, seq_id) -> list[int]:
        return list(self._pages[seq_id])

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._pages

    # ----- allocation -----

    def allocate(self, seq_id, n_tokens: int) -> list[int]:
        """Room for n_tokens more tokens of seq_id (a new sequence starts at 0 tokens); returns the
        pages added. All or nothing: raises ValueError when the pool cannot hold them."""
        need = self._new_pages(seq_id, n_tokens)
        total = self._lengths.get(seq_id, 0) + n_tokens
        if self.pages_for(total) > self.num_pages:
            raise ValueError(f"sequence {seq_id!r} of {total} tokens needs {self.pages_for(total)} pages of "
                             f"{self.page_size} tokens; the pool has {self.num_pages} pages in all")
        if need > len(self._free):
            raise ValueError(f"sequence {seq_id!r} needs {need} more pages for {n_tokens} more tokens "
                             f"({total} in all, pages of {self.page_size}); the pool has {len(self._free)} "
                             f"free of {self.num_pages}")
        new = [heapq.heappop(self._free) for _ in range(need)]
        self._pages.setdefault(seq_id, []).extend(new)
        self._lengths[seq_id] = total
        return new

    def free(self, seq_id) -> None:
        """Return seq_id's pages to the pool."""
        if seq_id not in self._pages:
            raise ValueError(f"sequence {seq_id!r} holds no pages")
        for page in self._pages.pop(seq_id):
            heapq.heappush(self._free, page)
        del self._lengths[seq_id]

    # ----- arrays for a step -----

    def slot_mapping(self, seq_id, start_pos: int, n: int) -> np.ndarray:
        """Flat slots [n] int32 of seq_id's positions start_pos .. start_pos + n - 1."""
        held = self._lengths.get(seq_id)
        if held is None:
            raise ValueError(f"sequence {seq_id!r} holds no pages")
        if start_pos < 0 or n < 0 or start_pos + n > held:
            raise ValueError(f"positions {start_pos}..{start_pos + n - 1} of sequence {seq_id!r}: it holds "
                             f"positions 0..{held - 1} (allocate first)")
        pos = np.arange(start_pos, start_pos + n)
        pages = np.asarray(self._pages[seq_id], np.int64)
        return (pages[pos // self.page_size] * self.page_size + pos % self.page_size).astype(np.int32)

    def page_table_array(self, seq_ids, max_pages: int, pad: int = 0) -> np.ndarray:
        """Page tables [B, max_pages] int32 of seq_ids (None: an empty row); unused entries `pad`
        (a valid page id by default: attention masks them by kv_lens)."""
        table = np.full((len(seq_ids), max_pages), pad, np.int32)
        for b, seq_id in enumerate(seq_ids):
            if seq_id is None:
                continue
            pages = self._pages[seq_id]
            if len(pages) > max_pages:
                raise ValueError(f"sequence {seq_id!r} holds {len(pages)} pages; the table has room for {max_pages}")
            table[b, :len(pages)] = pages
        return table

    def lengths_array(self, seq_ids) -> np.ndarray:
        """kv_lens [B] int32 of seq_ids (None: 0)."""
        return np.array([0 if s is None else self._lengths[s] for s in seq_ids], np.int32)
