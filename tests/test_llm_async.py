"""LLM with async scheduling (the default) against async scheduling off and transformers."""

import random

import numpy as np
import pytest

from llmapi import LLM, SamplingParams
from test_llm_parity import _reference


class _PlaceholderCount:
    """Wraps a runner's submit, counting the placeholder input ids (Batch.prev_rows >= 0) it gets."""

    def __init__(self, runner):
        self.count = 0
        submit = runner.submit

        def counting(batch):
            self.count += int((np.asarray(batch.prev_rows) >= 0).sum())
            return submit(batch)
        runner.submit = counting


def _generate_both(model_dir, prompts, params, **kwargs):
    """Outputs with async scheduling on and off; asserts that on used placeholders and off none."""
    results = {}
    for on in (True, False):
        with LLM(str(model_dir), async_scheduling=on, **kwargs) as llm:
            assert llm._executor is not None
            spy = _PlaceholderCount(llm._local)
            results[on] = llm.generate(prompts, params, use_tqdm=False)
            assert (spy.count > 0) == on
    return results[True], results[False]


def _prompts(n, seed, vocab=120):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 30))] for _ in range(n)]


def test_async_scheduling_is_a_validated_knob(tiny_llama_dir):
    with pytest.raises(ValueError, match="async_scheduling"):
        LLM(str(tiny_llama_dir), async_scheduling="yes")


def test_greedy_equals_async_off_and_transformers(tiny_llama_dir):
    prompts = _prompts(6, seed=3)
    params = [SamplingParams(max_tokens=m, temperature=0) for m in (1, 2, 5, 12, 20, 20)]
    on, off = _generate_both(tiny_llama_dir, prompts, params, kv_cache_config={"max_tokens": 256},
                             tokens_per_block=8, max_num_tokens=24)
    got = [o.outputs[0].token_ids for o in on]
    assert got == [o.outputs[0].token_ids for o in off]
    # Greedy: a shorter generation is a prefix of the longest one.
    ref = _reference(tiny_llama_dir, prompts, max_tokens=20)
    assert got == [r[:s.max_tokens] for r, s in zip(ref, params)]


def test_seeded_sampling_equals_async_off(tiny_gpt2_dir):
    prompts = _prompts(5, seed=4)
    params = [SamplingParams(max_tokens=16, temperature=0.9, top_k=30, top_p=0.9, seed=i, min_tokens=4)
              for i in range(5)]
    on, off = _generate_both(tiny_gpt2_dir, prompts, params)
    assert [o.outputs[0].token_ids for o in on] == [o.outputs[0].token_ids for o in off]
    assert len({tuple(o.outputs[0].token_ids) for o in on}) > 1


def test_n_beam_logprobs_and_penalties_mixed_with_plain_requests(tiny_llama_dir):
    prompts = _prompts(7, seed=5)
    params = [SamplingParams(max_tokens=10, temperature=0),
              SamplingParams(max_tokens=8, n=2, temperature=1.0, seed=7),
              SamplingParams(max_tokens=8, temperature=0),
              SamplingParams(max_tokens=6, n=2, use_beam_search=True, temperature=0),
              SamplingParams(max_tokens=9, temperature=0, logprobs=2),
              SamplingParams(max_tokens=9, temperature=0.8, seed=1, repetition_penalty=1.3),
              SamplingParams(max_tokens=12, temperature=0, bad_token_ids=[[5, 6], 7])]
    on, off = _generate_both(tiny_llama_dir, prompts, params)
    for a, b in zip(on, off):
        assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
        assert [o.finish_reason for o in a.outputs] == [o.finish_reason for o in b.outputs]
    for a, b in zip(on[4].outputs[0].logprobs, off[4].outputs[0].logprobs):
        assert a.keys() == b.keys()
        assert all(abs(a[k].logprob - b[k].logprob) < 1e-4 for k in a)


def test_stop_strings_end_the_text_with_a_step_ahead(tiny_llama_dir):
    with LLM(str(tiny_llama_dir)) as llm:
        base = llm.generate("the quick brown fox", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
        words = base.outputs[0].text.split()
        stop = words[2]
        out = llm.generate("the quick brown fox", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                                                 stop=[stop])).outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == base.outputs[0].text[:base.outputs[0].text.index(stop)]
