"""Speculative decoding over 2 MPI ranks on the CPU (TP=2 and PP=2): with n-gram drafts and with a draft model,
greedy outputs equal one rank's speculative outputs and plain greedy decoding token for token (prompts sharing a
prefix found in the cache), seeded sampling with a draft model equals one rank's token for token, the drafted and
accepted counts are those of one rank (and > 0), logprobs of verified tokens match one rank's, and every block is
free afterwards. An EAGLE head is refused by name at two ranks."""

import math
import random

import pytest

from llmapi import (LLM, DraftTargetDecodingConfig, EagleDecodingConfig, KvCacheConfig, NGramDecodingConfig,
                    SamplingParams)

SETTINGS = dict(tokens_per_block=4, kv_cache_config=KvCacheConfig(max_tokens=256, enable_block_reuse=True))
TOL = 1e-5


def _prompts():
    """8 prompts: 4 sharing a 12-token prefix (three blocks of 4), 2 repeating a short pattern, 2 random."""
    rng = random.Random(5)
    shared = [rng.randrange(3, 320) for _ in range(12)]
    prompts = [shared + [rng.randrange(3, 320) for _ in range(rng.randrange(1, 6))] for _ in range(4)]
    for n in range(2):
        pattern = [rng.randrange(3, 320) for _ in range(2 + n)]
        prompts.append(pattern * 4)
    prompts += [[rng.randrange(3, 320) for _ in range(rng.randrange(2, 12))] for _ in range(2)]
    return prompts


PROMPTS = _prompts()
GREEDY = SamplingParams(max_tokens=16, temperature=0)
SEEDED = [SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, seed=seed, ignore_eos=True)
          for seed in range(len(PROMPTS))]
LOGPROBS = SamplingParams(max_tokens=10, temperature=0, logprobs=2)
STATS = ("num_draft_tokens", "num_accepted_draft_tokens", "num_prefix_hit_tokens")


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A 1-layer, hidden-32 Llama with the target's vocabulary and its own random weights."""
    from tiny_models import make_tiny_draft_llama

    path = tmp_path_factory.mktemp("tiny-draft-mr")
    make_tiny_draft_llama(path)
    return path


def _config(kind, draft_dir):
    if kind == "ngram":
        return NGramDecodingConfig(max_draft_len=3, max_matching_ngram_size=3)
    return DraftTargetDecodingConfig(speculative_model=str(draft_dir), max_draft_len=3)


def _run(llm, kind):
    """The first prompt alone (its blocks cached), then all of them (the shared prefix found): greedy outputs and
    the stats they leave; for a draft model also seeded sampling's outputs and greedy logprobs."""
    first = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    stats = llm.get_stats()
    result = dict(greedy=[o.outputs[0].token_ids for o in first + outs], stats={k: stats[k] for k in STATS})
    if kind == "draft":
        result["seeded"] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SEEDED, use_tqdm=False)]
        result["logprobs"] = [o.outputs[0] for o in llm.generate(PROMPTS[:3], LOGPROBS, use_tqdm=False)]
    result["used_blocks"] = llm.get_stats()["num_used_blocks"]
    return result


@pytest.fixture(scope="module")
def plain(tiny_llama_dir):
    """Plain greedy decoding on one rank (no speculation)."""
    with LLM(str(tiny_llama_dir), **SETTINGS) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:1] + PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def one_rank(tiny_llama_dir, draft_dir):
    """One rank's speculative outputs, per kind of draft."""
    got = {}
    for kind in ("ngram", "draft"):
        with LLM(str(tiny_llama_dir), speculative_config=_config(kind, draft_dir), **SETTINGS) as llm:
            got[kind] = _run(llm, kind)
    return got


@pytest.mark.parametrize("kind", ["ngram", "draft"])
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_two_ranks_equal_one_rank(tiny_llama_dir, draft_dir, plain, one_rank, kind, tp, pp):
    with LLM(str(tiny_llama_dir), tp=tp, pp=pp, speculative_config=_config(kind, draft_dir), **SETTINGS) as llm:
        assert (llm.args.tensor_parallel_size, llm.args.pipeline_parallel_size) == (tp, pp)
        got = _run(llm, kind)
    want = one_rank[kind]
    assert want["greedy"] == plain  # one rank's speculation is exact
    assert got["greedy"] == want["greedy"]
    # Speculation happened, as on one rank: the same drafts verified and accepted; the prefix found in the cache.
    assert got["stats"] == want["stats"]
    assert got["stats"]["num_accepted_draft_tokens"] > 0 and got["stats"]["num_prefix_hit_tokens"] >= 12
    assert got["used_blocks"] == 0 and want["used_blocks"] == 0
    if kind == "draft":
        assert got["seeded"] == want["seeded"]
        for w, g in zip(want["logprobs"], got["logprobs"]):
            assert g.token_ids == w.token_ids and len(g.logprobs) == len(w.logprobs) == len(w.token_ids)
            for wl, gl in zip(w.logprobs, g.logprobs):
                assert list(gl) == list(wl)  # the chosen token, then the top 2, in order
                for token in wl:
                    assert gl[token].rank == wl[token].rank
                    assert math.isclose(gl[token].logprob, wl[token].logprob, rel_tol=TOL, abs_tol=TOL)


@pytest.mark.parametrize("parallel", [dict(tp=2), dict(pp=2)], ids=["tp2", "pp2"])
def test_eagle_is_refused_by_name_at_two_ranks(tiny_llama_dir, parallel):
    with pytest.raises(ValueError, match="EagleDecodingConfig.*pipeline_parallel_size = 2: an EAGLE head"):
        LLM(str(tiny_llama_dir), speculative_config=EagleDecodingConfig(speculative_model="an/eagle-head"),
            **parallel)
