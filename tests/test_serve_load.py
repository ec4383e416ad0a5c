"""The server under load, in this process (so that its threads, tasks and KV blocks can be counted): 300
concurrent streams with a fifth of the clients leaving mid-stream; disconnects abort; backpressure answers 503."""

import asyncio
import json
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmapi import LLM
from llmapi.serve import ServeConfig, create_app
from llmapi.serve.server import ServerThread

NUM_REQUESTS, DISCONNECT_EVERY, MAX_TOKENS = 300, 5, 32


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), tokens_per_block=8, kv_cache_config={"max_tokens": 16384}) as llm:
        yield llm


@pytest.fixture(scope="module")
def served(llm):
    app = create_app(llm, ServeConfig(served_model_name="tiny"))
    thread = ServerThread(app)
    with thread as url:
        yield url, app.state.serve, thread.loop


def _metrics(url) -> dict:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            samples[(s.name, s.labels.get("finished_reason"))] = s.value
    return samples


def _loop_tasks(server_thread_loop) -> int:
    async def count():
        return len(asyncio.all_tasks())
    return asyncio.run_coroutine_threadsafe(count(), server_thread_loop).result(5)


def _settled(state, llm, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = llm.get_stats()
        if not state.live and s["num_used_blocks"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0:
            return True
        time.sleep(0.02)
    return False


async def _one(client, i: int) -> dict:
    """One streamed completion; every DISCONNECT_EVERY-th client leaves after its second chunk."""
    leave = i % DISCONNECT_EVERY == 0
    body = {"model": "tiny", "prompt": "once upon a time", "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "temperature": 1.0, "seed": i, "stream": True, "stream_options": {"include_usage": True}}
    chunks, usage, finish, done = 0, None, None, False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code} {await r.aread()}"}
        async for line in r.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[len("data: "):])
            if "error" in event:
                return {"error": event["error"]}
            if event.get("usage"):
                usage = event["usage"]
            for c in event["choices"]:
                chunks += 1
                finish = c["finish_reason"] or finish
            if leave and chunks == 2:
                return {"left": True}  # leaving the block closes the connection mid-stream
    return {"left": False, "usage": usage, "finish": finish, "done": done}


def test_300_streams_with_disconnects_leave_nothing_behind(served, llm):
    url, state, loop = served
    _metrics(url)  # the metrics route's worker thread exists before the baseline
    assert httpx.get(f"{url}/health").status_code == 200
    threads_before = set(threading.enumerate())
    tasks_before = _loop_tasks(loop)
    before = _metrics(url)

    async def run():
        limits = httpx.Limits(max_connections=NUM_REQUESTS + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:
            return await asyncio.gather(*(_one(client, i) for i in range(NUM_REQUESTS)), return_exceptions=True)

    start = time.perf_counter()
    results = asyncio.run(run())
    wall = time.perf_counter() - start
    errors = [r for r in results if isinstance(r, BaseException) or "error" in r]
    left = [r for r in results if not isinstance(r, BaseException) and r.get("left")]
    finished = [r for r in results if not isinstance(r, BaseException) and r.get("left") is False]
    assert not errors, errors[:3]
    assert len(left) == NUM_REQUESTS // DISCONNECT_EVERY and len(finished) == NUM_REQUESTS - len(left)
    for r in finished:
        assert r["done"] and r["finish"] == "length" and r["usage"]["completion_tokens"] == MAX_TOKENS, r

    assert _settled(state, llm), (llm.get_stats(), len(state.live))
    after = _metrics(url)
    assert after[("llmapi:kv_cache_used_blocks", None)] == 0
    assert after[("llmapi:num_requests_pending", None)] == 0 and after[("llmapi:num_requests_running", None)] == 0
    count = lambda m, reason: m.get(("llmapi:request_success_total", reason), 0)  # noqa: E731
    aborted = count(after, "abort") - count(before, "abort")
    completed = count(after, "length") - count(before, "length")
    print(f"\nserve load: {NUM_REQUESTS} streams of {MAX_TOKENS} tokens, {len(left)} clients left mid-stream "
          f"({int(aborted)} aborted in the engine), {len(finished)} finished in full, {len(errors)} errors, "
          f"wall {wall:.1f} s; KV blocks used after: {int(after[('llmapi:kv_cache_used_blocks', None)])}")
    assert aborted + completed == NUM_REQUESTS and completed >= len(finished) and aborted > 0
    assert httpx.get(f"{url}/health").status_code == 200
    deadline = time.monotonic() + 5
    while _loop_tasks(loop) != tasks_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _loop_tasks(loop) == tasks_before
    assert set(threading.enumerate()) == threads_before


def test_disconnect_aborts_in_the_engine(served, llm):
    url, state, _ = served
    before = _metrics(url)

    async def leave_stream():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            body = {"prompt": "hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        return

    async def leave_waiting():
        async with httpx.AsyncClient(base_url=url, timeout=0.15) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 200, "ignore_eos": True})

    asyncio.run(leave_stream())
    asyncio.run(leave_waiting())
    assert _settled(state, llm)
    after = _metrics(url)
    key = ("llmapi:request_success_total", "abort")
    assert after[key] - before.get(key, 0) == 2
    gen = ("llmapi:generation_tokens_total", None)
    assert after[gen] - before[gen] < 2 * 200  # both stopped early


def test_backpressure_answers_503_with_retry_after(llm):
    app = create_app(llm, ServeConfig(served_model_name="tiny", max_pending=2))
    with ServerThread(app) as url:
        async def run():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                body = {"prompt": "hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
                async with client.stream("POST", "/v1/completions", json=body) as a, \
                        client.stream("POST", "/v1/completions", json=body) as b:
                    assert a.status_code == b.status_code == 200
                    r = await client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
                    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
                    assert r.json()["error"]["type"] == "server_overloaded"
                # The two streams closed: once the server has seen them go, it admits again.
                assert await asyncio.to_thread(_settled, app.state.serve, llm)
                r = await client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
                assert r.status_code == 200
        asyncio.run(run())
        assert _settled(app.state.serve, llm)


@pytest.mark.parametrize("processes", [1, 2])
def test_bench_drives_the_server(served, llm, tmp_path, capsys, processes):
    # From one client, or from two client processes (four requests each, two in flight each).
    from llmapi.cli import main

    url, state, _ = served
    out = tmp_path / "bench.json"
    rc = main(["bench", "--backend", "openai", "--base-url", f"{url}/v1", "--vocab-size", "320", "--isl", "6",
               "--osl", "5", "--num-requests", "8", "--concurrency", "3", "--warmup", "2", "--json", str(out),
               "--client-processes", str(processes)])
    assert rc == 0
    result = json.loads(out.read_text())
    r = result["openai"]
    assert result["client_processes"] == processes
    assert result["model"] == "tiny" and r["requests"] == 8 and r["output_tokens"] == 40  # ignore_eos: 8 x 5
    assert 0 < r["ttft_ms_p50"] <= r["ttft_ms_p99"] <= 1e3 * r["wall_s"] and 0 < r["tpot_ms_p50"] <= r["tpot_ms_p99"]
    assert "output tok/s" in capsys.readouterr().out
    # The client reads a stream's last event before the server's handler has let its request go: wait for that.
    assert _settled(state, llm)


def test_health_is_503_once_the_llm_is_dead(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), tokens_per_block=8, kv_cache_config={"max_tokens": 1024})
    with ServerThread(create_app(llm, ServeConfig(served_model_name="tiny"))) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        llm.shutdown()
        assert httpx.get(f"{url}/health").status_code == 503
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(f"{url}/version").status_code == 200


def test_stream_interval_sends_fewer_larger_chunks(llm):
    app = create_app(llm, ServeConfig(served_model_name="tiny", stream_interval=0.05))
    body = {"prompt": "once upon a time", "max_tokens": 40, "ignore_eos": True, "temperature": 0}
    with ServerThread(app) as url:
        whole = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts = [e["choices"][0]["text"] for e in events]
    assert "".join(texts) == whole
    assert len([t for t in texts if t]) < 40  # a chunk carries the tokens made while its stream waited
