"""Speculative decoding in the C++ core: the n-gram proposer, decode steps carrying drafts, settling the accepted
tokens (stop rules inside them, rejected drafts' blocks handed back), drafter inputs, and aborts mid-step."""

import random

import numpy as np
import pytest

from llmapi import _core
from llmapi._core import ExecutorConfig, Request, Scheduler

NGRAM, DRAFT_MODEL, EAGLE = 1, 2, 3


def propose_ngram_reference(tokens, max_ngram, k):
    """The rule as stated: for n = max_ngram .. 1, the most recent earlier occurrence of the last n tokens (one
    that something follows), and up to k tokens after it."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        suffix = tokens[len(tokens) - n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def test_ngram_proposer_matches_the_rule_on_random_sequences():
    rng = random.Random(0)
    proposed = 0
    for _ in range(2000):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        n, k = rng.randrange(1, 5), rng.randrange(1, 6)
        got = _core.propose_ngram(tokens, n, k)
        assert got == propose_ngram_reference(tokens, n, k)
        proposed += bool(got)
    assert proposed > 1000  # most sequences of a 4-token alphabet have a match


def test_ngram_proposer_prefers_the_longest_suffix_then_the_latest_match():
    #       0  1  2  3  4  5  6  7  8  9
    seq = [1, 2, 3, 9, 7, 2, 3, 8, 1, 2, 3]
    assert _core.propose_ngram(seq, 3, 2) == [9, 7]  # [1, 2, 3] recurs at 0: the longest wins over [2, 3] at 5
    assert _core.propose_ngram(seq, 2, 2) == [8, 1]  # [2, 3]: the latest earlier match, at 5
    assert _core.propose_ngram([4, 4, 4], 2, 3) == [4]  # overlapping the suffix is allowed
    assert _core.propose_ngram([1, 2, 3], 3, 3) == []


def make_scheduler(mode=NGRAM, k=3, **overrides) -> Scheduler:
    config = dict(max_batch_size=8, max_num_tokens=64, max_seq_len=64, tokens_per_block=4, num_blocks=32,
                  speculative_mode=mode, max_draft_len=k, max_matching_ngram_size=3)
    config.update(overrides)
    return Scheduler(ExecutorConfig(**config))


def prefill(s, rid, prompt, first_token, **request_kwargs):
    prefill_all(s, [(rid, prompt, first_token, request_kwargs)])


def prefill_all(s, requests):
    """Admit (id, prompt, first token, Request kwargs) requests and run their prompts in one step."""
    for rid, prompt, _, kwargs in requests:
        s.add(Request(rid, prompt, **kwargs))
    out = s.schedule()
    assert [x.num_new_tokens for x in out.scheduled] == [len(r[1]) for r in requests]
    s.update(out, [r[2] for r in requests])


class Result:
    """A runner's answer with explicit candidate columns."""

    def __init__(self, tokens, **fields):
        self.tokens = np.asarray(tokens, dtype=np.int32)
        for name, value in fields.items():
            setattr(self, name, value)


def test_a_decode_step_carries_ngram_drafts_and_keeps_the_accepted_ones():
    s = make_scheduler()
    # Prompt 5 6 7 8 5 6, first output 7: the suffix [5, 6, 7] recurs at 0, followed by 8 5 6.
    prefill(s, 1, [5, 6, 7, 8, 5, 6], 7, max_tokens=20)
    assert s.request(1).block_ids == [0, 1]
    out = s.schedule()
    (x,) = out.scheduled
    assert (x.num_computed_tokens, x.num_new_tokens, x.num_draft_tokens, x.do_sample) == (6, 4, 3, True)
    b = s.make_batch(out)
    assert b.input_ids.tolist() == [7, 8, 5, 6]  # the last token, then the drafts
    assert b.positions.tolist() == [6, 7, 8, 9]
    assert b.num_draft_tokens.tolist() == [3] and b.draft_start.tolist() == [-1]
    assert b.prev_rows.tolist() == [-1] * 4 and b.output_index.tolist() == [1]
    assert s.request(1).block_ids == [0, 1, 2]  # positions up to 9
    # Drafts 8 and 5 accepted, 6 rejected: the target's own token there is 40.
    (r,) = s.update(out, Result([[8, 5, 40, -1]]))
    assert r.token_ids == [8, 5, 40] and not r.finished
    req = s.request(1)
    assert req.output_token_ids == [7, 8, 5, 40]
    assert req.num_computed_tokens == 9  # 7, 8, 5 have KV; 40 is the next input
    assert req.block_ids == [0, 1, 2]  # 10 tokens: three blocks kept
    assert (req.num_draft_tokens, req.num_accepted_draft_tokens) == (3, 2)
    assert (r.num_draft_tokens, r.num_accepted_draft_tokens) == (3, 2)
    st = s.stats()
    assert (st["num_draft_tokens"], st["num_accepted_draft_tokens"]) == (3, 2)


def test_blocks_filled_by_accepted_drafts_are_cached_under_the_requests_salt():
    s = make_scheduler()
    prefill(s, 1, [5, 6, 5], 6, max_tokens=20, cache_salt=77)  # an adapter's requests hash apart
    out = s.schedule()
    assert s.make_batch(out).input_ids.tolist() == [6, 5, 6]  # [5, 6] recurs at 0
    s.update(out, Result([[5, 6, 40]]))  # both accepted: positions 0..5 computed, block 0 full
    bm = s.block_manager
    first = s.request(1).block_ids[0]
    root = _core.BlockManager.root_hash(77)
    assert root != _core.BlockManager.ROOT_HASH
    assert bm.block_hash(first) == _core.BlockManager.hash_block_tokens(root, [5, 6, 5, 6])
    assert bm.lookup([5, 6, 5, 6, 1], root) == [first]
    assert bm.lookup([5, 6, 5, 6, 1]) == []  # not under the plain root


def test_rejected_drafts_blocks_go_back():
    s = make_scheduler(k=5)
    prefill(s, 1, [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6, 1], 2, max_tokens=20)  # 14 tokens: blocks 0..3
    out = s.schedule()
    b = s.make_batch(out)
    assert b.input_ids.tolist() == [2, 3, 4, 5, 6, 1]  # [6, 1, 2] recurs at 5: 3 4 5 6 1 follow
    assert s.request(1).block_ids == [0, 1, 2, 3, 4]  # positions 13..18
    s.update(out, Result([[9, -1, -1, -1, -1, -1]]))  # the first draft rejected
    req = s.request(1)
    assert req.num_computed_tokens == 14 and req.num_tokens == 15
    assert req.block_ids == [0, 1, 2, 3]  # block 4 held only rejected drafts
    assert s.block_manager.num_free_blocks == 32 - 4


def test_a_stop_token_inside_the_accepted_drafts_ends_the_output_there():
    s = make_scheduler()
    prefill(s, 1, [5, 6, 7, 8, 5, 6], 7, max_tokens=20, eos_token_ids=[2], stop_token_ids=[5])
    out = s.schedule()
    (r,) = s.update(out, Result([[8, 5, 6, 11]]))  # all accepted, but 5 stops it
    assert r.finished and r.finish_reason == "stop" and r.stop_reason == 5
    assert r.token_ids == [8, 5]
    assert s.block_manager.num_used_blocks == 0 and not s.has_unfinished


def test_drafts_never_pass_max_tokens():
    s = make_scheduler(k=4)
    prefill(s, 1, [5, 6, 7, 8, 5, 6], 7, max_tokens=3)  # two outputs to go
    out = s.schedule()
    assert out.scheduled[0].num_draft_tokens == 1  # the verified token and one draft: outputs 2 and 3
    (r,) = s.update(out, Result([[8, 5]]))
    assert r.finished and r.finish_reason == "length" and r.token_ids == [8, 5]


def test_requests_that_cannot_speculate_decode_one_token():
    s = make_scheduler()
    prompt = [5, 6, 7, 8, 5, 6]
    prefill_all(s, [(1, prompt, 7, dict(max_tokens=20, repetition_penalty=1.2)),  # a state row
                    (2, prompt, 7, dict(max_tokens=20, min_tokens=4)),
                    (3, prompt, 7, dict(max_tokens=20, bad_words=[[8, 9]])),
                    (4, [1, 2, 3, 4], 9, dict(max_tokens=20)),  # no n-gram match: nothing to draft
                    (5, prompt, 7, dict(max_tokens=20, prompt_table_size=2)),  # virtual tokens: no drafter input
                    (6, prompt, 7, dict(max_tokens=20))])
    out = s.schedule()
    assert [(x.request_id, x.num_new_tokens, x.num_draft_tokens) for x in out.scheduled] == [
        (1, 1, 0), (2, 1, 0), (3, 1, 0), (4, 1, 0), (5, 1, 0), (6, 4, 3)]


def test_drafts_never_preempt_and_wait_for_blocks():
    s = make_scheduler(k=4, num_blocks=3)
    # 8 tokens in 2 blocks, 3 tokens in 1 block: the cache is full.
    prefill_all(s, [(1, [5, 6, 7, 5, 6, 7, 5], 6, dict(max_tokens=20)), (2, [9, 10], 11, dict(max_tokens=20))])
    out = s.schedule()
    # Request 1's drafts (7 5 6 7) would need a third block: it decodes one token rather than preempt request 2.
    assert [(x.request_id, x.num_new_tokens, x.num_draft_tokens) for x in out.scheduled] == [(1, 1, 0), (2, 1, 0)]
    assert list(out.preempted) == []


def test_a_drafter_row_gets_placeholders_and_its_catch_up_inputs():
    # The drafter computes what the target computes: a draft model's KV follows the computed tokens, an EAGLE head's
    # all but the last (its pair needs the token after it).
    for mode, behind in ((DRAFT_MODEL, 0), (EAGLE, 1)):
        s = make_scheduler(mode=mode, k=3)
        prefill(s, 1, [5, 6, 7, 8, 9, 10], 11, max_tokens=20)
        assert s.request(1).num_draft_computed == 6 - behind
        out = s.schedule()
        b = s.make_batch(out)
        assert out.scheduled[0].num_draft_tokens == 3 and b.draft_start.tolist() == [6 - behind]
        assert b.input_ids.tolist() == [11, -1, -1, -1]  # the runner fills the drafts
        assert b.draft_input_ids.tolist() == [10, 11][1 - behind:]  # from draft_start to the last known token
        assert b.draft_offsets.tolist() == [0, 1 + behind]
        s.update(out, Result([[20, 21, 22, 23]]))  # every draft accepted
        req = s.request(1)
        assert req.num_computed_tokens == 10 and req.num_draft_computed == 10 - behind
        b = s.make_batch(s.schedule())
        assert b.draft_start.tolist() == [10 - behind]
        assert b.draft_input_ids.tolist() == [22, 23][1 - behind:]
    # A prefix hit: the cached blocks' drafter KV came with them (an EAGLE head's last pair is redone: the token
    # after the hit may differ).
    for mode, behind in ((DRAFT_MODEL, 0), (EAGLE, 1)):
        s = make_scheduler(mode=mode, k=3)
        prefill(s, 1, [5, 6, 7, 8, 9, 10, 11, 12, 13], 14, max_tokens=20)
        s.add(Request(2, [5, 6, 7, 8, 9, 10, 11, 12, 40], max_tokens=20))
        out = s.schedule()
        assert s.request(2).num_cached_tokens == 8 and s.request(2).num_draft_computed == 8 - behind


def test_async_scheduling_waits_for_a_speculating_requests_step():
    """A request that may speculate is not scheduled ahead of its step in flight (its accepted count decides the
    next step's tokens): the next schedule has nothing for it until that step is collected."""
    s = make_scheduler(async_scheduling=True)
    prefill(s, 1, [5, 6, 7, 8, 5, 6], 7, max_tokens=20)
    first = s.schedule()
    assert [(x.request_id, x.num_draft_tokens) for x in first.scheduled] == [(1, 3)]
    assert list(s.schedule().scheduled) == []  # in flight: not ahead
    s.update(first, Result([[8, -1, -1, -1]]))
    second = s.schedule()
    assert [(x.request_id, x.num_computed_tokens, x.input_row) for x in second.scheduled] == [(1, 7, -1)]


def test_an_abort_during_a_speculative_step_frees_every_block():
    ex_config = ExecutorConfig(max_batch_size=8, max_num_tokens=64, max_seq_len=64, tokens_per_block=4,
                               num_blocks=32, speculative_mode=NGRAM, max_draft_len=3, max_matching_ngram_size=3)
    s = Scheduler(ex_config)
    prefill(s, 1, [5, 6, 7, 8, 5, 6], 7, max_tokens=20)
    out = s.schedule()
    assert out.scheduled[0].num_draft_tokens == 3
    assert s.abort(1) == []  # in flight: settled at collect
    (r,) = s.update(out, Result([[8, 5, 6, 9]]))
    assert r.finished and r.finish_reason == "abort"
    assert s.block_manager.num_used_blocks == 0


def test_logprobs_per_speculative_token():
    s = make_scheduler()
    s.add(Request(1, [5, 6, 7, 8, 5, 6], max_tokens=20, logprobs=2))
    s.update(s.schedule(), Result([[7]], logprobs=np.array([[-2.0]], np.float32), ranks=np.array([[3]], np.int32),
                                  top_ids=np.array([[50, 51]], np.int32),
                                  top_logprobs=np.array([[-0.1, -0.2]], np.float32)))
    out = s.schedule()
    tokens = [[8, 5, 40, -1]]
    logprobs = np.array([[-0.5, -1.0, -1.5, np.nan]], dtype=np.float32)
    ranks = np.array([[1, 2, 1, 0]], dtype=np.int32)
    top_ids = np.arange(8, dtype=np.int32).reshape(1, 8) + 100  # [R, K * L]: a list of 2 per token
    top_lps = -np.arange(8, dtype=np.float32).reshape(1, 8)
    (r,) = s.update(out, Result(tokens, logprobs=logprobs, ranks=ranks, top_ids=top_ids, top_logprobs=top_lps,
                                top_per_token=True))
    assert r.token_ids == [8, 5, 40]
    assert r.logprobs == pytest.approx([-0.5, -1.0, -1.5]) and r.ranks == [1, 2, 1]
    assert r.top_ids == [100, 101, 102, 103, 104, 105]
    assert r.top_logprobs == pytest.approx([0, -1, -2, -3, -4, -5])
    assert r.cumulative_logprob == pytest.approx(-5.0)


def test_block_manager_truncate_releases_the_tail_last_first():
    bm = _core.BlockManager(8, 4)
    table = bm.allocate([], 14)  # 4 blocks
    assert table == [0, 1, 2, 3]
    assert bm.truncate(table, 6) == [0, 1]
    assert bm.free_queue() == [4, 5, 6, 7, 3, 2]
    assert bm.truncate([0, 1], 8) == [0, 1]


@pytest.mark.parametrize("field,value", [("speculative_mode", 4), ("max_draft_len", 0),
                                         ("max_matching_ngram_size", 0), ("sliding_window", 16)])
def test_executor_config_refuses_bad_speculative_settings(field, value):
    config = dict(max_batch_size=8, max_num_tokens=64, max_seq_len=64, tokens_per_block=4, num_blocks=32,
                  speculative_mode=NGRAM, max_draft_len=3, max_matching_ngram_size=3)
    config[field] = value
    with pytest.raises(ValueError, match=field):
        ExecutorConfig(**config)
