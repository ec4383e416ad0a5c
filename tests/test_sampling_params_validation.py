"""SamplingParams refuses every value the core cannot hold, with a ValueError naming the field, on construction
and on every attribute write (which also takes effect); token ids are checked against the model's vocabulary
when a request is prepared, and the LLM goes on serving."""

import dataclasses
import re

import pytest

from llmapi import LLM, KvCacheConfig, SamplingParams
from llmapi.config import validated_kwargs

HUGE = 10 ** 400  # past float64: float() of it raises OverflowError
INT32_OVER = 2 ** 31

NUMERIC_FIELDS = ["max_tokens", "min_tokens", "temperature", "top_k", "top_p", "seed", "end_id", "n", "best_of",
                  "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "logprobs",
                  "prompt_logprobs", "length_penalty"]


def _rejects(kwargs, field, message=""):
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{field}=.* is invalid: .*{message}") as info:
        SamplingParams(**kwargs)
    assert not isinstance(info.value, OverflowError)
    return str(info.value)


@pytest.mark.parametrize("field", NUMERIC_FIELDS)
def test_huge_int_names_the_field(field):
    _rejects({field: HUGE, **({"max_tokens": None} if field == "min_tokens" else {})}, field)


@pytest.mark.parametrize("kwargs, field", [
    ({"stop_token_ids": [HUGE]}, "stop_token_ids"),
    ({"bad_token_ids": [HUGE]}, "bad_token_ids"),
    ({"bad_token_ids": [[4, HUGE]]}, "bad_token_ids"),
    ({"logit_bias": {HUGE: 1.0}}, "logit_bias"),
    ({"logit_bias": {4: HUGE}}, "logit_bias"),
    ({"logit_bias": {4: -HUGE}}, "logit_bias"),
])
def test_huge_int_inside_a_collection_names_the_field(kwargs, field):
    _rejects(kwargs, field)


@pytest.mark.parametrize("kwargs, field", [
    ({"top_k": INT32_OVER}, "top_k"),
    ({"end_id": INT32_OVER}, "end_id"),
    ({"stop_token_ids": [1, INT32_OVER]}, "stop_token_ids"),
    ({"bad_token_ids": [INT32_OVER]}, "bad_token_ids"),
    ({"bad_token_ids": [[3, INT32_OVER]]}, "bad_token_ids"),
    ({"logit_bias": {INT32_OVER: 1.0}}, "logit_bias"),
    ({"max_tokens": INT32_OVER}, "max_tokens"),
    ({"min_tokens": INT32_OVER, "max_tokens": None}, "min_tokens"),
    ({"n": INT32_OVER}, "n"),
    ({"best_of": INT32_OVER}, "best_of"),
    ({"logprobs": INT32_OVER}, "logprobs"),
    ({"prompt_logprobs": INT32_OVER}, "prompt_logprobs"),
])
def test_past_int32_names_the_field(kwargs, field):
    _rejects(kwargs, field, re.escape("2**31"))


@pytest.mark.parametrize("kwargs", [
    {"top_k": INT32_OVER - 1}, {"end_id": INT32_OVER - 1}, {"stop_token_ids": [INT32_OVER - 1]},
    {"bad_token_ids": [INT32_OVER - 1]}, {"logit_bias": {INT32_OVER - 1: 1.0}}, {"max_tokens": INT32_OVER - 1},
    {"n": INT32_OVER - 1}, {"logprobs": INT32_OVER - 1},
    {"seed": 2 ** 63 + 5}, {"seed": -(2 ** 63)}, {"seed": 2 ** 64 - 1},  # the sampler takes the low 63 bits
    {"temperature": 3.4e38}, {"top_p": 1e-40}, {"logit_bias": {1: -1e38}},  # float32 holds these
])
def test_largest_values_the_core_holds_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_seed_is_masked_to_63_bits():
    assert SamplingParams(seed=2 ** 63 + 5).effective_seed(0) == 5
    _rejects({"seed": 2 ** 64}, "seed")


@pytest.mark.parametrize("kwargs, field, message", [
    ({"top_p": 5e-324}, "top_p", "rounds to 0 in float32"),
    ({"temperature": 1e308}, "temperature", "rounds to inf in float32"),
    ({"temperature": 1e-50}, "temperature", "rounds to 0 in float32"),
    ({"min_p": 1e-50}, "min_p", "rounds to 0 in float32"),
    ({"length_penalty": 1e300}, "length_penalty", "rounds to inf in float32"),
    ({"repetition_penalty": 1e-50}, "repetition_penalty", "rounds to 0 in float32"),
    ({"repetition_penalty": 1e39}, "repetition_penalty", "rounds to inf in float32"),
    ({"presence_penalty": 1e-60}, "presence_penalty", "rounds to 0 in float32"),
    ({"logit_bias": {3: 1e300}}, "logit_bias", "rounds to inf in float32"),
    ({"logit_bias": {3: -1e300}}, "logit_bias", "rounds to inf in float32"),
    ({"logit_bias": {3: 1e-60}}, "logit_bias", "rounds to 0 in float32"),
])
def test_values_float32_cannot_hold(kwargs, field, message):
    _rejects(kwargs, field, message)


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": float("inf")}, "temperature"),
    ({"length_penalty": float("nan")}, "length_penalty"),
    ({"logit_bias": {3: float("nan")}}, "logit_bias"),
    ({"stop": 5}, "stop"),
    ({"bad": 5}, "bad"),
    ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"bad_token_ids": 5}, "bad_token_ids"),
    ({"bad_token_ids": [[]]}, "bad_token_ids"),
    ({"logit_bias": [(1, 2.0)]}, "logit_bias"),
    ({"logit_bias": {"a": 2.0}}, "logit_bias"),
    ({"top_k": True}, "top_k"),
    ({"n": 2.0}, "n"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": "1"}, "logprobs"),
    ({"early_stopping": 1}, "early_stopping"),
    ({"logits_processor": [print, 3]}, "logits_processor"),
])
def test_wrong_values_and_types_name_the_field(kwargs, field):
    _rejects(kwargs, field)


def test_message_shortens_a_huge_value():
    message = _rejects({"temperature": HUGE}, "temperature")
    assert len(message) < 200
    _rejects({"top_k": 10 ** 5000}, "top_k")  # past Python's int-to-str digit limit


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_logprobs_true_means_one_false_none(field):
    assert getattr(SamplingParams(**{field: True}), field) == 1
    assert getattr(SamplingParams(**{field: False}), field) is None
    sp = SamplingParams()
    setattr(sp, field, True)
    assert getattr(sp, field) == 1


def test_unknown_arguments_named_as_llm_does():
    with pytest.raises(ValueError, match=re.escape("LLM() got unknown argument(s): bogus; known arguments are: ")):
        validated_kwargs({"model": "m", "bogus": 1})
    for cls in (SamplingParams, KvCacheConfig):
        with pytest.raises(ValueError) as info:
            cls(bogus=1, other=2)
        known = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
        assert str(info.value) == (f"{cls.__name__}() got unknown argument(s): bogus, other; "
                                   f"known arguments are: {known}")


def test_positional_and_replace_still_work():
    sp = SamplingParams(5, 1, 0.5)
    assert (sp.max_tokens, sp.min_tokens, sp.temperature) == (5, 1, 0.5)
    again = dataclasses.replace(sp, n=2, stop="x")
    assert (again.n, again.stop_strings, again.max_tokens) == (2, ["x"], 5)
    assert KvCacheConfig(0.5, 64).max_tokens == 64


# -------------------------------------------------------------------------- attribute writes


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", HUGE), ("temperature", -1.0), ("temperature", HUGE), ("top_p", 5e-324),
    ("top_k", INT32_OVER), ("stop", 5), ("stop", [""]), ("bad", [3]), ("stop_token_ids", [-1]),
    ("bad_token_ids", [[]]), ("logit_bias", {1: float("inf")}), ("logits_processor", 3), ("logprobs", -1),
    ("n", 0), ("best_of", 0), ("seed", "x"), ("ignore_eos", 1), ("early_stopping", "sometimes"),
])
def test_invalid_write_raises_and_keeps_the_old_value(field, value):
    sp = SamplingParams(max_tokens=8, stop=["a"], bad_token_ids=[[3, 4]], logit_bias={5: 1.0})
    before = dataclasses.replace(sp)
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}="):
        setattr(sp, field, value)
    assert sp == before


def test_write_that_breaks_another_field_is_refused():
    sp = SamplingParams(max_tokens=8, min_tokens=4)
    with pytest.raises(ValueError, match=r"SamplingParams\.min_tokens=4 .*max_tokens=2"):
        sp.max_tokens = 2
    assert sp.max_tokens == 8
    sp = SamplingParams(stop=".")
    with pytest.raises(ValueError, match=r"SamplingParams\.stop="):
        sp.detokenize = False
    assert sp.detokenize is True


def test_misspelt_write_is_an_error():
    sp = SamplingParams()
    with pytest.raises(AttributeError, match="max_token"):
        sp.max_token = 4
    assert not hasattr(sp, "max_token")


def test_derived_views_follow_writes():
    sp = SamplingParams()
    sp.stop = "x"
    assert sp.stop_strings == ["x"]
    sp.bad = ["y", "z"]
    assert sp.bad_strings == ["y", "z"]
    sp.bad_token_ids = [7, [8, 9]]
    assert sp.bad_word_ids == [[7], [8, 9]]
    sp.bad_token_ids.append([10])
    assert sp.bad_word_ids == [[7], [8, 9], [10]]
    assert sp.combined_logits_processor() is None
    sp.logits_processor = lambda out, logits: logits + 1
    assert sp.combined_logits_processor()([], [], 1) == 2
    sp.logits_processor = None
    assert sp.combined_logits_processor() is None
    sp.stop_token_ids = (4, 5)
    assert sp.stop_token_ids == [4, 5]


# -------------------------------------------------------------------------- on the tiny model

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), tokens_per_block=8, kv_cache_config={"max_tokens": 4096}) as llm:
        yield llm


def _greedy(**kwargs):
    return SamplingParams(**{"temperature": 0, "max_tokens": 16, **kwargs})


@pytest.fixture(scope="module")
def baseline(llm):
    out = llm.generate(PROMPT, _greedy()).outputs[0]
    assert len(out.token_ids) >= 6 and len(out.text.split()) >= 6
    return out


def _ban_first(baseline):
    banned = baseline.token_ids[0]

    def ban(output_ids, logits):
        logits[banned] = float("-inf")
        return logits
    return ban


@pytest.mark.parametrize("field, value_of", [
    ("stop", lambda b: [b.text.split()[3]]),
    ("bad", lambda b: b.text.split()[0]),
    ("bad_token_ids", lambda b: [b.token_ids[1]]),
    ("stop_token_ids", lambda b: [b.token_ids[2]]),
    ("logits_processor", _ban_first),
    ("logit_bias", lambda b: {b.token_ids[0]: -100.0}),
    ("max_tokens", lambda b: 5),
    ("min_tokens", lambda b: 3),
])
def test_a_write_after_construction_takes_effect(llm, baseline, field, value_of):
    value = value_of(baseline)
    constructed = llm.generate(PROMPT, _greedy(**{field: value})).outputs[0]
    written = llm.get_default_sampling_params()
    written.temperature = 0
    written.max_tokens = 16
    setattr(written, field, value)
    out = llm.generate(PROMPT, written).outputs[0]
    assert (out.token_ids, out.text, out.finish_reason) == (
        constructed.token_ids, constructed.text, constructed.finish_reason)
    if field != "min_tokens":
        assert out.token_ids != baseline.token_ids


def test_writes_between_calls_do_not_reach_requests_already_made(llm, baseline):
    sp = _greedy()
    pending = llm.generate_async(PROMPT, sp)
    sp.stop = [baseline.text.split()[1]]
    assert pending.result(30).outputs[0].token_ids == baseline.token_ids
    later = llm.generate(PROMPT, sp).outputs[0]
    assert later.finish_reason == "stop" and len(later.token_ids) < len(baseline.token_ids)


def test_a_list_changed_in_place_is_checked_at_generate(llm, baseline):
    sp = _greedy(stop_token_ids=[5])
    sp.stop_token_ids.append(-1)
    with pytest.raises(ValueError, match=r"SamplingParams\.stop_token_ids="):
        llm.generate(PROMPT, sp)
    assert llm.generate(PROMPT, _greedy()).outputs[0].token_ids == baseline.token_ids


def test_logprobs_true_returns_one_top_logprob(llm):
    outs = [llm.generate(PROMPT, SamplingParams(max_tokens=8, seed=3, logprobs=v)).outputs[0] for v in (True, 1)]
    assert outs[0].token_ids == outs[1].token_ids
    assert outs[0].logprobs == outs[1].logprobs
    for token, entry in zip(outs[0].token_ids, outs[0].logprobs):
        assert token in entry and len(entry) <= 2
        assert [lp.rank for lp in entry.values()].count(1) == 1


def test_beam_search_without_width_is_greedy(llm, baseline):
    sp = SamplingParams(use_beam_search=True, max_tokens=16)
    assert sp.num_sequences == 1
    out = llm.generate(PROMPT, sp).outputs[0]
    assert out.token_ids == baseline.token_ids


@pytest.mark.parametrize("field, value_of", [
    ("end_id", lambda v: v),
    ("stop_token_ids", lambda v: [3, v]),
    ("bad_token_ids", lambda v: [v]),
    ("bad_token_ids", lambda v: [[3, v + 7]]),
    ("logit_bias", lambda v: {v: 1.0}),
])
@pytest.mark.parametrize("how", ["generate", "generate_async", "generate_list"])
def test_token_ids_past_the_vocabulary_are_refused(llm, baseline, field, value_of, how):
    vocab = llm.vocab_size
    sp = _greedy(min_tokens=2, **{field: value_of(vocab)})  # end_id == vocab with min_tokens once broke a step
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}=.*vocab_size={vocab}"):
        if how == "generate":
            llm.generate(PROMPT, sp)
        elif how == "generate_async":
            llm.generate_async(PROMPT, sp)
        else:
            llm.generate([PROMPT, PROMPT], [_greedy(), sp], use_tqdm=False)
    assert llm.get_stats()["num_waiting"] == 0 and llm.get_stats()["num_running"] == 0
    assert llm.generate(PROMPT, _greedy()).outputs[0].token_ids == baseline.token_ids
