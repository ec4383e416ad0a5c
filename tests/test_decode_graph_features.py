"""Decode steps that use decoding features (logprobs, penalties, beams, n > 1, logit bias, bad words, stop rules, a
Python logits processor) take their logits from the decode graphs (here their CPU stand-in, the same static padded
buffers) and decode them as after an eager forward: the outputs equal the eager run's, logprobs included."""

import random

import pytest

from llmapi import LLM, SamplingParams
from llmapi.runtime.cuda_graph import GRAPHS_ON_CPU_ENV


def _params():
    return [
        SamplingParams(max_tokens=10, temperature=0, logprobs=3),
        SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=5, repetition_penalty=1.3,
                       presence_penalty=0.5, frequency_penalty=0.2),
        SamplingParams(max_tokens=8, n=3, temperature=1.0, seed=11, logprobs=1),
        SamplingParams(max_tokens=8, best_of=3, use_beam_search=True, temperature=0),
        SamplingParams(max_tokens=10, temperature=0, logit_bias={7: 5.0, 9: -100.0}, bad_token_ids=[12, 13]),
        SamplingParams(max_tokens=10, temperature=0.7, seed=3, min_p=0.1, min_tokens=4),
        SamplingParams(max_tokens=10, temperature=0,
                       logits_processor=lambda ids, logits: logits.index_fill_(0, logits.new_tensor([5]).long(), -1e9)),
        SamplingParams(max_tokens=10, temperature=0),
    ]


def _run(model_dir, prompts, params):
    with LLM(str(model_dir), max_batch_size=16, tokens_per_block=4) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm._runner.stats
        steps = stats.graph_steps
        # The host time of the eager steps and the longest submit are parts of the whole; all steps eager
        # without graphs.
        assert 0 < stats.max_submit_s <= stats.submit_s and 0 < stats.eager_submit_s <= stats.submit_s
        assert (stats.eager_submit_s == stats.submit_s) == (steps == 0)
    return [[(c.token_ids, c.logprobs) for c in o.outputs] for o in outs], steps


def test_decode_features_through_the_decode_graphs_equal_eager(tiny_llama_dir, monkeypatch):
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randrange(3, 14))] for _ in range(8)]
    params = _params()
    eager, eager_steps = _run(tiny_llama_dir, prompts, params)
    monkeypatch.setenv(GRAPHS_ON_CPU_ENV, "1")
    graphed, graph_steps = _run(tiny_llama_dir, prompts, params)
    assert eager_steps == 0 and graph_steps > 0
    for i, (a, b) in enumerate(zip(graphed, eager)):
        assert [t for t, _ in a] == [t for t, _ in b], f"request {i}"
        for (_, lp_a), (_, lp_b) in zip(a, b):
            if lp_b is not None:
                assert len(lp_a) == len(lp_b)
                for x, y in zip(lp_a, lp_b):
                    assert x.keys() == y.keys()
                    assert all(x[k].logprob == pytest.approx(y[k].logprob, abs=1e-5) for k in x)
