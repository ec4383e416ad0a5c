"""Async scheduling in the scheduler: a request runs one token ahead of its step in flight on a placeholder."""

import pytest

from llmapi._core import ExecutorConfig, Request, Scheduler


def make_scheduler(**overrides) -> Scheduler:
    config = dict(max_batch_size=8, max_num_tokens=16, max_seq_len=64, tokens_per_block=4,
                  num_blocks=32, async_scheduling=True)
    config.update(overrides)
    return Scheduler(ExecutorConfig(**config))


def plan(output):
    return [(s.request_id, s.num_new_tokens, s.do_sample, s.input_row) for s in output.scheduled]


def used(s):
    return s.stats()["num_used_blocks"]


def test_a_placeholder_row_takes_the_token_of_its_row_in_the_step_in_flight():
    s = make_scheduler(max_num_tokens=10)
    s.add(Request(1, [1, 2, 3], max_tokens=8, logprobs=1))  # needs its logprobs: never ahead
    s.add(Request(2, [11, 12, 13, 14], max_tokens=8))
    s.add(Request(3, [21, 22, 23, 24, 25, 26], max_tokens=8))
    out1 = s.schedule()
    assert plan(out1) == [(1, 3, True, -1), (2, 4, True, -1), (3, 3, False, -1)]
    s.add(Request(4, [31, 32], max_tokens=8))
    # Step 2 is scheduled before step 1 is collected: 2 runs ahead on row 1's token; 3 is mid-prompt
    # in flight (no token to take) and 1 is not eligible; 4 is admitted as usual.
    out2 = s.schedule()
    assert plan(out2) == [(2, 1, True, 1), (4, 2, True, -1)]
    b = s.make_batch(out2)
    assert b.input_ids.tolist() == [-1, 31, 32]
    assert b.prev_rows.tolist() == [1, -1, -1]
    assert b.positions.tolist() == [4, 0, 1]
    # 1 holds block 0, 2 block 1 (positions 0-3), 3 block 2; running 2 takes block 3 for position
    # 4 before 4 is admitted into block 4.
    assert b.block_tables.tolist() == [[1, 3], [4, 0]]
    assert b.slot_mapping.tolist() == [12, 16, 17]
    assert b.context_lens.tolist() == [5, 2]
    assert b.output_index.tolist() == [1, 0]  # its pending token counts as generated

    r = s.update(out1, [100, 200, 999])
    assert [(x.request_id, x.token_ids) for x in r] == [(1, [100]), (2, [200])]
    assert s.request(2).num_computed_tokens == 4  # position 4 is still in flight
    # Step 3 is scheduled while step 2 runs: 2 and 4 run ahead of their rows 0 and 1 in it.
    out3 = s.schedule()
    assert plan(out3) == [(1, 1, True, -1), (2, 1, True, 0), (3, 3, True, -1), (4, 1, True, 1)]
    b = s.make_batch(out3)
    assert b.input_ids.tolist() == [100, -1, 24, 25, 26, -1]
    assert b.prev_rows.tolist() == [-1, 0, -1, -1, -1, 1]
    assert b.positions.tolist() == [3, 5, 3, 4, 5, 2]
    r = s.update(out2, [201, 300])
    assert [(x.request_id, x.token_ids) for x in r] == [(2, [201]), (4, [300])]
    r = s.update(out3, [101, 202, 301, 302])
    assert [(x.request_id, x.token_ids) for x in r] == [(1, [101]), (2, [202]), (3, [301]), (4, [302])]
    assert (s.request(2).output_token_ids, s.request(2).num_computed_tokens) == ([200, 201, 202], 6)
    assert (s.request(4).output_token_ids, s.request(4).num_computed_tokens) == ([300, 302], 3)


def test_steady_decoding_alternates_two_steps_in_flight():
    s = make_scheduler()
    s.add(Request(1, [1, 2, 3], max_tokens=5))
    steps = [s.schedule()]
    tokens = []
    for k in range(10):
        nxt = s.schedule()  # before collecting the oldest
        if nxt.scheduled:
            steps.append(nxt)
        if not steps:
            break
        done = steps.pop(0)
        batch_token = 10 + k
        for x in s.update(done, [batch_token] * len(done.scheduled)):
            tokens.extend(x.token_ids)
    assert tokens == [10, 11, 12, 13, 14]  # max_tokens=5: nothing scheduled past the last token
    assert not s.has_unfinished and used(s) == 0


@pytest.mark.parametrize("finish", ["eos", "stop_id", "abort"])
def test_finishing_with_a_step_ahead_drops_its_token_and_frees_blocks_after_it(finish):
    s = make_scheduler(enable_prefix_caching=False)
    s.add(Request(1, [1, 2, 3, 4], max_tokens=8, eos_token_ids=[7], stop_token_ids=[8]))
    out1 = s.schedule()
    out2 = s.schedule()
    assert plan(out2) == [(1, 1, True, 0)]
    assert used(s) == 2  # position 4 opened a second block
    token = {"eos": 7, "stop_id": 8, "abort": 5}[finish]
    if finish == "abort":
        assert s.abort(1) == []  # in flight: settled at collect
    (r,) = s.update(out1, [token])
    assert r.finished and r.request_finished
    assert r.finish_reason == ("abort" if finish == "abort" else "stop")
    assert r.token_ids == ([] if finish == "abort" else [token])
    assert not s.has_unfinished
    assert used(s) == 2  # the step ahead still writes position 4
    # The user may reuse the id at once; the new request must not be mistaken for the old row.
    s.add(Request(1, [40, 41], max_tokens=3))
    out3 = s.schedule()
    assert plan(out3) == [(1, 2, True, -1)]
    assert s.update(out2, [99]) == []  # the dropped token
    assert used(s) == 1  # the new request's block only
    assert s.request(1).num_computed_tokens == 0 and s.request(1).output_token_ids == []
    (r,) = s.update(out3, [42])
    assert r.token_ids == [42]


def test_max_tokens_and_max_seq_len_bound_the_step_ahead():
    s = make_scheduler()
    s.add(Request(1, [1, 2], max_tokens=1))
    s.add(Request(2, [1, 2], max_tokens=2))
    out1 = s.schedule()
    out2 = s.schedule()
    assert plan(out2) == [(2, 1, True, 1)]  # 1's only token is its last; 2 has one more
    s.update(out1, [5, 6])
    assert s.schedule().scheduled == []  # 2's second token is its last: nothing past it
    (r,) = s.update(out2, [7])
    assert (r.token_ids, r.finish_reason) == ([7], "length")
    assert used(s) == 0

    s = make_scheduler(max_seq_len=5)
    s.add(Request(1, [1, 2, 3], max_tokens=10))
    out1 = s.schedule()
    out2 = s.schedule()
    assert plan(out2) == [(1, 1, True, 0)]  # 4 tokens with the pending one: the 5th may follow
    s.update(out1, [5])
    assert s.schedule().scheduled == []  # the 5th token reaches max_seq_len
    (r,) = s.update(out2, [6])
    assert (r.token_ids, r.finish_reason) == ([6], "length")


def test_only_plain_requests_run_ahead():
    s = make_scheduler(max_batch_size=16, max_num_tokens=64)
    plain = dict(max_tokens=8)
    s.add(Request(1, [1, 2], **plain))
    s.add(Request(2, [1, 2], num_sequences=2, **plain))
    s.add(Request(3, [1, 2], num_sequences=2, beam_search=True, **plain))
    s.add(Request(4, [1, 2], logprobs=0, **plain))
    s.add(Request(5, [1, 2], repetition_penalty=1.2, **plain))
    s.add(Request(6, [1, 2], bad_words=[[3, 4]], **plain))
    s.add(Request(7, [1, 2], generation_logits=True, **plain))
    s.add(Request(8, [1, 2], bad_words=[[9]], min_tokens=3, eos_token_ids=[0], temperature=0.5,
                  seed=11, **plain))
    s.add(Request(9, [1, 2], token_history=True, **plain))
    assert len(s.schedule().scheduled) == 9  # every request once: the first step
    out2 = s.schedule()
    assert [x.request_id for x in out2.scheduled] == [1, 8]
    b = s.make_batch(out2)
    assert b.prev_rows.tolist() == [0, 7]
    # 8 under min_tokens counting its pending token (1 < 3): EOS masked with its single-token bad word.
    assert b.suppress_ids[b.suppress_offsets[1]:b.suppress_offsets[2]].tolist() == [0, 9]
    assert (b.seeds.tolist(), b.output_index.tolist()) == ([0, 11], [1, 1])


def test_a_step_ahead_never_preempts_and_nothing_in_flight_is_preempted():
    s = make_scheduler(num_blocks=3, max_seq_len=12)
    s.add(Request(1, [1, 2, 3, 4], max_tokens=8))
    s.add(Request(2, [5, 6, 7], max_tokens=8))
    s.add(Request(3, [9, 9, 9, 9, 9], max_tokens=8))  # needs 2 blocks: waits
    out1 = s.schedule()
    assert plan(out1) == [(1, 4, True, -1), (2, 3, True, -1)]
    out2 = s.schedule()
    # 2's position 3 is in its own block; 1's position 4 needs the last free block, which it takes.
    assert plan(out2) == [(1, 1, True, 0), (2, 1, True, 1)]
    s.update(out1, [10, 20])
    # 1's position 5 is in its block; 2's position 4 needs one and none is free: 2 skips this step.
    out3 = s.schedule()
    assert plan(out3) == [(1, 1, True, 0)] and list(out3.preempted) == []
    s.update(out2, [11, 21])
    # 2 must catch up and may preempt, but not 1, in flight: it preempts itself.
    out4 = s.schedule()
    assert plan(out4) == [(1, 1, True, 0)] and list(out4.preempted) == [2]
    s.update(out3, [12])
    s.update(out4, [13])
    assert s.request(1).output_token_ids == [10, 11, 12, 13]


@pytest.mark.parametrize("failed", ["first", "ahead"])
def test_a_failed_step_with_a_step_ahead_frees_blocks_once_both_are_settled(failed):
    s = make_scheduler(enable_prefix_caching=False)
    s.add(Request(1, [1, 2, 3, 4], max_tokens=8))
    out1 = s.schedule()
    out2 = s.schedule()
    first, second = (out1, out2) if failed == "first" else (out2, out1)
    (r,) = s.fail(first, "boom")
    assert (r.finish_reason, r.error, r.token_ids) == ("error", "boom", [])
    assert used(s) == 2
    assert s.update(second, [5]) == []
    assert used(s) == 0


def test_finish_all_frees_blocks_kept_for_a_step_ahead():
    s = make_scheduler()
    s.add(Request(1, [1, 2, 3, 4], max_tokens=8, eos_token_ids=[7]))
    s.add(Request(2, [1, 2, 3], max_tokens=8))
    out1 = s.schedule()
    s.schedule()
    s.update(out1, [7, 5])  # 1 finishes; its blocks wait for the step ahead
    r = s.finish_all("abort")
    assert [(x.request_id, x.finish_reason) for x in r] == [(2, "abort")]
    assert used(s) == 0


def test_async_scheduling_config():
    base = dict(max_batch_size=8, max_num_tokens=16, max_seq_len=64, tokens_per_block=4, num_blocks=32)
    assert not ExecutorConfig(**base).async_scheduling
    assert "async_scheduling=True" in repr(ExecutorConfig(**base, async_scheduling=True))
    with pytest.raises(ValueError, match="max_inflight_batches=2 is invalid with async_scheduling"):
        ExecutorConfig(**base, max_inflight_batches=2, async_scheduling=True)
    # Without async scheduling nothing in flight is scheduled.
    s = Scheduler(ExecutorConfig(**base))
    s.add(Request(1, [1, 2], max_tokens=8))
    s.schedule()
    assert s.schedule().scheduled == []
