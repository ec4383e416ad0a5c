"""RequestOutput as a future and as a stream, fed from another thread as the LLM's response thread does."""

import asyncio
import threading
import time

import pytest

from llmapi.outputs import RequestOutput


def _feed(out, pieces, finish="length", delay=0.001):
    def run():
        for ids, text in pieces:
            time.sleep(delay)
            out._add(ids, text)
        out._add([], "", finish_reason=finish, stop_reason=None)
    t = threading.Thread(target=run)
    t.start()
    return t


PIECES = [([1], "a"), ([2], "é"), ([3, 4], "xy"), ([5], "!")]


def test_result_waits_and_accumulates():
    out = RequestOutput(0, "p", [9])
    t = _feed(out, PIECES)
    res = out.result(timeout=5)
    t.join()
    assert res.outputs[0].token_ids == [1, 2, 3, 4, 5]
    assert res.outputs[0].text == "aéxy!"
    assert res.outputs[0].finish_reason == "length"


def test_result_timeout():
    with pytest.raises(TimeoutError):
        RequestOutput(0, "p", [9]).result(timeout=0.01)


def test_sync_stream_diffs_concatenate():
    out = RequestOutput(0, "p", [9], streaming=True)
    t = _feed(out, PIECES)
    texts, ids = [], []
    for chunk in out:
        texts.append(chunk.outputs[0].text_diff)
        ids.extend(chunk.outputs[0].token_ids_diff)
    t.join()
    assert "".join(texts) == "aéxy!" and ids == [1, 2, 3, 4, 5]


def test_async_stream_and_await_inside_running_loop():
    async def main():
        out = RequestOutput(0, "p", [9], streaming=True)
        t = _feed(out, PIECES)
        texts = [c.outputs[0].text_diff async for c in out]
        t.join()
        other = RequestOutput(1, "p", [9])
        t2 = _feed(other, PIECES, finish="stop")
        done = await other
        t2.join()
        return texts, done
    texts, done = asyncio.run(main())
    assert "".join(texts) == "aéxy!"
    assert done.outputs[0].finish_reason == "stop" and done.outputs[0].text == "aéxy!"


def test_non_streaming_iteration_yields_once():
    out = RequestOutput(0, "p", [9], streaming=False)
    t = _feed(out, PIECES)
    chunks = [c.outputs[0].text_diff for c in out]
    t.join()
    assert chunks == ["aéxy!"]


def test_error_is_raised_by_result_and_stream():
    out = RequestOutput(0, "p", [9])
    out._add([1], "a")
    out._add([], "", finish_reason="error", error=RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        out.result(timeout=1)
    with pytest.raises(RuntimeError, match="boom"):
        list(out)


def test_abort_calls_back_once_running():
    called = []
    out = RequestOutput(3, "p", [9], abort_fn=called.append)
    out.abort()
    out._add([], "", finish_reason="abort")
    out.abort()
    assert called == [3]
