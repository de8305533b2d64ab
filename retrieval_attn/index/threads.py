"""``cpu_threads``: run a block with a given number of torch, numba and faiss CPU threads.

The index backends compute with all three libraries, so a thread budget must reach all three. faiss
is only touched once something imported it (the ``ivf`` backend), so a thread budget never loads it.

Thread safety: numba's and OpenMP's (faiss, torch) thread counts belong to the calling thread, so a
block sets and restores them for its own thread only, and blocks in several Python threads do not
disturb each other. torch also keeps one process-wide count that threads started later begin with;
``torch.set_num_threads`` updates it too, so while blocks overlap it holds the latest request, and
the last block to exit puts back the process default: the main thread's count when a block entered
there with no block running, else the main thread's count at import. (A worker thread's own count
is no guide: one started inside a block begins with that block's count.) Results never depend on
the thread count (tests/test_threads.py), only the speed does.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Iterator

import numba
import torch

__all__ = ["cpu_threads"]

_lock = threading.Lock()
_active = 0  # cpu_threads blocks running in any thread
_torch_default = torch.get_num_threads()  # the process default, restored when the last block exits


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Within the block, torch, numba and faiss use ``n`` threads in this thread (None: leave them as they are)."""
    global _active, _torch_default
    if n is None:
        yield
        return
    faiss = sys.modules.get("faiss")  # loaded by the ivf backend, whose config was made before any block
    old = torch.get_num_threads(), numba.get_num_threads(), faiss.omp_get_max_threads() if faiss else 0
    with _lock:
        if _active == 0 and threading.current_thread() is threading.main_thread():
            _torch_default = old[0]
        _active += 1
        torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    if faiss:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(old[1])
        if faiss:
            faiss.omp_set_num_threads(old[2])
        with _lock:
            _active -= 1
            torch.set_num_threads(_torch_default if _active == 0 else old[0])
