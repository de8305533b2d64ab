"""``roar``: a query-aware proximity graph built from each group's prefill queries.

Keys that answer the same training query become neighbours, so a beam search driven by attention
queries (out-of-distribution with respect to keys) walks where queries land instead of where keys
cluster. This module owns the choice of training data, the query -> key co-occurrence candidates and
the entry point; storage, pruning, the connectivity pass, ``add`` and the search kernel are the
shared ones of ``graph``. Edges are chosen in L2 between keys (inner product between keys is
dominated by key norms: every list would fill up with the few largest keys); search ranks by inner
product.

Build, for all groups of a layer at once:

1. sample at most ``train_queries`` training queries per group (seeded, the same rows in every
   group) and take the exact top-``nq`` keys of each with a chunked torch matmul + topk, on the
   build's device (the GPU when the layer's tensors are there);
2. co-occurrence candidates (``_cooccurrence``, numba, parallel over nodes): in every training
   query's ranked top list, each key is paired with the keys at most ``window`` ranks away; a key's
   candidates are its ``cands`` most frequent partners over all lists (ties: lower row first). Each
   key gets its own list, so keys that are the top-1 of many queries (large-norm "hub" keys) do not
   absorb the information, and keys of the same answer sets link to each other;
3. ``graph.build_graph`` in L2: prune each list to ``M`` (``graph._prune``: drop p if a kept
   neighbour r has |p - r| < |p - node|, then top up with the nearest dropped ones), add reverse
   edges (re-pruning lists above ``M``), then the connectivity pass: every key beam-searches its own
   vector and links to its ``conn`` pruned results both ways while lists have room (degree <= 3M),
   which reaches keys that no training query selected.

Entry point of a group: its most frequent top-1 key over the training queries. The search cost of a
query is close to the number of distinct neighbours of its true top keys, so ``conn`` is kept small:
most edges are query-aware ones.

``add`` applies the same co-occurrence rule online, with the queries the index served last (during
decoding: the current step's queries) as training queries: a new key that would rank r-th in one of
their result lists gets the keys ranked within ``window`` of r as candidates, pruned to ``M`` (L2),
plus ``conn`` edges from a beam search of its own vector (L2); a key that ranks in no list is linked
by that search alone. Neighbours link back to it, in row order.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from .base import Param
from .registry import register_index
from .graph import L2, GraphIndex

__all__ = ["RoarIndex", "exact_top_keys"]


def exact_top_keys(queries: np.ndarray, keys: np.ndarray, k: int, device=None) -> np.ndarray:
    """Rows of the ``k`` largest inner products, best first: queries [G, m, D], keys [G, n, D] -> [G, m, k] int64.

    Runs on ``device`` (None: the CPU) in blocks of groups and queries: at most 256 MiB of keys and a
    [g, chunk, n] score block near 64 MiB are on the device at once.
    """
    groups, m, dim = queries.shape
    n = keys.shape[1]
    device = torch.device("cpu") if device is None else torch.device(device)
    per_block = max(1, (1 << 26) // max(n * dim, 1))  # groups whose keys fit in 256 MiB of fp32
    out = np.empty((groups, m, k), np.int64)
    for g0 in range(0, groups, per_block):
        g1 = min(groups, g0 + per_block)
        key_t = torch.from_numpy(keys[g0:g1]).to(device).transpose(1, 2)  # [g, D, n]
        chunk = max(1, (1 << 24) // max((g1 - g0) * n, 1))
        for s in range(0, m, chunk):
            q = torch.from_numpy(np.ascontiguousarray(queries[g0:g1, s : s + chunk])).to(device)  # [g, c, D]
            top = torch.topk(torch.bmm(q, key_t), k, dim=2, sorted=True).indices  # [g, c, k]
            out[g0:g1, s : s + chunk] = top.cpu().numpy()
    return out


@njit(parallel=True, cache=True)
def _cooccurrence(top, occ_ptr, occ, n, window, out, out_cnt):
    """Each node's most frequent partners within ``window`` ranks in the training queries' top lists.

    top [G, s, nq] int32: ranked top keys of each training query; node v = g * n + x occurs at
    occ[occ_ptr[v]:occ_ptr[v + 1]] = query * nq + rank. Writes out [G * n, C] int32 (partners, most
    frequent first, ties by lower row) and out_cnt [G * n]. Nodes are processed in blocks that share
    one dense counter (reset after each node), each node writing only its own row.
    """
    groups, _, nq = top.shape
    total = groups * n
    cap = out.shape[1]
    block = 256
    for b in prange((total + block - 1) // block):
        count = np.zeros(n, np.int32)
        touched = np.empty(n, np.int32)
        for v in range(b * block, min(total, (b + 1) * block)):
            g = v // n
            x = v - g * n
            nt = 0
            for o in range(occ_ptr[v], occ_ptr[v + 1]):
                qi = occ[o] // nq
                r = occ[o] - qi * nq
                for r2 in range(max(0, r - window), min(nq, r + window + 1)):
                    y = top[g, qi, r2]
                    if y == x:
                        continue
                    if count[y] == 0:
                        touched[nt] = y
                        nt += 1
                    count[y] += 1
            ids = np.sort(touched[:nt])
            key = np.empty(nt, np.int64)
            for a in range(nt):
                key[a] = -count[ids[a]]
                count[ids[a]] = 0
            order = np.argsort(key, kind="mergesort")  # stable: ties keep ascending rows
            c = min(cap, nt)
            for a in range(c):
                out[v, a] = ids[order[a]]
            out_cnt[v] = c


@register_index
class RoarIndex(GraphIndex):
    """Query-aware graph over keys: co-occurrence in training queries' top lists, L2 pruning; inner-product search."""

    name = "roar"
    uses_train_queries = True
    link_metric = L2
    params = {
        **GraphIndex.params,
        "ef": Param(150, 1, None, doc="search beam width (queue length); must be >= k. 150: the smallest "
                    "reaching recall@100 >= 0.95 on every sampled head of the embedded model at 16K-32K"),
        "nq": Param(100, 2, 10_000, doc="exact top keys per training query"),
        "train_queries": Param(8192, 1, None, doc="training queries sampled per group, at most"),
        "window": Param(4, 1, 10_000, doc="keys at most this many ranks apart in a top list are partners"),
        "cands": Param(64, 1, 10_000, doc="most frequent partners per key, pruned to M"),
        "conn": Param(4, 0, 512, doc="extra edges per key from the connectivity pass (0: none); 4: the sweep's cheapest at 32K"),
        "recent": Param(32, 1, 4096, doc="search calls whose queries and results link keys added later"),
    }

    def _conn_degree(self) -> int:
        return self.config["conn"]

    def _build(self, keys: np.ndarray, train_queries: np.ndarray | None) -> None:
        # ring of the last `recent` search calls: queries [G, R, m, D], result scores and ids [G, R, m, k]
        self._ring: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._ring_calls = 0
        super()._build(keys, train_queries)

    def _search(self, queries: np.ndarray, k: int, config: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, scores, scored = super()._search(queries, k, config)
        groups, m, dim = queries.shape
        if self._ring is None or self._ring[2].shape[2:] != (m, k):  # first call, or another query count or k
            r = self.config["recent"]
            self._ring = (np.empty((groups, r, m, dim), np.float32), np.empty((groups, r, m, k), np.float32),
                          np.empty((groups, r, m, k), np.int64))
            self._ring_calls = 0
        slot = self._ring_calls % self._ring[0].shape[1]
        for buf, new in zip(self._ring, (queries, scores, ids)):
            buf[:, slot] = new
        self._ring_calls += 1
        return ids, scores, scored

    def _insert_candidates(self, keys: np.ndarray) -> np.ndarray:
        """Co-occurrence candidates of new keys (groups, t, E) from the results of the last ``recent`` searches.

        The queries served last are the freshest training queries there are: a new key that would
        rank r-th in a query's result list gets the keys ranked within ``window`` of r as candidates,
        the rule the build applies to the prefill queries' top lists.
        """
        groups, t, _ = keys.shape
        if self._ring is None:
            return np.full((groups, t, 0), -1, np.int32)
        filled = min(self._ring_calls, self._ring[0].shape[1])
        queries, scores, ids = (b[:, :filled].reshape(groups, -1, b.shape[3]) for b in self._ring)  # [G, m', D|k]
        k, w = ids.shape[2], self.config["window"]
        new_scores = np.einsum("gmd,gtd->gtm", queries, keys)  # [G, t, m]
        rank = (scores[:, None, :, :] > new_scores[..., None]).sum(axis=3)  # [G, t, m], its place in each list
        offsets = np.arange(-w, w)  # the w ranks above and the w below its place
        pos = rank[..., None] + offsets  # [G, t, m, 2w]
        valid = (rank[..., None] < k) & (pos >= 0) & (pos < k)
        g_idx = np.arange(groups)[:, None, None, None]
        m_idx = np.arange(queries.shape[1])[None, None, :, None]
        picked = np.where(valid, ids[g_idx, m_idx, np.clip(pos, 0, k - 1)], -1)  # [G, t, m, 2w]
        return picked.reshape(groups, t, -1).astype(np.int32)

    def _candidates(
        self, keys: np.ndarray, train_queries: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        groups, n, _ = keys.shape
        m = train_queries.shape[1]
        picked = np.sort(np.random.default_rng(0).choice(m, min(m, self.config["train_queries"]), replace=False))
        queries = np.ascontiguousarray(train_queries[:, picked])  # [G, s, D]
        s, nq = queries.shape[1], min(self.config["nq"], n)
        top = exact_top_keys(queries, keys, nq, self.build_device).astype(np.int32)  # [G, s, nq]
        # entry point: the most frequent top-1 key of each group
        for g in range(groups):
            self._entries[g] = np.bincount(top[g, :, 0], minlength=n).argmax()
        # occurrences of each node (group-major number) as query * nq + rank, in that order
        node = (np.arange(groups, dtype=np.int64)[:, None, None] * n + top).ravel()
        order = np.argsort(node, kind="stable")
        occ = order % (s * nq)
        occ_ptr = np.zeros(groups * n + 1, np.int64)
        occ_ptr[1:] = np.cumsum(np.bincount(node, minlength=groups * n))
        out = np.empty((groups * n, self.config["cands"]), np.int32)
        out_cnt = np.zeros(groups * n, np.int64)
        _cooccurrence(top, occ_ptr, occ, n, self.config["window"], out, out_cnt)
        flat = out[np.arange(out.shape[1])[None, :] < out_cnt[:, None]]
        ptr = np.zeros(groups * n + 1, np.int64)
        ptr[1:] = np.cumsum(out_cnt)
        nodes = np.arange(groups * n)
        return np.stack([nodes // n, nodes % n], axis=1), ptr, flat
