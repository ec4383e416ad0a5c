"""Core requests made from another's settings (Request.with_prompt, core_request(like=...)): the same request
the full conversion makes, and a batch built that way generates what each request alone does."""

import pytest

from llmapi import LLM, SamplingParams
from llmapi.core_request import core_request
from llmapi.errors import RequestError

FIELDS = ("request_id", "prompt_token_ids", "max_tokens", "min_tokens", "eos_token_ids", "stop_token_ids",
          "ignore_eos", "temperature", "top_k", "top_p", "seed", "num_sequences", "beam_search",
          "requested_logprobs")


def _make(rid, ids, params, seed, like=None):
    return core_request(rid, ids, params, eos_token_ids=[2, 7], max_seq_len=40, seed=seed, tokenizer=None,
                        token_history=False, like=like)


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=30, min_tokens=3, temperature=0.7, top_k=5, top_p=0.9, stop_token_ids=[4], logprobs=2),
    SamplingParams(max_tokens=None, ignore_eos=True, n=2, best_of=3, seed=11),
])
def test_with_prompt_equals_full_conversion(params):
    first = _make(5, [1, 2, 3], params, seed=17)
    # A longer prompt: max_tokens is capped anew by max_seq_len (40 - 20), min_tokens by that cap.
    got = _make(6, list(range(1, 21)), params, seed=99, like=first)
    want = _make(6, list(range(1, 21)), params, seed=99)
    assert {f: getattr(got, f) for f in FIELDS} == {f: getattr(want, f) for f in FIELDS}
    assert got.max_tokens == min(params.max_tokens or 20, 20)
    # The settings of `first` are unchanged by the copy.
    assert (first.request_id, first.prompt_token_ids, first.seed) == (5, [1, 2, 3], 17)


def test_with_prompt_validates():
    first = _make(5, [1, 2, 3], SamplingParams(max_tokens=4), seed=1)
    with pytest.raises(RequestError, match="prompt is empty"):
        first.with_prompt(6, [], 4, 0, 1)
    with pytest.raises(RequestError, match="min_tokens"):
        first.with_prompt(6, [1], 4, 5, 1)
    with pytest.raises(RequestError, match="seed"):
        first.with_prompt(6, [1], 4, 0, -1)


def test_batch_built_from_shared_settings_generates_as_single_requests(tiny_llama_dir):
    """Sampled with penalties, a bias and banned ids (settings with_prompt copies without exposing them): a
    generate() batch, whose requests after the first copy the first's settings, gives each prompt the
    tokens it gets enqueued on its own with the same seed."""
    plain = dict(max_tokens=12, temperature=1.5, seed=1234, ignore_eos=True, detokenize=False)
    prompts = [[3, 4, 5, 6], [8, 1], [10, 11, 12, 13, 14, 15], [7]]
    with LLM(str(tiny_llama_dir), tokens_per_block=8, kv_cache_config={"max_tokens": 2048}) as llm:
        unset = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(**plain), use_tqdm=False)]
        banned = sorted({ids[0] for ids in unset})  # each prompt's first token without the settings
        params = SamplingParams(**plain, repetition_penalty=2.0, presence_penalty=1.0, logit_bias={5: 3.0},
                                bad_token_ids=banned)
        batch = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        alone = [llm.generate_async(p, params).result().outputs[0].token_ids for p in prompts]
    assert batch == alone
    # The settings reached every request of the batch: no banned id, so no first token as without them.
    assert all(not set(ids) & set(banned) for ids in batch)
    assert all(a[0] != b[0] for a, b in zip(unset, batch))
