"""The host side of the paged KV cache: which pages each sequence owns, shared pages and the prefix
cache (pure Python and numpy).

One `PagePool` describes every layer's pool at once (the same page ids index each layer's
k_pages, v_pages [num_pages, P, K, H]; models/paged_attention.py reads them). A sequence's token
at position j lives in its (j // P)-th page at offset j % P, flat slot page * P + j % P.

A step uses it on the host before it runs: the scheduler asks `can_fit` before admitting or
growing a sequence, `allocate` (or `append`, which also records the tokens) gives the sequence
room for the step's new tokens, `slot_mapping` says where write_kv puts each new token,
`page_table_array` and `lengths_array` are the step's page tables [B, max_pages] and kv_lens [B];
`free` returns a sequence's pages.

Pages are reference-counted, so sequences can share them:
- `fork(src, dst)`: dst shares src's full pages and gets its own copy of src's partial last page
  (the returned (src page, dst page) pair is copied on the device before dst writes to it); the
  n samples of one prompt share its pages this way.
- The prefix cache (`prefix_cache=True`): every full page whose tokens are known is keyed by
  (the key of the page before it, its own tokens), a chain that names the whole prefix up to and
  including the page. `start(seq, tokens)` shares the longest chain of cached pages a new
  sequence's tokens begin with (never its last token: a prompt's last position is computed to
  sample from). A page is cached from when it is allocated; it is `ready` once the step that
  writes it has run (`computed`), so a sequence sharing a page another sequence is still
  prefilling waits for it. A cached page no sequence holds stays cached and is reused, least
  recently freed first (a sequence frees its pages last first, so a prefix's tail goes before its
  head), only when no never-cached page is left.

Deterministic: free pages are handed out lowest id first and every decision follows the calls
made, so the same calls give the same page ids in every process of a multi-host job. Memory held
is ceil(length / P) pages per sequence, less what it shares.
"""

from __future__ import annotations

import collections
import heapq
import itertools

import numpy as np


class PagePool:
    def __init__(self, num_pages: int, page_size: int, prefix_cache: bool = False):
        if page_size < 1:
            raise ValueError(f"page size must be >= 1 token, got {page_size}")
        if num_pages < 1:
            raise ValueError(f"a page pool needs >= 1 page, got {num_pages}")
        self.num_pages, self.page_size, self.prefix_cache = num_pages, page_size, prefix_cache
        self._free = list(range(num_pages))  # a heap of pages never cached (or dropped): lowest id first
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, held by no one: LRU
        self._refs = [0] * num_pages
        self._pages: dict = {}  # seq_id -> [page ids] in position order
        self._lengths: dict = {}  # seq_id -> tokens held
        self._tokens: dict = {}  # seq_id -> the token ids of its positions, where known (None: unknown)
        self._chain: dict = {}  # seq_id -> the prefix keys of its full pages (cache only)
        self._cache: dict = {}  # (parent key, page tokens) -> (key, page)
        self._key_of: dict = {}  # cached page -> its (parent key, tokens)
        self._ready: set = set()  # cached pages whose keys and values are written
        self._computed: dict = {}  # seq_id -> its leading pages `computed` has seen
        self._keys = itertools.count()
        self.evictions = 0  # cached pages reused for other tokens

    # ----- accounting -----

    @property
    def free_pages(self) -> int:
        """Pages that can be handed out now: never used, freed, or cached and held by no sequence."""
        return len(self._free) + len(self._idle)

    @property
    def pages_in_use(self) -> int:
        """Pages some sequence holds."""
        return self.num_pages - self.free_pages

    @property
    def cached_pages(self) -> int:
        return len(self._key_of)

    def pages_for(self, n_tokens: int) -> int:
        """Pages that hold n_tokens tokens."""
        return -(-n_tokens // self.page_size)

    def new_pages(self, seq_id, n_tokens: int) -> int:
        """Pages seq_id (new or held) needs to take on n_tokens more tokens."""
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        return self.pages_for(self._lengths.get(seq_id, 0) + n_tokens) - len(self._pages.get(seq_id, ()))

    def can_fit(self, n_tokens: int, seq_id=None) -> bool:
        """Whether n_tokens more tokens fit now: for a new sequence, or for held `seq_id` to grow."""
        return self.new_pages(seq_id, n_tokens) <= self.free_pages

    def length(self, seq_id) -> int:
        return self._lengths[seq_id]

    def pages(self, seq_id) -> list[int]:
        return list(self._pages[seq_id])

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._pages

    # ----- allocation -----

    def _take(self) -> int:
        if self._free:
            page = heapq.heappop(self._free)
        else:  # the least recently freed cached page leaves the cache
            page, _ = self._idle.popitem(last=False)
            self._uncache(page)
            self.evictions += 1
        self._refs[page] = 1
        return page

    def _uncache(self, page: int) -> None:
        key = self._key_of.pop(page)
        del self._cache[key]
        self._ready.discard(page)

    def allocate(self, seq_id, n_tokens: int) -> list[int]:
        """Room for n_tokens more tokens of seq_id (a new sequence starts at 0 tokens), whose token
        ids are not recorded (its pages are not cached); returns the pages added. All or nothing:
        raises ValueError when the pool cannot hold them."""
        return self._grow(seq_id, n_tokens, None)

    def append(self, seq_id, token_ids) -> list[int]:
        """`allocate` for these tokens, recorded: with the prefix cache, each page they fill is cached."""
        return self._grow(seq_id, len(token_ids), list(token_ids))

    def _grow(self, seq_id, n_tokens: int, token_ids: list | None) -> list[int]:
        need = self.new_pages(seq_id, n_tokens)
        total = self._lengths.get(seq_id, 0) + n_tokens
        if self.pages_for(total) > self.num_pages:
            raise ValueError(f"sequence {seq_id!r} of {total} tokens needs {self.pages_for(total)} pages of "
                             f"{self.page_size} tokens; the pool has {self.num_pages} pages in all")
        if need > self.free_pages:
            raise ValueError(f"sequence {seq_id!r} needs {need} more pages for {n_tokens} more tokens "
                             f"({total} in all, pages of {self.page_size}); the pool has {self.free_pages} "
                             f"free of {self.num_pages}")
        new = [self._take() for _ in range(need)]
        if seq_id not in self._pages:
            self._pages[seq_id], self._lengths[seq_id], self._tokens[seq_id], self._chain[seq_id] = [], 0, [], []
        self._pages[seq_id].extend(new)
        self._lengths[seq_id] = total
        if token_ids is None:
            self._tokens[seq_id] = None
        elif self._tokens[seq_id] is not None:
            self._tokens[seq_id].extend(token_ids)
        self._register(seq_id)
        return new

    def free(self, seq_id) -> None:
        """Return seq_id's pages to the pool (a page others share stays theirs; a cached page stays
        cached until the pool needs it)."""
        if seq_id not in self._pages:
            raise ValueError(f"sequence {seq_id!r} holds no pages")
        for page in reversed(self._pages.pop(seq_id)):
            self._refs[page] -= 1
            if self._refs[page]:
                continue
            if page in self._ready:
                self._idle[page] = None
            else:  # never cached, or cached but never written (its sequence left before computing it)
                if page in self._key_of:
                    self._uncache(page)
                heapq.heappush(self._free, page)
        del self._lengths[seq_id], self._tokens[seq_id], self._chain[seq_id]
        self._computed.pop(seq_id, None)

    def fork(self, src, dst) -> tuple[int, int] | None:
        """New sequence dst with src's tokens: it shares src's full pages and gets a page of its own
        for src's partial last page. Returns (src page, dst page) to copy on the device before dst
        writes to it (None when src ends on a page boundary)."""
        if dst in self._pages:
            raise ValueError(f"sequence {dst!r} already holds pages")
        n, P = self._lengths[src], self.page_size
        shared = self._pages[src][:n // P]
        if n % P and not self.free_pages:
            raise ValueError(f"forking sequence {src!r} needs 1 page for its partial last page; none is free")
        for page in shared:
            self._hold(page)
        self._pages[dst], self._lengths[dst] = list(shared), n
        self._tokens[dst] = None if self._tokens[src] is None else list(self._tokens[src])
        self._chain[dst] = list(self._chain[src])
        if n % P == 0:
            return None
        page = self._take()
        self._pages[dst].append(page)
        return self._pages[src][-1], page

    def _hold(self, page: int) -> None:
        if self._refs[page] == 0:
            del self._idle[page]
        self._refs[page] += 1

    # ----- the prefix cache -----

    def _page_tokens(self, tokens, i: int) -> tuple:
        return tuple(tokens[i * self.page_size:(i + 1) * self.page_size])

    def _register(self, seq_id) -> None:
        """Cache seq_id's full pages with known tokens not yet keyed (a page whose prefix is already
        cached elsewhere, e.g. a sample equal to its sibling, is not cached twice: the chain goes on
        through the cached one)."""
        tokens, chain = self._tokens[seq_id], self._chain[seq_id]
        if not self.prefix_cache or tokens is None:
            return
        for i in range(len(chain), len(tokens) // self.page_size):
            key = (chain[-1] if chain else -1, self._page_tokens(tokens, i))
            if key not in self._cache:
                page = self._pages[seq_id][i]
                self._cache[key] = (next(self._keys), page)
                self._key_of[page] = key
            chain.append(self._cache[key][0])

    def match(self, tokens) -> list[int]:
        """The cached pages the longest cached prefix of `tokens` occupies (whole pages, leaving at
        least the last token out)."""
        if not self.prefix_cache:
            return []
        pages, parent = [], -1
        for i in range((len(tokens) - 1) // self.page_size):
            hit = self._cache.get((parent, self._page_tokens(tokens, i)))
            if hit is None:
                break
            parent, page = hit
            pages.append(page)
        return pages

    def start(self, seq_id, token_ids) -> int:
        """New sequence seq_id holding token_ids: the longest cached prefix's pages shared, room
        for the rest allocated (and its full pages cached). Returns the tokens the cache holds
        already. All or nothing, as `allocate`."""
        if seq_id in self._pages:
            raise ValueError(f"sequence {seq_id!r} already holds pages")
        token_ids = list(token_ids)
        shared = self.match(token_ids)
        if self.pages_for(len(token_ids)) > self.num_pages or self._to_start(token_ids, shared) > self.free_pages:
            self._grow(seq_id, len(token_ids), token_ids)  # raises the error allocate gives
        for page in shared:
            self._hold(page)
        cached = len(shared) * self.page_size
        self._pages[seq_id], self._lengths[seq_id] = shared, cached
        self._tokens[seq_id], self._chain[seq_id] = token_ids[:cached], [self._cache[self._key_of[p]][0] for p in shared]
        self._grow(seq_id, len(token_ids) - cached, token_ids[cached:])
        return cached

    def pages_to_start(self, token_ids) -> int:
        """Free pages `start` would take for a sequence of these tokens (what the cache has is shared)."""
        return self._to_start(token_ids, self.match(token_ids))

    def _to_start(self, token_ids, shared) -> int:  # new pages, and cached ones leaving the idle list
        return self.pages_for(len(token_ids)) - len(shared) + sum(self._refs[p] == 0 for p in shared)

    def computed(self, seq_id, n_tokens: int) -> None:
        """seq_id's first n_tokens positions have their keys and values written: its cached pages
        among them are ready to share."""
        pages, done = self._pages[seq_id], self._computed.get(seq_id, 0)
        for page in pages[done:n_tokens // self.page_size]:  # each page once: decode calls this every step
            if page in self._key_of:
                self._ready.add(page)
        self._computed[seq_id] = max(done, n_tokens // self.page_size)

    def ready(self, seq_id, n_tokens: int) -> bool:
        """Whether seq_id's first n_tokens positions are written (a shared page another sequence is
        still prefilling is not)."""
        return not any(p in self._key_of and p not in self._ready for p in self._pages[seq_id][:n_tokens // self.page_size])

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
