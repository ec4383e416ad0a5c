"""The capacity scheduler policy (TensorRT-LLM's CapacitySchedulerPolicy): MAX_UTILIZATION admits a request when
its next step's blocks fit and preempts when running requests run short; GUARANTEED_NO_EVICT admits one only if
the KV cache holds it to completion beside what the running requests have set aside for theirs, so nobody is
preempted. Checked on the core with synthetic steps (admission counts against hand-computed reservations, forked
sequences, requests larger than the cache) and through LLM on tiny models (no preemptions, the same greedy
tokens as transformers running each prompt alone, n samples and beams), plus the argument checks."""

import random
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from llmapi import LLM, CapacitySchedulerPolicy, KvCacheConfig, SamplingParams, SchedulerConfig
from llmapi._core import ExecutorConfig, Request, Scheduler

MAX_UTIL, NO_EVICT = 0, 1  # ExecutorConfig.capacity_scheduler_policy


def blocks(num_tokens: int, tokens_per_block: int) -> int:
    return -(-num_tokens // tokens_per_block)


# --- the core, driven with synthetic steps -------------------------------------------------------------------------

def make_scheduler(policy: int, **overrides) -> Scheduler:
    config = dict(max_batch_size=16, max_num_tokens=256, max_seq_len=128, tokens_per_block=4, num_blocks=16,
                  capacity_scheduler_policy=policy)
    config.update(overrides)
    return Scheduler(ExecutorConfig(**config))


def drive(s: Scheduler, pending=None):
    """Runs `s` to the end (settling `pending`, a step scheduled already, first). Each row's candidates depend only
    on the position sampled (100 + position + column), so a request's tokens do not depend on how it was scheduled.
    Returns the outputs and finish reasons by (request id, sequence index), the requests running after each
    schedule(), and the stats."""
    outputs, reasons, running = {}, {}, []
    while s.has_unfinished:
        out, pending = pending or s.schedule(), None
        assert out.scheduled, "nothing scheduled with requests unfinished"
        running.append(len(s.running_ids))
        batch = s.make_batch(out)
        k = max(int(c) for c in batch.num_candidates)
        tokens = np.array([[100 + r.num_computed_tokens + r.num_new_tokens + c for c in range(k)]
                           for r in out.scheduled], dtype=np.int32)
        scores = np.tile(-np.arange(k, dtype=np.float32), (len(out.scheduled), 1))
        result = SimpleNamespace(tokens=tokens, scores=scores, logprobs=None, ranks=None, top_ids=None,
                                 top_logprobs=None)
        for r in s.update(out, result):
            outputs.setdefault((r.request_id, r.seq_index), []).extend(r.token_ids)
            if r.finished:
                reasons[(r.request_id, r.seq_index)] = r.finish_reason
    assert s.block_manager.num_used_blocks == 0
    return outputs, reasons, running, s.stats()


def test_core_admits_only_what_the_cache_holds_to_completion():
    B, num_blocks, prompt_len, max_tokens, count = 4, 16, 6, 10, 6
    per_request = blocks(prompt_len + max_tokens, B)  # 4 blocks each to completion
    allowed = num_blocks // per_request  # 4 at once
    results = {}
    for policy in (MAX_UTIL, NO_EVICT):
        s = make_scheduler(policy, tokens_per_block=B, num_blocks=num_blocks)
        for i in range(count):
            s.add(Request(i + 1, [3 + i] * prompt_len, max_tokens=max_tokens))
        results[policy] = drive(s)
    mu_out, mu_reasons, mu_running, mu_stats = results[MAX_UTIL]
    ne_out, ne_reasons, ne_running, ne_stats = results[NO_EVICT]
    # MAX_UTILIZATION takes all six at once (their prompts' 2 blocks each fit) and must preempt later.
    assert mu_running[0] == count and mu_stats["num_preemptions"] > 0
    # GUARANTEED_NO_EVICT takes exactly the hand-computed number, never more, and preempts nobody.
    assert ne_running[0] == allowed and max(ne_running) == allowed
    assert ne_stats["num_preemptions"] == 0
    assert ne_out == mu_out and len(ne_out) == count
    assert all(len(t) == max_tokens for t in ne_out.values())
    assert set(ne_reasons.values()) == set(mu_reasons.values()) == {"length"}


def test_core_counts_running_requests_reservations_and_prefix_hits():
    B = 4
    # Request 1 (prompt 6, 6 more tokens) needs 3 blocks in all; after admission it holds 2, so 1 is set aside.
    # Request 2 (prompt 5, 12 more tokens): 5 blocks to completion.
    for num_blocks, together in ((7, False), (8, True)):
        s = make_scheduler(NO_EVICT, tokens_per_block=B, num_blocks=num_blocks)
        s.add(Request(1, [5] * 6, max_tokens=6))
        out = s.schedule()
        s.add(Request(2, [7] * 5, max_tokens=12))
        s.update(out, [106])
        out = s.schedule()
        assert s.running_ids == ([1, 2] if together else [1]), num_blocks
        _, reasons, _, stats = drive(s, out)
        assert stats["num_preemptions"] == 0 and set(reasons.values()) == {"length"}
    # A prefix-cache hit on blocks a running request holds costs nothing: two requests with the same 8-token prompt
    # (prompt 8 + 4 more = 3 blocks each; the second reuses the first's 1 full block that lookup offers).
    s = make_scheduler(NO_EVICT, tokens_per_block=B, num_blocks=5)
    s.add(Request(1, list(range(10, 18)), max_tokens=4))
    out = s.schedule()
    s.update(out, [118])  # its 2 prompt blocks are cached now; 3 - 2 = 1 set aside, 3 free
    s.add(Request(2, list(range(10, 18)), max_tokens=4))
    out = s.schedule()
    # Without the credit it would need 3 blocks > 2 (3 free, 1 set aside); with it 3 - 1 = 2 (lookup offers 1 block).
    assert s.running_ids == [1, 2]
    _, _, _, stats = drive(s, out)
    assert stats["num_preemptions"] == 0 and stats["num_prefix_hit_tokens"] == 4


def test_core_counts_every_sequence_of_a_sample_group():
    B = 4
    # n=3 samples of a 6-token prompt with 6 more tokens: the prompt's full block is shared, each sequence then
    # holds 2 blocks of its own (the prompt's tail block copied on write for two of them): 1 + 3 * 2 = 7.
    group = 1 + 3 * (blocks(12, B) - 6 // B)
    assert group == 7
    for num_blocks in (group, group + 2):
        s = make_scheduler(NO_EVICT, tokens_per_block=B, num_blocks=num_blocks)
        s.add(Request(1, [5] * 6, max_tokens=6, num_sequences=3, seed=1))
        s.add(Request(2, [9] * 6, max_tokens=2))  # 2 blocks: only beside the group when 2 more are there
        out = s.schedule()
        assert s.running_ids == ([1, 2] if num_blocks > group else [1])
        outputs, reasons, _, stats = drive(s, out)
        assert stats["num_preemptions"] == 0
        assert len(outputs) == 4 and set(reasons.values()) == {"length"}
    # Under MAX_UTILIZATION the same group in its own 7 blocks runs too (the estimate is exact, not loose).
    assert drive(make_scheduler(MAX_UTIL, tokens_per_block=B, num_blocks=group))[3]["num_preemptions"] == 0


def test_core_counts_an_encoder_decoder_request_s_cross_blocks():
    B = 4
    # Decoder start token + 7 tokens: 2 blocks; an 8-token encoder input: 2 cross blocks; 4 to completion. Once
    # admitted, the first holds 1 + 2 and sets 1 aside: the second's 4 fit 8 - 3 - 1 = 4, not 7 - 3 - 1 = 3.
    per = blocks(1 + 7, B) + blocks(8, B)
    assert per == 4
    for policy, num_blocks, together in ((NO_EVICT, 7, False), (NO_EVICT, 8, True), (MAX_UTIL, 7, True)):
        s = make_scheduler(policy, tokens_per_block=B, num_blocks=num_blocks)
        s.add(Request(1, [0], max_tokens=7, encoder_token_ids=list(range(10, 18))))
        s.add(Request(2, [0], max_tokens=7, encoder_token_ids=list(range(20, 28))))
        out = s.schedule()
        assert s.running_ids == ([1, 2] if together else [1]), (policy, num_blocks)
        outputs, reasons, _, stats = drive(s, out)
        assert set(reasons.values()) == {"length"} and len(outputs[(2, 0)]) == 7
        if policy == NO_EVICT:
            assert stats["num_preemptions"] == 0


def test_core_request_larger_than_the_cache_still_runs():
    B, num_blocks = 4, 8
    reasons_by_policy = {}
    for policy in (MAX_UTIL, NO_EVICT):
        s = make_scheduler(policy, tokens_per_block=B, num_blocks=num_blocks)
        # 6 + 40 tokens need 12 blocks > 8: it can never be guaranteed. It stops at position 20 (a stop id).
        s.add(Request(1, [5] * 6, max_tokens=40, stop_token_ids=[120]))
        # 6 + 40 again, without a stop: it fails once its tokens outgrow the cache, as under MAX_UTILIZATION.
        s.add(Request(2, [6] * 6, max_tokens=40))
        s.add(Request(3, [7] * 6, max_tokens=6))  # fits, and runs once the others are gone
        outputs, reasons, _, stats = drive(s)
        reasons_by_policy[policy] = (outputs, reasons)
    assert reasons_by_policy[NO_EVICT] == reasons_by_policy[MAX_UTIL]
    outputs, reasons = reasons_by_policy[NO_EVICT]
    assert reasons == {(1, 0): "stop", (2, 0): "error", (3, 0): "length"}
    assert outputs[(1, 0)][-1] == 120 and len(outputs[(3, 0)]) == 6


def test_core_policy_is_validated():
    with pytest.raises(ValueError, match="capacity_scheduler_policy=2"):
        make_scheduler(2)
    assert "capacity_scheduler_policy=1" in repr(ExecutorConfig(max_batch_size=1, max_num_tokens=8, max_seq_len=8,
                                                                tokens_per_block=4, num_blocks=4,
                                                                capacity_scheduler_policy=1))


# --- through LLM, on a tiny Llama -----------------------------------------------------------------------------------

B = 4
KV_TOKENS = 48  # 12 blocks of 4 tokens
PROMPT_LEN, MAX_TOKENS, NUM_PROMPTS = 10, 10, 8


def _prompts(lengths, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(n)] for n in lengths]


def _reference(model_dir, prompts, max_tokens):
    """transformers' greedy generate, one prompt at a time: each request alone."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                              pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs


def _llm(model_dir, policy, **kwargs):
    kv = KvCacheConfig(max_tokens=KV_TOKENS, enable_block_reuse=False)
    return LLM(str(model_dir), tokens_per_block=B, kv_cache_config=kv,
               scheduler_config=SchedulerConfig(capacity_scheduler_policy=policy), **kwargs)


def _generate_counting_rows(llm, prompts, params):
    """generate(), recording how many requests each step submitted to the runner ran."""
    rows = []
    runner = llm._runner
    submit = runner.submit

    def counting(batch):
        rows.append(batch.num_requests)
        return submit(batch)

    runner.submit = counting
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        del runner.submit
    return outs, rows


@pytest.fixture(scope="module")
def squeezed(tiny_llama_dir):
    """8 greedy requests of 10 + 10 tokens through a 12-block cache under each policy (and no-evict without async
    scheduling, where every running request is in every step), with the rows of each step."""
    prompts = _prompts([PROMPT_LEN] * NUM_PROMPTS, seed=11)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    runs = {}
    for name, policy, extra in (("max_utilization", CapacitySchedulerPolicy.MAX_UTILIZATION, {}),
                                ("no_evict", CapacitySchedulerPolicy.GUARANTEED_NO_EVICT, {}),
                                ("no_evict_sync", "guaranteed_no_evict", dict(async_scheduling=False))):
        with _llm(tiny_llama_dir, policy, **extra) as llm:
            assert llm.num_kv_blocks == KV_TOKENS // B
            outs, rows = _generate_counting_rows(llm, prompts, params)
            runs[name] = ([o.outputs[0].token_ids for o in outs], rows, llm.get_stats(), llm.engine_built)
    return prompts, runs


def test_no_evict_preempts_nobody_and_keeps_the_greedy_tokens(squeezed, tiny_llama_dir):
    prompts, runs = squeezed
    want = _reference(tiny_llama_dir, prompts, MAX_TOKENS)
    assert sum(len(p) + len(w) for p, w in zip(prompts, want)) > KV_TOKENS  # their completions exceed the cache
    tokens, _, stats, _ = runs["max_utilization"]
    assert stats["num_preemptions"] > 0 and tokens == want
    for name in ("no_evict", "no_evict_sync"):
        tokens, _, stats, _ = runs[name]
        assert stats["num_preemptions"] == 0, name
        assert stats["num_used_blocks"] == 0 and tokens == want, name


def test_no_evict_runs_no_more_requests_than_the_reservations_allow(squeezed):
    _, runs = squeezed
    # Each request holds ceil((10 + 10) / 4) = 5 blocks at its completion: 12 blocks guarantee 2 at once.
    allowed = (KV_TOKENS // B) // blocks(PROMPT_LEN + MAX_TOKENS, B)
    assert allowed == 2
    assert max(runs["max_utilization"][1]) > allowed  # the limit binds: MAX_UTILIZATION runs more
    assert max(runs["no_evict"][1]) <= allowed
    # Without async scheduling every running request is in every step: the peak is exactly the reservation's.
    assert max(runs["no_evict_sync"][1]) == allowed


def test_the_policy_is_not_part_of_the_engine(squeezed):
    _, runs = squeezed
    # The max_utilization run built (or found) the engine; the no-evict runs found the same cache entry.
    assert not runs["no_evict"][3] and not runs["no_evict_sync"][3]


def _run_with_timeout(fn, timeout_s=120):
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised below
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"no result within {timeout_s} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_no_evict_runs_a_request_whose_completion_exceeds_the_cache(tiny_llama_dir):
    prompt = _prompts([PROMPT_LEN], seed=12)[0]
    # max_tokens=60: 70 tokens, 18 blocks > the cache's 12, so it can never be guaranteed. It ends at a stop id taken
    # from its own greedy continuation (the first token first seen at output 15 or later), inside the cache.
    ref = _reference(tiny_llama_dir, [prompt], 30)[0]
    k = next(i for i in range(15, 30) if ref[i] not in ref[:i])
    stop = SamplingParams(max_tokens=60, temperature=0, stop_token_ids=[ref[k]])
    neighbours = _prompts([PROMPT_LEN] * 3, seed=13)
    plain = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    results = {}
    for policy in ("max_utilization", "GUARANTEED_NO_EVICT"):
        with _llm(tiny_llama_dir, policy) as llm:
            outs = _run_with_timeout(lambda: llm.generate([prompt] + neighbours, [stop] + [plain] * 3,
                                                          use_tqdm=False))
            results[policy] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]
    assert results["GUARANTEED_NO_EVICT"] == results["max_utilization"]
    (tokens, reason), *rest = results["GUARANTEED_NO_EVICT"]
    assert reason == "stop" and tokens[:k] == ref[:k]
    assert [t for t, _ in rest] == _reference(tiny_llama_dir, neighbours, MAX_TOKENS)


def test_no_evict_n_samples_and_beams_match_max_utilization(tiny_llama_dir):
    prompts = _prompts([6, 9, 7], seed=14)
    samples = SamplingParams(n=2, seed=5, max_tokens=8, temperature=1.0, ignore_eos=True)
    beams = SamplingParams(max_tokens=8, use_beam_search=True, best_of=2, n=2)
    results = {}
    for policy in (CapacitySchedulerPolicy.MAX_UTILIZATION, CapacitySchedulerPolicy.GUARANTEED_NO_EVICT):
        with _llm(tiny_llama_dir, policy) as llm:
            outs = _run_with_timeout(lambda: llm.generate(prompts + prompts, [samples] * 3 + [beams] * 3,
                                                          use_tqdm=False))
            results[policy] = ([sorted(c.token_ids for c in o.outputs) for o in outs], llm.get_stats())
    mu, ne = results[CapacitySchedulerPolicy.MAX_UTILIZATION], results[CapacitySchedulerPolicy.GUARANTEED_NO_EVICT]
    assert mu[1]["num_preemptions"] > 0 and ne[1]["num_preemptions"] == 0  # the cache is tight for them
    assert ne[0] == mu[0]
    assert all(len(o) == 2 for o in ne[0])


def test_scheduler_config_arguments():
    from llmapi.config import LlmArgs

    assert SchedulerConfig().capacity_scheduler_policy is CapacitySchedulerPolicy.MAX_UTILIZATION
    for spelling in ("guaranteed_no_evict", "GUARANTEED_NO_EVICT", "Guaranteed_No_Evict",
                     CapacitySchedulerPolicy.GUARANTEED_NO_EVICT):
        assert (SchedulerConfig(capacity_scheduler_policy=spelling).capacity_scheduler_policy
                is CapacitySchedulerPolicy.GUARANTEED_NO_EVICT)
    assert SchedulerConfig("max_utilization").capacity_scheduler_policy is CapacitySchedulerPolicy.MAX_UTILIZATION
    for bad in ("fastest", 1, None, "static_batch"):
        with pytest.raises(ValueError, match="MAX_UTILIZATION, GUARANTEED_NO_EVICT") as e:
            SchedulerConfig(capacity_scheduler_policy=bad)
        assert "capacity_scheduler_policy=" in str(e.value)
    with pytest.raises(ValueError, match="unknown argument.*policy"):
        SchedulerConfig(policy="max_utilization")
    args = LlmArgs(model="m", scheduler_config={"capacity_scheduler_policy": "guaranteed_no_evict"})
    assert args.scheduler_config == SchedulerConfig(CapacitySchedulerPolicy.GUARANTEED_NO_EVICT)
    assert LlmArgs(model="m").scheduler_config == SchedulerConfig()
    with pytest.raises(ValueError, match="scheduler_config='guaranteed_no_evict' is invalid"):
        LlmArgs(model="m", scheduler_config="guaranteed_no_evict")
    assert CapacitySchedulerPolicy.GUARANTEED_NO_EVICT.core_value == NO_EVICT
    assert CapacitySchedulerPolicy.MAX_UTILIZATION.core_value == MAX_UTIL


# --- llmapi bench ---------------------------------------------------------------------------------------------------

def test_bench_flag_reaches_the_llm_and_reports_preemptions(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import argparse
    import json

    from llmapi import bench
    from llmapi.cli import main

    seen = []
    start = bench._start_llm

    def recording(model, kwargs):
        llm, startup = start(model, kwargs)
        seen.append(llm.args.scheduler_config.capacity_scheduler_policy)
        return llm, startup

    monkeypatch.setattr(bench, "_start_llm", recording)
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_llama_dir), "--device", "cpu", "--isl", "6", "--osl", "5",
                 "--num-requests", "4", "--capacity-scheduler-policy", "guaranteed_no_evict", "--json", str(out)]) == 0
    assert seen == [CapacitySchedulerPolicy.GUARANTEED_NO_EVICT]
    result = json.loads(out.read_text())
    assert result["capacity_scheduler_policy"] == "guaranteed_no_evict"
    assert result["llmapi"]["preemptions"] == 0 and result["llmapi"]["output_tokens"] == 20
    assert "0 preemptions (guaranteed_no_evict)" in capsys.readouterr().out
    # The grid builds its LLM from the same arguments; the default stays max_utilization (LLM's), and is
    # guaranteed_no_evict with --grid (TensorRT-LLM's, whose figures the grid compares with).
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    kwargs = bench.offline_llm_kwargs(p.parse_args([]), 64)
    assert kwargs["scheduler_config"] == {"capacity_scheduler_policy": "max_utilization"}
    assert SchedulerConfig.coerce(kwargs["scheduler_config"]) == SchedulerConfig()
    kwargs = bench.offline_llm_kwargs(p.parse_args(["--grid", "trtllm"]), 64)
    assert kwargs["scheduler_config"] == {"capacity_scheduler_policy": "guaranteed_no_evict"}
    kwargs = bench.offline_llm_kwargs(p.parse_args(["--grid", "trtllm", "--capacity-scheduler-policy",
                                                    "max_utilization"]), 64)
    assert kwargs["scheduler_config"] == {"capacity_scheduler_policy": "max_utilization"}
    with pytest.raises(SystemExit):
        p.parse_args(["--capacity-scheduler-policy", "fastest"])
    assert "invalid choice: 'fastest'" in capsys.readouterr().err


# --- several ranks --------------------------------------------------------------------------------------------------

def test_no_evict_reaches_rank_0_executor_on_two_ranks(squeezed, tiny_llama_dir):
    """tp=2: the spawned job's rank 0 runs the executor; the policy travels with its other settings."""
    prompts, runs = squeezed
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    preemptions = {}
    for policy in ("max_utilization", "guaranteed_no_evict"):
        with _llm(tiny_llama_dir, policy, tp=2) as llm:
            outs = llm.generate(prompts, params, use_tqdm=False)
            preemptions[policy] = llm.get_stats()["num_preemptions"]
        assert [o.outputs[0].token_ids for o in outs] == runs["no_evict"][0], policy
    assert preemptions["max_utilization"] > 0 and preemptions["guaranteed_no_evict"] == 0
