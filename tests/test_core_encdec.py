"""The core's encoder-decoder requests: the encoder step (its tokens under the step budget, never chunked) and
the batch fields it fills, cross-attention blocks allocated with it and shared by samples and beams by reference
count, freed at finish, abort and preemption (which runs the encoder again), and the prefix-cache salt that keeps
decoder blocks of different sources apart. Expectations are hand-computed from the documented allocation order
or recomputed in plain Python from the batch's own tables."""

import random
from collections import Counter, deque
from types import SimpleNamespace

import numpy as np
import pytest

from llmapi._core import ExecutorConfig, Request, Scheduler
from llmapi.errors import RequestError

B = 4  # tokens per block in most tests


def make_scheduler(**overrides) -> Scheduler:
    config = dict(max_batch_size=8, max_num_tokens=32, max_seq_len=64, tokens_per_block=B, num_blocks=64)
    config.update(overrides)
    return Scheduler(ExecutorConfig(**config))


def plan(output):
    return [(s.request_id, s.num_new_tokens, s.num_encoder_tokens, s.do_sample) for s in output.scheduled]


def step(tokens, scores=None):
    """A runner's answer: tokens [R, K] (and beam scores), no logprobs."""
    tokens = np.asarray(tokens, dtype=np.int32)
    return SimpleNamespace(tokens=tokens, scores=None if scores is None else np.asarray(scores, np.float32),
                           logprobs=None, ranks=None, top_ids=None, top_logprobs=None)


def used(s) -> int:
    return s.stats()["num_used_blocks"]


def expected_cross_slots(batch) -> list:
    """cross_slot_mapping recomputed from the batch's cross tables and encoder lengths."""
    tpb, slots = batch.tokens_per_block, []
    for row, length in enumerate(batch.encoder_lens.tolist()):
        table = batch.cross_block_tables[row]
        slots += [int(table[i // tpb]) * tpb + i % tpb for i in range(length)]
    return slots


def check_block_accounting(s):
    """Every block's reference count equals the number of tables (decoder and cross, over all unfinished
    sequences) that hold it, and the used blocks are exactly those held. Valid when no finished request's
    blocks wait for a step in flight."""
    refs, tables = Counter(), {}
    for rid in s.running_ids + s.waiting_ids:
        r = s.request(rid)
        refs.update(r.block_ids)
        refs.update(r.cross_block_ids)
        if r.encoder_token_ids and r.cross_block_ids:
            assert len(r.cross_block_ids) == -(-len(r.encoder_token_ids) // s.block_manager.tokens_per_block)
            # The sequences of one request (samples, beams) hold one copy of the cross blocks.
            assert tables.setdefault(r.user_id, r.cross_block_ids) == r.cross_block_ids
    bm = s.block_manager
    assert {b: bm.ref_count(b) for b in refs} == dict(refs)
    assert bm.num_used_blocks == len(refs)


def test_encoder_step_fills_the_batch_and_later_steps_read_the_cross_blocks():
    s = make_scheduler()
    enc_a, enc_b = list(range(10, 16)), list(range(20, 29))  # 6 and 9 encoder tokens
    s.add(Request(1, [0], max_tokens=4, encoder_token_ids=enc_a))
    s.add(Request(2, [0, 4], max_tokens=4, encoder_token_ids=enc_b))
    s.add(Request(3, [30, 31, 32], max_tokens=4))  # decoder-only, in the same batch
    out = s.schedule()
    assert plan(out) == [(1, 1, 6, True), (2, 2, 9, True), (3, 3, 0, True)]
    assert out.num_tokens == 6 + 1 + 9 + 2 + 3  # encoder tokens count against the budget
    b = s.make_batch(out)
    assert b.num_tokens == 6 and b.input_ids.tolist() == [0, 0, 4, 30, 31, 32]
    assert b.encoder_input_ids.tolist() == enc_a + enc_b
    assert b.encoder_lens.tolist() == [6, 9, 0] and b.cross_lens.tolist() == [6, 9, 0]
    # Admission order: each request takes its decoder blocks, then its cross blocks.
    assert b.block_tables.tolist() == [[0], [3], [7]]
    assert b.max_cross_blocks == 3
    assert b.cross_block_tables.tolist() == [[1, 2, 0], [4, 5, 6], [0, 0, 0]]
    assert b.cross_slot_mapping.tolist() == [4, 5, 6, 7, 8, 9] + list(range(16, 25))
    assert b.cross_slot_mapping.tolist() == expected_cross_slots(b)
    assert b.forced_token_ids.tolist() == [-1, -1, -1]
    assert s.request(1).cross_block_ids == [1, 2] and s.request(3).cross_block_ids == []
    assert not b.encoder_input_ids.flags.writeable and not b.cross_block_tables.flags.writeable
    check_block_accounting(s)

    s.update(out, [40, 41, 42])
    out = s.schedule()
    assert plan(out) == [(1, 1, 0, True), (2, 1, 0, True), (3, 1, 0, True)]
    assert out.num_tokens == 3
    b = s.make_batch(out)
    assert b.encoder_input_ids.tolist() == [] and b.cross_slot_mapping.tolist() == []
    assert b.encoder_lens.tolist() == [0, 0, 0]
    assert b.cross_lens.tolist() == [6, 9, 0]  # every decode step reads the encoder's keys
    assert b.cross_block_tables.tolist() == [[1, 2, 0], [4, 5, 6], [0, 0, 0]]
    while s.has_unfinished:
        s.update(out, [50] * len(out.scheduled))
        out = s.schedule()
    assert used(s) == 0


def test_a_batch_without_encoder_decoder_rows_has_no_cross_columns():
    s = make_scheduler()
    s.add(Request(1, [3, 4, 5], max_tokens=2))
    b = s.make_batch(s.schedule())
    assert b.max_cross_blocks == 0 and b.cross_block_tables.shape == (1, 0)
    assert b.encoder_lens.tolist() == [0] and b.cross_lens.tolist() == [0] and len(b.encoder_input_ids) == 0


def test_encoder_tokens_count_against_the_budget_and_are_never_chunked():
    s = make_scheduler(max_num_tokens=16)
    s.add(Request(1, [0], max_tokens=3, encoder_token_ids=list(range(10, 20))))  # 10 + 1
    s.add(Request(2, [0], max_tokens=3, encoder_token_ids=list(range(10, 18))))  # 8 + 1: 5 left, waits
    s.add(Request(3, [7], max_tokens=3))  # would fit, but no overtaking
    out = s.schedule()
    assert plan(out) == [(1, 1, 10, True)] and out.num_tokens == 11
    assert s.waiting_ids == [2, 3]
    s.update(out, [40])
    out = s.schedule()
    assert plan(out) == [(1, 1, 0, True), (2, 1, 8, True), (3, 1, 0, True)] and out.num_tokens == 11

    # A long decoder prompt is chunked beside the whole encoder input: 10 + 6, then the other 6.
    s = make_scheduler(max_num_tokens=16)
    s.add(Request(1, list(range(3, 15)), max_tokens=2, encoder_token_ids=list(range(10, 20))))
    out = s.schedule()
    assert plan(out) == [(1, 6, 10, False)]
    s.update(out, [99])
    out = s.schedule()
    assert plan(out) == [(1, 6, 0, True)]
    # The encoder needs room for itself and a decoder token: with 6 tokens left, 5 + 1 fit, 6 + 1 do not.
    s.add(Request(2, [0], max_tokens=2, encoder_token_ids=list(range(6))))
    s.update(out, [40])
    s.add(Request(3, [0], max_tokens=2, encoder_token_ids=list(range(5))))
    out = s.schedule()  # request 1 decodes 1 token: 15 left, so 2 (6 + 1) and 3 (5 + 1) fit
    assert plan(out) == [(1, 1, 0, True), (2, 1, 6, True), (3, 1, 5, True)]


def test_without_chunked_prefill_the_encoder_and_decoder_prompt_go_whole():
    cfg = dict(max_num_tokens=16, max_seq_len=16, enable_chunked_prefill=False)
    s = make_scheduler(**cfg)
    s.add(Request(1, [0, 3, 4], max_tokens=3, encoder_token_ids=list(range(10, 14))))  # 4 + 3
    s.add(Request(2, [0, 3, 4, 5, 6], max_tokens=3, encoder_token_ids=list(range(10, 16))))  # 6 + 5 > 9 left
    out = s.schedule()
    assert plan(out) == [(1, 3, 4, True)]
    assert s.waiting_ids == [2]
    # With chunked prefill the same request takes its encoder and the decoder tokens that fit (9 - 6).
    s = make_scheduler(max_num_tokens=16)
    s.add(Request(1, [0, 3, 4], max_tokens=3, encoder_token_ids=list(range(10, 14))))
    s.add(Request(2, [0, 3, 4, 5, 6], max_tokens=3, encoder_token_ids=list(range(10, 16))))
    assert plan(s.schedule()) == [(1, 3, 4, True), (2, 3, 6, False)]
    # Without chunking, decoder tokens that cannot fit beside the encoder even in an empty step go in
    # the most such a step holds (16 - 10), so the request is never stuck.
    s = make_scheduler(**cfg)
    s.add(Request(1, list(range(3, 12)), max_tokens=3, encoder_token_ids=list(range(10, 20))))  # 10 + 9
    out = s.schedule()
    assert plan(out) == [(1, 6, 10, False)]
    s.update(out, [0])
    assert plan(s.schedule()) == [(1, 3, 0, True)]


def test_encoder_inputs_over_a_limit_are_refused_by_name():
    s = make_scheduler(max_num_tokens=16)
    with pytest.raises(RequestError, match=r"encoder input has 16 tokens, more than max_num_tokens - 1 = 15"):
        s.add(Request(1, [0], max_tokens=2, encoder_token_ids=list(range(16))))
    s.add(Request(2, [0], max_tokens=2, encoder_token_ids=list(range(15))))  # 15 + 1 decoder token fit
    assert plan(s.schedule()) == [(2, 1, 15, True)]

    s = make_scheduler(max_num_tokens=16, max_encoder_input_len=8)
    with pytest.raises(RequestError, match=r"encoder input has 9 tokens, more than max_encoder_input_len=8"):
        s.add(Request(1, [0], max_tokens=2, encoder_token_ids=list(range(9))))
    s.add(Request(2, [0], max_tokens=2, encoder_token_ids=list(range(8))))
    assert ExecutorConfig(max_batch_size=1, max_num_tokens=8, max_seq_len=8, tokens_per_block=4,
                          num_blocks=8).max_encoder_input_len == 0  # the default: no limit of its own
    with pytest.raises(ValueError, match=r"max_encoder_input_len=-1 is invalid"):
        ExecutorConfig(max_batch_size=1, max_num_tokens=8, max_seq_len=8, tokens_per_block=4, num_blocks=8,
                       max_encoder_input_len=-1)
    with pytest.raises(RequestError, match=r"encoder_token_ids=.*-3.* is invalid"):
        Request(1, [0], max_tokens=2, encoder_token_ids=[4, -3])
    for name in ("forced_eos_token_id", "forced_bos_token_id"):
        with pytest.raises(RequestError, match=rf"{name}=-2 is invalid"):
            Request(1, [0], max_tokens=2, **{name: -2})
        with pytest.raises(RequestError, match=rf"{name} holds token id 50, outside the vocabulary"):
            make_scheduler(vocab_size=50).add(Request(1, [0], max_tokens=2, **{name: 50}))
    with pytest.raises(RequestError, match=r"no_repeat_ngram_size=-1 is invalid"):
        Request(1, [0], max_tokens=2, no_repeat_ngram_size=-1)
    # Cross blocks and decoder blocks together must fit the cache: 3 + 2 > 4.
    s = make_scheduler(num_blocks=4)
    with pytest.raises(RequestError, match=r"prompt and its encoder input need 5 KV blocks .*3 for cross"):
        s.add(Request(1, [0, 1, 2, 3, 4], max_tokens=2, encoder_token_ids=list(range(12))))
    s = make_scheduler(sliding_window=8)
    with pytest.raises(RequestError, match=r"encoder_token_ids.*sliding_window=8"):
        s.add(Request(1, [0], max_tokens=2, encoder_token_ids=[5]))


def test_cross_blocks_are_shared_by_samples_and_freed_when_all_finish():
    s = make_scheduler()
    enc = list(range(10, 19))  # 9 tokens: 3 cross blocks
    s.add(Request(1, [0, 5], max_tokens=3, num_sequences=3, seed=4, encoder_token_ids=enc))
    out = s.schedule()
    assert plan(out) == [(1, 2, 9, True)]
    s.update(out, step([[20, 21, 22]]))
    seqs = [s.request(i) for i in s.running_ids]
    assert len(seqs) == 3 and {tuple(r.cross_block_ids) for r in seqs} == {(1, 2, 3)}
    assert [s.block_manager.ref_count(b) for b in (1, 2, 3)] == [3, 3, 3]  # shared, not copied
    check_block_accounting(s)
    out = s.schedule()
    b = s.make_batch(out)
    assert b.encoder_lens.tolist() == [0, 0, 0] and b.cross_lens.tolist() == [9, 9, 9]
    assert b.cross_block_tables.tolist() == [[1, 2, 3]] * 3
    assert not set(b.block_copies.flatten().tolist()) & {1, 2, 3}  # copy-on-write never touches them
    s.update(out, step([[30], [31], [32]]))
    # One sample finishes early (abort): the others keep the cross blocks.
    s.abort(1, seq_index=1)
    assert [s.block_manager.ref_count(b) for b in (1, 2, 3)] == [2, 2, 2]
    check_block_accounting(s)
    while s.has_unfinished:
        out = s.schedule()
        s.update(out, step([[40]] * len(out.scheduled)))
    assert used(s) == 0


def test_beams_share_the_cross_blocks_through_every_refork():
    s = make_scheduler()
    enc = list(range(10, 17))  # 7 tokens: 2 cross blocks
    s.add(Request(7, [0, 5, 6], max_tokens=4, num_sequences=2, beam_search=True, eos_token_ids=[2],
                  encoder_token_ids=enc))
    out = s.schedule()
    assert plan(out) == [(7, 3, 7, True)]
    s.update(out, step([[11, 12, 13, 14]], [[-0.5, -1.0, -1.5, -2.0]]))
    beams = list(s.running_ids)
    cross = s.request(beams[0]).cross_block_ids
    assert len(beams) == 2 and cross == [1, 2] and s.request(beams[1]).cross_block_ids == cross
    assert [s.block_manager.ref_count(b) for b in cross] == [2, 2]
    # Both next beams continue beam 0: beam 1 is replaced by a fork of beam 0, cross blocks included.
    out = s.schedule()
    b = s.make_batch(out)
    assert b.cross_block_tables.tolist() == [cross, cross] and b.encoder_lens.tolist() == [0, 0]
    rows = {int(r): i for i, r in enumerate(b.seq_index)}
    tokens, scores = np.full((2, 4), -1), np.zeros((2, 4))
    tokens[rows[0]], scores[rows[0]] = [15, 16, 17, 18], [-0.1, -0.2, -5, -6]
    tokens[rows[1]], scores[rows[1]] = [19, 20, 21, 22], [-3, -4, -5, -6]
    s.update(out, step(tokens, scores))
    assert [s.request(i).output_token_ids for i in beams] == [[11, 15], [11, 16]]
    assert [s.request(i).cross_block_ids for i in beams] == [cross, cross]
    assert [s.block_manager.ref_count(b) for b in cross] == [2, 2]
    check_block_accounting(s)
    while s.has_unfinished:
        out = s.schedule()
        n = len(out.scheduled)
        s.update(out, step(np.tile([[23, 24, 25, 26]], (n, 1)), np.tile([[-0.1, -0.2, -0.3, -0.4]], (n, 1))))
    assert used(s) == 0


def test_abort_frees_the_cross_blocks_waiting_running_and_in_flight():
    s = make_scheduler()
    enc = list(range(10, 20))
    s.add(Request(1, [0], max_tokens=8, encoder_token_ids=enc))
    s.add(Request(2, [0], max_tokens=8, encoder_token_ids=enc))
    s.abort(2)  # waiting: it never held a block
    out = s.schedule()
    assert plan(out) == [(1, 1, 10, True)] and used(s) == 1 + 3
    (r,) = s.abort(1) or [None]  # in flight: finished when its step is collected
    assert r is None and used(s) == 4
    (r,) = s.update(out, [5])
    assert (r.finished, r.finish_reason) == (True, "abort") and used(s) == 0

    s.add(Request(3, [0], max_tokens=8, encoder_token_ids=enc))
    s.update(s.schedule(), [5])
    (r,) = s.abort(3)  # running, not in flight
    assert r.finish_reason == "abort" and used(s) == 0


def test_abort_in_flight_with_async_scheduling():
    s = make_scheduler(async_scheduling=True)
    s.add(Request(1, [0, 4], max_tokens=8, encoder_token_ids=list(range(10, 20))))
    s.add(Request(2, [3, 4, 5], max_tokens=8))  # plain: runs ahead
    out1 = s.schedule()
    assert plan(out1) == [(1, 2, 10, True), (2, 3, 0, True)]
    out2 = s.schedule()  # both run ahead, the encoder-decoder request of its encoder step too
    assert [(x.request_id, x.input_row, x.num_encoder_tokens) for x in out2.scheduled] == [(1, 0, 0), (2, 1, 0)]
    b2 = s.make_batch(out2)  # the row ahead reads the cross blocks its step in flight writes
    assert b2.cross_lens.tolist() == [10, 0] and len(b2.encoder_input_ids) == 0
    assert b2.cross_block_tables[0].tolist() == s.request(1).cross_block_ids
    assert s.abort(1) == [] and s.abort(2) == []  # both in flight
    r = s.update(out1, [40, 41])
    assert sorted((x.request_id, x.finish_reason) for x in r) == [(1, "abort"), (2, "abort")]
    assert used(s) == 1 + 1 + 3  # blocks step 2 writes, still in flight: request 2's, request 1's decoder and cross
    assert s.update(out2, [42, 43]) == [] and used(s) == 0 and not s.has_unfinished

    # Finished by its own token while another step is in flight: freed at once.
    s.add(Request(3, [0], max_tokens=1, encoder_token_ids=list(range(10, 20))))
    s.add(Request(4, [3, 4], max_tokens=3))
    out1 = s.schedule()
    out2 = s.schedule()
    assert [x.request_id for x in out2.scheduled] == [4]  # 3 has no token left to run ahead for
    s.update(out1, [40, 41])
    assert s.request(4).num_tokens == 3 and used(s) == 1  # 3's freed; 4's block (positions 0-3, one ahead)
    while s.has_unfinished:
        s.update(out2, [43] * len(out2.scheduled))
        out2 = s.schedule()
    assert used(s) == 0


def test_preemption_frees_the_cross_blocks_and_runs_the_encoder_again():
    # 10 blocks of 2 tokens; each request holds 2 cross blocks and grows its decoder blocks.
    s = make_scheduler(tokens_per_block=2, num_blocks=10, max_num_tokens=64)
    enc1, enc2 = [11, 12, 13], [21, 22, 23, 24]
    s.add(Request(1, [0, 5], max_tokens=12, encoder_token_ids=enc1))
    s.add(Request(2, [0, 6], max_tokens=12, encoder_token_ids=enc2))
    s.update(s.schedule(), [7, 8])
    assert (s.request(1).block_ids, s.request(1).cross_block_ids) == ([0], [1, 2])
    assert (s.request(2).block_ids, s.request(2).cross_block_ids) == ([3], [4, 5])
    preempted_at = None
    for i in range(12):
        out = s.schedule()
        if out.preempted:
            preempted_at = i
            break
        s.update(out, [7, 8][:len(out.scheduled)])
        check_block_accounting(s)
    assert preempted_at is not None and list(out.preempted) == [2]
    assert s.waiting_ids == [2]
    waiting = s.request(2)
    assert waiting.cross_block_ids == [] and waiting.block_ids == [] and waiting.num_computed_tokens == 0
    check_block_accounting(s)
    known = waiting.num_tokens
    # Request 1 runs until it finishes; then request 2 is admitted again: its encoder runs in that step, into
    # cross blocks allocated anew, beside its recomputed decoder tokens (after its own cached blocks).
    rerun = None
    for _ in range(40):
        s.update(out, [7] * len(out.scheduled))
        out = s.schedule()
        b = s.make_batch(out)
        rows = [row for row, x in enumerate(out.scheduled) if x.request_id == 2]
        if rows:
            rerun = (out.scheduled[rows[0]], b, rows[0])
            break
    assert rerun is not None
    x, b, row = rerun
    cross = s.request(2).cross_block_ids
    assert x.num_encoder_tokens == 4 and x.num_computed_tokens + x.num_new_tokens == known
    assert b.encoder_input_ids.tolist() == enc2 and b.encoder_lens[row] == 4 and b.cross_lens[row] == 4
    assert len(cross) == 2 and b.cross_block_tables[row].tolist()[:2] == cross
    assert b.cross_slot_mapping.tolist() == expected_cross_slots(b)
    assert all(s.block_manager.ref_count(c) == 1 for c in cross)
    check_block_accounting(s)
    for _ in range(40):
        s.update(out, [7] * len(out.scheduled))
        if not s.has_unfinished:
            break
        out = s.schedule()
        assert all(x.num_encoder_tokens == 0 for x in out.scheduled)  # not again
    assert used(s) == 0 and s.stats()["num_preemptions"] == 1


def test_a_preempted_beam_group_comes_back_with_one_copy_of_the_cross_blocks():
    # 10 blocks of 2 tokens: the beams' 4 shared cross blocks and their decoder blocks fit, two copies would
    # not. The plain request, admitted first, grows and preempts the group; re-admitted, one beam runs the
    # encoder and the other waits for it and shares its cross blocks.
    s = make_scheduler(tokens_per_block=2, num_blocks=10, max_num_tokens=64)
    s.add(Request(1, [3, 4, 5, 6, 7], max_tokens=12))
    s.add(Request(7, [0], max_tokens=8, num_sequences=2, beam_search=True, eos_token_ids=[2],
                  encoder_token_ids=list(range(10, 18))))
    encoder_rows, group_preemptions = 0, 0
    for i in range(100):
        out = s.schedule()
        assert out.scheduled  # never stuck
        group_preemptions += any(rid != 1 for rid in out.preempted)  # every running beam goes at once
        encoder_rows += sum(1 for x in out.scheduled if x.num_encoder_tokens)
        n = len(out.scheduled)
        s.update(out, step(np.tile([[20 + i % 7, 30 + i % 5, 40, 41]], (n, 1)),
                           np.tile([[-0.1, -0.2, -0.3, -0.4]], (n, 1))))
        check_block_accounting(s)
        if not s.has_unfinished:
            break
    assert not s.has_unfinished and used(s) == 0
    # Preempted at least once, and the encoder ran once per admission of the group.
    assert group_preemptions >= 1 and encoder_rows == 1 + group_preemptions


def test_prefix_cache_salt_keeps_sources_apart_and_same_source_hits():
    base = Request(1, [0, 4], max_tokens=2)
    a = Request(1, [0, 4], max_tokens=2, encoder_token_ids=[5, 6, 7])
    b = Request(1, [0, 4], max_tokens=2, encoder_token_ids=[5, 6, 8])
    salted = Request(1, [0, 4], max_tokens=2, encoder_token_ids=[5, 6, 7], cache_salt=77)
    assert base.cache_salt == 0 and a.cache_salt != 0 and b.cache_salt != 0
    assert len({a.cache_salt, b.cache_salt, salted.cache_salt, 77}) == 4
    assert Request(9, [3], max_tokens=5, encoder_token_ids=[5, 6, 7]).cache_salt == a.cache_salt
    # with_prompt mixes the salt anew from its own cache_salt and encoder ids.
    assert base.with_prompt(2, [0, 4], 2, 0, 1, encoder_token_ids=[5, 6, 7]).cache_salt == a.cache_salt
    assert a.with_prompt(2, [0, 4], 2, 0, 1).cache_salt == 0
    again = a.with_prompt(2, [0, 4], 2, 0, 1, cache_salt=77, encoder_token_ids=[5, 6, 7])
    assert again.cache_salt == salted.cache_salt and again.encoder_token_ids == [5, 6, 7]

    s = make_scheduler()
    prompt = [0] + list(range(40, 49))  # 10 tokens: 2 full blocks of 4 are cacheable
    src1, src2 = list(range(10, 16)), list(range(20, 26))

    s.add(Request(1, prompt, max_tokens=2, encoder_token_ids=src1))
    while s.has_unfinished:
        s.update(s.schedule(), [3])
    assert s.stats()["num_prefix_hit_tokens"] == 0 and s.stats()["num_cached_blocks"] >= 2
    # Another source, the same decoder prompt: no hit.
    s.add(Request(2, prompt, max_tokens=2, encoder_token_ids=src2))
    out = s.schedule()
    assert plan(out) == [(2, 10, 6, True)] and s.stats()["num_prefix_hit_tokens"] == 0
    while s.has_unfinished:
        s.update(out, [3])
        out = s.schedule()
    # The first source again: its two decoder blocks hit, and the encoder still runs (cross KV is not cached).
    s.add(Request(3, prompt, max_tokens=2, encoder_token_ids=src1))
    out = s.schedule()
    assert plan(out) == [(3, 2, 6, True)] and out.scheduled[0].num_computed_tokens == 8
    assert s.stats()["num_prefix_hit_tokens"] == 8 and s.request(3).num_cached_tokens == 8
    b = s.make_batch(out)
    assert b.encoder_input_ids.tolist() == src1 and b.cross_slot_mapping.tolist() == expected_cross_slots(b)
    while s.has_unfinished:
        s.update(out, [3])
        out = s.schedule()
    # A decoder-only request with the same prompt shares nothing with either source.
    s.add(Request(4, prompt, max_tokens=1))
    out = s.schedule()
    assert plan(out) == [(4, 10, 0, True)]
    s.update(out, [3])
    assert used(s) == 0


def _fake_result(batch, rng, vocab=40):
    """Random candidates for every row: distinct ids per row (top-K), beam scores best first, forced ids kept."""
    k = int(max(batch.num_candidates.tolist(), default=1))
    rows = batch.num_requests
    tokens = np.full((rows, k), -1, dtype=np.int32)
    scores = np.zeros((rows, k), dtype=np.float32)
    for r in range(rows):
        n = int(batch.num_candidates[r])
        ids = rng.sample(range(2, vocab), n)  # 2 is EOS: requests stop at random
        if batch.forced_token_ids[r] >= 0:
            ids = [int(batch.forced_token_ids[r])] * n
        tokens[r, :n] = ids
        scores[r, :n] = sorted((-rng.random() * 3 for _ in range(n)), reverse=True)
    return step(tokens, scores)


def _random_request(rid, rng):
    kind = rng.random()
    fields = dict(max_tokens=rng.randint(1, 8), eos_token_ids=[2], seed=rid)
    if kind < 0.15:
        fields.update(num_sequences=rng.randint(2, 3))
    elif kind < 0.3:
        fields.update(num_sequences=rng.randint(2, 3), beam_search=True)
    if rng.random() < 0.75:
        fields["encoder_token_ids"] = [rng.randrange(3, 40) for _ in range(rng.randint(1, 14))]
    if rng.random() < 0.2:
        fields["no_repeat_ngram_size"] = rng.randint(1, 3)
    if rng.random() < 0.2:
        fields["forced_eos_token_id"] = 2
    prompt = [rng.randrange(3, 12) for _ in range(rng.randint(1, 12))]  # a small alphabet: prefix hits
    return Request(rid, prompt, **fields)


@pytest.mark.parametrize("async_scheduling, chunked", [(False, True), (True, True), (False, False)])
def test_random_mixed_load_with_aborts_frees_every_block(async_scheduling, chunked):
    rng = random.Random(17 + 2 * async_scheduling + chunked)
    # A small cache (preemptions) and budget (encoder steps compete for it).
    s = make_scheduler(max_batch_size=6, max_num_tokens=24, max_seq_len=24, tokens_per_block=2, num_blocks=40,
                       async_scheduling=async_scheduling, enable_chunked_prefill=chunked)
    inflight, next_id, num_requests = deque(), 1, 500
    max_inflight = 2 if async_scheduling else 1
    reasons = Counter()
    for _ in range(20000):
        if next_id <= num_requests and rng.random() < 0.6:
            for _ in range(rng.randint(1, 3)):
                s.add(_random_request(next_id, rng))
                next_id += 1
        if rng.random() < 0.15:
            ids = s.running_ids + s.waiting_ids
            if ids:
                reasons.update(r.finish_reason for r in s.abort(s.request(rng.choice(ids)).user_id))
        while len(inflight) < max_inflight:
            out = s.schedule()
            if not out.scheduled:
                break
            b = s.make_batch(out)
            assert b.cross_slot_mapping.tolist() == expected_cross_slots(b)
            assert len(b.encoder_input_ids) == int(b.encoder_lens.sum()) <= out.num_tokens <= 24
            assert b.num_tokens + int(b.encoder_lens.sum()) <= 24
            for row, x in enumerate(out.scheduled):
                req = s.request(x.request_id)
                assert b.cross_lens[row] == len(req.encoder_token_ids)
                assert x.num_encoder_tokens in (0, len(req.encoder_token_ids))
                if x.input_row >= 0:  # ahead: a decode row, its encoder run (or running) before
                    assert x.num_encoder_tokens == 0 and x.num_new_tokens == 1
                    assert b.cross_block_tables[row][:len(req.cross_block_ids)].tolist() == req.cross_block_ids
            inflight.append((out, b))
        if inflight:
            out, b = inflight.popleft()
            reasons.update(r.finish_reason for r in s.update(out, _fake_result(b, rng)) if r.finished)
        if not async_scheduling:
            check_block_accounting(s)
        if next_id > num_requests and not s.has_unfinished and not inflight:
            break
    assert next_id > num_requests and not s.has_unfinished and not inflight
    stats = s.stats()
    assert stats["num_used_blocks"] == 0 and stats["num_free_blocks"] == 40
    assert stats["num_preemptions"] > 0 and reasons["abort"] > 0 and reasons["stop"] > 0 and reasons["length"] > 0


class EncoderRunner:
    """A runner that records each batch's encoder-decoder fields (with their dtypes and shapes) and samples
    (last input token + 1) % 50, or the forced id."""

    FIELDS = ("encoder_input_ids", "encoder_lens", "cross_slot_mapping", "cross_lens", "cross_block_tables",
              "forced_token_ids")

    def __init__(self):
        self.batches = []

    def submit(self, batch):
        self.batches.append({name: np.array(getattr(batch, name)) for name in self.FIELDS})
        self.batches[-1]["max_cross_blocks"] = batch.max_cross_blocks
        ends = np.cumsum(batch.query_lens) - 1
        forced = np.asarray(batch.forced_token_ids)
        return np.where(forced >= 0, forced, (np.asarray(batch.input_ids)[ends] + 1) % 50).astype(np.int32)

    def collect(self, handle):
        return handle


def test_executor_runs_encoder_decoder_requests_and_refuses_long_inputs():
    from llmapi._core import Executor

    runner = EncoderRunner()
    ex = Executor(ExecutorConfig(max_batch_size=4, max_num_tokens=16, max_seq_len=32, tokens_per_block=4,
                                 num_blocks=32, max_encoder_input_len=12), runner)
    try:
        with pytest.raises(RequestError, match="max_encoder_input_len=12"):
            ex.enqueue(Request(1, [0], max_tokens=3, encoder_token_ids=list(range(13))))
        with pytest.raises(RequestError, match="max_encoder_input_len=12"):  # all or nothing: 4 is not queued
            ex.enqueue_many([Request(4, [0], max_tokens=3, encoder_token_ids=[5]),
                             Request(2, [0], max_tokens=3, encoder_token_ids=list(range(16)))])
        ex.enqueue(Request(3, [0], max_tokens=3, encoder_token_ids=list(range(20, 29)), forced_eos_token_id=2))
        tokens, finished = [], False
        while not finished:
            for r in ex.await_responses(10):
                tokens += r.token_ids
                finished = r.finished
        assert tokens == [1, 2, 2]  # the third and last token forced
        assert ex.stats()["num_used_blocks"] == 0
    finally:
        ex.shutdown()
    first = runner.batches[0]
    assert first["encoder_input_ids"].tolist() == list(range(20, 29)) and first["encoder_lens"].tolist() == [9]
    assert {k: str(v.dtype) for k, v in first.items() if k != "max_cross_blocks"} == {
        "encoder_input_ids": "int32", "encoder_lens": "int32", "cross_slot_mapping": "int64",
        "cross_lens": "int32", "cross_block_tables": "int32", "forced_token_ids": "int32"}
    assert first["cross_block_tables"].shape == (1, first["max_cross_blocks"]) == (1, 3)
    assert [b["encoder_lens"].tolist() for b in runner.batches] == [[9], [0], [0]]
    assert [b["forced_token_ids"].tolist() for b in runner.batches] == [[-1], [-1], [2]]


def test_core_request_passes_the_encoder_input_and_decoding_rules():
    from llmapi import SamplingParams
    from llmapi.core_request import core_request

    params = SamplingParams(max_tokens=6, temperature=0, no_repeat_ngram_size=3)

    def make(rid, encoder, like=None, **kw):
        return core_request(rid, [0, 5], params, eos_token_ids=[2], max_seq_len=32, seed=1, tokenizer=None,
                            token_history=False, like=like, encoder_token_ids=encoder, **kw)

    forced = dict(forced_eos_token_id=2, forced_bos_token_id=0)
    first = make(1, [7, 8, 9], **forced)
    assert (first.encoder_token_ids, first.no_repeat_ngram_size, first.forced_eos_token_id,
            first.forced_bos_token_id) == ([7, 8, 9], 3, 2, 0)
    fields = ("prompt_token_ids", "encoder_token_ids", "cache_salt", "no_repeat_ngram_size", "forced_eos_token_id",
              "forced_bos_token_id", "max_tokens", "temperature")
    for encoder in ([7, 8, 9], [4, 4], None):
        got, want = make(2, encoder, like=first, **forced), make(2, encoder, **forced)
        assert {f: getattr(got, f) for f in fields} == {f: getattr(want, f) for f in fields}
    plain = make(3, None)
    assert (plain.encoder_token_ids, plain.forced_eos_token_id, plain.forced_bos_token_id) == ([], -1, -1)
    assert make(3, None).cache_salt == 0 and make(3, [4, 4]).cache_salt != make(3, [4, 5]).cache_salt


def test_wire_format_carries_the_encoder_decoder_fields():
    from llmapi.distributed.comm import _BATCH_FIELDS, decode_batch, encode_batch

    s = make_scheduler()
    s.add(Request(1, [0], max_tokens=4, encoder_token_ids=list(range(10, 16)), forced_eos_token_id=2))
    s.add(Request(2, [3, 4], max_tokens=1, forced_eos_token_id=2))
    s.add(Request(3, [0, 4], max_tokens=4, encoder_token_ids=list(range(20, 29))))
    batch = s.make_batch(s.schedule())
    decoded = decode_batch(encode_batch(batch))
    for name, _, _ in _BATCH_FIELDS:
        want = np.asarray(getattr(batch, name))
        assert getattr(decoded, name).dtype == want.dtype and np.array_equal(getattr(decoded, name), want), name
    assert decoded.cross_block_tables.shape == (3, 3) and decoded.max_cross_blocks == 3
    assert decoded.forced_token_ids.tolist() == [-1, 2, -1]
