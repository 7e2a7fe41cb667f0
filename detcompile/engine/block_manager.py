"""Pages of the KV cache: allocation, reference counts and the prefix cache.

Page 0 is never handed out: CUDA-graph padding rows write their K/V there. A full page is
registered under a chained hash of (previous page's hash, its tokens), with its tokens kept for a
check, so a later sequence with the same prefix reuses the page instead of recomputing it. A
cached page that no sequence uses stays in the cache until a new page is needed (LRU eviction).
Reusing cached K/V is bit-exact because the K/V of a token is a function of the tokens before it
alone (batch-invariant kernels), so a hit gives the bits a recomputation would give."""
from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV cache holds {num_blocks} page(s); at least 2 are needed (page 0 is reserved)")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.free: list[int] = list(range(num_blocks - 1, 0, -1))  # pop() hands out low pages first
        self.ref = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> page
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced cached pages, LRU first
        self.queried_tokens = 0
        self.hit_tokens = 0

    # -- capacity -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def usage(self) -> float:
        """Fraction of the usable pages held by sequences (cached-but-unused pages count as free)."""
        return 1.0 - self.num_free / (self.num_blocks - 1)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Pages ``seq`` still needs so that its first ``num_tokens`` tokens have slots."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    # -- prefix cache ----------------------------------------------------------------------------
    @staticmethod
    def _hash(prev: int | None, tokens: tuple[int, ...]) -> int:
        return hash((prev, tokens))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached pages holding a prefix of ``seq``'s tokens, up to the first position whose logits
        it needs (at least the last token is always computed: its logits start the generation)."""
        if not self.enable_prefix_caching:
            return []
        tokens, bs = seq.tokens, self.block_size
        pages, h = [], None
        for i in range(seq.first_logit_pos // bs):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = self._hash(h, chunk)
            page = self.cached.get(h)
            if page is None or self.block_tokens[page] != chunk:
                break
            pages.append(page)
        return pages

    def admit(self, seq: Sequence) -> None:
        """Give a waiting sequence its cached prefix pages (it computes from there on)."""
        assert not seq.block_table and seq.num_computed == 0
        pages = self.match_prefix(seq)
        for page in pages:
            if self.ref[page] == 0:
                self.evictable.pop(page, None)
            self.ref[page] += 1
        seq.block_table = list(pages)
        seq.num_computed = len(pages) * self.block_size
        seq.committed_pages = len(pages)  # matched pages are registered: the chain continues from the last
        seq.last_page_hash = self.block_hash[pages[-1]] if pages else None
        seq.num_cached_prompt = seq.num_computed
        self.queried_tokens += seq.first_logit_pos
        self.hit_tokens += seq.num_computed

    def commit(self, seq: Sequence) -> None:
        """Register the pages ``seq`` has filled completely since the last call, so later sequences
        can reuse them (incremental: a decode step costs nothing until a page fills)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed // bs
        if seq.committed_pages >= full:
            return
        tokens, h = seq.tokens, seq.last_page_hash
        for i in range(seq.committed_pages, full):
            page = seq.block_table[i]
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = self._hash(h, chunk)
            if self.block_hash[page] is None and h not in self.cached:  # else: cached already, here or elsewhere
                self.cached[h] = page
                self.block_hash[page] = h
                self.block_tokens[page] = chunk
        seq.committed_pages, seq.last_page_hash = full, h

    def flush(self) -> None:
        """Forget every cached prefix (pages in use keep their contents, unregistered)."""
        self.cached.clear()
        for page in range(self.num_blocks):
            self.block_hash[page] = None
            self.block_tokens[page] = None
        self.free.extend(reversed(list(self.evictable)))
        self.evictable.clear()

    # -- allocation ------------------------------------------------------------------------------
    def _new_page(self) -> int:
        if self.free:
            page = self.free.pop()
        else:
            page, _ = self.evictable.popitem(last=False)  # least recently released cached page
            del self.cached[self.block_hash[page]]
            self.block_hash[page] = None
            self.block_tokens[page] = None
        self.ref[page] = 1
        return page

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give ``seq`` pages for its first ``num_tokens`` tokens (caller checked ``num_free``)."""
        for _ in range(self.extra_blocks(seq, num_tokens)):
            seq.block_table.append(self._new_page())

    def release(self, seq: Sequence) -> None:
        """Drop ``seq``'s pages; cached ones stay reusable until evicted."""
        for page in reversed(seq.block_table):
            self.ref[page] -= 1
            if self.ref[page] == 0:
                if self.block_hash[page] is not None:
                    self.evictable[page] = None
                else:
                    self.free.append(page)
        seq.block_table = []
        seq.num_computed = 0
        seq.committed_pages, seq.last_page_hash = 0, None
