"""LLM(engine_process=True): the engine runs as the one rank of an MPI job the caller's process spawns (as a server
wants it: the caller's interpreter lock is its own). The tokens and logprobs are one in-process rank's, a request
that breaks the executor's rules is refused at generate as in-process (checked in the caller's process, since the
requests are sent to rank 0 without a round trip), rank 0 ends a request it refuses after all with an "error"
response, and shutdown leaves no process. Every decoding setting through it: tests/test_multi_rank_decoding.py."""

import json
import os
import random

import pytest

from llmapi import LLM, KvCacheConfig, RequestError, SamplingParams
from processes import running, wait_until

LENGTHS = [1, 5, 17, 33, 2, 9]
# A cache of 16 blocks: a prompt needing more is refused by the executor's rules alone (the KV cache's size is the
# executor's to know).
SETTINGS = dict(tokens_per_block=8, kv_cache_config=KvCacheConfig(max_tokens=128))


def _prompts(model_dir, seed=1):
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in LENGTHS]


def test_engine_process_decodes_as_in_process(tiny_llama_dir):
    prompts = _prompts(tiny_llama_dir)
    params = [SamplingParams(max_tokens=12, temperature=0, logprobs=2 if i % 2 else None) for i in range(6)]
    with LLM(str(tiny_llama_dir), **SETTINGS) as llm:
        want = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        with pytest.raises(RequestError, match="the prompt needs 32 KV blocks of 8 tokens; the cache has 16") as e:
            llm.generate([[5] * 250], SamplingParams(max_tokens=2), use_tqdm=False)
        refused = str(e.value)
    with LLM(str(tiny_llama_dir), engine_process=True, **SETTINGS) as llm:
        assert llm.world_size == 1 and llm._runner is None
        rank0 = llm._executor.rank_pids[0]
        assert rank0 != os.getpid() and running(rank0)
        pids = [llm._executor.job.proc.pid] + llm._executor.rank_pids
        got = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        streamed = []
        for chunk in llm.generate_async(prompts[2], params[0], streaming=True):
            streamed.extend(chunk.outputs[0].token_ids[len(streamed):])
        # The executor's rules are checked here: the request is refused at the call as in-process, the LLM serves on.
        with pytest.raises(RequestError) as e:
            llm.generate([[5] * 250], SamplingParams(max_tokens=2), use_tqdm=False)
        assert str(e.value) == refused
        again = llm.generate(prompts[:1], params[0], use_tqdm=False)[0].outputs[0]
        assert llm.get_stats()["num_running"] == 0
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert len({tuple(w.token_ids) for w in want}) >= 3  # the prompts lead to different outputs
    assert streamed == want[2].token_ids and again.token_ids == want[0].token_ids
    for w, g in zip(want, got):
        if w.logprobs:
            assert [list(d) for d in g.logprobs] == [list(d) for d in w.logprobs]
            assert [d[t].logprob for t, d in zip(g.token_ids, g.logprobs)] == pytest.approx(
                [d[t].logprob for t, d in zip(w.token_ids, w.logprobs)], abs=1e-5)
    assert wait_until(lambda: not any(running(p) for p in pids), 10), [p for p in pids if running(p)]


def test_engine_process_is_checked():
    from llmapi.config import validated_kwargs
    from llmapi.speculative.config import EagleDecodingConfig

    with pytest.raises(ValueError, match="engine_process='yes' is invalid: must be True or False"):
        validated_kwargs(dict(model="m", engine_process="yes"))
    with pytest.raises(ValueError, match="EagleDecodingConfig.*engine_process=True.*EAGLE head runs on one rank"):
        validated_kwargs(dict(model="m", engine_process=True,
                              speculative_config=EagleDecodingConfig(speculative_model="an/eagle-head")))


class _Conn:
    """Rank 0's end of the channel: the user's messages in, what rank 0 sends recorded."""

    def __init__(self, messages):
        self.messages, self.sent = list(messages), []

    def recv(self):
        if not self.messages:
            raise EOFError
        return self.messages.pop(0)


class _Records:
    def __init__(self):
        self.opened, self.popped = [], []

    def open(self, rid):
        self.opened.append(rid)

    def pop(self, rid):
        self.popped.append(rid)


class _Runner:
    def __init__(self):
        self.processors, self.records = {}, _Records()


class _DeadExecutor:
    def __init__(self):
        self.enqueued = []

    def enqueue_many(self, requests):
        from llmapi.errors import ExecutorDeadError

        self.enqueued.append([r.request_id for r in requests])
        raise ExecutorDeadError("the executor is dead: a step failed")


def test_rank0_ends_the_requests_it_refuses_with_error_responses():
    from llmapi import _core
    from llmapi.distributed import channel
    from llmapi.distributed.server import _serve_calls

    requests = [_core.Request(7, [1, 2, 3], 4, prompt_logprobs=1), _core.Request(8, [4, 5], 4)]
    fields = [channel.request_fields(r) for r in requests]
    conn, executor, runner = _Conn([("enqueue_many", None, fields, {8: b"processor"})]), _DeadExecutor(), _Runner()
    _serve_calls(conn, executor, runner, conn.sent.append)  # returns when the user's end closes
    assert executor.enqueued == [[7, 8]]
    # Registered for the step, then let go: nothing of theirs stays on rank 0.
    assert runner.records.opened == [7] and runner.records.popped == [7, 8] and runner.processors == {}
    (kind, responses, records), = conn.sent
    assert kind == "responses" and records == {}
    for r, rid, prompt in zip(responses, (7, 8), (3, 2)):
        assert (r.request_id, r.seq_index, r.token_ids) == (rid, 0, [])
        assert r.finished and r.request_finished and r.finish_reason == "error"
        assert r.error == "ExecutorDeadError: the executor is dead: a step failed"
        assert r.num_prompt_tokens == prompt and r.num_top_logprobs == -1


def test_responses_cross_as_bytes_field_for_field():
    # A step's responses as rank 0 sends them (one byte string) read back equal in every field: tokens, logprobs
    # with their ranks and top ids, the finish, an error's text, the counters.
    from llmapi import _core
    from llmapi._core import Executor, ExecutorConfig, Request
    from llmapi.distributed.channel import RemoteResponse

    import numpy as np

    from llmapi.runtime.decode import StepOutput

    class Runner:  # samples token 7 with logprob -0.5 (rank 1), top-2 7, 9 (-0.5, -1.5); request 2 fails
        def submit(self, batch):
            r = int(batch.num_requests)
            rows = list(np.asarray(batch.request_ids))
            return StepOutput(tokens=np.full((r, 1), 7, np.int32), logprobs=np.full((r, 1), -0.5, np.float32),
                              ranks=np.ones((r, 1), np.int32), top_ids=np.tile(np.int32([7, 9]), (r, 1)),
                              top_logprobs=np.tile(np.float32([-0.5, -1.5]), (r, 1)),
                              errors={rows.index(2): "ValueError: row 2 fails"} if 2 in rows else None)

        def collect(self, handle):
            return handle

    with pytest.raises(ValueError, match="cut short"):
        _core.decode_responses(b"\x01\x00")
    config = ExecutorConfig(max_batch_size=4, max_num_tokens=32, max_seq_len=16, tokens_per_block=4, num_blocks=16)
    ex = Executor(config, Runner())
    try:
        ex.enqueue_many([Request(1, [3, 4, 5], 3, ignore_eos=True, logprobs=2), Request(2, [3], 2, ignore_eos=True)])
        responses = []
        while sum(r.request_finished for r in responses) < 2:
            responses += ex.await_responses(5.0)
    finally:
        ex.shutdown()
    data = _core.encode_responses(responses)
    back = _core.decode_responses(data)
    fields = RemoteResponse._fields
    assert [tuple(getattr(r, f) for f in fields) for r in back] == [tuple(getattr(r, f) for f in fields)
                                                                    for r in responses]
    first = next(r for r in back if r.request_id == 1 and r.token_ids)
    assert first.token_ids == [7] and first.logprobs == [-0.5] and first.ranks == [1]
    assert first.top_ids == [7, 9] and first.top_logprobs == [-0.5, -1.5] and first.num_top_logprobs == 2
    assert sorted((r.request_id, r.finish_reason, r.error) for r in back if r.finished) == [
        (1, "length", ""), (2, "error", "ValueError: row 2 fails")]
    with pytest.raises(ValueError, match="bytes past their last response"):
        _core.decode_responses(data + b"\x00")
