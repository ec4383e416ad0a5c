"""Scheduler: token budget split, chunked prefill, batch limits, admission, preemption by recompute."""

import numpy as np
import pytest

from llmapi._core import ExecutorConfig, Request, Scheduler
from llmapi.errors import RequestError


def make_scheduler(**overrides) -> Scheduler:
    config = dict(max_batch_size=8, max_num_tokens=16, max_seq_len=64, tokens_per_block=4,
                  num_blocks=32)
    config.update(overrides)
    return Scheduler(ExecutorConfig(**config))


def plan(output):
    return [(s.request_id, s.num_new_tokens, s.do_sample) for s in output.scheduled]


def test_budget_is_split_running_first_and_the_last_prompt_is_chunked():
    s = make_scheduler(max_num_tokens=10)
    s.add(Request(1, [1, 2, 3, 4], max_tokens=8))
    s.add(Request(2, [11, 12, 13, 14, 15], max_tokens=8))
    s.add(Request(3, [21, 22, 23, 24, 25, 26], max_tokens=8))
    out = s.schedule()
    assert plan(out) == [(1, 4, True), (2, 5, True), (3, 1, False)]
    assert out.num_tokens == 10
    assert out.num_scheduled_tokens == {1: 4, 2: 5, 3: 1}
    b = s.make_batch(out)
    assert b.input_ids.tolist() == [1, 2, 3, 4, 11, 12, 13, 14, 15, 21]
    assert b.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 0]
    assert b.block_tables.tolist() == [[0, 0], [1, 2], [3, 0]]  # padded with 0
    assert b.slot_mapping.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 12]
    assert (b.query_lens.tolist(), b.context_lens.tolist()) == ([4, 5, 1], [4, 5, 1])
    assert (b.do_sample.tolist(), b.output_index.tolist()) == ([1, 1, 0], [0, 0, 0])
    responses = s.update(out, [100, 200, 999])  # row 3 is a mid-prompt chunk: its token is unused
    assert [(r.request_id, r.token_ids, r.finished) for r in responses] == [
        (1, [100], False), (2, [200], False)]
    assert (s.request(3).num_computed_tokens, s.request(3).output_token_ids) == (1, [])

    out = s.schedule()
    assert plan(out) == [(1, 1, True), (2, 1, True), (3, 5, True)]
    b = s.make_batch(out)
    assert b.input_ids.tolist() == [100, 200, 22, 23, 24, 25, 26]
    assert b.positions.tolist() == [4, 5, 1, 2, 3, 4, 5]
    assert b.block_tables.tolist() == [[0, 4], [1, 2], [3, 5]]
    assert b.slot_mapping.tolist() == [16, 9, 13, 14, 15, 20, 21]
    assert b.context_lens.tolist() == [5, 6, 6]
    assert b.output_index.tolist() == [1, 1, 0]


def test_without_chunked_prefill_a_prompt_waits_for_a_budget_it_fits_whole():
    s = make_scheduler(max_num_tokens=10, max_seq_len=10, enable_chunked_prefill=False)
    s.add(Request(1, [1, 2, 3, 4], max_tokens=4))
    s.add(Request(2, [11, 12, 13, 14, 15], max_tokens=4))
    s.add(Request(3, [21, 22, 23, 24, 25, 26], max_tokens=4))
    s.add(Request(4, [31], max_tokens=4))  # would fit, but no overtaking
    out = s.schedule()
    assert plan(out) == [(1, 4, True), (2, 5, True)]
    assert s.waiting_ids == [3, 4]
    s.update(out, [5, 16])
    out = s.schedule()
    assert plan(out) == [(1, 1, True), (2, 1, True), (3, 6, True), (4, 1, True)]
    with pytest.raises(ValueError, match="max_num_tokens=8"):
        ExecutorConfig(max_batch_size=1, max_num_tokens=8, max_seq_len=10, tokens_per_block=4,
                       num_blocks=8, enable_chunked_prefill=False)


def test_max_batch_size_caps_the_running_requests():
    s = make_scheduler(max_batch_size=2)
    s.add(Request(1, [1, 2], max_tokens=1))
    s.add(Request(2, [3, 4], max_tokens=3))
    s.add(Request(3, [5, 6], max_tokens=3))
    out = s.schedule()
    assert plan(out) == [(1, 2, True), (2, 2, True)]
    assert (s.running_ids, s.waiting_ids) == ([1, 2], [3])
    responses = s.update(out, [7, 8])
    assert [(r.request_id, r.finished, r.finish_reason) for r in responses] == [
        (1, True, "length"), (2, False, "")]
    out = s.schedule()
    assert plan(out) == [(2, 1, True), (3, 2, True)]
    assert (s.running_ids, s.waiting_ids) == ([2, 3], [])


def test_admission_blocks_when_blocks_run_out_and_first_come_first_served_holds():
    s = make_scheduler(num_blocks=3, max_num_tokens=64)
    s.add(Request(1, list(range(1, 9)), max_tokens=1))
    s.add(Request(2, list(range(11, 19)), max_tokens=1))  # needs 2 blocks, 1 is free
    s.add(Request(3, [21, 22], max_tokens=1))             # fits 1 block, but queues behind 2
    out = s.schedule()
    assert plan(out) == [(1, 8, True)]
    assert s.request(1).block_ids == [0, 1]
    assert s.waiting_ids == [2, 3]
    (r,) = s.update(out, [9])
    assert (r.finished, r.finish_reason) == (True, "length")
    # Request 1's blocks were freed last block first (free queue: 2, 1, 0) and stay cached until
    # reused: 2 takes blocks 2 and 1 (evicting 1), 3 takes block 0 (evicting it).
    assert s.block_manager.free_queue() == [2, 1, 0]
    assert s.block_manager.num_cached_blocks == 2
    out = s.schedule()
    assert plan(out) == [(2, 8, True), (3, 2, True)]
    assert (s.request(2).block_ids, s.request(3).block_ids) == ([2, 1], [0])
    assert s.block_manager.num_cached_blocks == 0


def test_preemption_by_recompute_of_the_latest_admitted_request():
    s = make_scheduler(tokens_per_block=2, num_blocks=4, max_num_tokens=64)
    s.add(Request(1, [1, 2, 3], max_tokens=4))
    s.add(Request(2, [11, 12, 13], max_tokens=10))
    s.add(Request(3, [21, 22, 23], max_tokens=10))
    out = s.schedule()
    assert plan(out) == [(1, 3, True), (2, 3, True)]  # 3 needs 2 blocks, none left
    assert (s.request(1).block_ids, s.request(2).block_ids) == ([0, 1], [2, 3])
    s.update(out, [4, 14])
    out = s.schedule()
    assert plan(out) == [(1, 1, True), (2, 1, True)]
    s.update(out, [5, 15])

    # Request 1 needs a third block: request 2 (admitted last) is preempted; its blocks are freed
    # last first (free queue 3, 2) and 1 takes block 3. Preempted requests wait at the front.
    out = s.schedule()
    assert plan(out) == [(1, 1, True)]
    assert list(out.preempted) == [2]
    assert s.request(1).block_ids == [0, 1, 3]
    r2 = s.request(2)
    assert (r2.status, r2.num_computed_tokens, r2.block_ids, r2.num_preemptions) == (
        "waiting", 0, [], 1)
    assert r2.output_token_ids == [14, 15]
    assert (s.running_ids, s.waiting_ids) == ([1], [2, 3])
    stats = s.stats()
    assert (stats["num_preemptions"], stats["num_free_blocks"], stats["num_cached_blocks"]) == (
        1, 1, 3)  # cached: 1's [1,2] [3,4] and 2's [11,12]; 2's [13,14] was evicted by the reuse
    s.update(out, [6])

    # Request 2 (5 tokens) hits its own cached block [11, 12] but needs 2 more blocks: blocked.
    out = s.schedule()
    assert plan(out) == [(1, 1, True)]
    (r,) = s.update(out, [7])
    assert (r.token_ids, r.finish_reason) == ([7], "length")
    assert s.block_manager.free_queue() == [2, 3, 1, 0]

    out = s.schedule()
    assert [(x.request_id, x.num_computed_tokens, x.num_new_tokens, x.do_sample)
            for x in out.scheduled] == [(2, 2, 3, True)]
    b = s.make_batch(out)
    assert b.input_ids.tolist() == [13, 14, 15]  # the prompt's rest and the generated tokens
    assert b.positions.tolist() == [2, 3, 4]
    assert b.output_index.tolist() == [2]
    assert s.request(2).block_ids == [2, 3, 1]
    assert b.slot_mapping.tolist() == [6, 7, 2]
    assert s.waiting_ids == [3]  # one block left, request 3 needs 2
    (r,) = s.update(out, [16])
    assert (r.request_id, r.token_ids, r.num_cached_tokens) == (2, [16], 0)
    stats = s.stats()
    assert (stats["num_prefix_hit_tokens"], stats["num_preemptions"], stats["num_steps"]) == (2, 1, 5)


def test_the_tail_is_preempted_first_even_the_request_itself():
    s = make_scheduler(tokens_per_block=2, num_blocks=3, enable_prefix_caching=False)
    for i in range(3):
        s.add(Request(i + 1, [2 * i + 1, 2 * i + 2], max_tokens=2))
    out = s.schedule()
    assert plan(out) == [(1, 2, True), (2, 2, True), (3, 2, True)]
    s.update(out, [30, 40, 50])
    # 1 needs a second block: 3 goes; 2 then needs one too and is itself the last admitted.
    out = s.schedule()
    assert plan(out) == [(1, 1, True)]
    assert list(out.preempted) == [3, 2]
    assert (s.running_ids, s.waiting_ids) == ([1], [2, 3])
    (r,) = s.update(out, [31])
    assert r.finished
    # Without prefix caching request 2 recomputes everything: prompt plus its generated token.
    out = s.schedule()
    assert [(x.request_id, x.num_computed_tokens, x.num_new_tokens) for x in out.scheduled] == [
        (2, 0, 3)]
    b = s.make_batch(out)
    assert (b.input_ids.tolist(), b.positions.tolist(), b.output_index.tolist()) == (
        [3, 4, 40], [0, 1, 2], [1])
    assert s.waiting_ids == [3]


def test_requests_that_can_never_fit_fail_instead_of_looping():
    s = make_scheduler(tokens_per_block=2, num_blocks=2, max_seq_len=64)
    with pytest.raises(RequestError, match="needs 3 KV blocks"):
        s.add(Request(1, [1, 2, 3, 4, 5], max_tokens=1))
    with pytest.raises(RequestError, match="max_seq_len=64"):
        s.add(Request(1, list(range(65)), max_tokens=1))
    s.add(Request(2, [1, 2, 3, 4], max_tokens=5))
    with pytest.raises(ValueError, match="duplicate request id 2"):
        s.add(Request(2, [1], max_tokens=1))
    out = s.schedule()
    (r,) = s.update(out, [9])
    assert (r.token_ids, r.finished, r.finish_reason) == ([9], True, "error")
    assert "needs 3 KV blocks; the cache has 2" in r.error
    assert (s.has_unfinished, s.block_manager.num_free_blocks) == (False, 2)


def test_max_seq_len_finishes_with_length():
    s = make_scheduler(max_seq_len=6)
    s.add(Request(1, [1, 2, 3, 4], max_tokens=10))
    s.update(s.schedule(), [5])
    (r,) = s.update(s.schedule(), [6])
    assert (r.token_ids, r.finish_reason, r.stop_reason) == ([6], "length", -1)


def test_abort_waiting_running_and_in_flight_requests():
    s = make_scheduler(max_batch_size=1)
    s.add(Request(1, [1, 2, 3], max_tokens=5))
    s.add(Request(2, [4, 5], max_tokens=5))
    (r,) = s.abort(2)  # waiting
    assert (r.request_id, r.finished, r.finish_reason, r.token_ids) == (2, True, "abort", [])
    out = s.schedule()
    assert s.abort(1) == []  # in flight: its blocks may still be written until collected
    assert s.block_manager.num_used_blocks == 1
    (r,) = s.update(out, [7])
    assert (r.request_id, r.token_ids, r.finish_reason) == (1, [], "abort")
    assert s.block_manager.num_used_blocks == 0
    assert s.abort(1) == [] and s.abort(99) == []
    s.add(Request(3, [1], max_tokens=5))
    s.update(s.schedule(), [2])
    (r,) = s.abort(3)  # running, between steps
    assert (r.finish_reason, s.has_unfinished, s.block_manager.num_used_blocks) == ("abort", False, 0)


def test_a_failed_step_fails_its_requests_only():
    s = make_scheduler(max_num_tokens=4)
    s.add(Request(1, [1, 2, 3], max_tokens=5))
    s.add(Request(2, [4, 5, 6], max_tokens=5))
    out = s.schedule()
    assert plan(out) == [(1, 3, True), (2, 1, False)]
    responses = s.fail(out, "RuntimeError: boom")
    assert [(r.request_id, r.finish_reason, r.error) for r in responses] == [
        (1, "error", "RuntimeError: boom"), (2, "error", "RuntimeError: boom")]
    assert (s.has_unfinished, s.block_manager.num_free_blocks) == (False, 32)


def test_suppress_ids_and_sampling_fields_in_the_batch():
    s = make_scheduler(max_num_tokens=4)
    s.add(Request(1, [1], max_tokens=5, min_tokens=2, eos_token_ids=[5, 9], stop_token_ids=[9, 7],
                  temperature=0.5, top_k=3, top_p=0.9, seed=1234))
    s.add(Request(2, [2], max_tokens=5, min_tokens=1, eos_token_ids=[5], stop_token_ids=[8],
                  ignore_eos=True))
    s.add(Request(3, [3, 3, 3], max_tokens=5, min_tokens=3, eos_token_ids=[5]))  # chunked
    b = s.make_batch(s.schedule())
    assert b.suppress_offsets.tolist() == [0, 3, 4, 4]
    assert b.suppress_ids.tolist() == [5, 9, 7, 8]  # eos then stop ids, deduplicated
    assert b.temperature.dtype == np.float32 and b.temperature.tolist() == [0.5, 1.0, 1.0]
    assert b.top_k.tolist() == [3, 0, 0] and np.allclose(b.top_p, [0.9, 1.0, 1.0])
    assert b.seeds.tolist() == [1234, 0, 0]
    assert b.request_ids.dtype == np.uint64 and b.request_ids.tolist() == [1, 2, 3]
