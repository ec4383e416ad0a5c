"""Decoding settings the multi-rank runners do not carry are refused by name, never silently ignored."""

import pytest

from llmapi import SamplingParams
from llmapi.core_request import check_multi_rank


@pytest.mark.parametrize("kwargs, name", [
    ({"n": 2, "seed": 1}, "n"), ({"best_of": 3}, "best_of"), ({"use_beam_search": True, "best_of": 2}, "use_beam_search"),
    ({"prompt_logprobs": 0}, "prompt_logprobs"),
    ({"return_context_logits": True}, "return_context_logits"),
    ({"return_generation_logits": True}, "return_generation_logits"),
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"repetition_penalty": 1.2}, "repetition_penalty"), ({"min_p": 0.1}, "min_p"),
    ({"bad": "x"}, "bad"), ({"bad_token_ids": [3]}, "bad_token_ids"), ({"logit_bias": {3: 1.0}}, "logit_bias"),
    ({"logits_processor": lambda ids, logits: logits}, "logits_processor"),
])
def test_single_rank_settings_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=rf"SamplingParams [a-z_, ]*\b{name}\b[a-z_, ]*: not supported yet with"):
        check_multi_rank(SamplingParams(**kwargs))


def test_plain_sampling_passes():
    check_multi_rank(SamplingParams(max_tokens=8, temperature=0.7, top_k=5, top_p=0.9, seed=3, stop="x",
                                    stop_token_ids=[4], min_tokens=2, logprobs=3))
