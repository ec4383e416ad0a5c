"""Decoding settings: invalid values and combinations raise a ValueError naming the field; the
model's generation_config.json gives the default SamplingParams (as vLLM)."""

import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmapi import LLM, SamplingParams


@pytest.mark.parametrize("kwargs, field", [
    ({"use_beam_search": True, "n": 4, "best_of": 2}, "n"),  # more hypotheses than beams
    ({"n": 3, "best_of": 2}, "best_of"),
    ({"n": 0}, "n"),
    ({"best_of": 0}, "best_of"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": math.nan}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"bad": ["ok", ""]}, "bad"),
    ({"bad_token_ids": [[1, -2]]}, "bad_token_ids"),
    ({"bad_token_ids": [[]]}, "bad_token_ids"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {5: math.inf}}, "logit_bias"),
    ({"logits_processor": 5}, "logits_processor"),
    ({"logprobs": -1}, "logprobs"),
    ({"prompt_logprobs": "3"}, "prompt_logprobs"),
    ({"length_penalty": math.nan}, "length_penalty"),
    ({"early_stopping": "sometimes"}, "early_stopping"),
    ({"use_beam_search": True, "return_generation_logits": True}, "return_generation_logits"),
    ({"return_context_logits": 1}, "return_context_logits"),
])
def test_sampling_params_reject(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}="):
        SamplingParams(**kwargs)


def test_beam_width_defaults_to_n():
    p = SamplingParams(use_beam_search=True, n=3)
    assert p.num_sequences == 3
    assert SamplingParams(n=2, best_of=5).num_sequences == 5


def test_llm_rejects_what_the_model_cannot_take(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), max_logprobs=4, max_batch_size=8, max_num_tokens=6) as llm:
        for params, field in [(SamplingParams(logprobs=5), "logprobs"),
                              (SamplingParams(prompt_logprobs=7), "prompt_logprobs"),
                              (SamplingParams(logit_bias={320: 1.0}), "logit_bias"),
                              (SamplingParams(bad_token_ids=[[4, 320]]), "bad_token_ids"),
                              (SamplingParams(n=2, best_of=9), "best_of"),
                              (SamplingParams(use_beam_search=True, best_of=7), "best_of")]:
            with pytest.raises(ValueError, match=rf"SamplingParams\.{field}"):
                llm.generate([[5, 6], [7, 8]], [SamplingParams(max_tokens=2), params])
        assert llm.get_stats()["num_waiting"] == 0  # the valid first prompt was not enqueued either


def test_defaults_come_from_generation_config(tiny_llama_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "top_k": 1, "top_p": 0.9,
              "temperature": 0.7, "min_p": 0.05, "repetition_penalty": 1.9, "max_new_tokens": 5}
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    prompt = [30, 41, 30, 52, 41, 30]
    with LLM(str(model_dir)) as llm:
        defaults = llm.get_default_sampling_params()
        assert (defaults.top_k, defaults.top_p, defaults.temperature, defaults.min_p,
                defaults.repetition_penalty, defaults.max_tokens) == (1, 0.9, 0.7, 0.05, 1.9, 5)
        got = llm.generate(prompt, use_tqdm=False).outputs[0].token_ids  # no params: the defaults
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=5,
                      repetition_penalty=1.9, pad_token_id=0)  # top_k=1 is greedy
    assert got == ref[0, len(prompt):].tolist()


def test_defaults_without_generation_settings_are_samplingparams_defaults(tiny_gpt2_dir):
    with LLM(str(tiny_gpt2_dir)) as llm:
        assert llm.get_default_sampling_params() == SamplingParams()
