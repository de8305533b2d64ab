"""``keygraph``: a query-agnostic proximity graph over keys alone, the baseline that ``roar`` improves on.

Each key's candidates are its exact ``knn`` nearest keys in L2 (chunked torch matmul + topk); they
go through the same pruning, reverse edges and connectivity pass as ``roar``, all in L2, and ``add``
links new keys to their L2 neighbours. Queries are answered by inner product with the same numba
beam search (``graph.GraphIndex``). It ignores training queries, so it shows what a key-only graph
costs for attention queries.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Param
from .registry import register_index
from .graph import L2, GraphIndex

__all__ = ["KeyGraphIndex", "exact_l2_neighbours"]


def exact_l2_neighbours(keys: np.ndarray, k: int) -> np.ndarray:
    """Rows of the ``k`` nearest keys in L2 (self included), nearest first: keys [G, n, D] -> [G, n, k] int64.

    |x - y|^2 ranks like |y|^2 - 2 x . y for a fixed x; computed in chunks of rows (~64 MiB blocks).
    """
    groups, n, _ = keys.shape
    chunk = max(1, (1 << 24) // max(groups * n, 1))
    base = torch.from_numpy(keys)  # [G, n, D]
    sq = (base * base).sum(dim=2).unsqueeze(1)  # [G, 1, n]
    base_t = base.transpose(1, 2)  # [G, D, n]
    out = np.empty((groups, n, k), np.int64)
    for s in range(0, n, chunk):
        rank = 2 * torch.bmm(base[:, s : s + chunk], base_t) - sq  # [G, c, n], larger is nearer
        out[:, s : s + chunk] = torch.topk(rank, k, dim=2, sorted=True).indices.numpy()
    return out


@register_index
class KeyGraphIndex(GraphIndex):
    """Key-only graph: exact L2 key kNN pruned to ``M`` + connectivity pass; searched by inner product."""

    name = "keygraph"
    link_metric = L2
    params = {
        **GraphIndex.params,
        "knn": Param(64, 1, 2048, doc="exact L2 neighbours per key, pruned to M"),
    }

    def _candidates(
        self, keys: np.ndarray, train_queries: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        groups, n, _ = keys.shape
        kk = min(self.config["knn"] + 1, n)  # +1: the key itself comes back first and is dropped later
        flat = exact_l2_neighbours(keys, kk).astype(np.int32).ravel()  # [G * n * kk]
        nodes = np.arange(groups * n)
        work = np.stack([nodes // n, nodes % n], axis=1)  # [G * n, 2] (group, node)
        ptr = np.arange(groups * n + 1, dtype=np.int64) * kk
        return work, ptr, flat
