"""Logprobs of generated and prompt tokens equal log_softmax of transformers' logits in fp32 (within
1e-5 absolute plus 1e-5 relative: two forward implementations differ by a few ulps of logits of
magnitude ~20), with ranks and top-k, and log_softmax of the engine's own logits to 1e-6; context
and generation logits equal transformers' logits; cumulative_logprob is the sum; the top-k width
is limited by LLM(max_logprobs=...)."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmapi import LLM, SamplingParams

K = 5
TOL = 1e-5


def _close(value, want, own=None):
    assert value == pytest.approx(want, abs=TOL, rel=TOL)
    if own is not None:
        assert value == pytest.approx(own, abs=1e-6)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request, tiny_llama_dir, tiny_gpt2_dir):
    model_dir = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}[request.param]
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(3)
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (9, 2, 14)]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # Small blocks and a small step budget: prompts are chunked across steps.
    with LLM(str(model_dir), tokens_per_block=4, max_num_tokens=8) as llm:
        yield llm, hf, prompts


def _reference_logprobs(hf, ids):
    with torch.inference_mode():
        logits = hf(torch.tensor([ids])).logits[0].float()  # [L, V]
    return logits, logits.log_softmax(-1)


def _check_entry(entry, token, ref_row, own_row=None):
    """entry: {id: Logprob} with the token itself and the top K; ref_row: [V] transformers' logprobs;
    own_row: [V] log_softmax of the engine's own logits of that position, if known."""
    own = (lambda t: float(own_row[t])) if own_row is not None else (lambda t: None)
    _close(entry[token].logprob, float(ref_row[token]), own(token))
    assert entry[token].rank == int((ref_row > ref_row[token]).sum()) + 1
    values, ids = ref_row.topk(K)
    for j, (v, t) in enumerate(zip(values.tolist(), ids.tolist())):
        _close(entry[t].logprob, v, own(t))
        if t != token:
            assert entry[t].rank == j + 1
    assert set(entry) <= set(ids.tolist()) | {token}


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generated_token_logprobs_equal_transformers(setup, temperature):
    llm, hf, prompts = setup
    params = SamplingParams(max_tokens=10, temperature=temperature, seed=5, logprobs=K,
                            return_generation_logits=True)
    for p, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        o = out.outputs[0]
        _, ref = _reference_logprobs(hf, p + o.token_ids)
        own = o.generation_logits.log_softmax(-1)  # [T, V]
        assert len(o.logprobs) == len(o.token_ids)
        for i, (token, entry) in enumerate(zip(o.token_ids, o.logprobs)):
            # Raw model logprobs: not temperature-scaled.
            _check_entry(entry, token, ref[len(p) - 1 + i], own[i])
        total = sum(float(ref[len(p) - 1 + i, t]) for i, t in enumerate(o.token_ids))
        assert o.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_prompt_logprobs_equal_transformers(setup):
    llm, hf, prompts = setup
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=K, return_context_logits=True)
    # Twice: the second run must not take the prompt from the prefix cache and skip its logits.
    for _ in range(2):
        for p, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
            _, ref = _reference_logprobs(hf, p)
            own = out.context_logits.log_softmax(-1)
            assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
            for i in range(1, len(p)):
                _check_entry(out.prompt_logprobs[i], p[i], ref[i - 1], own[i - 1])
            assert out.outputs[0].logprobs is None


def test_context_and_generation_logits_equal_transformers(setup):
    llm, hf, prompts = setup
    params = SamplingParams(max_tokens=6, temperature=0, return_context_logits=True,
                            return_generation_logits=True)
    for p, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        o = out.outputs[0]
        logits, _ = _reference_logprobs(hf, p + o.token_ids)
        assert out.context_logits.shape == (len(p), logits.shape[1])
        torch.testing.assert_close(out.context_logits, logits[:len(p)], rtol=TOL, atol=TOL)
        assert o.generation_logits.shape == (len(o.token_ids), logits.shape[1])
        torch.testing.assert_close(o.generation_logits, logits[len(p) - 1:len(p) - 1 + len(o.token_ids)],
                                   rtol=TOL, atol=TOL)


def test_logprobs_are_limited_by_max_logprobs(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), max_logprobs=3) as llm:
        with pytest.raises(ValueError, match=r"SamplingParams\.logprobs=4 .*max_logprobs=3"):
            llm.generate([5, 6], SamplingParams(logprobs=4))
        with pytest.raises(ValueError, match=r"SamplingParams\.prompt_logprobs=9"):
            llm.generate([5, 6], SamplingParams(prompt_logprobs=9))
        out = llm.generate([5, 6], SamplingParams(max_tokens=2, logprobs=3), use_tqdm=False)
        assert all(len(e) in (3, 4) for e in out.outputs[0].logprobs)
