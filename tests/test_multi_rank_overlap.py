"""Overlapped (async) scheduling over 2 MPI ranks on the CPU (TP=2 and PP=2): the executor submits step N+1, whose
inputs include the tokens step N samples, before it collects step N, and the tokens equal one rank's (greedy,
seeded sampling, n, beam search, stop rules, under preemption and with an abort), every KV block free after."""

import random

import pytest
from test_multi_rank_decoding import SETTINGS, _prompts  # small blocks and cache: the mixed batch preempts

from llmapi import LLM, SamplingParams


@pytest.fixture(scope="module")
def one_rank(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), **SETTINGS) as llm:
        yield llm


@pytest.fixture(scope="module", params=[(2, 1), (1, 2)], ids=["tp2", "pp2"])
def two_ranks(request, tiny_llama_dir):
    tp, pp = request.param
    with LLM(str(tiny_llama_dir), tp=tp, pp=pp, async_scheduling=True, **SETTINGS) as llm:
        yield llm


def _tokens(outputs):
    return [[(s.token_ids, s.finish_reason) for s in o.outputs] for o in outputs]


def test_step_is_submitted_before_the_one_it_reads_is_collected(two_ranks, tiny_llama_dir):
    """The runner's record of the executor's calls: each step whose inputs take tokens of the step before
    (placeholders) was submitted while that step was in flight, before its collect."""
    prompts = _prompts(tiny_llama_dir, [3, 9, 5, 12], seed=1)
    before = two_ranks._executor.runner_stats()
    two_ranks.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    stats = two_ranks._executor.runner_stats()
    events = [e for e in stats["events"] if e[1] >= before["steps"]]  # this call's steps
    order = {(e[0], e[1]): i for i, e in enumerate(events)}
    ahead = [e for e in events if e[0] == "submit" and e[3] > 0]  # ("submit", step, in flight, placeholders)
    assert len(ahead) >= 10  # one per decode step of the batch, less the last
    for _, step, inflight, placeholders in ahead:
        assert inflight == 1 and order[("submit", step)] < order[("collect", step - 1)]
        assert placeholders <= len(prompts)
    assert stats["overlapped_steps"] - before["overlapped_steps"] >= len(ahead)
    assert two_ranks.get_stats()["num_used_blocks"] == 0


CASES = {
    "greedy": SamplingParams(max_tokens=10, temperature=0),
    "seeded": SamplingParams(max_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=7),
    "n=2": SamplingParams(max_tokens=8, temperature=1.0, n=2, seed=3),
    "beams=3": SamplingParams(max_tokens=8, use_beam_search=True, best_of=3, n=2),
    "min_tokens": SamplingParams(max_tokens=9, temperature=0.7, seed=11, min_tokens=6),
    "long": SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
}


def test_settings_under_preemption_equal_one_rank(one_rank, two_ranks, tiny_llama_dir):
    """Every case twice in one generate call: more sequences than the cache holds, so requests are preempted
    while others run a token ahead."""
    cases = list(CASES.values()) * 2
    prompts = _prompts(tiny_llama_dir, [random.Random(i).randrange(2, 24) for i in range(len(cases))], seed=5)
    before = two_ranks.get_stats()["num_preemptions"]
    want = one_rank.generate(prompts, cases, use_tqdm=False)
    got = two_ranks.generate(prompts, cases, use_tqdm=False)
    assert _tokens(got) == _tokens(want)
    assert [len(o.outputs) for o in want[3::len(CASES)]] == [2, 2]  # beams: n kept
    stats = two_ranks.get_stats()
    assert stats["num_preemptions"] > before and stats["num_used_blocks"] == 0


def test_stop_token_of_a_step_ahead_and_an_abort(one_rank, two_ranks, tiny_llama_dir):
    """A stop token ends a request whose next token is already being computed (that token is dropped); an
    aborted request ends alone; the others give one rank's tokens."""
    prompts = _prompts(tiny_llama_dir, [4, 10, 7], seed=8)
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in one_rank.generate(prompts, greedy, use_tqdm=False)]
    stop = plain[1][5]
    params = [greedy, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop_token_ids=[stop])]
    want = one_rank.generate(prompts[:2], params, use_tqdm=False)
    assert want[1].outputs[0].finish_reason == "stop" and len(want[1].outputs[0].token_ids) <= 6

    long = two_ranks.generate_async(prompts[2], SamplingParams(max_tokens=200, ignore_eos=True), streaming=True)
    next(iter(long))
    got = [two_ranks.generate_async(p, s) for p, s in zip(prompts[:2], params)]
    long.abort()
    assert long.result(timeout=30).outputs[0].finish_reason == "abort"
    assert _tokens(r.result(timeout=30) for r in got) == _tokens(want)
    stats = two_ranks.get_stats()
    assert stats["num_running"] == 0 and stats["num_used_blocks"] == 0


def test_without_async_scheduling_no_step_reads_an_earlier_one(tiny_llama_dir, one_rank):
    """async_scheduling=False at PP=2: the stages still overlap (two steps in flight, of different requests),
    no batch takes a token not yet collected, and the tokens are one rank's."""
    prompts = _prompts(tiny_llama_dir, [3, 9, 5, 12, 6, 2], seed=2)
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=4)
    want = one_rank.generate(prompts, params, use_tqdm=False)
    with LLM(str(tiny_llama_dir), pp=2, async_scheduling=False, max_num_tokens=16, **SETTINGS) as llm:
        got = llm.generate(prompts, params, use_tqdm=False)
        stats = llm._executor.runner_stats()
    assert _tokens(got) == _tokens(want)
    assert all(e[3] == 0 for e in stats["events"] if e[0] == "submit")
    assert stats["overlapped_steps"] > 0
