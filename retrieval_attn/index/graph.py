"""Proximity-graph machinery shared by the graph backends: numba kernels and the ``GraphIndex`` base.

The kernels own the beam search (used for queries, for the connectivity pass of the build, for
inserting keys, and for replaying hnswlib's level-0 search), the neighbour pruning rule, and the
construction steps that turn per-node candidate lists into a graph. ``GraphIndex`` owns the storage
of a graph index (keys, padded adjacency, entry points), its growth for ``add`` and its search;
subclasses (``roar``, ``keygraph``) only decide the initial candidate list of each node.

Storage of one layer, ``G`` groups, capacity ``cap`` rows, out-degree at most ``maxdeg``:

- keys ``[G, cap, D]`` fp32 (rows ``n..cap`` unused),
- adjacency ``[G, cap, maxdeg]`` int32 of row ids within the group, valid up to ``deg [G, cap]`` int32,
- one entry point per group ``[G]`` int64.

Beam widths (``ef``, ``build_ef``) at or above the number of keys all mean "keep every visited key":
the kernels get ``min(width, keys)``, which finds the same results without allocating for absent keys.

Distances: ``IP`` is ``-<a, b>`` (maximum inner product), ``L2`` is ``|a - b|^2``. Every kernel runs
one ``prange`` over independent work items (group x query, group x node, or group) that write only
their own outputs and read nothing written in the same loop, so results do not depend on the number
of numba threads. Nothing here knows about torch, models or the engine.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import numpy as np
from numba import njit, prange

from .base import GrowableKeys, KeyIndex, Param

__all__ = [
    "IP", "L2", "FASTMATH", "distance", "beam_scratch", "beam_search", "search_graph", "build_graph", "insert_nodes", "GraphIndex"
]

IP = 0
L2 = 1

# Reassociation lets LLVM vectorise the dot products; no-NaN/no-Inf flags are left out on purpose.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@njit(inline="always", fastmath=FASTMATH)
def distance(a, b, metric):
    """Distance between two vectors a, b [D]: -<a, b> (IP) or |a - b|^2 (L2)."""
    s = np.float32(0.0)
    if metric == IP:
        for i in range(a.shape[0]):
            s += a[i] * b[i]
        return -s
    for i in range(a.shape[0]):
        t = a[i] - b[i]
        s += t * t
    return s


@njit(inline="always")
def _visit(visited, node):
    """Mark ``node`` in the bitset ``visited`` [words] uint64; True if it was already marked."""
    w = node >> 6
    bit = np.uint64(1) << np.uint64(node & 63)
    if visited[w] & bit:
        return True
    visited[w] |= bit
    return False


@njit(inline="always")
def beam_scratch(ef, n):
    """Scratch of one beam search of queue length ``ef`` over ``n`` nodes: pool ids, distances, expanded flags, visited bitset."""
    return np.empty(ef, np.int32), np.empty(ef, np.float32), np.empty(ef, np.bool_), np.zeros((n + 63) >> 6, np.uint64)


@njit(inline="always")
def _pool_insert(pool_i, pool_d, pool_x, size, cap, node, d):
    """Insert (node, d) into the ascending pool of ``size`` entries and capacity ``cap``; return its slot.

    The caller has checked that the pool is not full or that d beats the last entry. A linear scan
    from the end that shifts as it goes (insertion sort) beats a binary search + shift here: no
    unpredictable branches. Equal distances keep insertion order, so the pool is deterministic.
    """
    lo = size if size < cap else cap - 1
    while lo > 0 and pool_d[lo - 1] > d:
        pool_i[lo] = pool_i[lo - 1]
        pool_d[lo] = pool_d[lo - 1]
        pool_x[lo] = pool_x[lo - 1]
        lo -= 1
    pool_i[lo] = node
    pool_d[lo] = d
    pool_x[lo] = False
    return lo


@njit(cache=True, fastmath=FASTMATH)
def beam_search(keys_g, n, adj_g, deg_g, entry, q, ef, need, metric, pool_i, pool_d, pool_x, visited):
    """Best-first beam search of ``q`` [D] over the first ``n`` nodes of one group's graph.

    keys_g [cap, D], adj_g [cap, maxdeg], deg_g [cap]; the pool (pool_i int32, pool_d fp32, pool_x
    bool, each [ef]) ends sorted by distance. ``visited`` [ceil(n / 64)] uint64 must be zeroed. The
    beam expands the best unexpanded pool entry until none is left; if fewer than ``need`` nodes were
    reachable it restarts from the lowest unvisited row, so at least min(need, n) results come back.
    Returns (pool size, number of distance computations).
    """
    scored = 0
    size = 0
    restart = 0  # rows below this are visited (only used for restarts)
    if entry >= 0 and n > 0:
        _visit(visited, entry)
        pool_i[0] = entry
        pool_d[0] = distance(q, keys_g[entry], metric)
        pool_x[0] = False
        size = 1
        scored = 1
    while True:
        cur = 0
        while cur < size:
            if pool_x[cur]:
                cur += 1
                continue
            pool_x[cur] = True
            node = pool_i[cur]
            low = size  # lowest slot that received a new node while expanding ``node``
            for j in range(deg_g[node]):
                nb = adj_g[node, j]
                if _visit(visited, nb):
                    continue
                d = distance(q, keys_g[nb], metric)
                scored += 1
                if size == ef and d >= pool_d[size - 1]:
                    continue
                pos = _pool_insert(pool_i, pool_d, pool_x, size, ef, nb, d)
                if size < ef:
                    size += 1
                if pos < low:
                    low = pos
            cur = low if low <= cur else cur + 1
        if size >= need or scored >= n:
            return size, scored
        while visited[restart >> 6] & (np.uint64(1) << np.uint64(restart & 63)):
            restart += 1
        _visit(visited, restart)
        d = distance(q, keys_g[restart], metric)
        scored += 1
        if size < ef or d < pool_d[size - 1]:
            _pool_insert(pool_i, pool_d, pool_x, size, ef, restart, d)
            if size < ef:
                size += 1


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def search_graph(keys, n, adj, deg, entries, queries, k, ef, ids, scores, scored):
    """Top-``k`` by inner product for every query of every group, one beam of width ``ef`` each.

    keys [G, cap, D], adj [G, cap, maxdeg], deg [G, cap], entries [G], queries [G, m, D];
    writes ids [G, m, k] int64, scores [G, m, k] fp32 (exact q . key) and scored [G, m] int64.
    """
    groups, m = queries.shape[0], queries.shape[1]
    ip = np.int64(IP)  # a plain int64 (a global is a literal), so beam_search compiles once for all callers
    for t in prange(groups * m):
        g = t // m
        i = t - g * m
        pool_i, pool_d, pool_x, visited = beam_scratch(ef, n)
        _, cnt = beam_search(keys[g], n, adj[g], deg[g], entries[g], queries[g, i], ef, k, ip,
                             pool_i, pool_d, pool_x, visited)
        for j in range(k):
            ids[g, i, j] = pool_i[j]
            scores[g, i, j] = -pool_d[j]
        scored[g, i] = cnt


@njit(cache=True, fastmath=FASTMATH)
def _sorted_candidates(keys_g, node, raw, metric):
    """Distinct rows of ``raw`` other than ``node`` and their distances to it, nearest first."""
    uniq = np.unique(raw)
    cand = uniq[(uniq != node) & (uniq >= 0)]
    d = np.empty(cand.shape[0], np.float32)
    for a in range(cand.shape[0]):
        d[a] = distance(keys_g[node], keys_g[cand[a]], metric)
    order = np.argsort(d, kind="mergesort")
    return cand[order], d[order]


@njit(cache=True, fastmath=FASTMATH)
def _prune(keys_g, cand, cand_d, cap, metric, out):
    """Choose at most ``cap`` neighbours of a node among candidates sorted by distance to it, cand_d.

    First the pruning rule, nearest first: candidate p is dropped if an already kept neighbour r has
    dist(p, r) < dist(p, node). Then, as RoarGraph's projection does, the dropped candidates top the
    list up to ``cap``, nearest first: with inner product the rule alone keeps one or two large-norm
    neighbours per key, and on attention-like data a third of the keys then had no in-edge.
    Writes the rows to ``out`` (rule survivors first) and returns their count.
    """
    kept = np.zeros(cand.shape[0], np.bool_)
    cnt = 0
    for a in range(cand.shape[0]):
        if cnt == cap:
            break
        p = cand[a]
        keep = True
        for b in range(cnt):
            if distance(keys_g[p], keys_g[out[b]], metric) < cand_d[a]:
                keep = False
                break
        if keep:
            out[cnt] = p
            kept[a] = True
            cnt += 1
    for a in range(cand.shape[0]):
        if cnt == cap:
            break
        if not kept[a]:
            out[cnt] = cand[a]
            cnt += 1
    return cnt


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _link(keys, work, ptr, flat, cap, metric, adj, deg):
    """Set each work node's out-edges to its pruned candidates (at most ``cap``).

    work [W, 2] (group, node) with distinct rows; the candidates of work item w are flat[ptr[w]:ptr[w + 1]].
    """
    for w in prange(work.shape[0]):
        g, v = work[w, 0], work[w, 1]
        cand, cand_d = _sorted_candidates(keys[g], v, flat[ptr[w] : ptr[w + 1]], metric)
        deg[g, v] = _prune(keys[g], cand, cand_d, cap, metric, adj[g, v])


@njit(cache=True)
def _in_edges(adj, deg, n, with_own):
    """For every node, its in-edge sources (ascending), after its own out-edges if ``with_own``, as CSR.

    adj [G, cap, width], deg [G, cap]; returns work [G * n, 2] (group, node), ptr [G * n + 1], flat int32.
    """
    groups = adj.shape[0]
    ptr = np.zeros(groups * n + 1, np.int64)
    for g in range(groups):
        for u in range(n):
            if with_own:
                ptr[g * n + u + 1] += deg[g, u]
            for j in range(deg[g, u]):
                ptr[g * n + adj[g, u, j] + 1] += 1
    for i in range(groups * n):
        ptr[i + 1] += ptr[i]
    flat = np.empty(ptr[-1], np.int32)
    fill = ptr[:-1].copy()
    if with_own:
        for g in range(groups):
            for u in range(n):
                for j in range(deg[g, u]):
                    flat[fill[g * n + u]] = adj[g, u, j]
                    fill[g * n + u] += 1
    for g in range(groups):
        for u in range(n):
            for j in range(deg[g, u]):
                v = g * n + adj[g, u, j]
                flat[fill[v]] = u
                fill[v] += 1
    work = np.empty((groups * n, 2), np.int64)
    for i in range(groups * n):
        work[i, 0] = i // n
        work[i, 1] = i % n
    return work, ptr, flat


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _search_own(keys, n, adj, deg, entries, ef, cap, metric, extra, extra_deg):
    """Connectivity pass, step 1: beam-search every node's own vector; its pruned results -> extra [G, n, cap]."""
    groups = adj.shape[0]
    for t in prange(groups * n):
        g = t // n
        v = t - g * n
        pool_i, pool_d, pool_x, visited = beam_scratch(ef, n)
        size, _ = beam_search(keys[g], n, adj[g], deg[g], entries[g], keys[g, v], ef, ef, metric,
                              pool_i, pool_d, pool_x, visited)
        cand, cand_d = _sorted_candidates(keys[g], v, pool_i[:size], metric)
        extra_deg[g, v] = _prune(keys[g], cand, cand_d, cap, metric, extra[g, v])


@njit(cache=True, fastmath=FASTMATH)
def _append_new(keys_g, node, row, cnt, raw, metric):
    """Append the rows of ``raw`` not yet in row[:cnt] to ``row``, nearest to ``node`` first, while it has room.

    Returns the new count.
    """
    cand, _ = _sorted_candidates(keys_g, node, raw, metric)
    for a in range(cand.shape[0]):
        if cnt == row.shape[0]:
            break
        dup = False
        for b in range(cnt):
            if row[b] == cand[a]:
                dup = True
                break
        if not dup:
            row[cnt] = cand[a]
            cnt += 1
    return cnt


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _merge_extra(keys, work, ptr, src, extra, extra_deg, metric, adj, deg):
    """Connectivity pass, step 2: out-edges += extra edges, then += reverse extra edges, up to maxdeg.

    work [G * n, 2] (group, node) and src[ptr[w]:ptr[w + 1]]: the in-edge sources of the extra edges.
    """
    for w in prange(work.shape[0]):
        g, v = work[w, 0], work[w, 1]
        cnt = _append_new(keys[g], v, adj[g, v], np.int64(deg[g, v]), extra[g, v, : extra_deg[g, v]], metric)
        deg[g, v] = _append_new(keys[g], v, adj[g, v], cnt, src[ptr[w] : ptr[w + 1]], metric)


def build_graph(keys, n, work, ptr, flat, M, build_ef, entries, metric, adj, deg, conn=None):
    """Build a graph on the first ``n`` rows of every group from per-node candidate lists.

    keys [G, cap, D]; work [W, 2] (group, node), ptr [W + 1], flat: CSR candidate lists (nodes not
    in ``work`` start with no edges); adj [G, cap, maxdeg] and deg [G, cap] are filled in place.
    Steps, all with ``metric``: (1) prune each candidate list to M; (2) add reverse edges, re-pruning
    lists above M; (3) connectivity pass: beam-search each node's own vector from its group's entry
    point, prune the results to ``conn`` (default M; 0 skips the pass) and add them, then their
    reverse edges, while a list has room (degree <= maxdeg). Every prune is ``_prune``'s rule + fill.
    """
    deg[:, :n] = 0
    _link(keys, work, ptr, flat, M, metric, adj, deg)
    work_all, both_ptr, both = _in_edges(adj, deg, n, True)
    _link(keys, work_all, both_ptr, both, M, metric, adj, deg)
    conn = M if conn is None else conn
    if conn == 0:
        return
    extra = np.empty((adj.shape[0], n, conn), np.int32)
    extra_deg = np.zeros((adj.shape[0], n), np.int32)
    _search_own(keys, n, adj, deg, entries, build_ef, conn, metric, extra, extra_deg)
    work_all, in_ptr, in_src = _in_edges(extra, extra_deg, n, False)
    _merge_extra(keys, work_all, in_ptr, in_src, extra, extra_deg, metric, adj, deg)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def insert_nodes(keys, n_old, t, adj, deg, entries, ef, M, metric, cooc, conn):
    """Link rows n_old..n_old+t-1 of every group into its graph, in row order (groups in parallel).

    Each new node beam-searches its own vector (by ``metric``) over the nodes before it. Its out-edges
    are its pruned and filled candidates ``cooc[g, v - n_old]`` (int32, -1 padded; e.g. keys it
    co-occurs with in recent queries' results) followed by ``conn`` of the pruned search results, or,
    without candidates, the pruned search results alone (M). It is then added to each of those
    neighbours' lists: appended while the list has room, else the neighbour's list plus the new node
    is pruned and filled back to maxdeg (dropping one). A group with no nodes yet takes its first
    node as entry point.
    """
    groups, maxdeg = adj.shape[0], adj.shape[2]
    for g in prange(groups):
        pool_i, pool_d, pool_x, visited = beam_scratch(ef, n_old + t)
        scratch = np.empty(maxdeg + 1, np.int32)
        for v in range(n_old, n_old + t):
            deg[g, v] = 0
            if entries[g] < 0:
                entries[g] = v
                continue
            visited[:] = 0
            size, _ = beam_search(keys[g], v, adj[g], deg[g], entries[g], keys[g, v], ef, ef, metric,
                                  pool_i, pool_d, pool_x, visited)
            cand, cand_d = _sorted_candidates(keys[g], v, pool_i[:size], metric)
            given, given_d = _sorted_candidates(keys[g], v, cooc[g, v - n_old], metric)
            if given.shape[0] == 0:
                deg[g, v] = _prune(keys[g], cand, cand_d, M, metric, adj[g, v])
            else:
                cnt = _prune(keys[g], given, given_d, M, metric, adj[g, v])
                room = min(cnt + conn, maxdeg)
                deg[g, v] = _append_new(keys[g], v, adj[g, v, :room], np.int64(cnt), pool_i[:size], metric)
            for a in range(deg[g, v]):
                r = np.int64(adj[g, v, a])
                if deg[g, r] < maxdeg:
                    adj[g, r, deg[g, r]] = v
                    deg[g, r] += 1
                    continue
                scratch[:maxdeg] = adj[g, r]
                scratch[maxdeg] = v
                rc, rd = _sorted_candidates(keys[g], r, scratch, metric)
                deg[g, r] = _prune(keys[g], rc, rd, maxdeg, metric, adj[g, r])


class GraphIndex(KeyIndex):
    """Base of the numba graph backends: storage, growth, ``add`` and inner-product beam search.

    Subclasses implement ``_candidates(keys, train_queries) -> (work, ptr, flat)`` (the initial
    candidate list of each node, CSR; it may also replace the default entry points ``self._entries``,
    the key nearest in L2 to its group's mean key) and set ``link_metric``, the distance that builds
    the graph and links added keys (``IP`` or ``L2``); ``_conn_degree`` is the number of extra edges
    per node of the connectivity pass (default ``M``). Search always ranks by inner product.
    """

    link_metric: ClassVar[int] = IP
    search_params = ("ef",)
    params: ClassVar[dict[str, Param]] = {
        "M": Param(32, 2, 512, doc="out-degree cap of the pruned lists; stored degree <= 3M"),
        "build_ef": Param(64, 1, None, doc="beam width of the connectivity pass and of add()"),
        "ef": Param(128, 1, None, doc="search beam width (queue length); must be >= k"),
    }

    def _build(self, keys: np.ndarray, train_queries: np.ndarray | None) -> None:
        groups, n, dim = keys.shape
        self._keys = GrowableKeys.holding(keys)
        self._maxdeg = 3 * self.config["M"]
        self._adj = np.empty((groups, self._capacity, self._maxdeg), np.int32)
        self._deg = np.zeros((groups, self._capacity), np.int32)
        # entry point: the key nearest (L2) to its group's mean key; -1 while a group has no keys
        self._entries = np.full(groups, -1, np.int64)
        if n == 0:
            return
        centre = keys.mean(axis=1, keepdims=True)  # [G, 1, D]
        self._entries[:] = ((keys - centre) ** 2).sum(axis=2).argmin(axis=1)  # [G]
        work, ptr, flat = self._candidates(keys, train_queries)
        build_graph(self._keys.buffer, n, work, ptr, flat, self.config["M"], min(self.config["build_ef"], n),
                    self._entries, self.link_metric, self._adj, self._deg, self._conn_degree())

    @classmethod
    def _bytes_per_row(cls, config: dict[str, Any]) -> int:
        return 4 * (3 * config["M"] + 1)  # adjacency [3M] and degree, int32

    def _conn_degree(self) -> int:
        """Extra edges per node from the connectivity pass of the build (``build_graph``'s ``conn``)."""
        return self.config["M"]

    @property
    def _capacity(self) -> int:
        """Rows allocated per group (keys and adjacency grow together)."""
        return self._keys.buffer.shape[1]

    @abstractmethod
    def _candidates(
        self, keys: np.ndarray, train_queries: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Initial candidates per node: work [W, 2] int64 (group, node), ptr [W + 1] int64, flat int32."""

    def _add(self, keys: np.ndarray) -> None:
        n_old, t = self._keys.n, keys.shape[1]
        self._keys.append(keys)
        if self._capacity > self._adj.shape[1]:
            adj = np.empty((self.groups, self._capacity, self._maxdeg), np.int32)
            adj[:, :n_old] = self._adj[:, :n_old]
            deg = np.zeros((self.groups, self._capacity), np.int32)
            deg[:, :n_old] = self._deg[:, :n_old]
            self._adj, self._deg = adj, deg
        insert_nodes(self._keys.buffer, n_old, t, self._adj, self._deg, self._entries,
                     min(self.config["build_ef"], n_old + t), self.config["M"], self.link_metric,
                     self._insert_candidates(keys), self._conn_degree())

    def _insert_candidates(self, keys: np.ndarray) -> np.ndarray:
        """Given candidates of each new key (groups, t, E) int32, -1 padded; none by default."""
        return np.full((keys.shape[0], keys.shape[1], 0), -1, np.int32)

    def __len__(self) -> int:
        return self._keys.n if self.dim else 0

    @property
    def nbytes(self) -> int:
        if not self.dim:
            return 0
        return self._keys.nbytes + self._adj.nbytes + self._deg.nbytes + self._entries.nbytes

    def _search(self, queries: np.ndarray, k: int, config: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ef = config["ef"]
        if ef < k:
            raise ValueError(f"index {self.name!r}: ef ({ef}) must be >= k ({k})")
        groups, m, _ = queries.shape
        ids = np.empty((groups, m, k), np.int64)
        scores = np.empty((groups, m, k), np.float32)
        scored = np.empty((groups, m), np.int64)
        # a queue as long as the key set already holds every key: a longer one would only allocate more
        search_graph(self._keys.buffer, len(self), self._adj, self._deg, self._entries, queries, k, min(ef, len(self)),
                     ids, scores, scored)
        return ids, scores, scored
