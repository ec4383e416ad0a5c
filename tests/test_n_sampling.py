"""n / best_of: seeded samples differ from one another, repeat exactly across runs and batch
compositions (busy batches, chunked prefill, preemption), come back ordered by cumulative logprob,
and best_of keeps the n best of its samples."""

import random

import pytest

from llmapi import LLM, KvCacheConfig, SamplingParams

PROMPT = [17, 45, 3, 99, 120, 8, 61]


def _samples(out):
    return [o.token_ids for o in out.outputs]


def _busy_batch(llm, params, seed):
    """PROMPT with `params` in the middle of a batch of other requests with other settings."""
    rng = random.Random(seed)
    others = [[rng.randrange(3, 300) for _ in range(rng.randrange(2, 30))] for _ in range(9)]
    other_params = [SamplingParams(max_tokens=rng.randrange(3, 20), temperature=rng.choice([0, 0.7, 1.3]),
                                   top_k=rng.choice([0, 5]), n=rng.choice([1, 2]), seed=rng.randrange(100))
                    for _ in others]
    prompts = others[:4] + [PROMPT] + others[4:]
    outs = llm.generate(prompts, other_params[:4] + [params] + other_params[4:], use_tqdm=False)
    return outs[4]


def test_n4_seeded_is_diverse_and_reproducible(tiny_llama_dir):
    params = SamplingParams(n=4, seed=1234, max_tokens=16, temperature=1.0, ignore_eos=True)
    with LLM(str(tiny_llama_dir), tokens_per_block=4) as llm:
        alone = _samples(llm.generate(PROMPT, params, use_tqdm=False))
        again = _samples(llm.generate(PROMPT, params, use_tqdm=False))
        busy = _samples(_busy_batch(llm, params, seed=1))
        busy2 = _samples(_busy_batch(llm, params, seed=2))
    assert len(alone) == 4 and len({tuple(s) for s in alone}) == 4
    assert all(len(s) == 16 for s in alone)
    assert sorted(alone) == sorted(again) == sorted(busy) == sorted(busy2)
    # Small step budget (chunked prefill) and a tiny KV cache (preemption): the same samples.
    kv = KvCacheConfig(max_tokens=64, enable_block_reuse=False)
    with LLM(str(tiny_llama_dir), tokens_per_block=4, max_num_tokens=8, kv_cache_config=kv) as llm:
        squeezed = _samples(_busy_batch(llm, params, seed=3))
        assert llm.get_stats()["num_preemptions"] > 0
    assert sorted(squeezed) == sorted(alone)


def test_outputs_are_ordered_by_cumulative_logprob(tiny_gpt2_dir):
    with LLM(str(tiny_gpt2_dir)) as llm:
        out = llm.generate(PROMPT, SamplingParams(n=5, seed=9, max_tokens=10, logprobs=0), use_tqdm=False)
    cumulative = [o.cumulative_logprob for o in out.outputs]
    assert cumulative == sorted(cumulative, reverse=True)
    assert sorted(o.index for o in out.outputs) == list(range(5))
    for o in out.outputs:
        assert o.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(o.token_ids, o.logprobs)),
                                                     abs=1e-4)


def test_best_of_keeps_the_n_best_samples(tiny_llama_dir):
    with LLM(str(tiny_llama_dir)) as llm:
        every = llm.generate(PROMPT, SamplingParams(n=6, seed=77, max_tokens=8), use_tqdm=False)
        best = llm.generate(PROMPT, SamplingParams(n=2, best_of=6, seed=77, max_tokens=8), use_tqdm=False)
        assert llm.get_stats()["num_used_blocks"] == 0
    ranked = sorted(every.outputs, key=lambda o: -o.cumulative_logprob)
    assert [o.token_ids for o in best.outputs] == [o.token_ids for o in ranked[:2]]
    assert [o.index for o in best.outputs] == [o.index for o in ranked[:2]]


def test_n_sequences_stream(tiny_gpt2_dir):
    with LLM(str(tiny_gpt2_dir)) as llm:
        stream = llm.generate_async(PROMPT, SamplingParams(n=3, seed=5, max_tokens=6, ignore_eos=True),
                                    streaming=True)
        pieces = {i: [] for i in range(3)}
        for update in stream:
            for o in update.outputs:
                pieces[o.index] += o.token_ids_diff
        final = stream.result()
    assert {o.index: o.token_ids for o in final.outputs} == pieces
    assert all(len(p) == 6 for p in pieces.values())


def test_stop_strings_end_each_sequence_on_its_own(tiny_llama_dir):
    base = SamplingParams(n=4, seed=21, max_tokens=12, ignore_eos=True)
    with LLM(str(tiny_llama_dir)) as llm:
        free = {o.index: o.text for o in llm.generate(PROMPT, base, use_tqdm=False).outputs}
        word = free[0].split()[3]  # appears in sample 0 (maybe in others): each stops at its own
        stopped = llm.generate(PROMPT, SamplingParams(n=4, seed=21, max_tokens=12, ignore_eos=True, stop=word),
                               use_tqdm=False)
        assert llm.get_stats()["num_used_blocks"] == 0
    for o in stopped.outputs:
        at = free[o.index].find(word)
        if at >= 0:
            assert (o.text, o.finish_reason, o.stop_reason) == (free[o.index][:at], "stop", word)
        else:
            assert (o.text, o.finish_reason) == (free[o.index], "length")
    assert next(o for o in stopped.outputs if o.index == 0).finish_reason == "stop"


def test_abort_ends_every_sequence(tiny_gpt2_dir):
    with LLM(str(tiny_gpt2_dir)) as llm:
        out = llm.generate_async(PROMPT, SamplingParams(n=3, max_tokens=200, ignore_eos=True), streaming=True)
        next(iter(out))  # the first tokens arrived
        out.abort()
        final = out.result(timeout=10)
        assert all(o.finish_reason == "abort" for o in final.outputs)
        assert llm.get_stats()["num_used_blocks"] == 0
