"""Keep Python's cyclic garbage collector off the objects that were alive before a generation started.

A full (oldest-generation) collection walks every tracked object: with torch, transformers and a model loaded
that is hundreds of thousands, tens of milliseconds during which no Python thread runs, so the runner's next
step waits. While `frozen_heap()` is open the objects alive at its entry are frozen (`gc.freeze`): collections
walk only what was allocated since. On the last exit they are unfrozen, so nothing is kept from being
collected for good; a heap the caller froze itself is left as it is.
"""

from __future__ import annotations

import contextlib
import gc
import threading

_lock = threading.Lock()
_depth = 0  # open frozen_heap() blocks, all threads together
_ours = False  # whether the outermost block froze the heap (and so unfreezes it)


@contextlib.contextmanager
def frozen_heap():
    global _depth, _ours
    with _lock:
        if _depth == 0:
            _ours = gc.isenabled() and gc.get_freeze_count() == 0
            if _ours:
                gc.freeze()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _ours:
                gc.unfreeze()
                _ours = False
