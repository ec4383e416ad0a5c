"""Greedy generation through LLM equals transformers' generate token for token (tiny Llama and GPT-2),
also with prefix reuse, forced chunked prefill, and a KV cache small enough to preempt."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmapi import LLM, KvCacheConfig, SamplingParams

MAX_TOKENS = 20


def _prompts(vocab: int, lengths, seed: int, prefix=()):
    rng = random.Random(seed)
    return [list(prefix) + [rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def _reference(model_dir, prompts, max_tokens=MAX_TOKENS):
    """transformers' greedy generate, one prompt at a time (no padding), stopping at EOS as we do."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                              do_sample=False, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs


def _generate(llm, prompts, max_tokens=MAX_TOKENS):
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


MIXED = [1, 5, 17, 33, 2, 48, 9, 26, 60, 12]


@pytest.fixture(params=["llama", "gpt2"])
def model_dir(request, tiny_llama_dir, tiny_gpt2_dir):
    return {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}[request.param]


def _vocab(model_dir):
    import json
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def test_greedy_parity_mixed_batch(model_dir):
    prompts = _prompts(_vocab(model_dir), MIXED, seed=1)
    with LLM(str(model_dir)) as llm:
        got = _generate(llm, prompts)
        assert llm.get_stats()["num_preemptions"] == 0
    assert got == _reference(model_dir, prompts)


def test_greedy_parity_with_prefix_reuse(model_dir):
    vocab = _vocab(model_dir)
    shared = _prompts(vocab, [40], seed=2)[0]
    first = _prompts(vocab, [3, 11, 20, 1], seed=3, prefix=shared)
    second = _prompts(vocab, [7, 2, 30, 15], seed=4, prefix=shared)
    with LLM(str(model_dir), tokens_per_block=8) as llm:
        got = _generate(llm, first)
        hits_before = llm.get_stats()["num_prefix_hit_tokens"]
        got += _generate(llm, second)
        hits = llm.get_stats()["num_prefix_hit_tokens"] - hits_before
    # Every prompt of the second round finds the 40-token prefix's 5 full blocks cached.
    assert hits >= 4 * 40
    assert got == _reference(model_dir, first + second)


def test_greedy_parity_with_chunked_prefill(model_dir):
    prompts = _prompts(_vocab(model_dir), MIXED, seed=5)
    with LLM(str(model_dir), max_num_tokens=16, tokens_per_block=8) as llm:
        got = _generate(llm, prompts)
        assert llm.get_stats()["num_steps"] > sum(MIXED) // 16  # prompts really were split
    assert got == _reference(model_dir, prompts)


def test_greedy_parity_with_preemption(model_dir):
    prompts = _prompts(_vocab(model_dir), [20] * 8, seed=6)
    # 12 blocks of 4 tokens: each request needs 10 blocks at its end, so they cannot all stay.
    kv = KvCacheConfig(max_tokens=48, enable_block_reuse=False)
    with LLM(str(model_dir), tokens_per_block=4, kv_cache_config=kv) as llm:
        got = _generate(llm, prompts)
        assert llm.get_stats()["num_preemptions"] > 0
    assert got == _reference(model_dir, prompts)
