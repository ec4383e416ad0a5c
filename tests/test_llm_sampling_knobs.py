"""End to end, greedy generation with each sampling knob equals transformers' generate with the
matching processor (repetition penalty, bad words, sequence bias, a custom logits processor), or
a plain greedy loop over transformers' logits (presence / frequency penalties), on the tiny
Llama and GPT-2; requests without the knob in the same batches are unaffected."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from llmapi import LLM, SamplingParams

MAX_TOKENS = 16


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request, tiny_llama_dir, tiny_gpt2_dir):
    model_dir = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}[request.param]
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(7)
    candidates = [[rng.randrange(3, vocab) for _ in range(rng.randrange(3, 12))] for _ in range(16)]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with LLM(str(model_dir), tokens_per_block=4) as llm:
        greedy = _generate(llm, candidates, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
        # Prompts whose greedy output runs long and repeats tokens: there the knobs have work to do.
        order = sorted(range(len(candidates)), key=lambda i: (len(greedy[i]) - len(set(greedy[i])), len(greedy[i])),
                       reverse=True)[:3]
        prompts, plain = [candidates[i] for i in order], [greedy[i] for i in order]
        assert all(len(g) > 5 for g in plain)
        yield llm, hf, prompts, plain, vocab


def _generate(llm, prompts, params):
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _hf(hf, prompts, **kwargs):
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                              do_sample=False, pad_token_id=0, **kwargs)
            outs.append(gen[0, len(p):].tolist())
    return outs


def _with_plain_neighbours(llm, prompts, params):
    """Generate `prompts` with `params`, interleaved with the same prompts under plain greedy."""
    plain = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    outs = llm.generate(prompts + prompts, [params] * len(prompts) + [plain] * len(prompts), use_tqdm=False)
    ids = [o.outputs[0].token_ids for o in outs]
    return ids[:len(prompts)], ids[len(prompts):]


def test_repetition_penalty_matches_transformers(setup):
    llm, hf, prompts, plain, _ = setup
    got, neighbours = _with_plain_neighbours(llm, prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                                          repetition_penalty=2.5))
    assert got == _hf(hf, prompts, repetition_penalty=2.5)
    assert got != plain and neighbours == plain


def test_bad_words_match_transformers(setup):
    llm, hf, prompts, plain, _ = setup
    # Ban the first prompt's first greedy token, and a pair the second prompt generates greedily.
    g0, g1 = plain[0], plain[1]
    bad = [[g0[0]], [g1[3], g1[4]]]
    assert all(t != 2 for w in bad for t in w)  # transformers drops a bad word equal to EOS
    got, neighbours = _with_plain_neighbours(llm, prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                                          bad_token_ids=bad))
    assert got == _hf(hf, prompts, bad_words_ids=bad)
    assert got[0][0] != g0[0] and got != plain and neighbours == plain


def test_logit_bias_matches_transformers_sequence_bias(setup):
    llm, hf, prompts, plain, vocab = setup
    unused = next(t for t in range(3, vocab) if all(t not in g for g in plain))
    bias = {unused: 6.0, plain[0][1]: -5.0}
    got, neighbours = _with_plain_neighbours(llm, prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                                          logit_bias=bias))
    assert got == _hf(hf, prompts, sequence_bias={(t,): b for t, b in bias.items()})
    assert got != plain and neighbours == plain


class _BanMultiplesOf(LogitsProcessor):
    def __init__(self, k):
        self.k = k

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, ::self.k] = float("-inf")
        return scores


def test_logits_processor_runs_for_its_request_only(setup):
    llm, hf, prompts, plain, _ = setup
    seen = []

    def ban_multiples_of_3(output_ids, logits):  # [V] float32
        seen.append(list(output_ids))
        logits = logits.clone()
        logits[::3] = float("-inf")
        return logits

    got, neighbours = _with_plain_neighbours(llm, prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                                          logits_processor=ban_multiples_of_3))
    assert got == _hf(hf, prompts, logits_processor=LogitsProcessorList([_BanMultiplesOf(3)]))
    assert all(t % 3 for g in got for t in g) and neighbours == plain
    # It saw each request's output so far, growing by one token a step.
    assert sorted(len(s) for s in seen) == sorted(i for g in got for i in range(len(g)))


def test_presence_and_frequency_penalties_match_a_plain_greedy_loop(setup):
    llm, hf, prompts, plain, _ = setup
    presence, frequency = 2.0, 1.5
    got, neighbours = _with_plain_neighbours(llm, prompts, SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0, presence_penalty=presence, frequency_penalty=frequency))
    want = []
    with torch.inference_mode():
        for p in prompts:
            ids, out = list(p), []
            for _ in range(MAX_TOKENS):
                logits = hf(torch.tensor([ids])).logits[0, -1].float()
                for t in set(out):  # OpenAI: logit -= count * frequency + presence
                    logits[t] -= out.count(t) * frequency + presence
                token = int(logits.argmax())
                out.append(token)
                ids.append(token)
                if token == 2:
                    break
            want.append(out)
    assert got == want
    assert got != plain and neighbours == plain


def test_bad_strings_are_tokenized_bad_words(setup):
    llm, hf, prompts, plain, _ = setup
    text = llm.tokenizer.decode(plain[0][2:4])  # two words the first prompt generates greedily
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    assert ids == plain[0][2:4]
    got = _generate(llm, prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, bad=text))
    assert got == _hf(hf, prompts, bad_words_ids=[ids]) and got[0] != plain[0]
