"""`llmapi serve --tensor-parallel-size 2` (two CPU ranks) and `llmapi serve --engine-process` (one rank in a process
of its own) answer as one rank in the server's process does; SIGTERM mid-stream drains: a short stream finishes, a
long one ends with "abort" at the drain timeout, the process exits and no rank is left."""

import asyncio
import json
import time

import httpx
import openai
import pytest
from processes import running, wait_until
from serve_process import ServerProcess, descendants

from llmapi import LLM, SamplingParams

DRAIN_S = 2.0
PROMPTS = ["the quick brown fox", "once upon a time there was", "hello my name is"]


@pytest.fixture(scope="module")
def long_llama_dir(tmp_path_factory):
    """The tiny Llama with room for streams longer than the drain timeout."""
    from tiny_models import make_tiny_llama
    from tiny_tokenizer import save_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama-long")
    model = make_tiny_llama(path, max_position_embeddings=8192)
    save_tiny_tokenizer(path, vocab_size=model.config.vocab_size)
    return path


@pytest.fixture(scope="module")
def one_rank(long_llama_dir):
    with LLM(str(long_llama_dir), tokens_per_block=8) as llm:
        yield llm


@pytest.fixture(scope="module", params=[("--tensor-parallel-size", 2), ("--engine-process",)],
                ids=["tp2", "engine-process"])
def spawned_server(request, one_rank, long_llama_dir, tmp_path_factory):
    """Two CPU ranks, or one rank in a process of its own (LLM(engine_process=True)): either way an MPI job that
    the server's process spawned."""
    proc = ServerProcess(long_llama_dir, "--device", "cpu", *request.param, "--tokens-per-block", 8,
                         "--served-model-name", "tiny", "--drain-timeout", DRAIN_S,
                         log=tmp_path_factory.mktemp("serve-ranks") / "server.log")
    yield proc
    proc.stop()


def test_spawned_ranks_answer_as_one_rank(spawned_server, one_rank):
    client = openai.OpenAI(base_url=f"{spawned_server.url}/v1", api_key="none", max_retries=0)
    want = one_rank.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)
    got = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.text for c in got.choices] == [w.outputs[0].text for w in want]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True))
    assert streamed == want[0].outputs[0].text
    lp_want = one_rank.generate(PROMPTS[1], SamplingParams(max_tokens=5, temperature=0, logprobs=2), use_tqdm=False)
    lp = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=5, temperature=0, logprobs=2)
    got_lps = lp.choices[0].logprobs.token_logprobs
    want_lps = [e[t].logprob for t, e in zip(lp_want.outputs[0].token_ids, lp_want.outputs[0].logprobs)]
    assert got_lps == pytest.approx(want_lps, abs=1e-4)


async def _stream(url: str, max_tokens: int, started: asyncio.Event) -> dict:
    body = {"model": "tiny", "prompt": "once upon a time", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    text, finish, usage, done = "", None, None, False
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[len("data: "):])
                    usage = event.get("usage") or usage
                    for c in event["choices"]:
                        text += c["text"]
                        finish = c["finish_reason"] or finish
                        started.set()
    return {"finish": finish, "usage": usage, "done": done}


def test_sigterm_mid_stream_drains_then_exits_leaving_no_rank(spawned_server):
    proc = spawned_server
    ranks = descendants(proc.proc.pid)
    assert len(ranks) >= 2  # mpiexec and its ranks

    async def run():
        long_started, short_started = asyncio.Event(), asyncio.Event()
        long = asyncio.ensure_future(_stream(proc.url, 8000, long_started))
        short = asyncio.ensure_future(_stream(proc.url, 40, short_started))
        await long_started.wait()
        await short_started.wait()
        proc.terminate()
        signalled = time.monotonic()
        await asyncio.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(f"{proc.url}/health", timeout=2)
        return await long, await short, signalled

    long, short, signalled = asyncio.run(run())
    assert short == {"finish": "length", "done": True, "usage": short["usage"]}
    assert short["usage"]["completion_tokens"] == 40  # in flight at SIGTERM, finished in the drain
    assert long["finish"] == "abort" and long["done"]  # cut at the drain timeout, ended cleanly
    assert long["usage"]["completion_tokens"] < 8000
    assert wait_until(lambda: proc.proc.poll() is not None, DRAIN_S + 20), proc.output()
    exited = time.monotonic() - signalled
    assert proc.proc.returncode == 0, proc.output()
    assert wait_until(lambda: not any(running(p) for p in ranks), 10), [p for p in ranks if running(p)]
    print(f"\nSIGTERM to exit: {exited:.1f} s (drain timeout {DRAIN_S} s), {len(ranks)} rank processes gone")
    assert exited < DRAIN_S + 15
