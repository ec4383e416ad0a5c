"""The core with a sliding window: which KV block ids are handed back when (exact ids, reference counts, free
queue order), with chunked prefill, a cache smaller than a request, prefix hits, forks, beams and preemption."""

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from llmapi._core import BlockManager, ExecutorConfig, Request, Scheduler
from llmapi.errors import RequestError

R = BlockManager.RELEASED


def make_scheduler(**overrides) -> Scheduler:
    config = dict(max_batch_size=8, max_num_tokens=64, max_seq_len=256, tokens_per_block=4, num_blocks=32,
                  sliding_window=6)
    config.update(overrides)
    return Scheduler(ExecutorConfig(**config))


def plan(output):
    return [(s.request_id, s.num_computed_tokens, s.num_new_tokens) for s in output.scheduled]


def result(batch, seed=0):
    """A runner's answer for `batch`: per row num_candidates distinct tokens with falling scores."""
    k = max(1, int(np.max(batch.num_candidates))) if batch.num_requests else 1
    rows = int(batch.num_requests)
    rng = np.random.default_rng(seed)
    tokens = np.stack([rng.choice(np.arange(10, 200), size=k, replace=False) for _ in range(rows)]).astype(np.int32)
    scores = -np.sort(rng.random((rows, k)).astype(np.float32), axis=1) - 0.1
    return SimpleNamespace(tokens=tokens, scores=scores, logprobs=scores, ranks=None, top_ids=None,
                           top_logprobs=None)


def expected_released(num_computed, window, block):
    """Leading blocks no query at position num_computed or later reads: each wholly before its window."""
    return max(0, num_computed - window + 1) // block


def check_invariants(s: Scheduler, window: int, block: int):
    """Released entries lead each table and are exactly those before the window; every block's reference
    count is the number of tables holding it, and the used blocks are exactly the held ones."""
    bm = s.block_manager
    held = Counter()
    for rid in s.running_ids:
        r = s.request(rid)
        table = r.block_ids
        released = sum(1 for b in table if b == R)
        assert table[:released] == [R] * released, table
        assert released == min(len(table), expected_released(r.num_computed_tokens, window, block)), (rid, table)
        held.update(b for b in table if b != R)
    assert all(bm.ref_count(b) == n for b, n in held.items()), held
    assert bm.num_used_blocks == len(held)


# ------------------------------------------------------------------------------------ BlockManager
def test_release_leading_hands_back_blocks_in_table_order_and_keeps_them_cached():
    bm = BlockManager(8, 4)
    tokens = list(range(100, 117))  # 17 tokens: 4 full blocks + 1
    table = bm.allocate([], 17)
    assert table == [0, 1, 2, 3, 4]
    bm.cache_full_blocks(table, tokens, 17)
    table = bm.release_leading(table, 2)
    assert table == [R, R, 2, 3, 4]
    assert (bm.ref_count(0), bm.ref_count(1), bm.ref_count(2)) == (0, 0, 1)
    assert bm.free_queue() == [5, 6, 7, 0, 1]  # the oldest first: evicted first
    assert (bm.num_used_blocks, bm.num_cached_blocks) == (3, 4)
    assert bm.lookup(tokens) == [0, 1, 2, 3]  # still findable until reused
    table = bm.release_leading(table, 3)  # entries already released are passed over
    assert table == [R, R, R, 3, 4] and bm.free_queue() == [5, 6, 7, 0, 1, 2]
    assert bm.release_leading(table, 99) == [R] * 5  # a count past the table releases all of it
    assert bm.free_queue() == [5, 6, 7, 0, 1, 2, 3, 4]
    bm.free([R] * 5)  # free passes over released entries
    assert bm.num_used_blocks == 0


def test_a_block_shared_by_a_fork_stays_until_every_holder_releases_it():
    bm = BlockManager(6, 4, enable_prefix_caching=False)
    parent = bm.allocate([], 12)
    child = bm.fork(parent)
    assert child == [0, 1, 2] and bm.ref_count(0) == 2
    parent = bm.release_leading(parent, 2)
    assert parent == [R, R, 2] and (bm.ref_count(0), bm.ref_count(1)) == (1, 1)
    assert bm.free_queue() == [3, 4, 5]  # the child still holds 0 and 1
    grandchild = bm.fork(parent)  # a fork of a released table shares only what it holds
    assert grandchild == [R, R, 2] and (bm.ref_count(0), bm.ref_count(2)) == (1, 3)
    child = bm.release_leading(child, 1)
    assert child == [R, 1, 2] and bm.free_queue() == [3, 4, 5, 0]
    for table in (parent, child, grandchild):
        bm.free(table)
    assert bm.num_used_blocks == 0 and bm.free_queue() == [3, 4, 5, 0, 1, 2]


def test_a_block_filled_after_its_parent_was_released_chains_from_its_tokens():
    # A window inside one block: block 1 is handed back before block 2 fills.
    bm = BlockManager(8, 4)
    tokens = list(range(50, 62))
    table = bm.allocate([], 12)
    bm.cache_full_blocks(table, tokens, 9)
    table = bm.release_leading(table, 2)
    assert table == [R, R, 2]
    bm.cache_full_blocks(table, tokens, 12)
    h0 = BlockManager.hash_block_tokens(None, tokens[0:4])
    h1 = BlockManager.hash_block_tokens(h0, tokens[4:8])
    assert bm.block_hash(2) == BlockManager.hash_block_tokens(h1, tokens[8:12])
    assert bm.lookup(tokens + [1]) == [0, 1, 2]


def test_writing_into_a_released_block_is_an_internal_error():
    bm = BlockManager(4, 4)
    table = bm.release_leading(bm.allocate([], 8), 1)
    with pytest.raises(RuntimeError, match="released"):
        bm.allocate_for_write(table, 2, 9)


# ------------------------------------------------------------------------------------ Scheduler
def test_decoding_hands_back_each_block_once_the_window_has_passed_it():
    s = make_scheduler(sliding_window=6, num_blocks=8)
    s.add(Request(1, [1, 2, 3, 4, 5], max_tokens=20, ignore_eos=True))
    out = s.schedule()
    assert plan(out) == [(1, 0, 5)] and s.request(1).block_ids == [0, 1]
    s.update(out, [10])
    history = []  # (next position, block table, free queue) after each step
    for token in range(11, 22):
        out = s.schedule()
        batch = s.make_batch(out)
        assert batch.block_tables.tolist() == [s.request(1).block_ids]  # released entries reach the runner as -1
        s.update(out, [token])
        r = s.request(1)
        history.append((r.num_computed_tokens, r.block_ids, s.block_manager.free_queue()))
    # A query at position p reads p - 5 .. p: block 0 (positions 0-3) is unread from p = 9 on, block 1 from 13.
    assert history[2] == (8, [0, 1], [2, 3, 4, 5, 6, 7])
    assert history[3] == (9, [R, 1, 2], [3, 4, 5, 6, 7, 0])
    assert history[6] == (12, [R, 1, 2], [3, 4, 5, 6, 7, 0])
    assert history[7] == (13, [R, R, 2, 3], [4, 5, 6, 7, 0, 1])
    assert history[10] == (16, [R, R, 2, 3], [4, 5, 6, 7, 0, 1])
    check_invariants(s, 6, 4)
    while s.has_unfinished:
        out = s.schedule()
        held = [b for b in s.request(1).block_ids if b != R]
        assert len(held) <= -(-6 // 4) + 1  # the window's blocks and the one written
        s.update(out, [30])
        check_invariants(s, 6, 4)
    assert s.block_manager.num_used_blocks == 0


def test_a_request_longer_than_the_cache_runs_in_chunks_that_fit():
    # 40 prompt tokens need 10 blocks; the cache has 4. Each chunk is as long as fits with the blocks before
    # the window handed back.
    s = make_scheduler(sliding_window=6, num_blocks=4, max_num_tokens=64, max_seq_len=128)
    s.add(Request(1, list(range(100, 140)), max_tokens=30, ignore_eos=True))
    steps = []
    for _ in range(5):
        out = s.schedule()
        steps.append((plan(out), s.request(1).block_ids))
        s.update(out, [7])
        check_invariants(s, 6, 4)
    assert steps == [
        ([(1, 0, 16)], [0, 1, 2, 3]),
        ([(1, 16, 8)], [R, R, 2, 3, 0, 1]),      # p = 16: blocks 0 and 1 (positions 0-7) are behind the window
        ([(1, 24, 8)], [R, R, R, R, 0, 1, 2, 3]),
        ([(1, 32, 8)], [R] * 6 + [2, 3, 0, 1]),  # the prompt's last chunk samples
        ([(1, 40, 1)], [R] * 8 + [0, 1, 2]),
    ]
    while s.has_unfinished:
        s.update(s.schedule(), [8])
        check_invariants(s, 6, 4)
    assert s.block_manager.num_used_blocks == 0
    # Without the window the same request can never fit.
    with pytest.raises(RequestError, match="needs 10 KV blocks"):
        make_scheduler(sliding_window=0, num_blocks=4).add(Request(2, list(range(100, 140)), max_tokens=1))
    # Nor without chunked prefill: a preempted request would recompute every token in one step.
    with pytest.raises(RequestError, match="needs 10 KV blocks"):
        make_scheduler(num_blocks=4, max_num_tokens=128, max_seq_len=128, enable_chunked_prefill=False).add(
            Request(3, list(range(100, 140)), max_tokens=1))


def test_a_prefix_hit_hands_back_its_blocks_before_the_window_at_admission():
    s = make_scheduler(sliding_window=6, num_blocks=10)
    prompt = list(range(60, 80))  # 5 full blocks
    s.add(Request(1, prompt, max_tokens=1))
    out = s.schedule()
    assert s.request(1).block_ids == [0, 1, 2, 3, 4]
    s.update(out, [9])  # finishes: p = 20 released blocks 0-2 first, then the rest is freed, last first
    assert s.block_manager.free_queue() == [5, 6, 7, 8, 9, 0, 1, 2, 4, 3]
    assert s.block_manager.num_cached_blocks == 5
    s.add(Request(2, prompt + [3], max_tokens=2))
    out = s.schedule()
    assert plan(out) == [(2, 20, 1)] and s.stats()["num_prefix_hit_tokens"] == 20
    # Blocks 0-2 were taken and handed back at once (still cached); 3 and 4 are read; 5 takes position 20.
    assert s.request(2).block_ids == [R, R, R, 3, 4, 5]
    assert [s.block_manager.ref_count(b) for b in range(6)] == [0, 0, 0, 1, 1, 1]
    assert s.block_manager.free_queue() == [6, 7, 8, 9, 0, 1, 2]
    s.update(out, [4])
    while s.has_unfinished:
        s.update(s.schedule(), [4])
    assert s.block_manager.num_used_blocks == 0


def test_a_window_holds_fewer_blocks_so_a_long_generation_never_preempts():
    # Three requests generate 60 tokens each in a cache of 9 blocks: with the window each holds at most 3.
    s = make_scheduler(sliding_window=6, num_blocks=9)
    for rid in (1, 2, 3):
        s.add(Request(rid, [rid] * 5, max_tokens=60, ignore_eos=True))
    while s.has_unfinished:
        out = s.schedule()
        assert not out.preempted
        s.update(out, result(s.make_batch(out)))
        check_invariants(s, 6, 4)
    assert s.stats()["num_preemptions"] == 0 and s.block_manager.num_used_blocks == 0


def test_preemption_frees_only_held_blocks_and_the_recompute_hands_back_again():
    s = make_scheduler(sliding_window=5, num_blocks=5, tokens_per_block=2, max_num_tokens=64)
    s.add(Request(1, [1, 2, 3, 4, 5], max_tokens=30, ignore_eos=True))
    s.add(Request(2, [6, 7, 8, 9, 10], max_tokens=30, ignore_eos=True))
    s.add(Request(3, [11, 12, 13], max_tokens=30, ignore_eos=True))
    preempted = 0
    for i in range(400):
        if not s.has_unfinished:
            break
        out = s.schedule()
        preempted += len(out.preempted)
        s.update(out, result(s.make_batch(out), seed=i))
        check_invariants(s, 5, 2)
    assert not s.has_unfinished and preempted > 0
    assert s.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("beam", [False, True])
def test_forked_sequences_share_blocks_until_each_passes_the_window(beam):
    s = make_scheduler(sliding_window=5, num_blocks=24, tokens_per_block=2)
    s.add(Request(1, [5, 6, 7, 8, 9, 10, 11], max_tokens=25, num_sequences=3, beam_search=beam, ignore_eos=True,
                  seed=3))
    s.add(Request(2, [3, 4], max_tokens=20, ignore_eos=True))
    copies = 0
    for i in range(200):
        if not s.has_unfinished:
            break
        out = s.schedule()
        copies += len(out.block_copies)
        s.update(out, result(s.make_batch(out), seed=i))
        check_invariants(s, 5, 2)
    assert not s.has_unfinished and copies > 0
    assert s.block_manager.num_used_blocks == 0


def test_async_scheduling_keeps_the_blocks_a_step_in_flight_reads():
    s = make_scheduler(sliding_window=6, num_blocks=8, async_scheduling=True)
    s.add(Request(1, [1, 2, 3, 4, 5], max_tokens=30, ignore_eos=True))
    first = s.schedule()
    inflight = [first]
    tokens = 0
    while s.has_unfinished:
        nxt = s.schedule()  # ahead of the step in flight
        if nxt.scheduled:
            for row in nxt.scheduled:
                # Every block the step ahead reads (its window) is held, none was handed back.
                table = s.request(row.request_id).block_ids
                lo = max(0, row.num_computed_tokens - 6 + 1) // 4
                assert R not in table[lo:]
            inflight.append(nxt)
        done = inflight.pop(0)
        s.update(done, [20 + tokens] * len(done.scheduled))
        tokens += 1
        check_invariants(s, 6, 4)
    assert s.block_manager.num_used_blocks == 0


def test_config_names_a_bad_window():
    with pytest.raises(ValueError, match="sliding_window=-1"):
        ExecutorConfig(max_batch_size=1, max_num_tokens=8, max_seq_len=8, tokens_per_block=4, num_blocks=4,
                       sliding_window=-1)
    config = ExecutorConfig(max_batch_size=1, max_num_tokens=8, max_seq_len=8, tokens_per_block=4, num_blocks=4,
                            sliding_window=4096)
    assert config.sliding_window == 4096 and "sliding_window=4096" in repr(config)
