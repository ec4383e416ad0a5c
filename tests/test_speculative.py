"""Speculative decoding through LLM (n-gram, a draft model, an EAGLE head) on a tiny Llama: greedy outputs equal plain
greedy decoding token for token with prefix reuse and preemption (but for near ties: greedy_ties), speculation
happens (acceptance statistics), stop rules inside accepted drafts end the output where plain decoding does, aborts
free every block, and bad settings are refused by name."""

import random
import time

import pytest
from greedy_ties import assert_equal_but_near_ties

from llmapi import (LLM, DraftTargetDecodingConfig, EagleDecodingConfig, KvCacheConfig, NGramDecodingConfig,
                    SamplingParams)
from llmapi.config import UnknownArgumentError

MAX_TOKENS = 24


def _prompts():
    """20 prompts: 8 sharing a 12-token prefix (three blocks of 4), 6 repeating a short pattern, 6 random."""
    rng = random.Random(7)
    shared = [rng.randrange(3, 320) for _ in range(12)]
    prompts = [shared + [rng.randrange(3, 320) for _ in range(rng.randrange(1, 9))] for _ in range(8)]
    for n in range(6):
        pattern = [rng.randrange(3, 320) for _ in range(2 + n % 3)]
        prompts.append(pattern * (3 + n % 2))
    prompts += [[rng.randrange(3, 320) for _ in range(rng.randrange(2, 20))] for _ in range(6)]
    return prompts


PROMPTS = _prompts()
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def plain(tiny_llama_dir):
    """Plain greedy decoding of the tiny Llama (no speculation): an LLM kept for the module's comparisons."""
    with LLM(str(tiny_llama_dir)) as llm:
        yield llm


@pytest.fixture(scope="module")
def reference(plain):
    return _tokens(plain.generate(PROMPTS, GREEDY, use_tqdm=False))


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A 1-layer, hidden-32 Llama with the target's vocabulary and its own random weights."""
    from tiny_models import make_tiny_draft_llama

    path = tmp_path_factory.mktemp("tiny-draft")
    make_tiny_draft_llama(path)
    return path


@pytest.fixture(scope="module")
def eagle_dir(tmp_path_factory, tiny_llama_dir):
    """A random-weight EAGLE-1 head for the tiny Llama, in EAGLE's checkpoint layout."""
    from transformers import AutoConfig

    from tiny_models import make_tiny_eagle_head

    path = tmp_path_factory.mktemp("tiny-eagle")
    make_tiny_eagle_head(path, AutoConfig.from_pretrained(tiny_llama_dir), seed=3)
    return path


def _config(kind, draft_dir, eagle_dir, tiny_llama_dir, k=3):
    if kind == "ngram":
        return NGramDecodingConfig(max_draft_len=k, max_matching_ngram_size=3)
    if kind == "draft":
        return DraftTargetDecodingConfig(speculative_model=str(draft_dir), max_draft_len=k)
    if kind == "self":  # the target as its own draft: every draft is the target's own greedy token
        return DraftTargetDecodingConfig(speculative_model=str(tiny_llama_dir), max_draft_len=k)
    return EagleDecodingConfig(speculative_model=str(eagle_dir), max_draft_len=k)


@pytest.mark.parametrize("kind", ["ngram", "draft", "eagle"])
def test_greedy_equals_plain_decoding_with_prefix_reuse_and_preemption(kind, tiny_llama_dir, draft_dir, eagle_dir,
                                                                       reference):
    # 24 blocks of 4 tokens: the 20 requests (up to 44 tokens each) cannot all stay, so some are preempted and
    # recomputed; the shared 12-token prefix is found in the cache.
    kv = KvCacheConfig(max_tokens=96)
    spec = _config(kind, draft_dir, eagle_dir, tiny_llama_dir)
    with LLM(str(tiny_llama_dir), tokens_per_block=4, kv_cache_config=kv, speculative_config=spec) as llm:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        stats = llm.get_stats()
    assert_equal_but_near_ties(_tokens(outs), reference, PROMPTS, tiny_llama_dir)
    assert stats["num_preemptions"] > 0 and stats["num_prefix_hit_tokens"] >= 12
    assert stats["num_draft_tokens"] > 0 and stats["num_used_blocks"] == 0
    drafted = sum(o.metrics.speculative_decoding.total_draft_tokens for o in outs)
    accepted = sum(o.metrics.speculative_decoding.total_accepted_draft_tokens for o in outs)
    # Per-request counts add up to the executor's (preempted requests keep counting).
    assert (drafted, accepted) == (stats["num_draft_tokens"], stats["num_accepted_draft_tokens"])


def test_the_near_tie_rule_fails_a_wrong_token(tiny_llama_dir, reference):
    """assert_equal_but_near_ties, as this module uses it: a token changed to one far from the top logit, a
    cut output, or two requests parting all fail."""
    def changed(i, j):
        out = [list(t) for t in reference]
        out[i][j] = next(t for t in range(3, 320) if t != out[i][j])
        return out

    a, b = [i for i, t in enumerate(reference) if len(t) > 5][:2]
    assert_equal_but_near_ties(reference, reference, PROMPTS, tiny_llama_dir)
    for got in (changed(a, 5), [t[:-1] if i == b else t for i, t in enumerate(reference)]):
        with pytest.raises(AssertionError):
            assert_equal_but_near_ties(got, reference, PROMPTS, tiny_llama_dir)
    twice = changed(a, 5)
    twice[b] = changed(b, 0)[b]
    with pytest.raises(AssertionError, match=rf"requests \[{a}, {b}\] differ"):
        assert_equal_but_near_ties(twice, reference, PROMPTS, tiny_llama_dir)


def test_ngram_verify_graphs_give_plain_decoding_tokens(tiny_llama_dir, reference, monkeypatch):
    """n-gram verify steps replayed from the verify graphs (their CPU stand-in: the same static, padded buffers),
    rows of 0 to 3 drafts padded to 4 tokens, with prefix reuse and preemption: the plain greedy tokens. A batch
    that needs more than greedy matching (logprobs) runs its verify steps eagerly beside them."""
    monkeypatch.setenv("LLMAPI_DECODE_GRAPHS_ON_CPU", "1")
    kv = KvCacheConfig(max_tokens=96)
    spec = NGramDecodingConfig(max_draft_len=3, max_matching_ngram_size=3)
    with LLM(str(tiny_llama_dir), tokens_per_block=4, kv_cache_config=kv, speculative_config=spec,
             max_batch_size=8) as llm:
        graphs = llm._runner.spec.graphs
        assert graphs.sizes == [1, 2, 4, 8] and graphs.q == 4
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        stats = llm.get_stats()
        replays = graphs.replays
        assert replays > 0 and stats["num_accepted_draft_tokens"] > 0 and stats["num_preemptions"] > 0
        assert_equal_but_near_ties(_tokens(outs), reference, PROMPTS, tiny_llama_dir)
        with_logprobs = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=1)
        outs = llm.generate(PROMPTS[8:14], with_logprobs, use_tqdm=False)
        assert graphs.replays == replays  # every such step ran eagerly
        assert_equal_but_near_ties(_tokens(outs), reference[8:14], PROMPTS[8:14], tiny_llama_dir)
        assert llm.get_stats()["num_draft_tokens"] > stats["num_draft_tokens"]


def _clear_margin(model_dir, prompts, outputs, margin=1e-3):
    """The indices of prompts whose greedy outputs never have a runner-up logit within `margin` of the top one
    (transformers' forward of the model): there the draft's own forward, in another batch shape, cannot round to a
    different argmax than the target's."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    keep = []
    with torch.inference_mode():
        for i, (prompt, out) in enumerate(zip(prompts, outputs)):
            logits = hf(torch.tensor([prompt + out[:-1]])).logits[0, len(prompt) - 1:]  # [len(out), V]
            top2 = logits.topk(2, dim=-1).values
            if bool(((top2[:, 0] - top2[:, 1]) > margin).all()):
                keep.append(i)
    return keep


def test_a_draft_identical_to_the_target_is_always_accepted(tiny_llama_dir, reference):
    keep = _clear_margin(tiny_llama_dir, PROMPTS, reference)
    assert len(keep) >= 15
    prompts = [PROMPTS[i] for i in keep]
    spec = DraftTargetDecodingConfig(speculative_model=str(tiny_llama_dir), max_draft_len=4)
    with LLM(str(tiny_llama_dir), speculative_config=spec) as llm:
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        stats = llm.get_stats()
    reference = [reference[i] for i in keep]
    assert _tokens(outs) == reference
    assert stats["num_draft_tokens"] > 0 and stats["num_accepted_draft_tokens"] == stats["num_draft_tokens"]
    for o in outs:
        m = o.metrics.speculative_decoding
        assert m.total_draft_tokens > 0 and m.acceptance_rate == 1.0
    # Up to 5 tokens per step: far fewer steps than tokens.
    assert stats["num_steps"] < sum(len(t) for t in reference) / 3


def test_ngram_on_a_repetitive_prompt_accepts_drafts(tiny_llama_dir, plain):
    prompt = [11, 12, 13, 14, 15] * 6
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = plain.generate(prompt, params).outputs[0].token_ids
    spec = NGramDecodingConfig(max_draft_len=4, max_matching_ngram_size=4)
    with LLM(str(tiny_llama_dir), speculative_config=spec) as llm:
        out = llm.generate(prompt, params)
    assert out.outputs[0].token_ids == expected
    m = out.metrics.speculative_decoding
    assert m.total_accepted_draft_tokens > 0 and m.total_draft_tokens >= m.total_accepted_draft_tokens


def test_without_async_scheduling_and_chunked_prefill_the_tokens_are_the_same(tiny_llama_dir, draft_dir, reference):
    spec = DraftTargetDecodingConfig(speculative_model=str(draft_dir), max_draft_len=2)
    with LLM(str(tiny_llama_dir), speculative_config=spec, async_scheduling=False, max_num_tokens=16,
             tokens_per_block=8) as llm:
        assert_equal_but_near_ties(_tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)), reference, PROMPTS,
                                   tiny_llama_dir)


@pytest.fixture(scope="module")
def self_drafted(tiny_llama_dir):
    """An LLM whose draft is the target itself (every draft accepted), 4 drafts a step."""
    spec = DraftTargetDecodingConfig(speculative_model=str(tiny_llama_dir), max_draft_len=4)
    with LLM(str(tiny_llama_dir), speculative_config=spec) as llm:
        yield llm


def _first_verified_step(plain, prompt):
    """Plain greedy output of `prompt`, whose tokens 1..4 come from one verified step of self_drafted (the first
    token comes from the prompt step)."""
    return plain.generate(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)).outputs[0]


STOP_PROMPT = [5, 9, 17, 33, 4, 100, 7, 250]


def test_a_stop_token_and_eos_inside_an_accepted_draft_end_the_output_as_plain_decoding(plain, self_drafted):
    full = _first_verified_step(plain, STOP_PROMPT).token_ids
    stop = full[2]  # decided inside the first verified step (drafts 1..4 accepted)
    assert stop not in full[:2]
    for params in (SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop]),
                   SamplingParams(max_tokens=8, temperature=0, end_id=stop)):
        want = plain.generate(STOP_PROMPT, params).outputs[0]
        got = self_drafted.generate(STOP_PROMPT, params).outputs[0]
        assert got.token_ids == want.token_ids == full[:3]
        assert (got.finish_reason, got.stop_reason, got.text) == (want.finish_reason, want.stop_reason, want.text)
        assert got.finish_reason == "stop"


def test_a_stop_string_inside_an_accepted_draft_ends_the_output_as_plain_decoding(plain, self_drafted):
    full = _first_verified_step(plain, STOP_PROMPT)
    word = plain.tokenizer.decode([full.token_ids[3]])
    for include in (False, True):
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop=[word],
                                include_stop_str_in_output=include)
        want = plain.generate(STOP_PROMPT, params).outputs[0]
        got = self_drafted.generate(STOP_PROMPT, params).outputs[0]
        assert got.finish_reason == want.finish_reason == "stop" and got.stop_reason == want.stop_reason == word
        assert (got.token_ids, got.text) == (want.token_ids, want.text)
        assert len(got.token_ids) <= 4  # ended inside the first verified step


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 6])
def test_max_tokens_inside_a_draft_ends_the_output_as_plain_decoding(plain, self_drafted, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    want = plain.generate(STOP_PROMPT, params).outputs[0]
    got = self_drafted.generate(STOP_PROMPT, params).outputs[0]
    assert got.token_ids == want.token_ids and len(got.token_ids) == max_tokens
    assert got.finish_reason == want.finish_reason == "length"


def test_streamed_updates_of_several_tokens_add_up_to_plain_decoding(plain, self_drafted):
    import asyncio

    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    want = plain.generate(STOP_PROMPT, params).outputs[0]

    async def stream():
        updates = []
        async for out in self_drafted.generate_async(STOP_PROMPT, params, streaming=True):
            updates.append((list(out.outputs[0].token_ids_diff), out.outputs[0].text_diff))
        return updates

    updates = asyncio.run(stream())
    assert [t for ids, _ in updates for t in ids] == want.token_ids
    assert "".join(text for _, text in updates) == want.text
    assert max(len(ids) for ids, _ in updates) > 1  # verified steps streamed several tokens at once


def test_logprobs_of_speculated_tokens_equal_plain_decoding(plain, self_drafted):
    params = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True, logprobs=3)
    want = plain.generate(STOP_PROMPT, params).outputs[0]
    got = self_drafted.generate(STOP_PROMPT, params).outputs[0]
    assert got.token_ids == want.token_ids
    assert len(got.logprobs) == len(want.logprobs) == 9
    for g, w in zip(got.logprobs, want.logprobs):
        assert list(g) == list(w)  # the token first, then the top 3
        for t in w:
            assert g[t].logprob == pytest.approx(w[t].logprob, abs=1e-4) and g[t].rank == w[t].rank
    assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-3)


def test_requests_that_do_not_speculate_run_beside_those_that_do(plain, self_drafted):
    """Penalties, n > 1 and min_tokens need every token's state: those requests decode one token a step, in the
    same batches, with plain decoding's results."""
    many = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
            SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, repetition_penalty=1.3),
            SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, min_tokens=6),
            SamplingParams(max_tokens=10, n=2, temperature=0.8, seed=5, ignore_eos=True),
            SamplingParams(max_tokens=10, temperature=0.7, seed=9, ignore_eos=True, logit_bias={7: 3.0})]
    prompts = [STOP_PROMPT] * len(many)
    want = plain.generate(prompts, many, use_tqdm=False)
    got = self_drafted.generate(prompts, many, use_tqdm=False)
    for g, w in zip(got, want):
        assert [o.token_ids for o in g.outputs] == [o.token_ids for o in w.outputs]


def test_aborts_mid_speculation_free_every_block(tiny_llama_dir, draft_dir):
    spec = DraftTargetDecodingConfig(speculative_model=str(draft_dir), max_draft_len=3)
    with LLM(str(tiny_llama_dir), speculative_config=spec, tokens_per_block=4) as llm:
        params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        outs = [llm.generate_async(p, params) for p in PROMPTS]
        deadline = time.monotonic() + 60
        while llm.get_stats()["num_draft_tokens"] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert llm.get_stats()["num_draft_tokens"] > 0  # speculating now
        for o in outs:
            o.abort()
        for o in outs:
            o.result(timeout=60)
        assert all(o.outputs[0].finish_reason == "abort" for o in outs)
        deadline = time.monotonic() + 10
        while llm.get_stats()["num_running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = llm.get_stats()
        assert stats["num_used_blocks"] == 0 and stats["num_running"] == stats["num_waiting"] == 0


def test_beam_search_is_refused_with_speculation(self_drafted):
    with pytest.raises(ValueError, match="use_beam_search"):
        self_drafted.generate(STOP_PROMPT, SamplingParams(max_tokens=4, n=2, use_beam_search=True))


@pytest.mark.parametrize("make,match", [
    (lambda: NGramDecodingConfig(max_draft_len=0), "max_draft_len"),
    (lambda: NGramDecodingConfig(max_draft_len=2.5), "max_draft_len"),
    (lambda: NGramDecodingConfig(max_matching_ngram_size=0), "max_matching_ngram_size"),
    (lambda: DraftTargetDecodingConfig(speculative_model="", max_draft_len=2), "speculative_model"),
    (lambda: EagleDecodingConfig(speculative_model="x", max_draft_len=True), "max_draft_len"),
    (lambda: NGramDecodingConfig(max_draft_length=3), "max_draft_length"),
    (lambda: DraftTargetDecodingConfig(speculative_model="x", draft_len=3), "draft_len"),
])
def test_bad_config_fields_are_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_an_unknown_field_names_the_known_ones():
    with pytest.raises(UnknownArgumentError, match="max_matching_ngram_size"):
        NGramDecodingConfig(max_ngram=3)


def test_llm_refuses_bad_speculative_settings(tiny_llama_dir, tmp_path):
    from tiny_models import make_tiny_llama

    with pytest.raises(ValueError, match="speculative_config"):
        LLM(str(tiny_llama_dir), speculative_config="ngram")
    with pytest.raises(ValueError, match="decoding_type"):
        LLM(str(tiny_llama_dir), speculative_config={"max_draft_len": 3})
    with pytest.raises(ValueError, match="EagleDecodingConfig.*tensor_parallel_size.*= 2.*EAGLE head runs on one"):
        LLM(str(tiny_llama_dir), tensor_parallel_size=2,
            speculative_config=EagleDecodingConfig(speculative_model="an/eagle-head"))
    other = tmp_path / "other-vocab"
    make_tiny_llama(other, num_hidden_layers=1, vocab_size=256)
    with pytest.raises(ValueError, match="speculative_model.*256"):
        LLM(str(tiny_llama_dir), speculative_config=DraftTargetDecodingConfig(str(other)))
    short = tmp_path / "short-draft"
    make_tiny_llama(short, num_hidden_layers=1, max_position_embeddings=64)
    with pytest.raises(ValueError, match="speculative_model.*max_seq_len=256.*64 positions"):
        LLM(str(tiny_llama_dir), speculative_config=DraftTargetDecodingConfig(str(short)))
    with LLM(str(tiny_llama_dir), max_seq_len=64, speculative_config=DraftTargetDecodingConfig(str(short))) as llm:
        assert len(llm.generate([5, 6, 7], SamplingParams(max_tokens=8, temperature=0)).outputs[0].token_ids) > 0


def test_a_dict_config_with_decoding_type_works(tiny_llama_dir, plain):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompt = [11, 12, 13, 14, 15] * 4
    with LLM(str(tiny_llama_dir), speculative_config={"decoding_type": "NGram", "max_draft_len": 2}) as llm:
        assert isinstance(llm.args.speculative_config, NGramDecodingConfig)
        got = llm.generate(prompt, params).outputs[0].token_ids
    assert got == plain.generate(prompt, params).outputs[0].token_ids


@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_lora_requests_speculate_with_their_adapter(tiny_llama_dir, draft_dir, tmp_path, kind):
    """Requests under a LoRA adapter and under the base model, sharing a prompt (their KV must not be shared: each
    adapter hashes its blocks apart, the blocks that accepted drafts fill too), give the tokens of the same LLM
    without speculation. The draft runs the base model: the target's verification keeps the adapter's tokens."""
    from llmapi import LoRARequest
    from lora_adapters import make_peft_adapter

    adapter = LoRARequest("a", 1, str(make_peft_adapter(tiny_llama_dir, tmp_path / "a", 8, ["q_proj", "v_proj"],
                                                        seed=7)))
    prompts = [[11, 12, 13, 14] * 3 + [5], [11, 12, 13, 14] * 3 + [6]] * 2
    loras = [adapter, adapter, None, None]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    kw = dict(enable_lora=True, max_loras=1, max_lora_rank=8, tokens_per_block=4)
    with LLM(str(tiny_llama_dir), **kw) as llm:
        want = _tokens(llm.generate(prompts, params, lora_request=loras, use_tqdm=False))
    spec = _config(kind, draft_dir, None, tiny_llama_dir)
    with LLM(str(tiny_llama_dir), speculative_config=spec, **kw) as llm:
        first = _tokens(llm.generate(prompts, params, lora_request=loras, use_tqdm=False))
        again = _tokens(llm.generate(prompts[::-1], params, lora_request=loras[::-1], use_tqdm=False))  # cache hits
        stats = llm.get_stats()
    assert first == want and again == want[::-1]
    assert want[0] != want[2]  # the adapter changes the output
    assert stats["num_draft_tokens"] > 0 and stats["num_prefix_hit_tokens"] > 0
