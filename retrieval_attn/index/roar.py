"""``roar``: a query-aware proximity graph (RoarGraph-style) built from each group's prefill queries.

Keys that answer the same training query become neighbours, so a beam search driven by attention
queries (out-of-distribution with respect to keys) walks where queries land instead of where keys
cluster. This module owns the choice of training data and the projection of query -> key
neighbourhoods onto key -> key edges; storage, pruning, the connectivity pass, ``add`` and the search
kernel are the shared ones of ``graph`` (here all by inner product, distance = -<a, b>).

Build, for all groups of a layer at once:

1. sample at most ``train_queries`` training queries per group (seeded, the same rows in every
   group) and take the exact top-``nq`` keys of each with a chunked torch matmul + topk;
2. projection: the top key of a query is its *pivot*; a key's candidates are the other top keys of
   every query it is the pivot of (gathering them per pivot, rather than letting queries overwrite
   each other, makes the result independent of thread timing), sorted by distance to it and pruned
   to ``M`` (``graph._prune``: drop p if a kept neighbour r has -<p, r> < -<p, pivot>, then top up
   with the nearest dropped ones); reverse edges are added and lists above ``M`` re-pruned;
3. connectivity pass (``graph.build_graph``): every key beam-searches its own vector from the entry
   point (the key nearest, in L2, to its group's mean key) and links to the pruned results both
   ways (degree <= 3M), which reaches keys that no training query selected.

``add`` treats each new key as a pseudo-query: it beam-searches the key's own vector by inner
product, links it to the pruned results and them back to it, in row order, so keys spilled during
decoding are reachable from where the queries that want them go (on the tests' data, after 2,000
added keys, recall@10 stayed within 0.02 of a rebuild's; linking them by L2 instead lost 0.05).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Param, register_index
from .graph import IP, GraphIndex

__all__ = ["RoarIndex", "exact_top_keys"]


def exact_top_keys(queries: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """Rows of the ``k`` largest inner products, best first: queries [G, m, D], keys [G, n, D] -> [G, m, k] int64.

    Scores are computed in chunks of queries so the [G, chunk, n] block stays near 64 MiB.
    """
    groups, m, _ = queries.shape
    n = keys.shape[1]
    chunk = max(1, (1 << 24) // max(groups * n, 1))
    key_t = torch.from_numpy(keys).transpose(1, 2)  # [G, D, n]
    out = np.empty((groups, m, k), np.int64)
    for s in range(0, m, chunk):
        scores = torch.bmm(torch.from_numpy(queries[:, s : s + chunk]), key_t)  # [G, c, n]
        out[:, s : s + chunk] = torch.topk(scores, k, dim=2, sorted=True).indices.numpy()
    return out


@register_index
class RoarIndex(GraphIndex):
    """Query-aware graph over keys: projected top-``nq`` neighbourhoods of training queries, inner product."""

    name = "roar"
    uses_train_queries = True
    link_metric = IP
    params = {
        **GraphIndex.params,
        "nq": Param(100, 2, 10_000, doc="exact top keys per training query; the first is its pivot"),
        "train_queries": Param(8192, 1, None, doc="training queries sampled per group, at most"),
    }

    def _candidates(
        self, keys: np.ndarray, train_queries: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if train_queries is None:
            raise ValueError("index 'roar' needs train_queries (groups, m, dim): the prefill queries of each group")
        groups, n, _ = keys.shape
        m = train_queries.shape[1]
        picked = np.sort(np.random.default_rng(0).choice(m, min(m, self.config["train_queries"]), replace=False))
        queries = np.ascontiguousarray(train_queries[:, picked])  # [G, s, D]
        s, nq = queries.shape[1], min(self.config["nq"], n)
        top = exact_top_keys(queries, keys, nq)  # [G, s, nq]
        # queries grouped by (group, pivot): each distinct pivot is one work item
        pivot = (np.arange(groups)[:, None] * n + top[:, :, 0]).ravel()  # [G * s], group-major node number
        order = np.argsort(pivot, kind="stable")
        nodes, first = np.unique(pivot[order], return_index=True)  # [W]
        work = np.stack([nodes // n, nodes % n], axis=1)  # [W, 2] (group, node)
        flat = top[:, :, 1:].reshape(groups * s, nq - 1)[order].ravel().astype(np.int32)  # candidates, by work item
        ptr = np.append(first, groups * s).astype(np.int64) * (nq - 1)  # [W + 1]
        return work, ptr, flat
