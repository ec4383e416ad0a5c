"""LLM's request API on a tiny model: streaming, aborts, stop rules, seeds, bad input, save and CLI."""

import asyncio
import json
import random
import threading
import time

import pytest

from llmapi import (LLM, ModelNotFoundError, RequestError, SamplingParams, UnsupportedModelError)
from llmapi.engine import cache
from llmapi.cli import main as cli_main

GREEDY = SamplingParams(max_tokens=16, temperature=0)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), tokens_per_block=8, kv_cache_config={"max_tokens": 4096}) as llm:
        yield llm


def _all_blocks_free(llm, timeout=5.0):
    """Every KV block is free or only held by the prefix cache. A stop string aborts its request
    in the executor asynchronously, so the executor may take a moment to release it."""
    deadline = time.monotonic() + timeout
    while True:
        s = llm.get_stats()
        if s["num_used_blocks"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def test_text_prompt_round_trip(llm):
    out = llm.generate("the quick brown fox", GREEDY)
    ids = llm.tokenizer.encode("the quick brown fox")
    assert out.prompt_token_ids == ids
    again = llm.generate([ids], GREEDY, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == out.outputs[0].token_ids
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_streaming_diffs_concatenate_to_final_text(llm):
    async def run():
        pieces, ids = [], []
        params = SamplingParams(max_tokens=24, temperature=0.8, seed=3)
        async for chunk in llm.generate_async("once upon a time", params, streaming=True):
            pieces.append(chunk.outputs[0].text_diff)
            ids.extend(chunk.outputs[0].token_ids_diff)
        return pieces, ids, chunk
    pieces, ids, final = asyncio.run(run())
    assert len(pieces) > 1
    assert "".join(pieces) == final.outputs[0].text
    assert ids == final.outputs[0].token_ids and final.finished


def test_64_concurrent_requests_with_random_aborts_all_settle(llm):
    rng = random.Random(0)

    async def run():
        outs = [llm.generate_async("hello my name is", SamplingParams(
            max_tokens=rng.randint(1, 40), temperature=1.0, seed=i, ignore_eos=True), streaming=True)
            for i in range(64)]
        aborted = set(rng.sample(range(64), 20))
        for i in aborted:
            outs[i].abort()
        results = await asyncio.wait_for(asyncio.gather(*[o.aresult() for o in outs]), 60)
        return results, aborted
    results, aborted = asyncio.run(run())
    for i, r in enumerate(results):
        o = r.outputs[0]
        assert r.finished
        if i in aborted:
            assert o.finish_reason in ("abort", "length")
        else:
            assert o.finish_reason == "length"
    assert sum(r.outputs[0].finish_reason == "abort" for r in results) >= 1
    assert _all_blocks_free(llm)


def test_stop_token_ids_and_stop_strings(llm):
    base = llm.generate("a cache must never", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    ids = base.outputs[0].token_ids
    stop_id = ids[5]
    first = ids.index(stop_id)
    out = llm.generate("a cache must never", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                                           stop_token_ids=[stop_id])).outputs[0]
    assert out.token_ids == ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id

    text = base.outputs[0].text
    stop = text.split()[3]
    cut = text.index(stop)
    for include in (False, True):
        o = llm.generate("a cache must never", SamplingParams(
            max_tokens=16, temperature=0, ignore_eos=True, stop=[stop, "never-seen"],
            include_stop_str_in_output=include)).outputs[0]
        assert o.finish_reason == "stop" and o.stop_reason == stop
        assert o.text == (text[:cut + len(stop)] if include else text[:cut])
    assert _all_blocks_free(llm)


def test_end_id_and_min_tokens(llm):
    # With end_id forced to the token greedy decoding produces first, the request stops at once...
    first = llm.generate([5, 6, 7], SamplingParams(max_tokens=8, temperature=0)).outputs[0].token_ids[0]
    o = llm.generate([5, 6, 7], SamplingParams(max_tokens=8, temperature=0, end_id=first)).outputs[0]
    assert o.token_ids == [first] and o.finish_reason == "stop" and o.stop_reason == first
    # ...unless min_tokens masks it, and then that token never appears among the first min_tokens.
    o = llm.generate([5, 6, 7], SamplingParams(max_tokens=8, temperature=0, end_id=first,
                                               min_tokens=4)).outputs[0]
    assert first not in o.token_ids[:4] and len(o.token_ids) >= 4


def test_seeded_sampling_same_alone_and_in_a_batch(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate("hello my name is", params).outputs[0].token_ids
    others = [SamplingParams(max_tokens=20, temperature=0.7, seed=s, ignore_eos=True) for s in range(6)]
    batch = llm.generate(["the lazy dog"] * 3 + ["hello my name is"] + ["a small"] * 3 + ["once upon"],
                         others[:3] + [params] + others[3:] + [others[0]], use_tqdm=False)
    assert batch[3].outputs[0].token_ids == alone
    assert llm.generate("hello my name is", SamplingParams(
        max_tokens=12, temperature=1.0, seed=99, ignore_eos=True)).outputs[0].token_ids != alone


def test_per_request_errors_leave_llm_usable(llm):
    with pytest.raises(RequestError, match="empty"):
        llm.generate("", GREEDY)
    with pytest.raises(RequestError, match="empty"):
        llm.generate_async([], GREEDY)
    too_long = [5] * 256
    with pytest.raises(RequestError, match="256 tokens; max_seq_len is 256"):
        llm.generate([too_long], GREEDY)
    for ids in ([5, 10**9], [5, -1], [5, True], [5, 6.0], [5, "6"]):
        with pytest.raises(RequestError, match="token ids"):
            llm.generate([ids], GREEDY)
    import enum
    Tok = enum.IntEnum("Tok", {"A": 5, "B": 6})  # an int subclass is an int
    assert llm.generate([Tok.A, Tok.B], GREEDY).outputs[0].token_ids == \
        llm.generate([5, 6], GREEDY).outputs[0].token_ids
    with pytest.raises(ValueError, match="temperature"):
        llm.generate("hello", SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="2 sampling_params for 1 prompts"):
        llm.generate(["hello"], [GREEDY, GREEDY])
    # A bad prompt in a batch enqueues nothing, and the LLM still serves.
    before = llm.get_stats()
    with pytest.raises(RequestError):
        llm.generate(["hello", ""], GREEDY)
    assert llm.get_stats()["num_waiting"] == before["num_waiting"]
    assert llm.generate("hello", GREEDY).outputs[0].finish_reason in ("stop", "length")


def _threads():
    return {t.name for t in threading.enumerate()}


def test_constructor_errors_leave_nothing_running(tmp_path, tiny_llama_dir):
    before = _threads()
    with pytest.raises(ValueError, match="max_batch"):
        LLM(str(tiny_llama_dir), max_batch=4)
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        LLM(str(tmp_path / "no-such-model"))
    bad = tmp_path / "bad-arch"
    bad.mkdir()
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    cfg["model_type"] = "foo"
    (bad / "config.json").write_text(json.dumps(cfg))
    for f in tiny_llama_dir.iterdir():
        if f.name != "config.json":
            (bad / f.name).write_bytes(f.read_bytes())
    with pytest.raises(UnsupportedModelError, match="FooForCausalLM"):
        LLM(str(bad))
    with pytest.raises(ValueError, match="max_seq_len"):
        LLM(str(tiny_llama_dir), max_seq_len=10**6)
    assert _threads() == before
    with LLM(str(tiny_llama_dir)) as again:
        assert again.generate("hello", GREEDY).finished


def test_second_llm_converts_nothing_and_shutdown_is_final(tiny_gpt2_dir):
    with LLM(str(tiny_gpt2_dir)) as first:
        expected = first.generate("hello my name is", GREEDY).outputs[0].token_ids
    builds = cache.stats.builds
    llm = LLM(str(tiny_gpt2_dir), max_batch_size=3, max_num_tokens=64)
    assert not llm.engine_built and cache.stats.builds == builds
    assert llm.generate("hello my name is", GREEDY).outputs[0].token_ids == expected
    llm.shutdown()
    llm.shutdown()
    from llmapi import ExecutorDeadError
    with pytest.raises(ExecutorDeadError):
        llm.generate("hello", GREEDY)


def test_save_and_cli(tmp_path, tiny_llama_dir, capsys):
    saved = tmp_path / "engine"
    with LLM(str(tiny_llama_dir)) as llm:
        llm.save(str(saved))
        expected = llm.generate("the quick brown fox", GREEDY).outputs[0].text
    builds = cache.stats.builds
    with LLM(str(saved)) as again:
        assert not again.engine_built
        assert again.generate("the quick brown fox", GREEDY).outputs[0].text == expected
    assert cache.stats.builds == builds
    assert cli_main(["generate", "--model", str(saved), "--prompt", "the quick brown fox",
                     "--max-tokens", "16", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["text"] == expected
    assert cli_main(["build", "--model", str(tiny_llama_dir), "--device", "cpu",
                     "--output", str(tmp_path / "cli-engine")]) == 0
    assert "found in the cache" in capsys.readouterr().out
    assert (tmp_path / "cli-engine" / "manifest.json").is_file()
    assert cli_main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "missing" in capsys.readouterr().err


def test_dummy_weights_generate_from_the_config_alone(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), load_format="dummy") as dummy, LLM(str(tiny_llama_dir)) as real:
        assert dummy.engine_info.path != real.engine_info.path
        assert not (dummy.engine_info.path / "rank0.safetensors").exists()
        a = dummy.generate("hello my name is", GREEDY).outputs[0].token_ids
        b = real.generate("hello my name is", GREEDY).outputs[0].token_ids
    assert len(a) > 0 and a != b


def test_cli_build_with_quant_matches_llm(tmp_path, capsys):
    from tiny_models import make_tiny_llama
    from tiny_tokenizer import save_tiny_tokenizer

    # A model of its own, so the engines built here stay out of other tests' cache expectations.
    tiny_llama_dir = tmp_path / "model"
    save_tiny_tokenizer(tiny_llama_dir, vocab_size=make_tiny_llama(tiny_llama_dir, seed=7).config.vocab_size)
    out = tmp_path / "int8-engine"
    assert cli_main(["build", "--model", str(tiny_llama_dir), "--device", "cpu", "--quant", "int8_weight_only",
                     "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "W8A16"
    builds = cache.stats.builds
    with LLM(str(tiny_llama_dir), quant="int8_weight_only") as llm:  # the engine the CLI built
        assert not llm.engine_built and cache.stats.builds == builds
    assert cli_main(["build", "--model", str(tiny_llama_dir), "--quant", "int3"]) == 2
    assert "int3" in capsys.readouterr().err


def test_eager_greedy_steps_take_the_model_dtype_argmax(llm, monkeypatch):
    """A step whose rows are all greedy with nothing suppressed picks by first_argmax on the model-dtype logits
    (no float32 copy); any other step goes through sample(). Greedy tokens agree either way."""
    import llmapi.runtime.model_runner as model_runner

    calls = []
    for name in ("first_argmax", "sample"):
        real = getattr(model_runner, name)
        monkeypatch.setattr(model_runner, name,
                            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    greedy = llm.generate("hello my name is", GREEDY).outputs[0].token_ids
    assert calls and set(calls) == {"first_argmax"}
    calls.clear()
    # min_tokens suppresses EOS for a while: those steps must go through sample(), and the tokens agree.
    held = llm.generate("hello my name is", SamplingParams(max_tokens=16, temperature=0, min_tokens=16,
                                                           ignore_eos=False)).outputs[0].token_ids
    assert "sample" in calls
    eos = set(llm.eos_token_ids)
    agree = next((i for i, t in enumerate(greedy) if t in eos), len(greedy))
    assert held[:agree] == greedy[:agree]
