"""``flat``: exact top-k by brute force over every key of all heads of a layer.

It scores every key, so it is the recall reference and the fastest choice for small contexts. A numba
kernel scores all queries of a group against each key row as it reads it (rows in the model's dtype,
widened on load, fp32 sums; parallel over groups and blocks of keys) into a per-thread score buffer
reused across searches; ``torch.topk`` then selects each query's k best into the result arrays.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch
from numba import njit, prange

from ..rows import FASTMATH, f32, grown_capacity
from .base import KeyIndex, SearchResult
from .registry import register_index

__all__ = ["FlatIndex"]

_BLOCK = 256  # keys per parallel work item
_scores = threading.local()  # .buf: this thread's score buffer, grown on demand, shared by its flat indexes


@njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def _score_all(rows, n, queries, scores):
    """scores[g, i, j] = queries[g, i] . rows[g, j] for j < n: rows [G, cap, D], queries [G, m, D], scores [G, m, >= n]."""
    groups, m, dim = queries.shape
    blocks = (n + _BLOCK - 1) // _BLOCK
    for t in prange(groups * blocks):
        g = t // blocks
        b = t - g * blocks
        for j in range(b * _BLOCK, min(n, (b + 1) * _BLOCK)):
            for i in range(m):
                s = np.float32(0.0)
                for d in range(dim):
                    s += queries[g, i, d] * f32(rows[g, j, d])
                scores[g, i, j] = s


def _score_buffer(groups: int, m: int, n: int) -> np.ndarray:
    """This thread's score buffer viewed as (groups, m, n) fp32, grown by a quarter when too small."""
    buf = getattr(_scores, "buf", None)
    if buf is None or buf.size < groups * m * n:
        buf = _scores.buf = np.empty(grown_capacity(groups * m * n), np.float32)
    return buf[: groups * m * n].reshape(groups, m, n)


@register_index
class FlatIndex(KeyIndex):
    """Exact maximum-inner-product search over every key (numba scores + torch.topk, CPU threads)."""

    name = "flat"

    @classmethod
    def estimate_shared_nbytes(cls, groups: int, n: int, dim: int, params: dict[str, Any], queries: int = 1) -> int:
        """The score buffer of the searching thread: (groups, queries, n) fp32 and its growth slack."""
        return grown_capacity(groups * queries * n) * 4

    def _build(self, train_queries: np.ndarray | None) -> None:
        pass

    def _add(self, n_old: int, t: int) -> None:
        pass

    def _search(self, queries: np.ndarray, k: int, config: dict[str, Any], out: SearchResult) -> None:
        groups, m, _ = queries.shape
        n = len(self)
        scores = _score_buffer(groups, m, n)  # [G, m, n]
        _score_all(self.rows(), n, queries, scores)
        torch.topk(torch.from_numpy(scores), k, dim=-1, sorted=True,
                   out=(torch.from_numpy(out.scores), torch.from_numpy(out.ids)))
        out.scored[:] = n
