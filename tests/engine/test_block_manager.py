"""Pages and the prefix cache: reference counts, chained hashes with a token check, LRU eviction."""
import pytest

from detcompile.engine.block_manager import BlockManager
from detcompile.engine.sampling_params import SamplingParams
from detcompile.engine.sequence import Sequence


def seq(tokens, **kw):
    return Sequence(list(tokens), SamplingParams(), 0, **kw)


def fill(bm, s):
    """Admit, give pages for every token, mark all computed, register full pages."""
    bm.admit(s)
    bm.grow(s, len(s))
    s.num_computed = len(s)
    bm.commit(s)


def test_page_zero_is_reserved_and_pages_are_unique():
    bm = BlockManager(9, 4)
    s = seq(range(30))
    bm.admit(s)
    bm.grow(s, 30)
    assert len(s.block_table) == 8 and 0 not in s.block_table and len(set(s.block_table)) == 8
    assert bm.num_free == 0


def test_prefix_hit_reuses_full_pages_and_leaves_the_last_token():
    bm = BlockManager(32, 4)
    a = seq(range(10))
    fill(bm, a)
    b = seq(list(range(8)) + [99, 98, 97])
    bm.admit(b)
    assert b.num_computed == 8 and b.block_table == a.block_table[:2]
    c = seq(range(8))  # the whole prompt is cached: the last page is recomputed for its logits
    bm.admit(c)
    assert c.num_computed == 4


def test_hash_chain_and_token_check_prevent_false_hits():
    bm = BlockManager(32, 4)
    fill(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    other = seq([0, 2, 3, 4, 5, 6, 7, 8, 9])  # same second page, different first page
    bm.admit(other)
    assert other.num_computed == 0
    # a colliding hash with other tokens must not hit: poison the registered tokens
    page = next(iter(bm.cached.values()))
    bm.block_tokens[page] = (7, 7, 7, 7)
    again = seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.admit(again)
    assert again.num_computed == 0


def test_released_cached_pages_are_evicted_lru_only_when_needed():
    bm = BlockManager(5, 4)  # 4 usable pages
    a, b = seq(range(9)), seq(range(100, 109))
    fill(bm, a)
    bm.release(a)
    assert bm.num_free == 4 and len(bm.evictable) == 2  # a's two full pages stay cached
    # b needs 3 pages: the 2 free ones, then the least recently released cached page, which is
    # a's second page (release goes from the last page back to the first)
    fill(bm, b)
    bm.release(b)
    c = seq(range(9))
    bm.admit(c)
    assert c.num_computed == 4


def test_flush_forgets_everything_unreferenced():
    bm = BlockManager(16, 4)
    a = seq(range(12))
    fill(bm, a)
    bm.release(a)
    bm.flush()
    assert not bm.cached and not bm.evictable and bm.num_free == 15
    b = seq(range(12))
    bm.admit(b)
    assert b.num_computed == 0


def test_refcounts_keep_shared_pages_alive():
    bm = BlockManager(16, 4)
    a = seq(range(12))
    fill(bm, a)
    b = seq(range(12))
    bm.admit(b)
    shared = b.block_table[0]
    bm.release(a)
    assert bm.ref[shared] == 1 and shared not in bm.evictable
    bm.release(b)
    assert bm.ref[shared] == 0 and shared in bm.evictable


def test_prompt_logprob_requests_compute_the_whole_prompt():
    bm = BlockManager(16, 4)
    fill(bm, seq(range(12)))
    s = Sequence(list(range(12)), SamplingParams(prompt_logprobs=0), 0)
    bm.admit(s)
    assert s.num_computed == 0


def test_too_small_cache_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        BlockManager(1, 4)
