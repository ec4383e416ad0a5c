"""An LLM nobody references shuts itself down (no thread, no MPI process left), its outputs still read, and
Ctrl-C inside generate() leaves none of that call's requests in the executor."""

import _thread
import gc
import threading
import weakref

import pytest

from llmapi import LLM, SamplingParams
from processes import running as _running, wait_until as _wait_until


def _llmapi_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("llmapi")]


@pytest.mark.parametrize("tp", [1, 2])
def test_dropped_llms_are_collected_with_their_threads_and_processes(tiny_llama_dir, tp):
    before = set(_llmapi_threads())
    refs, pids, outputs = [], [], []
    count = 10 if tp == 1 else 3  # each two-rank LLM starts an MPI job of two processes (about 4 s on a CPU)
    for _ in range(count):
        llm = LLM(str(tiny_llama_dir), tensor_parallel_size=tp, tokens_per_block=4)
        done = llm.generate([5, 6, 7], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
        running = llm.generate_async([8, 9], SamplingParams(max_tokens=200, ignore_eos=True))
        outputs.append((done, running))
        refs.append(weakref.ref(llm))
        if tp > 1:
            pids += [llm._executor.job.proc.pid] + llm._executor.rank_pids
        del llm, done, running  # only the outputs are kept
    gc.collect()
    assert [r() for r in refs] == [None] * count
    assert _wait_until(lambda: set(_llmapi_threads()) <= before, 10), _llmapi_threads()
    assert _wait_until(lambda: not [p for p in pids if _running(p)], 15), [p for p in pids if _running(p)]
    for done, running in outputs:
        assert len(done.outputs[0].token_ids) == 3  # an output outliving its LLM still reads
        assert running.done() and running.outputs[0].finish_reason == "abort"
        running.abort()  # a no-op now


def _interrupt_at_third_token(output_ids, logits):
    """A logits processor that presses Ctrl-C (KeyboardInterrupt in the main thread) as its request's third token
    is sampled: at a known step, with the other requests of the call far from done."""
    if len(output_ids) == 2:
        _thread.interrupt_main()
    return logits


def test_ctrl_c_in_generate_leaves_no_request_of_that_call(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), tokens_per_block=4) as llm:
        prompts = [[3 + i, 4 + i, 5 + i] for i in range(12)]
        # The first request ends after 5 tokens and wakes generate(), which waits for it first: the interrupt is
        # raised there, with the other 11 requests some 190 steps from their end.
        params = [SamplingParams(max_tokens=5, ignore_eos=True, logits_processor=_interrupt_at_third_token)]
        params += [SamplingParams(max_tokens=200, ignore_eos=True)] * 11
        with pytest.raises(KeyboardInterrupt):
            llm.generate(prompts, params, use_tqdm=False)
        stats = llm.get_stats()
        assert stats["num_running"] == 0 and stats["num_waiting"] == 0
        assert stats["num_used_blocks"] == 0
        # and the LLM still serves
        assert len(llm.generate([5, 6], SamplingParams(max_tokens=4), use_tqdm=False).outputs[0].token_ids) == 4
