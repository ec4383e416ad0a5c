"""frozen_heap: the cyclic collector skips what was alive at entry while generation runs, and nothing is kept."""

import gc
import threading
import weakref

import pytest

from llmapi.runtime.gc_freeze import frozen_heap


class Node:
    pass


def _cycle():
    """An object in a reference cycle (freed only by the cyclic collector once unreachable)."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a


@pytest.fixture(autouse=True)
def _clean_heap():
    assert gc.get_freeze_count() == 0
    yield
    gc.unfreeze()


def test_objects_alive_at_entry_are_skipped_until_the_last_exit():
    old = _cycle()  # alive at entry: frozen with everything else
    ref = weakref.ref(old)
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        with frozen_heap():  # nested (or another thread's generate): the outer exit unfreezes
            pass
        assert gc.get_freeze_count() > 0
        del old  # garbage now, but frozen: not walked
        gc.collect()
        assert ref() is not None
        new = weakref.ref(_cycle())  # allocated inside the block: collected as usual
        gc.collect()
        assert new() is None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None  # nothing kept for good


def test_a_heap_the_caller_froze_is_left_frozen():
    old = _cycle()
    ref = weakref.ref(old)
    gc.freeze()
    with frozen_heap():
        pass
    # Still frozen: the cycle, garbage now, survives a full collection. (Not by comparing freeze counts: a frozen
    # object that another thread drops is freed by its reference count and leaves the count.)
    del old
    gc.collect()
    assert ref() is not None
    gc.unfreeze()
    gc.collect()
    assert ref() is None


def test_threads_share_one_freeze():
    inside, release = threading.Event(), threading.Event()

    def worker():
        with frozen_heap():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    with frozen_heap():
        pass
    assert gc.get_freeze_count() > 0  # this thread's exit left the worker's freeze alone
    release.set()
    t.join(10)
    assert gc.get_freeze_count() == 0


def test_generate_runs_with_the_heap_frozen(tiny_llama_dir, monkeypatch):
    from llmapi import LLM, SamplingParams

    seen = []
    llm = LLM(str(tiny_llama_dir), skip_tokenizer_init=True)
    try:
        real = llm._generate_async_batch
        monkeypatch.setattr(llm, "_generate_async_batch",
                            lambda *a: seen.append(gc.get_freeze_count()) or real(*a))
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 3
    finally:
        llm.shutdown()
    assert seen and seen[0] > 0
    assert gc.get_freeze_count() == 0
