"""Async scheduling through the executor with a fake runner that fills placeholders as the model runner does."""

import random
import threading
import time

import numpy as np
import pytest

from llmapi._core import Executor, ExecutorConfig, Request

VOCAB = 100


class PlaceholderRunner:
    """Samples (last input token + 1) % VOCAB, stepping over suppressed ids; a placeholder input is
    the token the previous batch sampled for row prev_rows[t], which must be the same request's row."""

    def __init__(self, delay_s=0.0):
        self.delay_s = delay_s
        self.prev = None  # (request ids [R], tokens [R]) of the last batch
        self.outstanding = self.max_outstanding = self.placeholders = 0
        self.rows = []  # (request id, position of its last input) of every row run
        self.lock = threading.Lock()

    def submit(self, batch):
        if self.delay_s:
            time.sleep(self.delay_s)
        ids = np.array(batch.input_ids)
        prev_rows = np.asarray(batch.prev_rows)
        request_ids = np.asarray(batch.request_ids)
        row_of_token = np.repeat(np.arange(batch.num_requests), batch.query_lens)
        for t in np.flatnonzero(prev_rows >= 0):
            prev_ids, prev_tokens = self.prev
            assert ids[t] == -1
            assert prev_ids[prev_rows[t]] == request_ids[row_of_token[t]], "placeholder from another request"
            ids[t] = prev_tokens[prev_rows[t]]
            self.placeholders += 1
        ends = np.cumsum(batch.query_lens) - 1
        off = batch.suppress_offsets
        tokens = []
        for r, end in enumerate(ends):
            token = (int(ids[end]) + 1) % VOCAB
            while token in set(batch.suppress_ids[off[r]:off[r + 1]].tolist()):
                token = (token + 1) % VOCAB
            tokens.append(token)
            self.rows.append((int(request_ids[r]), int(batch.positions[end])))
        tokens = np.array(tokens, dtype=np.int32)
        self.prev = (request_ids.copy(), tokens)
        with self.lock:
            self.outstanding += 1
            self.max_outstanding = max(self.max_outstanding, self.outstanding)
        return tokens

    def collect(self, handle):
        with self.lock:
            self.outstanding -= 1
        return handle


def reference(prompt, max_tokens, min_tokens=0, eos=(), stop_ids=(), max_seq_len=10**9):
    """The tokens and finish reason the fake runner's rule gives one request, computed directly."""
    out, last = [], prompt[-1]
    while True:
        token = (last + 1) % VOCAB
        while len(out) < min_tokens and token in set(eos) | set(stop_ids):
            token = (token + 1) % VOCAB
        out.append(token)
        last = token
        if len(out) >= min_tokens and token in set(eos) | set(stop_ids):
            return out, "stop"
        if len(out) >= max_tokens or len(prompt) + len(out) >= max_seq_len:
            return out, "length"


def run(requests, runner, aborts=(), timeout=30.0, **config):
    """Runs `requests` to the end; each of `aborts` is aborted when its first token arrives."""
    cfg = dict(max_batch_size=8, max_num_tokens=16, max_seq_len=64, tokens_per_block=4, num_blocks=64)
    cfg.update(config)
    ex = Executor(ExecutorConfig(**cfg), runner)
    try:
        for r in requests:
            ex.enqueue(r)
        to_abort = set(aborts)
        got = {r.request_id: ([], None) for r in requests}
        pending = set(got)
        deadline = time.monotonic() + timeout
        while pending:
            assert time.monotonic() < deadline, f"requests {sorted(pending)} did not finish"
            for x in ex.await_responses(0.5):
                assert x.request_id in pending, "a response after the request finished"
                tokens, _ = got[x.request_id]
                tokens.extend(x.token_ids)
                if x.request_id in to_abort:
                    ex.abort(x.request_id)  # while its next step, likely one ahead, is in flight
                    to_abort.discard(x.request_id)
                if x.finished:
                    got[x.request_id] = (tokens, x.finish_reason)
                    pending.discard(x.request_id)
        while ex.stats()["num_used_blocks"] and time.monotonic() < deadline:
            time.sleep(0.005)  # the last step ahead may still be collected after the last response
        return got, ex.stats()
    finally:
        ex.shutdown()


def workload(seed, n=24):
    rng = random.Random(seed)
    specs = []
    for i in range(1, n + 1):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 14))]
        spec = dict(max_tokens=rng.randint(1, 12), min_tokens=0, eos=(), stop_ids=())
        if i % 3 == 0:
            spec["stop_ids"] = ((prompt[-1] + rng.randint(1, 6)) % VOCAB,)
        if i % 4 == 0:
            spec["eos"] = ((prompt[-1] + 2) % VOCAB,)
            spec["min_tokens"] = min(spec["max_tokens"], 3)
        specs.append((i, prompt, spec))
    return specs


def make_requests(specs):
    return [Request(i, p, max_tokens=s["max_tokens"], min_tokens=s["min_tokens"], eos_token_ids=list(s["eos"]),
                    stop_token_ids=list(s["stop_ids"])) for i, p, s in specs]


@pytest.mark.parametrize("num_blocks,max_num_tokens", [(64, 16), (10, 8)])
def test_outputs_equal_the_reference_with_chunking_and_preemption(num_blocks, max_num_tokens):
    specs = workload(seed=num_blocks)
    runner = PlaceholderRunner()
    got, stats = run(make_requests(specs), runner, async_scheduling=True, num_blocks=num_blocks,
                     max_num_tokens=max_num_tokens)
    for i, prompt, s in specs:
        assert got[i] == reference(prompt, s["max_tokens"], s["min_tokens"], s["eos"], s["stop_ids"]), i
    assert runner.max_outstanding == 2 and runner.placeholders > 0
    assert stats["num_used_blocks"] == 0 and stats["num_running"] == 0
    if num_blocks == 10:
        assert stats["num_preemptions"] > 0
    # The same workload with async scheduling off: one step in flight, no placeholders.
    sync = PlaceholderRunner()
    assert run(make_requests(specs), sync, num_blocks=num_blocks, max_num_tokens=max_num_tokens)[0] == got
    assert sync.max_outstanding == 1 and sync.placeholders == 0


def test_a_stop_token_with_a_step_ahead_delivers_nothing_more():
    # Prompt [10]: tokens 11, 12, 13 (the stop id), ...
    runner = PlaceholderRunner()
    got, stats = run([Request(1, [10], max_tokens=10, stop_token_ids=[13])], runner, async_scheduling=True)
    assert got[1] == ([11, 12, 13], "stop")
    # The step ahead of the stop token's step ran (its input: the stop token at position 3); its
    # token was dropped, and its blocks were freed after it.
    assert (1, 3) in runner.rows
    assert stats["num_used_blocks"] == 0


def test_64_concurrent_requests_with_aborts_settle_and_free_every_block():
    rng = random.Random(5)
    specs = [(i, [rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))],
              dict(max_tokens=rng.randint(1, 30), min_tokens=0, eos=(), stop_ids=())) for i in range(1, 65)]
    aborted = set(rng.sample(range(1, 65), 20))
    runner = PlaceholderRunner(delay_s=0.0005)
    got, stats = run(make_requests(specs), runner, aborts=sorted(aborted), async_scheduling=True,
                     max_batch_size=16, max_num_tokens=32, num_blocks=40)
    for i, prompt, s in specs:
        want, _ = reference(prompt, s["max_tokens"])
        tokens, reason = got[i]
        if i in aborted and reason == "abort":
            assert tokens == want[:len(tokens)]
        else:
            assert (tokens, reason) == (want, "length"), i
    assert sum(got[i][1] == "abort" for i in aborted) >= 10
    assert runner.placeholders > 0
    assert (stats["num_used_blocks"], stats["num_running"], stats["num_waiting"]) == (0, 0, 0)
