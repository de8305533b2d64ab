"""The thread budget of retrieval-attn's CPU work: ``cpu_threads`` runs a block with a given number of
torch, numba and faiss CPU threads; ``thread_budget`` is how many the work may use by default;
``ThreadChooser`` picks, call by call, how many a recurring piece of work uses, by timing it.

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

Why a budget and a chooser: torch and numba each keep their own OpenMP thread team (two runtimes, two
teams). A parallel region waits at its end for every thread of its team, so a team with more threads
than free cores stalls for a scheduler time slice (~10 ms) whenever one of its threads is not
running: on a 2-core machine busy with other work, one search thread was many times faster than two
(bench/README.md). On a quiet machine, or a GPU machine's 16 cores, more threads are faster. Which
one wins depends on the machine's load at the moment, so the default measures it.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import threading
from collections import deque
from typing import Iterator

import numba
import torch

__all__ = ["cpu_threads", "thread_budget", "ThreadChooser"]

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
    if old[1] != min(n, numba.config.NUMBA_NUM_THREADS):  # setting numba's costs microseconds: only if it changes
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    if faiss:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        if numba.get_num_threads() != old[1]:
            numba.set_num_threads(old[1])
        if faiss:
            faiss.omp_set_num_threads(old[2])
        with _lock:
            _active -= 1
            torch.set_num_threads(_torch_default if _active == 0 else old[0])


def thread_budget(device: str | torch.device) -> int:
    """The threads retrieval-attn's CPU work (search, attention over retrieved rows, index builds) may use
    when ``RetrievalConfig.cpu_threads`` is None: the cores this process may run on (its CPU affinity,
    at most numba's ``NUMBA_NUM_THREADS``), less one when the model runs on a GPU, whose decoding
    thread keeps a core to drive the device meanwhile."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = min(cores, numba.config.NUMBA_NUM_THREADS)
    return max(1, cores - 1 if torch.device(device).type == "cuda" else cores)


class ThreadChooser:
    """The thread count of one recurring piece of CPU work (a layer's search and attention), chosen by timing it.

    Candidates are 1 and ``budget``. They take turns until each has run ``first`` times, and the one
    with the lower median becomes the current one. Then the current one runs, and the other is timed
    again after ``explore`` calls. It takes over when two tries in a row (the second right after the
    first) each beat the median of the current one's last ``samples`` calls by ``margin``: on a busy
    machine a call's time is bimodal (a parallel region stalls until every thread of its team gets a
    core, or it does not), so one lucky call is no evidence. After a loss the wait until the
    next try at least doubles, and is long enough that tries cost at most ``overhead`` of the time
    spent (a try ``r`` times slower than the median waits ``(r - 1) / overhead`` calls; a stalled
    team is 5-20x slower), at most ``max_explore`` calls. So a machine that gets busy or quiet again
    is followed, at the cost of one or two slower calls now and then. Results never depend on the
    choice, only the speed. One chooser serves one thread at a time.
    """

    def __init__(self, budget: int, samples: int = 5, explore: int = 8, max_explore: int = 512, margin: float = 0.85,
                 overhead: float = 0.05, first: int = 3):
        self.candidates = (budget, 1) if budget > 1 else (1,)
        self._seconds = {c: deque(maxlen=max(samples, first)) for c in self.candidates}
        self._first = first
        self._settled = len(self.candidates) == 1  # every candidate has run ``first`` times
        self._current = self.candidates[0]
        self._explore, self._max_explore, self._margin, self._overhead = explore, max_explore, margin, overhead
        self._wait = self._countdown = explore
        self._won = False  # the other candidate's last try beat the current one: confirm at the next call

    @property
    def current(self) -> int:
        """The thread count in use."""
        return self._current

    def pick(self) -> int:
        """The thread count of the next call: the candidates in turn at first, then the current one, or (when
        due) the other."""
        if not self._settled:
            return min(self.candidates, key=lambda c: len(self._seconds[c]))
        if len(self.candidates) > 1:
            self._countdown -= 1
            if self._countdown <= 0:
                return next(c for c in self.candidates if c != self._current)
        return self._current

    def record(self, threads: int, seconds: float) -> None:
        """The call with ``threads`` threads took ``seconds``."""
        self._seconds[threads].append(seconds)
        if not self._settled:
            if all(len(self._seconds[c]) >= self._first for c in self.candidates):
                self._current = min(self.candidates, key=lambda c: statistics.median(self._seconds[c]))
                self._settled = True
            return
        if threads == self._current:
            return
        typical = statistics.median(self._seconds[self._current])
        if seconds < self._margin * typical:
            if self._won:  # the second win in a row: switch
                self._current, self._wait, self._won = threads, self._explore, False
                self._countdown = self._wait
            else:  # one win may be luck: try again at the next call
                self._won, self._countdown = True, 1
            return
        self._won = False
        priced = math.ceil((seconds / typical - 1) / self._overhead) if typical > 0 else 0
        self._wait = min(self._max_explore, max(2 * self._wait, priced))
        self._countdown = self._wait
