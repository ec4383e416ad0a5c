"""The core's forked sequences: n samples and beams share the prompt's KV blocks by reference count,
a shared, partly filled block is copied before it is written (copy-on-write, listed in the batch),
beams step together, and every block is free once the request is done."""

from types import SimpleNamespace

import numpy as np

from llmapi._core import BlockManager, ExecutorConfig, Request, Scheduler


def make_scheduler(**overrides):
    config = dict(max_batch_size=8, max_num_tokens=64, max_seq_len=64, tokens_per_block=4, num_blocks=32)
    config.update(overrides)
    return Scheduler(ExecutorConfig(**config))


def step(tokens, scores=None):
    """A runner's answer: tokens [R, K] (and beam scores), no logprobs."""
    tokens = np.asarray(tokens, dtype=np.int32)
    return SimpleNamespace(tokens=tokens, scores=None if scores is None else np.asarray(scores, np.float32),
                           logprobs=None, ranks=None, top_ids=None, top_logprobs=None)


def test_block_manager_fork_and_copy_on_write():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    table = bm.allocate([], 6)  # blocks 0 (full) and 1 (2 of 4 slots)
    assert table == [0, 1]
    child = bm.fork(table)
    assert child == [0, 1] and bm.ref_count(0) == 2 and bm.ref_count(1) == 2
    # The child writes position 6, in the shared block 1: it gets a copy (block 2) first.
    grown, copies = bm.allocate_for_write(child, 6, 7)
    assert grown == [0, 2] and copies == [1, 2]
    assert (bm.ref_count(0), bm.ref_count(1), bm.ref_count(2)) == (2, 1, 1)
    # The parent is now alone in block 1: it writes in place.
    grown, copies = bm.allocate_for_write(table, 6, 9)
    assert grown == [0, 1, 3] and copies == []
    bm.free([0, 2])
    bm.free([0, 1, 3])
    assert bm.num_used_blocks == 0


def test_n_samples_fork_sharing_the_prompt_blocks():
    s = make_scheduler()
    s.add(Request(1, [5, 6, 7, 8, 9, 10], max_tokens=3, num_sequences=3, seed=4))
    out = s.schedule()
    batch = s.make_batch(out)
    assert list(batch.num_candidates) == [3] and list(batch.logprobs) == [0]  # ranked by logprob
    responses = s.update(out, step([[20, 21, 22]]))
    assert [(r.request_id, r.seq_index, r.token_ids, r.finished) for r in responses] == [
        (1, 0, [20], False), (1, 1, [21], False), (1, 2, [22], False)]
    ids = s.running_ids
    tables = [s.request(i).block_ids for i in ids]
    assert tables == [[0, 1]] * 3 and s.block_manager.ref_count(0) == 3  # shared, not copied
    out = s.schedule()
    batch = s.make_batch(out)
    # Each sequence writes its first token into the shared block 1: two copy it, the last keeps it.
    assert batch.block_copies.tolist() == [[1, 2], [1, 3]]
    assert list(batch.seq_index) == [0, 1, 2] and list(batch.input_ids) == [20, 21, 22]
    assert list(batch.num_candidates) == [1, 1, 1]
    s.update(out, step([[30], [31], [32]]))
    responses = s.update(s.schedule(), step([[40], [41], [42]]))
    assert [r.request_finished for r in responses] == [False, False, True]
    assert s.block_manager.num_used_blocks == 0 and not s.has_unfinished


def test_beams_step_together_share_blocks_and_free_everything():
    s = make_scheduler()
    s.add(Request(7, [5, 6, 7, 8, 9, 10], max_tokens=4, num_sequences=2, beam_search=True,
                  eos_token_ids=[2]))
    s.add(Request(8, [3, 4], max_tokens=6))  # a plain neighbour
    out = s.schedule()
    batch = s.make_batch(out)
    assert list(batch.num_candidates) == [4, 1] and list(batch.beam) == [1, 0]  # 2 * max(2, 1 + 1 eos)
    s.update(out, step([[11, 12, 13, 14], [30, -1, -1, -1]], [[-0.5, -1.0, -1.5, -2.0], [0, 0, 0, 0]]))
    beams = [i for i in s.running_ids if s.request(i).user_id == 7]
    assert len(beams) == 2
    assert [s.request(i).output_token_ids for i in beams] == [[11], [12]]
    assert [s.request(i).block_ids for i in beams] == [[0, 1], [0, 1]]
    out = s.schedule()
    batch = s.make_batch(out)
    assert batch.block_copies.tolist() == [[1, 3]]  # block 2 went to the neighbour
    assert sorted(np.asarray(batch.request_ids).tolist()) == [7, 7, 8]
    # Both beams' best continuations come from beam 0: beam 1 is replaced by a fork of beam 0.
    rows = {int(r): i for i, r in enumerate(batch.seq_index) if batch.request_ids[i] == 7}
    tokens = np.full((3, 4), -1)
    scores = np.zeros((3, 4))
    tokens[rows[0]], scores[rows[0]] = [15, 16, 17, 18], [-0.1, -0.2, -5, -6]
    tokens[rows[1]], scores[rows[1]] = [19, 20, 21, 22], [-3, -4, -5, -6]
    s.update(out, step(tokens, scores))
    assert [s.request(i).output_token_ids for i in beams] == [[11, 15], [11, 16]]
    assert [s.request(i).block_ids for i in beams] == [[0, 3], [0, 3]]  # beam 0's copy, shared by both
    while s.has_unfinished:
        out = s.schedule()
        batch = s.make_batch(out)
        n = batch.num_requests
        s.update(out, step(np.tile([[23, 24, 25, 26]], (n, 1)), np.tile([[-0.1, -0.2, -0.3, -0.4]], (n, 1))))
    assert s.block_manager.num_used_blocks == 0
