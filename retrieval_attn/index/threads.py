"""``cpu_threads``: run a block with a given number of torch, numba and faiss CPU threads.

The index backends compute with all three libraries, so a thread budget must reach all three.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import faiss
import numba
import torch

__all__ = ["cpu_threads"]


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Within the block, torch, numba and faiss use ``n`` threads (None: leave them as they are)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads(), numba.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old[0])
        numba.set_num_threads(old[1])
        faiss.omp_set_num_threads(old[2])
