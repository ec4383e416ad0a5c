"""Beam search (use_beam_search, best_of = beam width) is token-exact against transformers'
num_beams on the tiny Llama and GPT-2, with length penalties and early stopping; the n best
hypotheses come back best first, and every KV block is free afterwards."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmapi import LLM, KvCacheConfig, SamplingParams

MAX_TOKENS = 12


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request, tiny_llama_dir, tiny_gpt2_dir):
    model_dir = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}[request.param]
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(11)
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (5, 8, 13)]  # partly filled blocks
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with LLM(str(model_dir), tokens_per_block=4) as llm:
        yield llm, hf, prompts


def _hf_beams(hf, prompt, width, n, **kwargs):
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, num_beams=width,
                          num_return_sequences=n, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                          output_scores=True, **kwargs)
    hyps = []
    for row, beam_indices in zip(out.sequences, out.beam_indices):
        length = int((beam_indices >= 0).sum())  # generated tokens of this hypothesis (pad follows)
        hyps.append(row[len(prompt):len(prompt) + length].tolist())
    return hyps, out.sequences_scores.tolist()


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("length_penalty", [1.0, 0.3, 2.0])
def test_beam_search_matches_transformers(setup, width, length_penalty):
    llm, hf, prompts = setup
    params = SamplingParams(max_tokens=MAX_TOKENS, use_beam_search=True, best_of=width, n=width,
                            length_penalty=length_penalty)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for p, out in zip(prompts, outs):
        want, scores = _hf_beams(hf, p, width, width, length_penalty=length_penalty)
        assert [o.token_ids for o in out.outputs] == want
        # cumulative_logprob is the sum; transformers' sequence score divides it by length**penalty.
        for o, score in zip(out.outputs, scores):
            assert o.cumulative_logprob / len(o.token_ids) ** length_penalty == pytest.approx(score, abs=1e-4)
            assert o.finish_reason == ("stop" if o.token_ids[-1] == 2 else "length")
    assert llm.get_stats()["num_used_blocks"] == 0


@pytest.mark.parametrize("early_stopping", [True, "never"])
def test_beam_search_early_stopping_matches_transformers(setup, early_stopping):
    llm, hf, prompts = setup
    params = SamplingParams(max_tokens=MAX_TOKENS, use_beam_search=True, best_of=3, n=2,
                            early_stopping=early_stopping, length_penalty=1.5)
    for p, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        want, _ = _hf_beams(hf, p, 3, 2, early_stopping=early_stopping, length_penalty=1.5)
        assert [o.token_ids for o in out.outputs] == want
    assert llm.get_stats()["num_used_blocks"] == 0


def test_beam_search_with_repetition_penalty_and_plain_neighbours(setup):
    llm, hf, prompts = setup
    beam = SamplingParams(max_tokens=MAX_TOKENS, use_beam_search=True, best_of=2, n=1, repetition_penalty=1.6)
    plain = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    outs = llm.generate(prompts + prompts, [beam] * 3 + [plain] * 3, use_tqdm=False)
    for p, out in zip(prompts, outs[:3]):
        want, _ = _hf_beams(hf, p, 2, 1, repetition_penalty=1.6)
        assert [o.token_ids for o in out.outputs] == want
    for p, out in zip(prompts, outs[3:]):
        ids = torch.tensor([p])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                          pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, len(p):].tolist()


def test_beam_search_survives_preemption(tiny_llama_dir):
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 320) for _ in range(10)] for _ in range(4)]
    # 24 blocks of 4 tokens: four requests of 3 beams cannot all hold their blocks at once.
    kv = KvCacheConfig(max_tokens=96, enable_block_reuse=False)
    with LLM(str(tiny_llama_dir), tokens_per_block=4, kv_cache_config=kv) as llm:
        params = SamplingParams(max_tokens=MAX_TOKENS, use_beam_search=True, best_of=3, n=3)
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.get_stats()
    assert stats["num_preemptions"] > 0 and stats["num_used_blocks"] == 0
    for p, out in zip(prompts, outs):
        want, _ = _hf_beams(hf, p, 3, 3)
        assert [o.token_ids for o in out.outputs] == want
