"""``keygraph``: a query-agnostic proximity graph over keys alone, the baseline that ``roar`` improves on.

Each key's candidates are its exact ``knn`` nearest keys in L2 (``dense.exact_l2_neighbours``: blocked
torch matmul + topk, quadratic in the keys); they go through the same pruning and reverse edges as
``roar``, in L2, then RoarGraph's connectivity pass (every key searches its own vector and links to
``M`` pruned results: a kNN graph of clustered keys is otherwise a set of islands), and ``add`` links
new keys to their L2 neighbours. Queries are answered by inner product with the same numba beam
search (``graph.GraphIndex``). It ignores training queries, so it shows what a key-only graph costs
for attention queries.
"""

from __future__ import annotations

import numpy as np

from .base import Param
from .dense import exact_l2_neighbours
from .graph import GraphIndex
from .graph_kernels import L2, in_edges, link
from .registry import register_index

__all__ = ["KeyGraphIndex"]


@register_index
class KeyGraphIndex(GraphIndex):
    """Key-only graph: exact L2 key kNN pruned to ``M``, reverse edges, connectivity pass; searched by inner product."""

    name = "keygraph"
    link_metric = L2
    params = {
        **GraphIndex.params,
        "knn": Param(64, 1, 2048, doc="exact L2 neighbours per key, pruned to M"),
    }

    @classmethod
    def expected_degree(cls, config: dict) -> float:
        # pruned kNN lists of M, topped up by reverse and connectivity edges: 1.35 M on random keys
        return min(float(config["max_degree"]), 1.35 * config["M"])

    @classmethod
    def estimate_build_nbytes(cls, groups: int, n: int, dim: int, params: dict, train: int = 0) -> int:
        """The graph build's, plus the exact neighbour lists and one score block."""
        knn = cls.resolved_params(params)["knn"]
        return super().estimate_build_nbytes(groups, n, dim, params, train) + groups * n * (knn + 1) * 4 + (1 << 26)

    def _adjacency(self, train_queries: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        groups, n, rows = self.groups, len(self), self.rows()
        kk = min(self.config["knn"] + 1, n)  # +1: the key itself comes back first and is dropped
        flat = exact_l2_neighbours(rows, n, kk, self.build_device).ravel()  # [G * n * kk]
        nodes = np.arange(groups * n)
        work = np.stack([nodes // n, nodes % n], axis=1)  # [G * n, 2] (group, node)
        ptr = np.arange(groups * n + 1, dtype=np.int64) * kk
        adj = np.empty((groups, n, self.config["max_degree"]), np.int32)
        deg = np.zeros((groups, n), np.int32)
        link(rows, work, ptr, flat, self.config["M"], L2, adj, deg)
        work, both_ptr, both = in_edges(adj, deg, n, True)
        link(rows, work, both_ptr, both, self.config["M"], L2, adj, deg)
        self.connect_by_search(adj, deg, self.config["M"])
        return adj, deg
