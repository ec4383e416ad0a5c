"""BlockManager: exact block ids, reference counts, chained prefix hashes and LRU eviction order."""

import pytest

from llmapi._core import BlockManager


def test_fresh_blocks_are_handed_out_in_id_order():
    bm = BlockManager(6, 4)
    assert bm.free_queue() == [0, 1, 2, 3, 4, 5]
    a = bm.allocate([], 10)  # ceil(10 / 4) = 3 blocks
    assert a == [0, 1, 2]
    assert bm.allocate(a, 12) == [0, 1, 2]  # still 3 blocks
    a = bm.allocate(a, 13)
    assert a == [0, 1, 2, 3]
    b = bm.allocate([], 8)
    assert b == [4, 5]
    assert (bm.num_free_blocks, bm.num_used_blocks) == (0, 6)
    assert bm.allocate([], 1) is None
    assert bm.allocate(b, 9) is None  # a failed allocation changes nothing
    assert [bm.ref_count(i) for i in range(6)] == [1] * 6


def test_free_releases_a_table_last_block_first():
    bm = BlockManager(6, 4, enable_prefix_caching=False)
    a = bm.allocate([], 12)
    b = bm.allocate([], 8)
    assert (a, b) == ([0, 1, 2], [3, 4])
    bm.free(a)
    assert bm.free_queue() == [5, 2, 1, 0]
    assert bm.allocate([], 12) == [5, 2, 1]
    assert bm.free_queue() == [0]
    with pytest.raises(ValueError):
        bm.free([0])  # not in use


def test_full_blocks_are_hashed_as_a_chain():
    bm = BlockManager(8, 4)
    tokens = list(range(100, 110))  # 10 tokens: 2 full blocks + 2 tokens
    a = bm.allocate([], 10)
    bm.cache_full_blocks(a, tokens, 10)
    h0 = BlockManager.hash_block_tokens(None, tokens[0:4])
    h1 = BlockManager.hash_block_tokens(h0, tokens[4:8])
    assert h0 == BlockManager.hash_block_tokens(BlockManager.ROOT_HASH, tokens[0:4])
    assert (bm.block_hash(0), bm.block_hash(1), bm.block_hash(2)) == (h0, h1, None)
    assert bm.num_cached_blocks == 2
    # Generated tokens fill block 2; it is hashed once all its KV is computed.
    tokens += [110, 111]
    bm.cache_full_blocks(a, tokens, 11)
    assert bm.block_hash(2) is None
    bm.cache_full_blocks(a, tokens, 12)
    assert bm.block_hash(2) == BlockManager.hash_block_tokens(h1, [108, 109, 110, 111])
    assert bm.num_cached_blocks == 3


def test_lookup_leaves_at_least_one_token_to_compute():
    bm = BlockManager(8, 4)
    tokens = list(range(100, 112))
    a = bm.allocate([], 12)
    bm.cache_full_blocks(a, tokens, 12)
    assert bm.lookup(tokens) == [0, 1]        # floor(11 / 4) = 2 blocks
    assert bm.lookup(tokens + [7]) == [0, 1, 2]
    assert bm.lookup(tokens[:9]) == [0, 1]
    assert bm.lookup(tokens[:8]) == [0]
    assert bm.lookup(tokens[:5]) == [0]
    assert bm.lookup(tokens[:4]) == []
    # The chain: block 1's tokens after a different first block are not a hit ...
    assert bm.lookup([1, 2, 3, 4] + tokens[4:8] + [0]) == []
    # ... and a sequence diverging inside block 1 hits block 0 only.
    assert bm.lookup(tokens[:4] + [9, 9, 9, 9, 9]) == [0]


def test_shared_prefix_reference_counts_and_free_accounting():
    bm = BlockManager(8, 4)
    toks = list(range(12))
    a = bm.allocate([], 12)
    bm.cache_full_blocks(a, toks, 12)
    hit = bm.lookup(toks + [50])
    assert hit == [0, 1, 2]
    b = bm.allocate([], 13, hit)
    assert b == [0, 1, 2, 3]
    hit_c = bm.lookup(toks[:8] + [70, 71, 72])
    assert hit_c == [0, 1]
    c = bm.allocate([], 11, hit_c)
    assert c == [0, 1, 4]
    assert [bm.ref_count(i) for i in range(8)] == [3, 3, 2, 1, 1, 0, 0, 0]
    assert (bm.num_free_blocks, bm.num_used_blocks) == (3, 5)

    bm.free(a)
    assert [bm.ref_count(i) for i in range(5)] == [2, 2, 1, 1, 1]
    assert bm.num_free_blocks == 3
    bm.free(b)  # 3 then 2 drop to 0 and join the tail
    assert bm.free_queue() == [5, 6, 7, 3, 2]
    assert [bm.ref_count(i) for i in range(5)] == [1, 1, 0, 0, 1]
    bm.free(c)
    assert bm.free_queue() == [5, 6, 7, 3, 2, 4, 1, 0]
    # Free = never used or uncached (5, 6, 7, 3, 4) + cached with no reference (0, 1, 2).
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.num_cached_blocks) == (8, 0, 3)
    assert bm.lookup(toks + [1]) == [0, 1, 2]


def test_cached_blocks_are_evicted_in_lru_order_when_reused():
    bm = BlockManager(8, 4)
    toks = list(range(12))
    a = bm.allocate([], 12)
    bm.cache_full_blocks(a, toks, 12)
    bm.free(a)
    assert bm.free_queue() == [3, 4, 5, 6, 7, 2, 1, 0]
    assert bm.allocate([], 20) == [3, 4, 5, 6, 7]  # uncached blocks go first
    assert bm.num_cached_blocks == 3
    assert bm.allocate([], 4) == [2]  # evicts the tail block of the freed sequence
    assert (bm.block_hash(2), bm.num_cached_blocks) == (None, 2)
    assert bm.lookup(toks + [1]) == [0, 1]
    assert bm.allocate([], 4) == [1]
    assert bm.lookup(toks + [1]) == [0]
    assert (bm.num_free_blocks, bm.num_cached_blocks) == (1, 1)


def test_a_lookup_hit_takes_the_block_out_of_the_free_queue():
    bm = BlockManager(4, 2)
    a = bm.allocate([], 4)
    bm.cache_full_blocks(a, [1, 2, 3, 4], 4)
    bm.free(a)
    assert bm.free_queue() == [2, 3, 1, 0]
    hit = bm.lookup([1, 2, 3, 4, 5])
    assert hit == [0, 1]
    assert bm.allocate([], 5, hit) == [0, 1, 2]
    assert bm.free_queue() == [3]
    assert [bm.ref_count(i) for i in range(4)] == [1, 1, 1, 0]
    with pytest.raises(ValueError):
        bm.allocate([3], 8, hit)  # a cached prefix only starts an empty table


def test_prefix_blocks_sitting_in_the_free_queue_count_against_availability():
    bm = BlockManager(3, 2)
    a = bm.allocate([], 4)
    bm.cache_full_blocks(a, [1, 2, 3, 4], 4)
    bm.free(a)
    hit = bm.lookup([1, 2, 3, 4, 5, 6, 7])
    assert hit == [0, 1]
    # 7 tokens need 4 blocks: 2 cached + 2 new, but taking the 2 cached ones leaves 1 free.
    assert bm.allocate([], 7, hit) is None
    assert (bm.num_free_blocks, bm.ref_count(0), bm.free_queue()) == (3, 0, [2, 1, 0])
    assert bm.allocate([], 5, hit) == [0, 1, 2]
    assert bm.num_free_blocks == 0


def test_the_first_block_computed_for_a_prefix_is_the_cached_one():
    bm = BlockManager(4, 2)
    a = bm.allocate([], 2)
    b = bm.allocate([], 2)
    bm.cache_full_blocks(a, [7, 8], 2)
    bm.cache_full_blocks(b, [7, 8], 2)
    assert bm.block_hash(1) == bm.block_hash(0)
    assert (bm.num_cached_blocks, bm.lookup([7, 8, 9])) == (1, [0])
    bm.free(a)
    assert bm.allocate([], 6) == [2, 3, 0]  # evicts block 0; its private copy is not cached
    assert (bm.num_cached_blocks, bm.lookup([7, 8, 9])) == (0, [])


def test_prefix_caching_off_hashes_nothing():
    bm = BlockManager(4, 2, enable_prefix_caching=False)
    a = bm.allocate([], 4)
    bm.cache_full_blocks(a, [1, 2, 3, 4], 4)
    assert (bm.block_hash(0), bm.num_cached_blocks, bm.lookup([1, 2, 3, 4, 5])) == (None, 0, [])


def test_invalid_sizes_raise_value_error():
    with pytest.raises(ValueError, match="num_blocks=0"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match="tokens_per_block=0"):
        BlockManager(4, 0)
