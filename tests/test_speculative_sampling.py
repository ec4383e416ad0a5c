"""Speculative sampling keeps the target's distribution: with a draft that differs from the target (a smaller
model, an EAGLE head, n-gram drafts), the tokens the first verified step decides (output positions 2..k+1) follow
the target's own sampling distribution, computed exactly from transformers' forward of the target (chi-square at
significance 0.001 over thousands of seeds); and a draft equal to the target gives plain sampling's tokens."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from llmapi import LLM, DraftTargetDecodingConfig, EagleDecodingConfig, NGramDecodingConfig, SamplingParams

VOCAB = 16
K = 3  # drafts per step: output positions 2..4 come from the first verified step
RUNS = 4000
PROMPT = [5, 9, 3, 12, 7, 4, 11, 6, 13, 8, 14, 10, 15, 3, 9, 5]  # every token of 3..15: n-gram always drafts


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tiny_models import make_tiny_draft_llama, make_tiny_eagle_head, make_tiny_llama

    root = tmp_path_factory.mktemp("spec-sampling")
    target = make_tiny_llama(root / "target", vocab_size=VOCAB, seed=11)
    make_tiny_draft_llama(root / "draft", vocab_size=VOCAB, seed=12)
    make_tiny_eagle_head(root / "eagle", target.config, seed=13)
    return root


def _distribution(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """The sampling distribution of transformers' warpers: logits / temperature, then the top-k kept."""
    scaled = logits / temperature
    if top_k:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return scaled.softmax(dim=-1)


def _marginals(model_dir, temperature: float, top_k: int, positions: int = K + 1) -> list:
    """The exact distribution of output tokens 1..positions (each summed over every earlier output), from
    transformers' forward of every continuation of PROMPT."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out, joint, prefixes = [], torch.ones(1, dtype=torch.float64), torch.tensor([PROMPT])
    with torch.inference_mode():
        for _ in range(positions):
            step = _distribution(hf(prefixes).logits[:, -1].double(), temperature, top_k)  # [P, V]
            joint = (joint.unsqueeze(1) * step).reshape(-1)  # over every prefix and next token
            out.append(joint.reshape(-1, VOCAB).sum(dim=0))
            prefixes = torch.cat([prefixes.repeat_interleave(VOCAB, dim=0),
                                  torch.arange(VOCAB).repeat(len(prefixes)).unsqueeze(1)], dim=1)
    return out


def _p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit; tokens expected fewer than 5 times are pooled into one cell."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def _sample(llm, temperature: float, top_k: int) -> np.ndarray:
    # K + 2 tokens: the first from the prompt step, then a step verifying K drafts (for outputs 2..K+1) and adding
    # one more token.
    params = [SamplingParams(max_tokens=K + 2, temperature=temperature, top_k=top_k, seed=seed, ignore_eos=True,
                             detokenize=False) for seed in range(RUNS)]
    outs = llm.generate([PROMPT] * RUNS, params, use_tqdm=False)
    tokens = np.array([o.outputs[0].token_ids for o in outs])
    assert tokens.shape == (RUNS, K + 2)
    return tokens


def _spec_config(kind, root):
    if kind == "draft":
        return DraftTargetDecodingConfig(speculative_model=str(root / "draft"), max_draft_len=K)
    if kind == "eagle":
        return EagleDecodingConfig(speculative_model=str(root / "eagle"), max_draft_len=K)
    return NGramDecodingConfig(max_draft_len=K, max_matching_ngram_size=2)


@pytest.mark.parametrize("kind,temperature,top_k", [("draft", 0.8, 0), ("draft", 1.0, 6), ("eagle", 0.8, 0),
                                                     ("ngram", 0.8, 0)])
def test_verified_tokens_follow_the_targets_distribution(models, kind, temperature, top_k):
    with LLM(str(models / "target"), skip_tokenizer_init=True, tokens_per_block=8,
             speculative_config=_spec_config(kind, models)) as llm:
        tokens = _sample(llm, temperature, top_k)
        stats = llm.get_stats()
    # Both ways through the verification were taken, many times.
    drafted, accepted = stats["num_draft_tokens"], stats["num_accepted_draft_tokens"]
    assert drafted >= RUNS and accepted >= 100 and drafted - accepted >= 100
    exact = _marginals(models / "target", temperature, top_k)
    for position in range(1, K + 1):  # output positions 2..K+1
        counts = np.bincount(tokens[:, position], minlength=VOCAB)
        p = _p_value(counts, exact[position].numpy())
        assert p > 1e-3, f"position {position + 1}: p = {p:.2e}"


def test_the_chi_square_tells_the_draft_from_the_target(models):
    """The check above has power: the draft's own distribution at those positions differs from the target's by
    far more than the test tolerates (the counts of plain sampling from the target reject it)."""
    with LLM(str(models / "target"), skip_tokenizer_init=True, tokens_per_block=8) as llm:
        tokens = _sample(llm, 0.8, 0)
    target = _marginals(models / "target", 0.8, 0, positions=2)
    draft = _marginals(models / "draft", 0.8, 0, positions=2)
    counts = np.bincount(tokens[:, 1], minlength=VOCAB)
    assert _p_value(counts, target[1].numpy()) > 1e-3
    assert _p_value(counts, draft[1].numpy()) < 1e-6


@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_a_draft_equal_to_the_target_gives_plain_sampling_tokens(models, monkeypatch, chunk_rows):
    """The drafter samples with the noise plain sampling uses at that output position, and p = q accepts every
    draft: seeded outputs are plain sampling's, token for token; also where the target's distribution is computed
    in chunks of rows (chunk_rows: a large batch's, here 2 rows of the 16-token vocabulary)."""
    if chunk_rows is not None:
        import llmapi.runtime.sampler as sampler

        monkeypatch.setattr(sampler, "SAMPLE_CHUNK_LOGITS", chunk_rows * VOCAB)
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=seed, ignore_eos=True) for seed in
              range(40)]
    prompts = [PROMPT] * len(params)
    with LLM(str(models / "target"), skip_tokenizer_init=True) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    spec = DraftTargetDecodingConfig(speculative_model=str(models / "target"), max_draft_len=K)
    with LLM(str(models / "target"), skip_tokenizer_init=True, speculative_config=spec) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        stats = llm.get_stats()
    assert got == want
    assert stats["num_accepted_draft_tokens"] == stats["num_draft_tokens"] > 0


def test_chunked_verification_gives_the_same_tokens(models, monkeypatch):
    """A draft unlike the target (rejections, corrections from the residual, bonus tokens): the verification in
    chunks of rows (the target's distribution computed a few rows at a time, as a large batch's is) decides every
    token as the whole-batch one does, for the same seeds."""
    import llmapi.runtime.sampler as sampler

    params = [SamplingParams(max_tokens=10, temperature=0.8, top_k=6 if seed % 2 else 0, top_p=0.9, seed=seed,
                             ignore_eos=True) for seed in range(48)]
    prompts = [PROMPT] * len(params)
    spec = DraftTargetDecodingConfig(speculative_model=str(models / "draft"), max_draft_len=K)
    runs = []
    for chunk_rows in (None, 3):
        if chunk_rows is not None:
            monkeypatch.setattr(sampler, "SAMPLE_CHUNK_LOGITS", chunk_rows * VOCAB)
        with LLM(str(models / "target"), skip_tokenizer_init=True, speculative_config=spec) as llm:
            runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
            stats = llm.get_stats()
        assert 0 < stats["num_accepted_draft_tokens"] < stats["num_draft_tokens"]  # some drafts rejected
    assert runs[0] == runs[1]
