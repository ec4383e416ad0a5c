"""Fuzzed SamplingParams and prompts through generate / generate_async on the tiny model: every outcome is a
result, a ValueError naming a field (or the prompt), a TypeError for a prompt of the wrong type, or an llmapi
error; afterwards the LLM still gives the greedy tokens it gave before. Derandomized, so CI is reproducible."""

import dataclasses
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmapi import LLM, GuidedDecodingParams, LLMAPIError, SamplingParams

MAX_TOKENS = 4
VOCAB = 320  # tiny_llama's; ids around it reach both sides of the vocabulary check
FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]
PROMPT = "the quick brown fox"


def _identity(output_ids, logits):
    return logits


def _identity_with_prompt(prompt_ids, output_ids, logits):
    return logits


def _raises(output_ids, logits):
    raise RuntimeError("a user's processor failed")


def _wrong_shape(output_ids, logits):
    return logits[:3]


ids = st.integers(0, VOCAB + 20)
# Grammars over the tiny word-level vocabulary (json_object has no token to start with: it fails its request).
grammars = st.none() | st.sampled_from([GuidedDecodingParams(choice=["the quick", "fox"]),
                                        GuidedDecodingParams(regex="(the|quick|fox)+"),
                                        GuidedDecodingParams(json_object=True), {"regex": "(brown|fox)+"}])
words = st.text(alphabet="abquick fox\n", min_size=1, max_size=6)
small_float = st.floats(-3, 3, allow_nan=False)

# Values each field usually takes: most requests with only these run.
VALID = {
    "max_tokens": st.integers(1, MAX_TOKENS),
    "min_tokens": st.integers(0, MAX_TOKENS),
    "temperature": st.sampled_from([0, 0.0, 0.7, 1]) | st.floats(0, 2),
    "top_k": st.integers(-1, VOCAB + 5),
    "top_p": st.floats(0.05, 1),
    "seed": st.none() | st.integers(-(2 ** 63), 2 ** 64 - 1),
    "stop": st.none() | words | st.lists(words, max_size=2),
    "stop_token_ids": st.none() | st.lists(ids, max_size=3),
    "ignore_eos": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "detokenize": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "spaces_between_special_tokens": st.booleans(),
    "end_id": st.none() | ids,
    "n": st.integers(1, 3),
    "best_of": st.none() | st.integers(1, 4),
    "presence_penalty": small_float,
    "frequency_penalty": small_float,
    "repetition_penalty": st.floats(0.2, 3),
    "min_p": st.floats(0, 1),
    "bad": st.none() | words | st.lists(words, max_size=2),
    "bad_token_ids": st.none() | st.lists(ids | st.lists(ids, min_size=1, max_size=3), max_size=3),
    "logit_bias": st.none() | st.dictionaries(ids, st.floats(-50, 50), max_size=3),
    "logits_processor": st.sampled_from([None, _identity, _identity_with_prompt, [_identity, _identity_with_prompt],
                                         _raises, _wrong_shape]),
    "logprobs": st.none() | st.booleans() | st.integers(0, 22),
    "prompt_logprobs": st.none() | st.booleans() | st.integers(0, 22),
    "return_context_logits": st.booleans(),
    "return_generation_logits": st.booleans(),
    "use_beam_search": st.booleans(),
    "length_penalty": small_float,
    "early_stopping": st.sampled_from([False, True, "never"]),
    "guided_decoding": grammars,
    "structured_outputs": grammars,
    "no_repeat_ngram_size": st.integers(0, 3),
}
assert set(VALID) == set(FIELDS)

huge_ints = st.sampled_from([2 ** 31 - 1, 2 ** 31, -(2 ** 31) - 1, 2 ** 63, 2 ** 64, 10 ** 400, -(10 ** 400), -1, 0])
odd_floats = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True) | st.sampled_from(
    [5e-324, 1e-50, -1e-50, 1e-40, 1e308, 3.5e38, -0.0, float("nan"), float("inf")])
wrong_types = st.one_of(st.none(), st.text(max_size=3), st.binary(max_size=3), st.just(object()),
                        st.just(print), st.complex_numbers(max_magnitude=2), st.tuples(st.integers()))
scalars = st.one_of(huge_ints, odd_floats, st.booleans(), wrong_types)
# Values a field should refuse (or, by chance, take).
INVALID = st.one_of(scalars, st.lists(scalars | ids, max_size=3),
                    st.lists(st.lists(scalars, max_size=2), max_size=2),
                    st.dictionaries(huge_ints | ids | st.text(max_size=2), scalars, max_size=2))

token_ids = st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=10)
good_prompts = st.one_of(st.text(alphabet="the quick brown fox jumps", min_size=1, max_size=30), token_ids,
                         st.fixed_dictionaries({"prompt": st.just(PROMPT)}),
                         st.fixed_dictionaries({"prompt_token_ids": token_ids}))
bad_prompts = st.one_of(st.just(""), st.text(max_size=12), st.just([]),
                        st.lists(st.integers(-3, 3) | st.integers(VOCAB - 2, VOCAB + 2) | huge_ints, min_size=1,
                                 max_size=4),
                        st.dictionaries(st.sampled_from(["prompt", "prompt_token_ids", "other"]),
                                        st.text(max_size=4) | token_ids, max_size=2))
# Not a prompt at all, or token ids that are not ints: a TypeError may say so.
wrong_type_prompts = st.one_of(st.none(), st.integers(), st.floats(), st.just(object()), st.just(print),
                               st.lists(st.booleans() | st.floats() | st.text(max_size=2) | st.none(), min_size=1,
                                        max_size=3),
                               st.fixed_dictionaries({"prompt_token_ids": st.integers() | st.none()}))

@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), tokens_per_block=4, max_batch_size=16, max_num_tokens=64,
             kv_cache_config={"max_tokens": 2048}) as llm:
        yield llm


def _names_a_field_or_the_prompt(message: str) -> bool:
    named = re.match(r"SamplingParams\.(\w+)=", message)
    return (named is not None and named.group(1) in FIELDS) or "prompt" in message


def _run(llm, how, prompts, params):
    """Every output of one call, finished (a failed request raises its error from result())."""
    if how == "generate":
        outs = llm.generate(prompts if len(prompts) > 1 else prompts[0], params, use_tqdm=False)
        outs = outs if isinstance(outs, list) else [outs]
    elif how == "generate_async":
        outs = [llm.generate_async(p, params).result(60) for p in prompts]
    else:  # streaming
        outs = []
        for p in prompts:
            chunks = list(llm.generate_async(p, params, streaming=True))
            outs.append(chunks[-1].result(60))
    for out in outs:
        assert out.finished
        for seq in out.outputs:
            if seq.finish_reason != "error":
                assert len(seq.token_ids) <= MAX_TOKENS
    return outs


def test_fuzzed_requests_fail_alone_and_by_name(llm):
    greedy = SamplingParams(max_tokens=8, temperature=0)
    baseline = llm.generate(PROMPT, greedy).outputs[0].token_ids
    outcomes = {"ok": 0, "ValueError": 0, "TypeError": 0, "LLMAPIError": 0}

    @settings(max_examples=3000, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def fuzz(data):
        num_bad = data.draw(st.sampled_from([0, 0, 1, 1, 2]), label="number of bad fields")
        bad_fields = data.draw(st.sets(st.sampled_from(FIELDS), min_size=num_bad, max_size=num_bad),
                               label="bad fields")
        kwargs = {}
        for name in data.draw(st.sets(st.sampled_from(FIELDS), max_size=8), label="fields") | bad_fields:
            kwargs[name] = data.draw(INVALID if name in bad_fields else VALID[name], label=name)
        kwargs.setdefault("max_tokens", MAX_TOKENS)  # the default 32 would only make it slower
        kind = data.draw(st.sampled_from(["good", "good", "good", "bad", "wrong type"]), label="prompt kind")
        prompt_strategy = {"good": good_prompts, "bad": bad_prompts, "wrong type": wrong_type_prompts}[kind]
        prompts = data.draw(st.lists(prompt_strategy, min_size=1, max_size=3), label="prompts")
        how = data.draw(st.sampled_from(["generate", "generate_async", "streaming"]), label="how")
        try:
            params = SamplingParams(**kwargs)
            if params.max_tokens is None or params.max_tokens > MAX_TOKENS:
                return  # a valid but long request: not what this test is about
            _run(llm, how, prompts, params)
            outcomes["ok"] += 1
        except LLMAPIError:  # RequestError for a bad prompt, LogitsProcessorError for a failing processor
            outcomes["LLMAPIError"] += 1
        except ValueError as e:
            assert _names_a_field_or_the_prompt(str(e)), f"a ValueError that names no field: {e!r}"
            outcomes["ValueError"] += 1
        except TypeError as e:
            assert kind == "wrong type", f"a TypeError for values of the right type: {e!r}"
            outcomes["TypeError"] += 1

    start = time.monotonic()
    fuzz()
    elapsed = time.monotonic() - start
    print(f"fuzz: {sum(outcomes.values())} requests in {elapsed:.0f} s: {outcomes}")
    assert outcomes["ok"] >= 50 and outcomes["ValueError"] >= 50
    stats = llm.get_stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert llm.generate(PROMPT, greedy).outputs[0].token_ids == baseline
