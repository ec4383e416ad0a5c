"""Speculative decoding on a GPU (marked gpu): the verify steps through the Triton kernels (decode kernel for the
one-token rows, packed kernel for the 1 + k rows; n-gram's in verify CUDA graphs), the drafters' steps, and the
plain decode graphs between them give plain decoding's greedy tokens in float32; a draft equal to the target gives plain sampling's tokens."""

import random

import pytest

from llmapi import LLM, DraftTargetDecodingConfig, EagleDecodingConfig, NGramDecodingConfig, SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS = [[random.Random(i).randrange(3, 320) for _ in range(3 + i)] for i in range(12)] + [[11, 12, 13] * 5]


@pytest.fixture(scope="module")
def drafts(tmp_path_factory, tiny_llama_dir):
    from transformers import AutoConfig

    from tiny_models import make_tiny_draft_llama, make_tiny_eagle_head

    root = tmp_path_factory.mktemp("gpu-drafts")
    make_tiny_draft_llama(root / "draft")
    make_tiny_eagle_head(root / "eagle", AutoConfig.from_pretrained(tiny_llama_dir), seed=3)
    return root


@pytest.mark.parametrize("kind", ["ngram", "draft", "self", "eagle"])
def test_greedy_on_cuda_equals_plain_decoding(tiny_llama_dir, drafts, kind):
    spec = {"ngram": NGramDecodingConfig(max_draft_len=4, max_matching_ngram_size=3),
            "draft": DraftTargetDecodingConfig(str(drafts / "draft"), max_draft_len=4),
            "self": DraftTargetDecodingConfig(str(tiny_llama_dir), max_draft_len=4),
            "eagle": EagleDecodingConfig(str(drafts / "eagle"), max_draft_len=4)}[kind]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    with LLM(str(tiny_llama_dir), device="cuda", dtype="float32") as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    with LLM(str(tiny_llama_dir), device="cuda", dtype="float32", speculative_config=spec,
             tokens_per_block=16) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        stats = llm.get_stats()
        if kind == "ngram":  # greedy matching only: the verify steps replay CUDA graphs (up to 16 rows here)
            replays = llm._runner.spec.graphs.replays
            alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[-1], params, use_tqdm=False)]
            assert replays > 0 and llm._runner.spec.graphs.replays > replays and alone == want[-1:]
    assert got == want
    assert stats["num_draft_tokens"] > 0 and stats["num_used_blocks"] == 0


def test_a_draft_equal_to_the_target_samples_as_plain_decoding_on_cuda(tiny_llama_dir):
    params = [SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=s, ignore_eos=True) for s in range(16)]
    prompts = PROMPTS[:1] * len(params)
    with LLM(str(tiny_llama_dir), device="cuda", dtype="float32") as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    spec = DraftTargetDecodingConfig(str(tiny_llama_dir), max_draft_len=3)
    with LLM(str(tiny_llama_dir), device="cuda", dtype="float32", speculative_config=spec) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
