"""Structured outputs on the bundled real model (SmolLM2-135M-Instruct): 30 sampled generations under each of a
JSON schema, a regex, an EBNF grammar and a choice list end at the grammar's end (at least 90%, not max_tokens)
and every one that ends validates by an independent check; min_tokens and stop strings behave as documented;
plain greedy requests beside guided ones get their tokens alone; an invalid schema or regex raises before
anything is queued."""

import json
import re

import jsonschema
import pytest

from llmapi import LLM, GuidedDecodingError, GuidedDecodingParams, SamplingParams

pytestmark = pytest.mark.slow

SAMPLES = 30
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 10},
    "age": {"type": "integer", "minimum": 18, "maximum": 90},
    "colour": {"enum": ["red", "green", "blue"]},
    "address": {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 10},
                                                 "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}},
                "required": ["city", "zip"]},
    "pets": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 6}, "minItems": 1,
             "maxItems": 2},
    "rating": {"type": "number", "minimum": 0, "maximum": 5}},
    "required": ["name", "age", "colour", "address", "pets", "rating"]}
REGEX = r"[A-Z][a-z]{1,8} (has|ate) [0-9]{1,3} (apples|pears)\."
# Two to four terms (numbers or bracketed products) added, the whole possibly in brackets: checked by hand and
# by a second xgrammar matcher.
GRAMMAR = ('root ::= "(" sum ")" | sum\n'
           'sum ::= term (" + " term){1,3}\n'
           'term ::= num | "(" num " * " num ")"\n'
           'num ::= [1-9] | [1-9] [0-9]')
CHOICES = ["Paris", "London", "Berlin", "Madrid", "Rome"]


def sum_ok(text: str) -> bool:
    """GRAMMAR by hand, as the regular expression it is."""
    num = r"[1-9][0-9]?"
    term = rf"(?:{num}|\({num} \* {num}\))"
    total = rf"{term}(?: \+ {term}){{1,3}}"
    return re.fullmatch(rf"\({total}\)|{total}", text) is not None


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    with LLM(str(smollm2_gguf)) as llm:
        yield llm


def _chat(llm, question: str):
    return {"prompt_token_ids": llm.chat_token_ids([{"role": "user", "content": question}])}


def _independent_matcher_accepts(llm, text: str) -> bool:
    """xgrammar's own matcher, compiled apart from the LLM's cache, run over the text."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(llm.tokenizer, vocab_size=llm.vocab_size)
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info, cache_enabled=False).compile_grammar(GRAMMAR),
                                 terminate_without_stop_token=True)
    return matcher.accept_string(text) and matcher.is_terminated()


KINDS = {
    "json": (GuidedDecodingParams(json=SCHEMA, disable_any_whitespace=True),
             "Describe a fictional person as a JSON object with name, age, favourite colour, address (city and zip "
             "code), pets and a rating from 0 to 5.",
             lambda llm, t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    "regex": (GuidedDecodingParams(regex=REGEX), "Tell me about someone and their fruit in one sentence.",
              lambda llm, t: re.fullmatch(REGEX, t) is not None),
    "grammar": (GuidedDecodingParams(grammar=GRAMMAR), "Write a sum of a few small numbers.",
                lambda llm, t: sum_ok(t) and _independent_matcher_accepts(llm, t)),
    "choice": (GuidedDecodingParams(choice=CHOICES), "Which city is the capital of France?",
               lambda llm, t: t in CHOICES),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_sampled_outputs_end_with_the_grammar_and_validate(llm, kind):
    guided, question, check = KINDS[kind]
    params = [SamplingParams(max_tokens=96, temperature=0.8, seed=7000 + i, guided_decoding=guided)
              for i in range(SAMPLES)]
    outs = llm.generate([_chat(llm, question)] * SAMPLES, params, use_tqdm=False)
    ended = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
    # Ended by the grammar: EOS (<|im_end|>, which the text omits) is what the grammar allows at its end.
    assert all(c.token_ids[-1] in llm.eos_token_ids for c in ended)
    assert len(ended) >= 0.9 * SAMPLES, [o.outputs[0].text for o in outs if o.outputs[0].finish_reason != "stop"]
    invalid = [c.text for c in ended if not check(llm, c.text)]
    assert invalid == []
    assert len({c.text for c in ended}) > 1  # sampled


def test_min_tokens_and_stop_strings(llm):
    """Documented: EOS stays masked until min_tokens, so the output goes on inside the grammar (a longer number
    here); a grammar that can only end before min_tokens fails its request alone; a stop string ends the text
    where it matches, inside the grammar."""
    question = _chat(llm, "Tell me about someone and their fruit in one sentence.")
    numbers = GuidedDecodingParams(regex=r"[0-9]{1,20}")
    outs = llm.generate([question] * 4, [SamplingParams(max_tokens=40, min_tokens=12, temperature=0.8, seed=i,
                                                        guided_decoding=numbers) for i in range(4)], use_tqdm=False)
    for o in outs:
        assert len(o.outputs[0].token_ids) > 12 and re.fullmatch(r"[0-9]{1,20}", o.outputs[0].text)
    short = llm.generate_async(question, SamplingParams(max_tokens=20, min_tokens=6,
                                                        guided_decoding=GuidedDecodingParams(choice=["Yes", "No"])))
    with pytest.raises(GuidedDecodingError, match="min_tokens"):
        short.result()
    stopped = llm.generate([question] * 4, [SamplingParams(max_tokens=40, temperature=0.8, seed=i, stop=" has",
                                                           guided_decoding=GuidedDecodingParams(regex=REGEX))
                                            for i in range(4)], use_tqdm=False)
    for o in stopped:
        c = o.outputs[0]
        if (c.finish_reason, c.stop_reason) == ("stop", " has"):
            assert re.fullmatch("[A-Z][a-z]{1,8}", c.text)
        else:  # the sentence took "ate": the grammar's end
            assert c.stop_reason in llm.eos_token_ids and re.fullmatch(REGEX, c.text) and " has" not in c.text
    assert any(o.outputs[0].stop_reason == " has" for o in stopped)


def test_plain_greedy_requests_beside_guided_ones_get_their_own_tokens(llm):
    plain = SamplingParams(max_tokens=16, temperature=0)
    questions = [_chat(llm, "What is the capital of France?"), _chat(llm, "Name three primary colors.")]
    alone = llm.generate(questions, plain, use_tqdm=False)
    guided = [SamplingParams(max_tokens=40, temperature=0.8, seed=i, guided_decoding=KINDS[k][0])
              for i, k in enumerate(("regex", "choice", "json"))]
    mixed = llm.generate([questions[0], *[_chat(llm, KINDS[k][1]) for k in ("regex", "choice", "json")],
                          questions[1]], [plain, *guided, plain], use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert mixed[4].outputs[0].token_ids == alone[1].outputs[0].token_ids
    assert re.fullmatch(REGEX, mixed[1].outputs[0].text) and mixed[2].outputs[0].text in CHOICES


@pytest.mark.parametrize("guided, message", [
    (GuidedDecodingParams(json={"type": "object", "properties": {"a": {"type": "integer", "minimum": "x"}}}),
     "invalid JSON schema"),
    (GuidedDecodingParams(regex="(unclosed"), "invalid regex '\\(unclosed'"),
])
def test_invalid_schema_or_regex_raises_before_queueing(llm, guided, message):
    steps = llm.get_stats()["num_steps"]
    with pytest.raises(GuidedDecodingError, match=message):
        llm.generate([_chat(llm, "Hi"), _chat(llm, "Hello")],
                     [SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, guided_decoding=guided)],
                     use_tqdm=False)
    stats = llm.get_stats()
    assert stats["num_waiting"] == stats["num_running"] == 0 and stats["num_steps"] == steps
