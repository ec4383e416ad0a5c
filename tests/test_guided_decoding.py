"""Structured outputs (SamplingParams.guided_decoding) on a tiny random-weight Llama with a byte-level tokenizer:
the parameters and their errors, the step's mask against xgrammar's own matcher, compiled grammars cached,
invalid grammars refused before anything is queued, outputs valid under each grammar kind (async scheduling on
and off, n > 1), min_tokens and stop strings as documented, guided and plain requests side by side, a failing
matcher failing its request alone, and TP=2 / PP=2 giving one rank's tokens."""

import json
import re

import jsonschema
import numpy as np
import pytest
import torch
from guided_tiny import VOCAB_SIZE, make_byte_level_tokenizer, make_tiny_guided_llama

from llmapi import (LLM, GuidedDecodingError, GuidedDecodingParams, KvCacheConfig, LogitsProcessorError,
                    SamplingParams, StructuredOutputsParams)
from llmapi.guided_decoding import GrammarBackend, GrammarGuide, apply_grammar_masks

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 4},
    "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "colour": {"enum": ["red", "blue"]},
    "pets": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    "home": {"type": "object", "properties": {"zip": {"type": "integer", "minimum": 100, "maximum": 999}},
             "required": ["zip"]}},
    "required": ["name", "age", "colour", "pets", "home"]}
REGEX = r"[a-z]{2,6}-[0-9]{1,3}"
# Sums of one- or two-digit numbers in parentheses, checked by hand below.
GRAMMAR = 'root ::= "(" expr ")"\nexpr ::= num | num " + " expr\nnum ::= [1-9] | [1-9] [0-9]'
CHOICES = ["yes", "no", "maybe so"]
SETTINGS = dict(tokens_per_block=8, kv_cache_config=KvCacheConfig(max_tokens=4096))


def grammar_ok(text: str) -> bool:
    """The hand-written check of GRAMMAR: '(' numbers in [1, 99] joined by ' + ' ')'."""
    if not (text.startswith("(") and text.endswith(")")):
        return False
    parts = text[1:-1].split(" + ")
    return all(re.fullmatch(r"[1-9][0-9]?", p) for p in parts)


CHECKS = {
    "json": (GuidedDecodingParams(json=SCHEMA, disable_any_whitespace=True),
             lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    "regex": (GuidedDecodingParams(regex=REGEX), lambda t: re.fullmatch(REGEX, t) is not None),
    "grammar": (GuidedDecodingParams(grammar=GRAMMAR), grammar_ok),
    "choice": (GuidedDecodingParams(choice=CHOICES), lambda t: t in CHOICES),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_guided_llama(tmp_path_factory.mktemp("guided-llama"))


@pytest.fixture(scope="module")
def llm(model_dir):
    with LLM(str(model_dir), **SETTINGS) as llm:
        yield llm


def _sampled(guided, count, **kw):
    return [SamplingParams(max_tokens=96, temperature=1.0, seed=1000 + i, guided_decoding=guided, **kw)
            for i in range(count)]


# ----------------------------------------------------------------------------------------- the parameters
def test_exactly_one_grammar_is_set():
    for kwargs, named in (({}, "got none"), ({"json": SCHEMA, "regex": "a"}, "got json, regex"),
                          ({"choice": ["a"], "json_object": True}, "got json_object, choice")):
        with pytest.raises(ValueError, match=f"exactly one of json, json_object, regex, grammar, choice; {named}"):
            GuidedDecodingParams(**kwargs)
    bad = [({"choice": []}, "choice"), ({"choice": ["a", ""]}, "choice"), ({"choice": "ab"}, "choice"),
           ({"regex": ""}, "regex"), ({"grammar": 5}, "grammar"), ({"json": 5}, "json"),
           ({"json": {"x": object()}}, "json"), ({"json_object": "yes"}, "json_object"),
           ({"regex": "a", "disable_any_whitespace": 1}, "disable_any_whitespace")]
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=rf"GuidedDecodingParams\.{name}=.* is invalid"):
            GuidedDecodingParams(**kwargs)
    with pytest.raises(ValueError, match="unknown argument.*regexp"):
        SamplingParams(guided_decoding={"regexp": "a"})
    assert StructuredOutputsParams is GuidedDecodingParams


def test_structured_outputs_is_an_alias():
    g = GuidedDecodingParams(regex="a+")
    p = SamplingParams(structured_outputs=g)
    assert p.guided_decoding is g and p.structured_outputs is g
    p = SamplingParams(guided_decoding={"choice": ["x", "y"]})  # a dict of the fields
    assert p.guided_decoding == GuidedDecodingParams(choice=["x", "y"]) and p.structured_outputs == p.guided_decoding
    assert SamplingParams(guided_decoding=g, structured_outputs=GuidedDecodingParams(regex="a+")).guided_decoding == g
    with pytest.raises(ValueError, match="guided_decoding=.* and structured_outputs=.* disagree"):
        SamplingParams(guided_decoding=g, structured_outputs=GuidedDecodingParams(regex="b+"))
    p.structured_outputs = g  # a write to either name sets both
    assert p.guided_decoding is g
    p.guided_decoding = None
    assert p.structured_outputs is None


def test_beam_search_and_ignore_eos_are_refused():
    g = GuidedDecodingParams(regex="a+")
    with pytest.raises(ValueError, match=r"guided_decoding=.*beam search with guided decoding is not supported"):
        SamplingParams(guided_decoding=g, use_beam_search=True, n=2)
    with pytest.raises(ValueError, match=r"guided_decoding=.*ignore_eos=True"):
        SamplingParams(guided_decoding=g, ignore_eos=True)
    p = SamplingParams(guided_decoding=g)
    with pytest.raises(ValueError, match="beam search"):
        p.use_beam_search = True
    assert p.use_beam_search is False


def test_backend_argument_is_validated():
    with pytest.raises(ValueError, match=r"guided_decoding_backend='outlines' is invalid: must be one of "
                                         r"\('xgrammar',\)"):
        LLM("any-model", guided_decoding_backend="outlines")


# ----------------------------------------------------------------------------------------- the step's mask
def _batch(requests):
    from llmapi._core import ExecutorConfig, Scheduler

    s = Scheduler(ExecutorConfig(max_batch_size=8, max_num_tokens=256, max_seq_len=128, tokens_per_block=4,
                                 num_blocks=64, enable_prefix_caching=False))
    for r in requests:
        s.add(r)
    return s.make_batch(s.schedule())


def _check_mask_against_matchers(device):
    """Rows at different points of their grammars: the finite logits after the mask are exactly the tokens a
    fresh xgrammar matcher at the same point accepts (one accept_token per token of the vocabulary)."""
    import xgrammar as xgr

    from llmapi._core import Request

    tokenizer = make_byte_level_tokenizer()
    backend = GrammarBackend(tokenizer, VOCAB_SIZE)
    cases = [(GuidedDecodingParams(json=SCHEMA), '{"name": "ab'), (GuidedDecodingParams(regex=REGEX), "abc"),
             (GuidedDecodingParams(grammar=GRAMMAR), ""), (GuidedDecodingParams(choice=CHOICES), "may")]
    prompt = tokenizer.encode("hello")
    requests, processors, histories = [], {}, {}
    for i, (g, text) in enumerate(cases):
        output = tokenizer.encode(text) if text else []
        # The whole history is the prompt the scheduler sees; the runner's prompt_lens split it below.
        requests.append(Request(i, prompt + output, max_tokens=4, token_history=True))
        processors[i] = GrammarGuide(g.spec(), [2], compiled=backend.compile(g.spec()))
    batch = _batch(requests)
    slots = np.asarray(batch.slots)
    for r, (g, text) in enumerate(cases):
        histories[int(slots[r])] = prompt + (tokenizer.encode(text) if text else [])

    class Batch:  # the scheduler's batch with the runner's view of prompt and output
        def __getattr__(self, name):
            return getattr(batch, name)

        prompt_lens = np.full(len(cases), len(prompt), dtype=np.int32)

    logits = torch.randn(len(cases), VOCAB_SIZE, generator=torch.Generator().manual_seed(0)).to(device)
    before = logits.clone()
    errors = apply_grammar_masks(logits, Batch(), np.arange(len(cases)), processors, histories)
    assert errors == {}
    for r, (g, text) in enumerate(cases):
        matcher = xgr.GrammarMatcher(backend.compile(g.spec()), override_stop_tokens=[2])
        for t in (tokenizer.encode(text) if text else []):
            assert matcher.accept_token(t)
        accepts = torch.tensor([matcher.fork().accept_token(t) for t in range(VOCAB_SIZE)])
        finite = torch.isfinite(logits[r]).cpu()
        assert accepts.any() and torch.equal(finite, accepts), g
        assert torch.equal(logits[r][finite.to(device)], before[r][finite.to(device)])  # the rest untouched


def test_mask_equals_xgrammar_matcher():
    _check_mask_against_matchers(torch.device("cpu"))


@pytest.mark.gpu
def test_mask_equals_xgrammar_matcher_on_cuda():
    _check_mask_against_matchers(torch.device("cuda"))


@pytest.mark.gpu
def test_guided_generation_on_cuda(model_dir):
    with LLM(str(model_dir), device="cuda", **SETTINGS) as llm:
        for name, (guided, check) in CHECKS.items():
            outs = llm.generate(["hello"] * 8, _sampled(guided, 8, n=2), use_tqdm=False)
            texts = [c.text for o in outs for c in o.outputs]
            assert all(c.finish_reason == "stop" for o in outs for c in o.outputs), (name, texts)
            assert all(check(t) for t in texts), (name, texts)


# ----------------------------------------------------------------------------------------- compile and refuse
def test_grammars_compile_once_and_are_cached(llm):
    g = GuidedDecodingParams(regex="[a-z]{3}")
    llm.generate(["hello"], SamplingParams(max_tokens=4, guided_decoding=g), use_tqdm=False)
    backend = llm._grammars
    before = backend.compilations
    same = GuidedDecodingParams(regex="[a-z]{3}")  # another object, the same grammar
    llm.generate(["hello", "once"], [SamplingParams(max_tokens=4, guided_decoding=same),
                                     SamplingParams(max_tokens=4, seed=3, guided_decoding=g)], use_tqdm=False)
    llm.generate_async("hello", SamplingParams(max_tokens=4, guided_decoding=same)).result()
    assert backend.compilations == before
    assert backend.compile(same.spec()) is backend.compile(g.spec())
    llm.generate(["hello"], SamplingParams(max_tokens=4, guided_decoding=GuidedDecodingParams(regex="[a-z]{4}")),
                 use_tqdm=False)
    assert backend.compilations == before + 1


def test_compiled_grammar_cache_is_bounded(monkeypatch):
    import llmapi.guided_decoding as gd

    monkeypatch.setattr(gd, "_CACHE_ENTRIES", 2)
    backend = GrammarBackend(make_byte_level_tokenizer(), VOCAB_SIZE)
    specs = [GuidedDecodingParams(regex=f"[a-z]{{{k}}}").spec() for k in (1, 2, 3)]
    first = backend.compile(specs[0])
    backend.compile(specs[1])
    assert backend.compile(specs[0]) is first and backend.compilations == 2  # a hit makes it the most recent
    backend.compile(specs[2])  # the least recently used (specs[1]) goes
    assert backend.compile(specs[0]) is first and backend.compilations == 3
    backend.compile(specs[1])
    assert backend.compilations == 4 and len(backend._cache) == 2
    assert backend._bytes == sum(c.memory_size_bytes for c in backend._cache.values())


@pytest.mark.parametrize("guided, message", [
    (GuidedDecodingParams(json={"type": "object", "properties": {"a": {"type": "strnig"}}}),
     "invalid JSON schema .*strnig"),
    (GuidedDecodingParams(json='{"type": "object",'), "invalid JSON schema"),
    (GuidedDecodingParams(regex="[a-z"), "invalid regex '\\[a-z'"),
    (GuidedDecodingParams(grammar='root ::= "a" rest'), 'invalid grammar .*"rest" is not defined'),
])
def test_invalid_grammar_raises_before_anything_is_queued(llm, guided, message):
    steps = llm.get_stats()["num_steps"]
    good = SamplingParams(max_tokens=4, guided_decoding=GuidedDecodingParams(regex="[a-z]+"))
    with pytest.raises(GuidedDecodingError, match=message):
        llm.generate(["hello", "once"], [good, SamplingParams(max_tokens=4, guided_decoding=guided)], use_tqdm=False)
    with pytest.raises(GuidedDecodingError, match=message):
        llm.generate_async("hello", SamplingParams(max_tokens=4, guided_decoding=guided))
    stats = llm.get_stats()
    # Nothing was queued: not even the valid request of the same call, and no step ran.
    assert stats["num_waiting"] == stats["num_running"] == 0 and stats["num_steps"] == steps
    assert not llm._res.live and not llm._res.processors


# ----------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_every_kind_gives_valid_outputs(model_dir, async_scheduling):
    with LLM(str(model_dir), async_scheduling=async_scheduling, **SETTINGS) as llm:
        for name, (guided, check) in CHECKS.items():
            outs = llm.generate(["hello"] * 12, _sampled(guided, 12), use_tqdm=False)
            texts = [o.outputs[0].text for o in outs]
            # The grammar's end is the model's EOS (2), as an EOS ends a request; the text omits it.
            assert all((o.outputs[0].finish_reason, o.outputs[0].stop_reason) == ("stop", 2) for o in outs), name
            assert all(o.outputs[0].token_ids[-1] == 2 for o in outs), name
            assert all(check(t) for t in texts), (name, texts)
            assert len(set(texts)) > 1, name  # sampled, not one forced string


def test_async_scheduling_masks_with_the_last_token(model_dir, llm):
    """Under async scheduling a guided request waits for its last token before its next step is scheduled:
    the same seeded tokens as without."""
    guided, _ = CHECKS["json"]
    with LLM(str(model_dir), async_scheduling=False, **SETTINGS) as sync:
        want = sync.generate(["hello"] * 6, _sampled(guided, 6), use_tqdm=False)
    assert llm.args.async_scheduling
    got = llm.generate(["hello"] * 6, _sampled(guided, 6), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_preempted_requests_resume_their_grammar(model_dir, llm):
    """A cache too small for the batch: preempted guided requests are recomputed, their matchers rebuilt from their
    tokens, and they give the tokens of an unpreempted run."""
    guided, check = CHECKS["json"]
    want = llm.generate(["hello"] * 8, _sampled(guided, 8), use_tqdm=False)
    small = dict(SETTINGS, kv_cache_config=KvCacheConfig(max_tokens=256, enable_block_reuse=False))
    with LLM(str(model_dir), **small) as tight:
        got = tight.generate(["hello"] * 8, _sampled(guided, 8), use_tqdm=False)
        assert tight.get_stats()["num_preemptions"] > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert all(check(o.outputs[0].text) for o in got)


def test_n_sequences_each_follow_the_grammar(llm):
    for name in ("json", "regex"):
        guided, check = CHECKS[name]
        (out,) = llm.generate(["hello"], SamplingParams(max_tokens=96, temperature=1.0, seed=5, n=4, best_of=5,
                                                         guided_decoding=guided), use_tqdm=False)
        texts = [o.text for o in out.outputs]
        assert all(o.finish_reason == "stop" for o in out.outputs), texts
        assert len(texts) == 4 and all(check(t) for t in texts), texts
        assert len(set(texts)) > 1, texts


def test_logits_processor_runs_before_the_mask(llm):
    """A request's own processor and its grammar together: the processor bans 'a', the grammar asks for
    [a-c]{4}: only b and c come."""
    from guided_processors import ban_letter_a

    guided = GuidedDecodingParams(regex="[a-c]{4}")
    outs = llm.generate(["hello"] * 6, _sampled(guided, 6, logits_processor=ban_letter_a), use_tqdm=False)
    assert all(re.fullmatch("[bc]{4}", o.outputs[0].text) for o in outs), [o.outputs[0].text for o in outs]


def test_min_tokens_keeps_the_output_inside_the_grammar(llm):
    """Documented: EOS stays masked until min_tokens, so the output goes on inside the grammar; a grammar that
    can only end before min_tokens fails its request alone (GuidedDecodingError naming min_tokens)."""
    longer = GuidedDecodingParams(regex="[a-z]{1,30}")
    outs = llm.generate(["hello"] * 6, _sampled(longer, 6, min_tokens=10), use_tqdm=False)
    for o in outs:
        assert len(o.outputs[0].token_ids) >= 10 + 1  # the EOS that ends it comes after min_tokens
        assert re.fullmatch("[a-z]{1,30}", o.outputs[0].text)
    # The longest choice, "maybe so", is 8 bytes, so at most 8 tokens: min_tokens=9 outlasts every choice.
    assert max(len(c.encode()) for c in CHOICES) == 8
    short = llm.generate_async("hello", SamplingParams(max_tokens=20, min_tokens=9,
                                                       guided_decoding=CHECKS["choice"][0]))
    plain = llm.generate_async("hello", SamplingParams(max_tokens=5, temperature=0))
    with pytest.raises(GuidedDecodingError, match="min_tokens"):
        short.result()
    assert len(plain.result().outputs[0].token_ids) == 5


def test_stop_string_ends_the_text_inside_the_grammar(llm):
    """Documented: a stop string ends the request where it matches, even before the grammar's end."""
    guided = GuidedDecodingParams(regex=REGEX)
    outs = llm.generate(["hello"] * 6, _sampled(guided, 6, stop="-"), use_tqdm=False)
    for o in outs:
        c = o.outputs[0]
        assert (c.finish_reason, c.stop_reason) == ("stop", "-")
        assert re.fullmatch("[a-z]{2,6}", c.text), c.text


def test_plain_requests_beside_guided_ones_are_unchanged(llm):
    plain = [SamplingParams(max_tokens=12, temperature=0), SamplingParams(max_tokens=9, temperature=0, n=2)]
    prompts = ["hello my name", "the quick brown", "once upon a time"]
    alone = llm.generate([prompts[0], prompts[2]], plain, use_tqdm=False)
    mixed = llm.generate(prompts, [plain[0], *_sampled(CHECKS["json"][0], 1), plain[1]], use_tqdm=False)
    assert [o.token_ids for o in mixed[0].outputs] == [o.token_ids for o in alone[0].outputs]
    assert [o.token_ids for o in mixed[2].outputs] == [o.token_ids for o in alone[1].outputs]
    assert CHECKS["json"][1](mixed[1].outputs[0].text)


def test_a_failing_matcher_fails_its_request_alone(llm, monkeypatch):
    original = GrammarGuide.matcher

    def matcher(self, slot, history, start, fresh):
        if self.spec[0] == "regex" and len(history) - start >= 2:
            raise RuntimeError("the matcher broke")
        return original(self, slot, history, start, fresh)

    monkeypatch.setattr(GrammarGuide, "matcher", matcher)
    broken = llm.generate_async("hello", SamplingParams(max_tokens=20, guided_decoding=CHECKS["regex"][0]))
    fine = llm.generate_async("hello", _sampled(CHECKS["choice"][0], 1)[0])
    plain = llm.generate_async("hello", SamplingParams(max_tokens=6, temperature=0))
    with pytest.raises(GuidedDecodingError, match="guided decoding of request .* failed: RuntimeError: the matcher "
                                                  "broke"):
        broken.result()
    assert fine.result().outputs[0].text in CHOICES
    assert len(plain.result().outputs[0].token_ids) == 6
    monkeypatch.setattr(GrammarGuide, "matcher", original)
    assert CHECKS["regex"][1](llm.generate("hello", _sampled(CHECKS["regex"][0], 1)[0]).outputs[0].text)


def test_processor_failure_with_a_grammar_is_the_processors_error(llm):
    from guided_processors import always_fails

    out = llm.generate_async("hello", _sampled(CHECKS["regex"][0], 1, logits_processor=always_fails)[0])
    with pytest.raises(LogitsProcessorError, match="fails on purpose"):
        out.result()


def test_no_tokenizer_is_refused(model_dir):
    with LLM(str(model_dir), skip_tokenizer_init=True, **SETTINGS) as llm:
        with pytest.raises(ValueError, match="guided decoding needs a tokenizer"):
            llm.generate([[5, 6]], SamplingParams(guided_decoding=CHECKS["regex"][0]))


# ----------------------------------------------------------------------------------------- several ranks
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_two_ranks_give_one_ranks_tokens(model_dir, llm, tp, pp):
    """The sampling rank compiles the grammars itself (from the engine's tokenizer) and masks as one rank."""
    prompts = ["hello"] * 6 + ["the quick", "once upon"]
    params = _sampled(CHECKS["json"][0], 6) + [
        SamplingParams(max_tokens=30, temperature=0.9, seed=3, n=2, guided_decoding=CHECKS["grammar"][0]),
        SamplingParams(max_tokens=10, temperature=0)]
    want = llm.generate(prompts, params, use_tqdm=False)
    with LLM(str(model_dir), tp=tp, pp=pp, **SETTINGS) as ranks:
        got = ranks.generate(prompts, params, use_tqdm=False)
        with pytest.raises(GuidedDecodingError, match="invalid regex"):
            ranks.generate(["hello"], SamplingParams(guided_decoding=GuidedDecodingParams(regex="(")))
    for w, g in zip(want, got):
        assert [o.token_ids for o in g.outputs] == [o.token_ids for o in w.outputs]
    assert all(CHECKS["json"][1](o.outputs[0].text) for o in got[:6])
