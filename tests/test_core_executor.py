"""Executor end to end with a fake runner: stop rules, suppression, abort, runner failures, shutdown."""

import gc
import threading
import time

import numpy as np
import pytest

from llmapi._core import Executor, ExecutorConfig, Request
from llmapi.errors import ExecutorDeadError, RequestError

BATCH_FIELDS = ("request_ids", "input_ids", "positions", "query_lens", "context_lens",
                "block_tables", "slot_mapping", "do_sample", "temperature", "top_k", "top_p",
                "seeds", "output_index", "suppress_offsets", "suppress_ids")


class FakeRunner:
    """Samples (last input token of each row + 1) % vocab, stepping over the row's suppressed ids."""

    def __init__(self, vocab=100, honour_suppress=True):
        self.vocab = vocab
        self.honour_suppress = honour_suppress
        self.batches = []
        self.outstanding = 0
        self.max_outstanding = 0

    def submit(self, batch):
        self.batches.append({name: np.array(getattr(batch, name)) for name in BATCH_FIELDS})
        self.outstanding += 1
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        ends = np.cumsum(batch.query_lens) - 1
        off = batch.suppress_offsets
        tokens = []
        for r, end in enumerate(ends):
            token = (int(batch.input_ids[end]) + 1) % self.vocab
            suppressed = set(batch.suppress_ids[off[r]:off[r + 1]].tolist())
            while self.honour_suppress and token in suppressed:
                token = (token + 1) % self.vocab
            tokens.append(token)
        return np.array(tokens, dtype=np.int32)

    def collect(self, handle):
        self.outstanding -= 1
        return handle


class GatedRunner(FakeRunner):
    """Holds its first submit until the test opens the gate, so the test can act mid-step."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def submit(self, batch):
        self.entered.set()
        assert self.gate.wait(10)
        return super().submit(batch)


def make_executor(runner, **overrides):
    config = dict(max_batch_size=8, max_num_tokens=64, max_seq_len=64, tokens_per_block=4,
                  num_blocks=64)
    config.update(overrides)
    return Executor(ExecutorConfig(**config), runner)


def run_until_finished(executor, ids, timeout=10.0):
    """Collects responses until every id in `ids` has finished; returns id -> [Response]."""
    got = {i: [] for i in ids}
    pending = set(ids)
    deadline = time.monotonic() + timeout
    while pending:
        assert time.monotonic() < deadline, f"requests {sorted(pending)} did not finish"
        for r in executor.await_responses(0.5):
            got[r.request_id].append(r)
            if r.finished:
                pending.discard(r.request_id)
    return got


def tokens_of(responses):
    return [t for r in responses for t in r.token_ids]


def generate(request, runner=None, **config):
    runner = runner or FakeRunner()
    ex = make_executor(runner, **config)
    try:
        ex.enqueue(request)
        (responses,) = run_until_finished(ex, [request.request_id]).values()
    finally:
        ex.shutdown()
    return responses, runner


def test_streams_one_token_per_step_until_max_tokens():
    responses, runner = generate(Request(1, [1, 2, 3], max_tokens=4))
    assert [r.token_ids for r in responses] == [[4], [5], [6], [7]]
    assert [r.finished for r in responses] == [False, False, False, True]
    last = responses[-1]
    assert (last.finish_reason, last.stop_reason, last.error) == ("length", -1, "")
    assert (last.num_prompt_tokens, last.num_cached_tokens) == (3, 0)
    b = runner.batches
    assert [x["input_ids"].tolist() for x in b] == [[1, 2, 3], [4], [5], [6]]
    assert [x["positions"].tolist() for x in b] == [[0, 1, 2], [3], [4], [5]]
    assert [x["output_index"].tolist() for x in b] == [[0], [1], [2], [3]]
    assert [x["slot_mapping"].tolist() for x in b] == [[0, 1, 2], [3], [4], [5]]
    assert [x["block_tables"].tolist() for x in b] == [[[0]], [[0]], [[0, 1]], [[0, 1]]]


def test_batch_dtypes_are_the_spec_and_read_only():
    seen = {}

    class Inspect(FakeRunner):
        def submit(self, batch):
            for name in BATCH_FIELDS:
                arr = getattr(batch, name)
                seen[name] = (arr.dtype, arr.ndim, arr.flags.writeable)
            seen["ints"] = (batch.num_tokens, batch.num_requests, batch.tokens_per_block)
            return super().submit(batch)

    generate(Request(1, [1, 2, 3], max_tokens=1), runner=Inspect())
    assert {k: str(v[0]) for k, v in seen.items() if k != "ints"} == {
        "request_ids": "uint64", "input_ids": "int32", "positions": "int32",
        "query_lens": "int32", "context_lens": "int32", "block_tables": "int32",
        "slot_mapping": "int64", "do_sample": "int8", "temperature": "float32", "top_k": "int32",
        "top_p": "float32", "seeds": "int64", "output_index": "int32",
        "suppress_offsets": "int32", "suppress_ids": "int32"}
    assert seen["block_tables"][1] == 2
    assert not any(v[2] for k, v in seen.items() if k != "ints")
    assert seen["ints"] == (3, 1, 4)


def test_stop_token_ids_and_eos():
    responses, _ = generate(Request(1, [1, 2, 3], max_tokens=10, stop_token_ids=[6]))
    assert tokens_of(responses) == [4, 5, 6]
    assert (responses[-1].finish_reason, responses[-1].stop_reason) == ("stop", 6)
    responses, _ = generate(Request(2, [1, 2, 3], max_tokens=10, eos_token_ids=[9, 5]))
    assert tokens_of(responses) == [4, 5]
    assert (responses[-1].finish_reason, responses[-1].stop_reason) == ("stop", 5)
    responses, _ = generate(Request(3, [1, 2, 3], max_tokens=4, eos_token_ids=[5], ignore_eos=True))
    assert tokens_of(responses) == [4, 5, 6, 7]
    assert (responses[-1].finish_reason, responses[-1].stop_reason) == ("length", -1)


def test_min_tokens_suppresses_eos_and_stop_ids_in_the_batch():
    runner = FakeRunner(vocab=10)
    req = Request(1, [3], max_tokens=20, min_tokens=2, eos_token_ids=[5], stop_token_ids=[9])
    responses, _ = generate(req, runner=runner)
    # Step 2 would sample 5 but it is suppressed (1 token generated < 2): 6 instead.
    assert tokens_of(responses) == [4, 6, 7, 8, 9]
    assert (responses[-1].finish_reason, responses[-1].stop_reason) == ("stop", 9)
    assert [b["suppress_ids"].tolist() for b in runner.batches] == [[5, 9], [5, 9], [], [], []]
    assert [b["suppress_offsets"].tolist() for b in runner.batches] == [
        [0, 2], [0, 2], [0, 0], [0, 0], [0, 0]]


def test_stop_rules_ignore_stop_ids_before_min_tokens():
    runner = FakeRunner(honour_suppress=False)
    responses, _ = generate(Request(1, [3], max_tokens=3, min_tokens=2, eos_token_ids=[4]),
                            runner=runner)
    assert tokens_of(responses) == [4, 5, 6]
    assert responses[-1].finish_reason == "length"


def test_max_seq_len_finishes_with_length():
    responses, _ = generate(Request(1, [1, 2, 3, 4, 5], max_tokens=100), max_seq_len=8)
    assert tokens_of(responses) == [6, 7, 8]
    assert responses[-1].finish_reason == "length"


def test_chunked_prefill_samples_only_on_the_last_chunk():
    responses, runner = generate(Request(1, list(range(10)), max_tokens=2), max_num_tokens=4)
    assert tokens_of(responses) == [10, 11]
    b = runner.batches
    assert [x["input_ids"].tolist() for x in b] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10]]
    assert [x["do_sample"].tolist() for x in b] == [[0], [0], [1], [1]]
    assert [x["context_lens"].tolist() for x in b] == [[4], [8], [10], [11]]
    assert [x["output_index"].tolist() for x in b] == [[0], [0], [0], [1]]


def test_prefix_hits_and_stats():
    ex = make_executor(FakeRunner(), num_blocks=16)
    try:
        ex.enqueue(Request(1, [1, 2, 3, 4, 5, 6, 7, 8], max_tokens=4))
        run_until_finished(ex, [1])
        # 11 tokens computed: blocks [1..4] and [5..8] are full and cached; all blocks are free.
        assert ex.stats() == dict(num_free_blocks=16, num_used_blocks=0, num_cached_blocks=2,
                                  num_running=0, num_waiting=0, num_prefix_hit_tokens=0,
                                  num_preemptions=0, num_steps=4, num_draft_tokens=0,
                                  num_accepted_draft_tokens=0)
        ex.enqueue(Request(2, [1, 2, 3, 4, 5, 6, 7, 8], max_tokens=1))
        (r,) = run_until_finished(ex, [2])[2]
        assert r.num_cached_tokens == 4  # the last block is recomputed to sample from it
        ex.enqueue(Request(3, [1, 2, 3, 4, 5, 6, 7, 8, 0], max_tokens=1))
        (r,) = run_until_finished(ex, [3])[3]
        assert (r.num_cached_tokens, r.token_ids) == (8, [1])
        stats = ex.stats()
        assert (stats["num_prefix_hit_tokens"], stats["num_steps"]) == (12, 6)
    finally:
        ex.shutdown()


def test_abort_a_running_and_a_waiting_request():
    runner = GatedRunner()
    ex = make_executor(runner, max_batch_size=1)
    try:
        ex.enqueue(Request(1, [1, 2, 3], max_tokens=50))
        assert runner.entered.wait(10)
        ex.enqueue(Request(2, [7], max_tokens=3))  # waits: one request at a time
        ex.abort(1)
        ex.abort(12345)  # unknown: ignored
        runner.gate.set()
        got = run_until_finished(ex, [1, 2])
        assert [(r.token_ids, r.finish_reason) for r in got[1]] == [([4], ""), ([], "abort")]
        assert tokens_of(got[2]) == [8, 9, 10]

        # A request aborted before the loop ever saw it still gets its one "abort" response.
        runner.gate.clear()
        runner.entered.clear()
        ex.enqueue(Request(3, [1], max_tokens=50))
        assert runner.entered.wait(10)
        ex.enqueue(Request(4, [5], max_tokens=50))
        ex.abort(4)
        ex.abort(3)
        runner.gate.set()
        got = run_until_finished(ex, [3, 4])
        assert [(r.token_ids, r.finish_reason) for r in got[3]] == [([2], ""), ([], "abort")]
        assert [(r.token_ids, r.finish_reason) for r in got[4]] == [([], "abort")]
        assert ex.stats()["num_used_blocks"] == 0
    finally:
        ex.shutdown()


class FailOn(GatedRunner):
    def __init__(self, bad_id, exc):
        super().__init__()
        self.bad_id, self.exc = bad_id, exc
        self.gate.set()

    def submit(self, batch):
        if self.bad_id in batch.request_ids.tolist():
            self.entered.set()
            raise self.exc
        return super().submit(batch)


def test_a_runner_error_fails_the_step_and_the_executor_keeps_serving():
    runner = FailOn(2, ValueError("boom"))
    ex = make_executor(runner)
    try:
        ex.enqueue(Request(2, [1, 2], max_tokens=3))
        (r,) = run_until_finished(ex, [2])[2]
        assert (r.finished, r.finish_reason, r.error, r.token_ids) == (True, "error", "ValueError: boom", [])
        ex.enqueue(Request(3, [1, 2], max_tokens=2))
        assert tokens_of(run_until_finished(ex, [3])[3]) == [3, 4]
        # The same id may be used again once finished.
        runner.bad_id = -1
        ex.enqueue(Request(2, [5], max_tokens=1))
        assert tokens_of(run_until_finished(ex, [2])[2]) == [6]
        assert ex.stats()["num_used_blocks"] == 0
    finally:
        ex.shutdown()


def test_a_bad_collect_result_is_a_step_error():
    class WrongLength(FakeRunner):
        def collect(self, handle):
            return np.zeros(3, dtype=np.int32)

    responses, _ = generate(Request(1, [1], max_tokens=2), runner=WrongLength())
    assert [(r.token_ids, r.finish_reason) for r in responses] == [([], "error")]
    assert responses[0].error == "runner.collect returned 3 tokens for a batch of 1 requests"

    class CollectRaises(FakeRunner):
        def collect(self, handle):
            raise KeyError("lost")

    responses, _ = generate(Request(1, [1], max_tokens=2), runner=CollectRaises())
    assert [(r.finish_reason, r.error) for r in responses] == [("error", "KeyError: 'lost'")]


class DeviceLost(Exception):
    fatal = True


def test_a_fatal_runner_error_kills_the_executor():
    runner = GatedRunner()
    ex = make_executor(runner, max_batch_size=1)

    def submit(batch):
        runner.entered.set()
        assert runner.gate.wait(10)
        raise DeviceLost("device lost")

    runner.submit = submit
    ex.enqueue(Request(1, [1, 2, 3], max_tokens=5))
    assert runner.entered.wait(10)
    ex.enqueue(Request(2, [4], max_tokens=5))  # waiting when the runner dies
    runner.gate.set()
    got = run_until_finished(ex, [1, 2])
    for rid in (1, 2):
        (r,) = got[rid]
        assert (r.finish_reason, r.error) == ("error", "DeviceLost: device lost")
    with pytest.raises(ExecutorDeadError, match="device lost"):
        ex.await_responses(1.0)
    with pytest.raises(ExecutorDeadError) as info:
        ex.enqueue(Request(3, [1], max_tokens=1))
    assert isinstance(info.value, RuntimeError)
    ex.abort(1)  # no-op
    ex.shutdown()
    assert ex.stats()["num_used_blocks"] == 0


def test_shutdown_aborts_pending_requests_and_is_idempotent():
    class Slow(FakeRunner):
        def submit(self, batch):
            time.sleep(0.005)
            return super().submit(batch)

    ex = make_executor(Slow(), max_batch_size=1, max_seq_len=2048, num_blocks=1024)
    for rid in (1, 2, 3):
        ex.enqueue(Request(rid, [rid], max_tokens=1000))
    assert ex.await_responses(10.0)  # request 1 is running
    ex.shutdown()  # the loop thread wants the GIL for the runner: shutdown must release it
    ex.shutdown()
    got = {1: [], 2: [], 3: []}
    while True:
        try:
            for r in ex.await_responses(1.0):
                got[r.request_id].append(r)
        except ExecutorDeadError as e:
            assert "shut down" in str(e)
            break
    for rid in (1, 2, 3):
        assert [r.finished for r in got[rid]] == [False] * (len(got[rid]) - 1) + [True]
        assert got[rid][-1].finish_reason == "abort"
    assert [r.token_ids for r in got[2]] == [[]] and [r.token_ids for r in got[3]] == [[]]
    with pytest.raises(ExecutorDeadError):
        ex.enqueue(Request(4, [1], max_tokens=1))


def test_dropping_a_busy_executor_joins_its_thread():
    ex = make_executor(FakeRunner(), max_seq_len=4096, num_blocks=2048)
    ex.enqueue(Request(1, [1], max_tokens=4000))
    del ex
    gc.collect()


def test_many_threads_awaiting_share_the_responses():
    ex = make_executor(FakeRunner(vocab=1000), max_batch_size=4)
    ids = list(range(1, 21))
    lock = threading.Lock()
    got = {i: [] for i in ids}
    done = threading.Event()

    def consume():
        while not done.is_set():
            for r in ex.await_responses(0.05):
                with lock:
                    got[r.request_id].append(r)
                    if all(any(x.finished for x in v) for v in got.values()):
                        done.set()

    threads = [threading.Thread(target=consume) for _ in range(8)]
    for t in threads:
        t.start()
    for i in ids:
        ex.enqueue(Request(i, [10 * i], max_tokens=5))
    assert done.wait(20)
    for t in threads:
        t.join(10)
    ex.shutdown()
    for i in ids:
        # Threads may append one request's responses out of order; the multiset is exact.
        assert sorted(tokens_of(got[i])) == [10 * i + k for k in range(1, 6)]
        assert [r.finished for r in got[i]].count(True) == 1
        assert all(len(r.token_ids) == 1 for r in got[i])


def test_two_batches_in_flight_never_share_a_request():
    class Disjoint(GatedRunner):
        def __init__(self):
            super().__init__()
            self.in_flight = set()

        def submit(self, batch):
            ids = set(batch.request_ids.tolist())
            assert not ids & self.in_flight
            self.in_flight |= ids
            handle = super().submit(batch)
            return ids, handle

        def collect(self, handle):
            ids, tokens = handle
            self.in_flight -= ids
            return super().collect(tokens)

    runner = Disjoint()
    ex = make_executor(runner, max_num_tokens=4, max_inflight_batches=2)
    try:
        ex.enqueue(Request(1, [1], max_tokens=1))
        assert runner.entered.wait(10)
        ex.enqueue(Request(2, [10, 11, 12, 13], max_tokens=3))
        ex.enqueue(Request(3, [20, 21, 22, 23], max_tokens=3))
        runner.gate.set()
        got = run_until_finished(ex, [1, 2, 3])
        assert [tokens_of(got[i]) for i in (1, 2, 3)] == [[2], [14, 15, 16], [24, 25, 26]]
        assert runner.max_outstanding == 2  # 2's prompt fills a batch, 3's goes in a second one
    finally:
        ex.shutdown()


def test_invalid_requests_raise_request_error():
    with pytest.raises(RequestError, match="empty"):
        Request(1, [], max_tokens=1)
    with pytest.raises(RequestError, match="max_tokens=0"):
        Request(1, [1], max_tokens=0)
    with pytest.raises(RequestError, match="min_tokens=3"):
        Request(1, [1], max_tokens=2, min_tokens=3)
    with pytest.raises(RequestError, match="top_p"):
        Request(1, [1], max_tokens=2, top_p=0.0)
    with pytest.raises(RequestError, match="temperature"):
        Request(1, [1], max_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="max_batch_size=0"):
        ExecutorConfig(max_batch_size=0, max_num_tokens=8, max_seq_len=8, tokens_per_block=4,
                       num_blocks=4)
    runner = GatedRunner()
    ex = make_executor(runner, max_seq_len=8)
    try:
        with pytest.raises(RequestError, match="max_seq_len=8"):
            ex.enqueue(Request(1, list(range(9)), max_tokens=1))
        ex.enqueue(Request(1, [1], max_tokens=2))
        assert runner.entered.wait(10)
        with pytest.raises(ValueError, match="duplicate request id 1"):
            ex.enqueue(Request(1, [2], max_tokens=2))
        runner.gate.set()
        assert tokens_of(run_until_finished(ex, [1])[1]) == [2, 3]
        start = time.monotonic()
        assert ex.await_responses(0.2) == []
        assert time.monotonic() - start >= 0.15
        with pytest.raises(ValueError):
            ex.await_responses(-1.0)
    finally:
        ex.shutdown()


def test_enqueue_many_is_all_or_nothing_and_one_step_sees_all():
    runner = GatedRunner()
    ex = make_executor(runner, max_seq_len=8)
    try:
        ex.enqueue(Request(1, [1], max_tokens=2))  # live: its id may not come again
        assert runner.entered.wait(10)
        bad_batches = (
            ([Request(2, [1], max_tokens=2), Request(3, list(range(9)), max_tokens=1)], RequestError, "max_seq_len=8"),
            ([Request(2, [1], max_tokens=2), Request(2, [5], max_tokens=2)], RequestError, "duplicate request id 2"),
            ([Request(2, [1], max_tokens=2), Request(1, [5], max_tokens=2)], RequestError, "duplicate request id 1"),
        )
        for batch, error, match in bad_batches:
            with pytest.raises(error, match=match):
                ex.enqueue_many(batch)
        assert ex.enqueue_many([Request(i, [10 * i], max_tokens=2) for i in (2, 3, 4)]) == [2, 3, 4]
        runner.gate.set()
        got = run_until_finished(ex, [1, 2, 3, 4])
        # None of the refused batches' requests ran: request 2 ran once, from the accepted batch.
        assert {i: tokens_of(got[i]) for i in got} == {1: [2, 3], 2: [21, 22], 3: [31, 32], 4: [41, 42]}
        # The three enqueued together were prefilled in the same step.
        steps = [set(b["request_ids"].tolist()) for b in runner.batches]
        assert any({2, 3, 4} <= s for s in steps), steps
    finally:
        ex.shutdown()
