"""``roar``: a query-aware proximity graph built from each group's prefill queries.

Keys that answer the same training query become neighbours, so a beam search driven by attention
queries (out-of-distribution with respect to keys) walks where queries land instead of where keys
cluster. This module owns the choice of training data, the query -> key co-occurrence candidates and
the entry point; storage, pruning, ``add`` and the search kernel are the shared ones of ``graph``.
Edges are chosen in L2 between keys (inner product between keys is dominated by key norms: every list
would fill up with the few largest keys); search ranks by inner product.

Build, for all groups of a layer at once. Costs per key in core-microseconds, measured at 32K keys
per head of the embedded model (head dim 64, 8,192 training queries, this project's 2-core CPU;
``bench/build.py``), after each step:

1. sample at most ``train_queries`` training queries per group (seeded, the same rows in every
   group) and take the exact top-``nq`` keys of each (``dense.exact_top_keys``: torch matmul + topk
   on the build's device, the GPU when the layer's tensors are there): s x D multiply-adds per key,
   ~50 us on the CPU (the one part that grows with the training set; a GPU makes it negligible);
2. co-occurrence candidates (``_occurrences``, a counting sort, then ``_cooccurrence``, numba,
   parallel over nodes): in every training query's ranked top list, each key is paired with the
   keys at most ``window`` ranks away; a key's candidates are its ``cands`` most frequent partners
   over all lists (ties: lower row first), picked by a histogram of counts, not a sort. Each key
   gets its own list, so keys that are the top-1 of many queries (large-norm "hub" keys) do not
   absorb the information, and keys of the same answer sets link to each other: ~5 us;
3. prune each list to ``M`` (``graph_kernels._prune``: drop p if a kept neighbour r has
   |p - r| < |p - node|, then top up with the nearest dropped ones), then add reverse edges,
   re-pruning lists above ``M``: ~5 us;
4. connectivity: most keys are in no training query's top list (on the embedded model, half of them
   at 32K); each key links to ``conn`` of its nearest *covered* keys (those step 3 linked; found in
   bulk by ``dense.nearest_covered``: clustering plus a scan of two clusters, then pruned), both ways,
   while lists have room (``max_degree``): ~8 us. It replaced a beam search of every key's own
   vector (RoarGraph's pass, still ``keygraph``'s), which cost 5x more and reached a lower recall on
   the worst heads;
5. reachability (``graph_kernels.span``): keys no edge reaches (their hubs' lists were full) are
   linked from a near reached key: ~1 us.

The graph part (steps 2-5) runs at ~50,000 keys per second per core.

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

from typing import Any

import numpy as np
from numba import njit, prange

from .base import Param, SearchResult
from .dense import exact_top_keys, fp32_rows
from .graph import DEGREE_CAP, _INSERT_CHUNK, GraphIndex
from .graph_kernels import L2, in_edges, link
from .registry import register_index

__all__ = ["RoarIndex"]


@njit(cache=True)
def _occurrences(top, n):
    """Where each node occurs in the top lists top [G, s, nq]: node v = g * n + x occurs at
    occ[ptr[v]:ptr[v + 1]] = query * nq + rank, in that order (a counting sort, O(G s nq))."""
    groups, s, nq = top.shape
    ptr = np.zeros(groups * n + 1, np.int64)
    for g in range(groups):
        for i in range(s):
            for r in range(nq):
                ptr[g * n + top[g, i, r] + 1] += 1
    for v in range(groups * n):
        ptr[v + 1] += ptr[v]
    occ = np.empty(ptr[-1], np.int64)
    fill = ptr[:-1].copy()
    for g in range(groups):
        for i in range(s):
            for r in range(nq):
                v = g * n + top[g, i, r]
                occ[fill[v]] = i * nq + r
                fill[v] += 1
    return ptr, occ


@njit(parallel=True, cache=True)
def _cooccurrence(top, occ_ptr, occ, n, window, out, out_cnt):
    """Each node's most frequent partners within ``window`` ranks in the training queries' top lists.

    top [G, s, nq] int32: ranked top keys of each training query; node v = g * n + x occurs at
    occ[occ_ptr[v]:occ_ptr[v + 1]] = query * nq + rank. Writes out [G * n, C] int32 (the C most
    frequent partners, ties going to lower rows, in ascending row order: the caller sorts them by
    distance anyway) and out_cnt [G * n]. Nodes are processed in blocks that share one dense counter,
    reset after each node, and a histogram of counts that finds the C-th count without sorting.
    """
    groups, s, nq = top.shape
    total = groups * n
    cap = out.shape[1]
    block = 256
    for b in prange((total + block - 1) // block):
        count = np.zeros(n, np.int32)
        touched = np.empty(n, np.int32)
        hist = np.zeros(2 * window * s + 2, np.int64)  # a partner counts at most 2 * window per occurrence
        for v in range(b * block, min(total, (b + 1) * block)):
            g = v // n
            x = v - g * n
            nt = 0
            top_count = 0
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
                    top_count = max(top_count, count[y])
            ids = touched[:nt]
            ids.sort()
            # threshold: the largest count c with at least `cap` partners counted >= c (or 1)
            for a in range(nt):
                hist[count[ids[a]]] += 1
            above, threshold = 0, 1
            for c in range(top_count, 0, -1):
                if above + hist[c] >= cap:
                    threshold = c
                    break
                above += hist[c]
            ties = cap - above  # partners taken among those counted exactly `threshold`, lowest rows first
            k = 0
            for a in range(nt):
                y = ids[a]
                c = count[y]
                if c > threshold or (c == threshold and ties > 0):
                    if c == threshold:
                        ties -= 1
                    out[v, k] = y
                    k += 1
                count[y] = 0
            hist[: top_count + 1] = 0
            out_cnt[v] = k


@register_index
class RoarIndex(GraphIndex):
    """Query-aware graph over keys: co-occurrence in training queries' top lists, L2 pruning; inner-product search."""

    name = "roar"
    uses_train_queries = True
    link_metric = L2
    params = {
        **GraphIndex.params,
        "M": Param(20, 2, DEGREE_CAP, doc="out-degree cap of the pruned candidate lists; 20 scored fewer keys at the "
                   "0.95 operating point than 24 or 32 on the embedded model at 8K and 32K, and holds less"),
        "ef": Param(200, 1, None, doc="search beam width (queue length); must be >= k. 200: the smallest on the "
                    "sweep's grid reaching recall@100 >= 0.95 on every sampled head of the embedded model at 16K-32K"),
        "nq": Param(100, 2, 10_000, doc="exact top keys per training query"),
        "train_queries": Param(8192, 1, None, doc="training queries sampled per group, at most"),
        "window": Param(4, 1, 10_000, doc="keys at most this many ranks apart in a top list are partners"),
        "cands": Param(64, 1, 10_000, doc="most frequent partners per key, pruned to M"),
        "conn": Param(4, 0, 64, doc="connectivity edges per key to its nearest covered keys (0: none)"),
        "recent": Param(32, 1, 4096, doc="search calls whose queries and results link keys added later"),
    }

    @classmethod
    def conn_degree(cls, config: dict) -> int:
        return config["conn"]

    @classmethod
    def expected_degree(cls, config: dict) -> float:
        # lists are pruned to M, then connectivity edges and their reverse top them up: on random keys
        # (every key in some top list) the mean degree measured M + 2 conn - 1 (M = 16, 20, 32); on the
        # embedded model's keys about 0.6 M + conn
        return min(float(config["max_degree"]), config["M"] + 2.0 * config["conn"] - 1)

    @classmethod
    def estimate_nbytes(cls, groups: int, n: int, dim: int, params: dict, queries: int = 1, k: int = 100,
                        added: int = 0) -> int:
        """The graph's, plus the ring of the last ``recent`` searches (queries, scores, ids)."""
        recent = cls.resolved_params(params)["recent"]
        return super().estimate_nbytes(groups, n, dim, params, queries, k, added) + groups * recent * queries * (
            dim * 4 + k * 12)

    @classmethod
    def estimate_build_nbytes(cls, groups: int, n: int, dim: int, params: dict, train: int = 0) -> int:
        """The graph build's, plus the training queries in fp32, their top lists and occurrences, the
        co-occurrence candidates and the connectivity step's nearest covered keys."""
        c = cls.resolved_params(params)
        s = min(train, c["train_queries"])
        per_node = c["cands"] * 8 + 8 + 16 * 4 + c["conn"] * 8
        return super().estimate_build_nbytes(groups, n, dim, params, train) + groups * (
            s * (dim * 4 + c["nq"] * 12) + n * per_node)

    def _build(self, train_queries: np.ndarray | None) -> None:
        # ring of the last `recent` search calls: queries [G, R, m, D], result scores and ids [G, R, m, k]
        self._ring: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._ring_calls = 0
        super()._build(train_queries)

    def _adjacency(self, train_queries: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        groups, n, rows = self.groups, len(self), self.rows()
        m = train_queries.shape[1]
        picked = np.sort(np.random.default_rng(0).choice(m, min(m, self.config["train_queries"]), replace=False))
        queries = np.ascontiguousarray(train_queries[:, picked])  # [G, s, D]
        nq = min(self.config["nq"], n)
        top = exact_top_keys(queries, rows, n, nq, self.build_device)  # [G, s, nq]
        # entry point: the most frequent top-1 key of each group
        for g in range(groups):
            self._entries[g] = np.bincount(top[g, :, 0], minlength=n).argmax()
        occ_ptr, occ = _occurrences(top, n)
        cand = np.empty((groups * n, self.config["cands"]), np.int32)
        cand_cnt = np.zeros(groups * n, np.int64)
        _cooccurrence(top, occ_ptr, occ, n, self.config["window"], cand, cand_cnt)
        flat = cand[np.arange(cand.shape[1])[None, :] < cand_cnt[:, None]]
        ptr = np.zeros(groups * n + 1, np.int64)
        ptr[1:] = np.cumsum(cand_cnt)
        nodes = np.arange(groups * n)
        work = np.stack([nodes // n, nodes % n], axis=1)  # [G * n, 2] (group, node)
        adj = np.empty((groups, n, self.config["max_degree"]), np.int32)
        deg = np.zeros((groups, n), np.int32)
        M = self.config["M"]
        link(rows, work, ptr, flat, M, L2, adj, deg)
        work, both_ptr, both = in_edges(adj, deg, n, True)
        link(rows, work, both_ptr, both, M, L2, adj, deg)
        self.connect(adj, deg, deg > 0, self.config["conn"])
        return adj, deg

    def _search(self, queries: np.ndarray, k: int, config: dict, out: SearchResult) -> None:
        super()._search(queries, k, config, out)
        groups, m, dim = queries.shape
        if self._ring is None or self._ring[2].shape[2:] != (m, k):  # first call, or another query count or k
            r = self.config["recent"]
            self._ring = (np.empty((groups, r, m, dim), np.float32), np.empty((groups, r, m, k), np.float32),
                          np.empty((groups, r, m, k), np.int64))
            self._ring_calls = 0
        slot = self._ring_calls % self._ring[0].shape[1]
        for buf, new in zip(self._ring, (queries, out.scores, out.ids)):
            buf[:, slot] = new
        self._ring_calls += 1

    def _own_nbytes(self) -> int:
        return super()._own_nbytes() + (sum(b.nbytes for b in self._ring) if self._ring is not None else 0)

    @classmethod
    def estimate_add_nbytes(cls, groups: int, dim: int, params: dict[str, Any], queries: int = 1, k: int = 100) -> int:
        """One insert chunk's candidates (``_insert_candidates``): per new key and ring query its score and
        rank, the comparison with the k results, and 2 x window positions, flags and picks; the keys in fp32."""
        c = cls.resolved_params(params)
        m, w = c["recent"] * queries, c["window"]
        per_pair = 4 + 8 + k + 2 * w * (8 + 1 + 8 + 8 + 4)  # score, rank, comparison, pos/valid/clip/pick/int32
        return groups * _INSERT_CHUNK * (m * per_pair + dim * 4)

    def _insert_candidates(self, first: int, t: int) -> np.ndarray:
        """Co-occurrence candidates of new keys ``first .. first + t - 1`` (groups, t, E) from the results of
        the last ``recent`` searches.

        The queries served last are the freshest training queries there are: a new key that would
        rank r-th in a query's result list gets the keys ranked within ``window`` of r as candidates,
        the rule the build applies to the prefill queries' top lists. The temporaries are
        ``[G, t, m', k]`` and ``[G, t, m', 2 window]`` for the ``m'`` ring queries: ``add`` bounds them
        by asking for one insert chunk at a time.
        """
        groups = self.groups
        if self._ring is None:
            return np.full((groups, t, 0), -1, np.int32)
        keys = fp32_rows(self.rows()[:, first : first + t], "cpu").numpy()  # [G, t, D]
        filled = min(self._ring_calls, self._ring[0].shape[1])
        queries, scores, ids = (b[:, :filled].reshape(groups, -1, b.shape[3]) for b in self._ring)  # [G, m', D|k]
        k, w = ids.shape[2], self.config["window"]
        new_scores = np.einsum("gmd,gtd->gtm", queries, keys)  # [G, t, m']
        rank = (scores[:, None, :, :] > new_scores[..., None]).sum(axis=3)  # [G, t, m'], its place in each list
        offsets = np.arange(-w, w)  # the w ranks above and the w below its place
        pos = rank[..., None] + offsets  # [G, t, m', 2w]
        valid = (rank[..., None] < k) & (pos >= 0) & (pos < k)
        g_idx = np.arange(groups)[:, None, None, None]
        m_idx = np.arange(queries.shape[1])[None, None, :, None]
        picked = np.where(valid, ids[g_idx, m_idx, np.clip(pos, 0, k - 1)], -1)  # [G, t, m', 2w]
        return picked.reshape(groups, t, -1).astype(np.int32)
