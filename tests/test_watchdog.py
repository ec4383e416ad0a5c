"""The step watchdog: a logits processor that never returns (a Python busy loop, a C-level sleep far past the
timeout) or a stopped rank (TP=2, rank 1 or rank 0 under SIGSTOP) fails every pending request with
StepTimeoutError naming the request or the rank within step_timeout + 5 s; the LLM is dead after it,
shutdown() returns promptly and leaves no MPI process. A normal or idle LLM never trips."""

import os
import re
import signal
import threading
import time

import pytest

from llmapi import LLM, SamplingParams, StepTimeoutError
from processes import running as _running, wait_until as _wait_until

STEP_TIMEOUT = 2.0
DEADLINE = STEP_TIMEOUT + 5  # every pending request has failed by then
SLEEP_S = DEADLINE + 3  # the hung processor's C-level sleep: it still sleeps when the requests have failed
GREEDY = SamplingParams(max_tokens=12, temperature=0)
LONG = SamplingParams(max_tokens=240, ignore_eos=True)


def _threads(name: str):
    return [t for t in threading.enumerate() if t.name == name]


def _all_fail_naming(outputs, pattern: str) -> float:
    """Seconds until every output has raised StepTimeoutError matching `pattern` (each within DEADLINE)."""
    start = time.monotonic()
    for out in outputs:
        with pytest.raises(StepTimeoutError, match=pattern):
            out.result(timeout=DEADLINE)
    return time.monotonic() - start


def _is_dead(llm) -> None:
    start = time.monotonic()
    with pytest.raises(StepTimeoutError):
        llm.generate([5, 6, 7], GREEDY, use_tqdm=False)
    assert time.monotonic() - start < 1  # at once
    start = time.monotonic()
    llm.shutdown()
    assert time.monotonic() - start < 3


@pytest.mark.parametrize("hang", ["busy_loop", "sleep"])
def test_hung_logits_processor_fails_every_pending_request(tiny_llama_dir, hang):
    entered = threading.Event()

    def hung_processor(prompt, output, logits):
        entered.set()
        if hang == "busy_loop":
            while True:
                pass
        time.sleep(SLEEP_S)  # returns only when it ends; the watchdog does not wait for it
        return logits

    closers_before = set(_threads("llmapi-close"))
    llm = LLM(str(tiny_llama_dir), step_timeout=STEP_TIMEOUT)
    try:
        hung = llm.generate_async([9, 8, 7], SamplingParams(max_tokens=8, logits_processor=hung_processor))
        bystanders = [llm.generate_async([5 + i, 6, 7], LONG) for i in range(3)]
        assert entered.wait(30)
        elapsed = _all_fail_naming([hung] + bystanders, rf"logits_processor of request {hung.request_id}\b")
        assert elapsed < DEADLINE
        _is_dead(llm)
        if hang == "sleep":
            assert entered.is_set() and _threads("llmapi-close")  # the close waits on the sleeping loop thread
    finally:
        llm.shutdown()
        # The sleep ends, the step is abandoned there, and the close that waited for it finishes.
        assert _wait_until(lambda: set(_threads("llmapi-close")) <= closers_before, SLEEP_S + 5)
    assert not llm._watchdog._thread.is_alive()


@pytest.mark.parametrize("victim", [1, 0])
def test_stopped_rank_fails_every_pending_request_and_is_named(tiny_llama_dir, victim):
    llm = LLM(str(tiny_llama_dir), tensor_parallel_size=2, step_timeout=STEP_TIMEOUT)
    pids = [llm._executor.job.proc.pid] + llm._executor.rank_pids
    stopped = llm._executor.rank_pids[victim]
    try:
        if victim == 1:  # an idle job never trips
            want = llm.generate([5, 6, 7], GREEDY, use_tqdm=False).outputs[0].token_ids
            time.sleep(STEP_TIMEOUT + 1)
            assert llm.generate([5, 6, 7], GREEDY, use_tqdm=False).outputs[0].token_ids == want
        outs = [llm.generate_async([5 + i, 6, 7], LONG, streaming=True) for i in range(4)]
        stream = iter(outs[0])
        next(stream), next(stream)  # tokens are streaming
        os.kill(stopped, signal.SIGSTOP)
        elapsed = _all_fail_naming(outs, rf"rank {victim} \(pid {stopped}\) is stopped")
        assert elapsed < DEADLINE
        _is_dead(llm)
        assert not [p for p in pids if _running(p)]  # mpiexec and both ranks, the stopped one too
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            if _running(stopped):
                os.kill(stopped, sig)
        llm.shutdown()


def test_normal_and_idle_llm_never_trip(tiny_llama_dir):
    prompts = [[5, 6, 7], [9, 8], [11, 12, 13, 14]]
    with LLM(str(tiny_llama_dir)) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    with LLM(str(tiny_llama_dir), step_timeout=STEP_TIMEOUT) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == want
        time.sleep(STEP_TIMEOUT + 1)  # idle past the timeout
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == want
        watchdog = llm._watchdog
        assert watchdog.error is None and watchdog._thread.is_alive()
    assert not watchdog._thread.is_alive()


def test_stalled_ranks_names_stale_then_stuck_ranks():
    """Without a stopped process: a stale heartbeat names its rank; all live, the ranks still in their step."""
    from llmapi.runtime.watchdog import stalled_ranks

    now = time.monotonic()
    me = os.getpid()
    beats = [(now, now - 9, 4, me), (now - 30, 0.0, 3, me)]
    assert re.search(r"rank 1 \(pid \d+\) has not run for 3\d\.\d s", stalled_ranks([me, me], beats, 2.0))
    beats = [(now, now - 9, 4, me), (now, now - 8, 3, me)]
    assert "rank 0 (pid" in stalled_ranks([me, me], beats, 2.0) and "collective" in stalled_ranks([me, me], beats, 2.0)
    assert stalled_ranks([me, me], [(now, 0.0, 4, me), (now, 0.0, 4, me)], 2.0) == ""


def test_launched_job_with_a_stopped_rank_fails_its_requests_and_ends(tiny_llama_dir, tmp_path):
    """Under `mpiexec -n 2 llmapi-launch`: rank 1 stopped mid-generation. The script's requests fail with
    StepTimeoutError naming rank 1, and the launcher then aborts the job, so nothing waits for the stopped rank."""
    import subprocess
    import sys
    import textwrap

    from llmapi.distributed.spawn import find_mpiexec

    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal
        from llmapi import LLM, SamplingParams, StepTimeoutError
        from llmapi.distributed import session

        llm = LLM({str(tiny_llama_dir)!r}, tensor_parallel_size=2, step_timeout={STEP_TIMEOUT})
        pids = session.current().pids
        print("PIDS", *pids, flush=True)
        out = llm.generate_async([5, 6, 7], SamplingParams(max_tokens=240, ignore_eos=True), streaming=True)
        next(iter(out))
        os.kill(pids[1], signal.SIGSTOP)
        try:
            out.result(timeout={DEADLINE})
        except StepTimeoutError as e:
            print("STALLED", e, flush=True)
    """))
    mpiexec = str(find_mpiexec())
    env = dict(os.environ, PATH=os.path.dirname(mpiexec) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.Popen([mpiexec, "-n", "2", sys.executable, "-m", "llmapi.launch", str(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    pids = []
    try:
        stdout, stderr = proc.communicate(timeout=90)
        pids = [int(p) for line in stdout.splitlines() if line.startswith("PIDS") for p in line.split()[1:]]
        assert re.search(r"STALLED .*rank 1", stdout), stdout + stderr
        assert proc.returncode != 0  # the job was aborted
        assert _wait_until(lambda: not [p for p in pids if _running(p)], 10)
    finally:
        for pid in pids:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
