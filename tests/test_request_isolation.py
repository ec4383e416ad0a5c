"""One bad request fails alone: 8 concurrent requests, one of them faulty (a logits processor that raises,
returns the wrong shape, returns NaN or calls sys.exit; out-of-vocabulary end_id / stop_token_ids with
min_tokens; an internal core error forced on its row). The 7 others get the tokens they get alone, the
faulty one a typed error naming the problem, and the LLM serves afterwards."""

import asyncio
import json
import random
import sys

import numpy as np
import pytest
import torch

from llmapi import LLM, ExecutorError, LLMAPIError, LogitsProcessorError, SamplingParams

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), tokens_per_block=4) as llm:
        yield llm


@pytest.fixture(scope="module")
def vocab(tiny_llama_dir):
    return json.loads((tiny_llama_dir / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def bystanders(llm, vocab):
    """Seven (prompt, params) pairs of mixed lengths and decoding settings, with the tokens each gets alone."""
    rng = random.Random(5)
    cases = []
    for i, n in enumerate([3, 9, 17, 5, 30, 2, 12]):
        prompt = [rng.randrange(3, vocab) for _ in range(n)]
        if i % 3 == 0:
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
        elif i % 3 == 1:
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_k=20, seed=100 + i)
        else:  # a bystander that also runs a (well-behaved) processor in the same decoding step
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logits_processor=_ban_token_7)
        alone = llm.generate(prompt, params, use_tqdm=False).outputs[0].token_ids
        cases.append((prompt, params, alone))
    return cases


def _ban_token_7(output_ids, logits):
    logits[7] = float("-inf")
    return logits


def _raises(output_ids, logits):
    raise RuntimeError("processor bug")


def _wrong_shape(output_ids, logits):
    return logits[:10]


def _nan(output_ids, logits):
    return torch.full_like(logits, float("nan"))


def _exits(output_ids, logits):
    sys.exit(3)


def _corrupt_row(llm, target_request_id: int, token: int):
    """Make the in-process runner answer `token` on the target request's rows: the core must fail that request."""
    runner = llm._local
    submit, collect = runner.submit, runner.collect
    rows = {}

    def submit_spy(batch):
        handle = submit(batch)
        ids = np.asarray(batch.request_ids)
        rows[id(handle)] = np.nonzero(ids == target_request_id)[0]
        return handle

    def collect_spy(handle):
        out = collect(handle)
        hit = rows.pop(id(handle), ())
        if len(hit):
            if hasattr(out, "tokens"):
                out.tokens[hit, 0] = token
            else:
                out[hit] = token
        return out

    runner.submit, runner.collect = submit_spy, collect_spy
    return lambda: (delattr(runner, "submit"), delattr(runner, "collect"))


FAULTS = {
    "processor raises": (dict(logits_processor=_raises), LogitsProcessorError, "RuntimeError: processor bug"),
    "processor wrong shape": (dict(logits_processor=_wrong_shape), LogitsProcessorError, "shape [10]"),
    "processor NaN": (dict(logits_processor=_nan), LogitsProcessorError, "NaN"),
    "processor sys.exit": (dict(logits_processor=_exits), LogitsProcessorError, "SystemExit"),
    "end_id = vocab with min_tokens": (dict(end_id="VOCAB", min_tokens=3), ValueError, "end_id"),
    "stop id beyond vocab with min_tokens": (dict(stop_token_ids=[5, "VOCAB+3"], min_tokens=3), ValueError,
                                             "stop_token_ids"),
    "internal core error": (dict(), ExecutorError, "outside the vocabulary"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_faulty_request_fails_alone(llm, vocab, bystanders, fault):
    overrides, error_type, message = FAULTS[fault]
    fill = {"VOCAB": vocab, "VOCAB+3": vocab + 3}
    overrides = {k: ([fill.get(x, x) for x in v] if isinstance(v, list) else fill.get(v, v))
                 for k, v in overrides.items()}
    faulty_params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, **overrides)
    restore = None

    async def run():
        nonlocal restore
        outs, faulty, early = [], None, None
        for i, (prompt, params, _) in enumerate(bystanders):
            outs.append(llm.generate_async(prompt, params))
            if i == 3:  # the faulty request in the middle of the batch
                try:
                    faulty = llm.generate_async([11, 12, 13, 14], faulty_params)
                except LLMAPIError as e:
                    early = e
                except ValueError as e:  # refused when prepared: nothing of it ran
                    early = e
                if fault == "internal core error" and faulty is not None:
                    restore = _corrupt_row(llm, faulty.request_id, vocab + 5)
        results = await asyncio.gather(*outs, return_exceptions=True)
        if early is None:
            try:
                await faulty
            except Exception as e:
                early = e
        return results, early

    try:
        results, error = asyncio.run(run())
    finally:
        if restore is not None:
            restore()
    for (prompt, params, alone), got in zip(bystanders, results):
        assert not isinstance(got, BaseException), f"a bystander failed: {got!r}"
        assert got.outputs[0].token_ids == alone
    assert isinstance(error, error_type), repr(error)
    assert message in str(error)
    # The LLM still serves, and every KV block of the failed request came back.
    prompt, params, alone = bystanders[0]
    assert llm.generate(prompt, params, use_tqdm=False).outputs[0].token_ids == alone
    stats = llm.get_stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert stats["num_used_blocks"] == 0


def test_processor_error_in_beam_search_fails_its_group_only(llm, bystanders):
    prompt, params, alone = bystanders[0]
    beams = SamplingParams(max_tokens=MAX_TOKENS, use_beam_search=True, best_of=3, n=2, logits_processor=_raises)

    async def run():
        good = llm.generate_async(prompt, params)
        bad = llm.generate_async([20, 21, 22], beams)
        return await asyncio.gather(good, bad, return_exceptions=True)

    good, bad = asyncio.run(run())
    assert good.outputs[0].token_ids == alone
    assert isinstance(bad, LogitsProcessorError)
    assert llm.get_stats()["num_used_blocks"] == 0


def test_beam_search_without_width_is_greedy(llm, bystanders):
    prompt, _, _ = bystanders[1]
    greedy = llm.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), use_tqdm=False)
    beam = llm.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, use_beam_search=True), use_tqdm=False)
    assert beam.outputs[0].token_ids == greedy.outputs[0].token_ids
    assert len(beam.outputs) == 1
