"""The numba kernels of the graph backends: beam search, neighbour pruning, the steps of a build, the
insertion of added keys, and the arena that holds every node's neighbour list.

Keys are read in place from an index's key rows (fp32, or bf16/fp16 bits widened on load, see
``retrieval_attn.rows``); distances are fp32: ``IP`` is ``-<a, b>`` (maximum inner product), ``L2``
is ``|a - b|^2``.

The adjacency of a layer (a ``graph.Graph``: ``start, count, room, edges, fill, garbage``) keeps each
node's neighbours in one contiguous run of a per-group arena: node v of group g owns
``edges[g, start[g, v] : start[g, v] + room[g, v]]``, of which ``count[g, v]`` are used. A list that
fills up moves to a run a quarter longer (``grown_room``: at least 4 slots more) at the end of the
arena (``_push``; the old run becomes garbage that the index compacts away), up to the graph's degree
cap, beyond which the list and the new edge are pruned back to the cap. A built list is exactly as
long as its neighbours, so the first edge added to it moves it: a run twice as long would leave most
of its new room empty in every list a decode step's key links back to. So lists are as long as the build and the insertions make them:
there is no fixed width.

Beam widths at or above the number of keys all mean "keep every visited key": callers pass
``min(width, keys)``. Search scratch (pool and visited bitset) comes from the caller, one row per
numba thread, so a search allocates nothing. Every kernel runs one ``prange`` over independent work
items that write only their own outputs (or, for insertion, only their own group), so results do not
depend on the number of threads. Nothing here knows about torch models or the engine.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ..rows import FASTMATH, f32, grown_capacity

__all__ = [
    "IP", "L2", "distance", "sorted_insert", "beam_search", "search_graph", "link", "in_edges", "merge_extra", "search_own",
    "arena_capacity", "grown_room", "to_arena", "compact_arena", "span", "insert_nodes", "mean_rows", "nearest_rows",
]

IP = 0
L2 = 1

_grown_capacity = njit(cache=True)(grown_capacity)  # the project's growth rule, callable from the kernels


@njit(cache=True)
def arena_capacity(slots):
    """Arena slots a build allots for ``slots`` in use: a sixteenth more (at least 1024) for the first
    moves of lists that decoding extends; beyond that the arena grows by the project's rule."""
    return slots + max(1024, slots // 16)


@njit(inline="always", fastmath=FASTMATH)
def distance(a, b, metric):
    """Distance between two rows a, b [D] of any kernel dtype: -<a, b> (IP) or |a - b|^2 (L2), in fp32."""
    s = np.float32(0.0)
    if metric == IP:
        for i in range(a.shape[0]):
            s += f32(a[i]) * f32(b[i])
        return -s
    for i in range(a.shape[0]):
        t = f32(a[i]) - f32(b[i])
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
def sorted_insert(ids, dists, cap, node, d):
    """Insert (node, d) into the full ascending list ids/dists of length ``cap``, dropping its last entry
    (the caller has checked that d beats it); equal distances keep insertion order."""
    pos = cap - 1
    while pos > 0 and dists[pos - 1] > d:
        dists[pos] = dists[pos - 1]
        ids[pos] = ids[pos - 1]
        pos -= 1
    dists[pos] = d
    ids[pos] = node


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


@njit(inline="always", fastmath=FASTMATH)
def _consider(rows_g, q, nb, metric, ef, pool_i, pool_d, pool_x, visited, size, low):
    """One neighbour ``nb`` of the node being expanded: score it unless visited, insert it if it is good
    enough. Returns (pool size, lowest slot changed, 1 if it was scored else 0)."""
    if _visit(visited, nb):
        return size, low, 0
    d = distance(q, rows_g[nb], metric)
    if size == ef and d >= pool_d[size - 1]:
        return size, low, 1
    pos = _pool_insert(pool_i, pool_d, pool_x, size, ef, nb, d)
    if size < ef:
        size += 1
    return size, min(low, pos), 1


@njit(cache=True, fastmath=FASTMATH)
def beam_search(rows_g, n, graph, g, entry, q, ef, need, metric, pool_i, pool_d, pool_x, visited):
    """Best-first beam search of ``q`` [D] over the first ``n`` nodes of group ``g`` of ``graph``.

    rows_g [cap, D] (any kernel dtype); the pool (pool_i int32, pool_d fp32, pool_x bool, each [>= ef])
    ends sorted by distance. ``visited`` [>= ceil(n / 64)] uint64 is zeroed here. The beam expands the
    best unexpanded pool entry until none is left; if fewer than ``need`` nodes were reachable it
    restarts from the lowest unvisited row, so at least min(need, n) results come back.
    Returns (pool size, number of distance computations).
    """
    start, count, _, edges, _, _ = graph
    visited[: (n + 63) >> 6] = 0
    scored = 0
    size = 0
    restart = 0  # rows below this are visited (only used for restarts)
    if entry >= 0 and n > 0:
        _visit(visited, entry)
        pool_i[0] = entry
        pool_d[0] = distance(q, rows_g[entry], metric)
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
            s0 = start[g, node]
            for j in range(s0, s0 + count[g, node]):
                size, low, c = _consider(rows_g, q, edges[g, j], metric, ef, pool_i, pool_d, pool_x, visited,
                                         size, low)
                scored += c
            cur = low if low <= cur else cur + 1
        if size >= need or scored >= n:
            return size, scored
        while visited[restart >> 6] & (np.uint64(1) << np.uint64(restart & 63)):
            restart += 1
        _visit(visited, restart)
        d = distance(q, rows_g[restart], metric)
        scored += 1
        if size < ef or d < pool_d[size - 1]:
            _pool_insert(pool_i, pool_d, pool_x, size, ef, restart, d)
            if size < ef:
                size += 1


@njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def search_graph(rows, n, graph, entries, queries, k, ef, ids, scores, scored, pool_i, pool_d, pool_x, visited):
    """Top-``k`` by inner product for every query of every group, one beam of width ``ef`` each.

    rows [G, cap, D], entries [G], queries [G, m, D] fp32; writes ids [G, m, k] int64, scores [G, m, k]
    fp32 (exact q . key) and scored [G, m] int64. Scratch rows ``[thread]`` of pool_* [T, >= ef] and
    visited [T, >= ceil(n / 64)].
    """
    groups, m = queries.shape[0], queries.shape[1]
    ip = np.int64(IP)  # a plain int64 (a global is a literal), so beam_search compiles once for all callers
    for t in prange(groups * m):
        g = t // m
        i = t - g * m
        th = numba.get_thread_id()
        _, cnt = beam_search(rows[g], n, graph, g, entries[g], queries[g, i], ef, k, ip,
                             pool_i[th], pool_d[th], pool_x[th], visited[th])
        for j in range(k):
            ids[g, i, j] = pool_i[th, j]
            scores[g, i, j] = -pool_d[th, j]
        scored[g, i] = cnt


@njit(cache=True, fastmath=FASTMATH)
def _sorted_candidates(rows_g, node, raw, metric):
    """Distinct rows of ``raw`` other than ``node`` (and >= 0) and their distances to it, nearest first."""
    uniq = np.unique(raw)
    cand = uniq[(uniq != node) & (uniq >= 0)]
    d = np.empty(cand.shape[0], np.float32)
    for a in range(cand.shape[0]):
        d[a] = distance(rows_g[node], rows_g[cand[a]], metric)
    order = np.argsort(d, kind="mergesort")
    return cand[order], d[order]


@njit(cache=True, fastmath=FASTMATH)
def _prune(rows_g, cand, cand_d, cap, metric, out):
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
            if distance(rows_g[p], rows_g[out[b]], metric) < cand_d[a]:
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
def link(rows, work, ptr, flat, cap, metric, adj, deg):
    """Set each work node's out-edges to its pruned candidates (at most ``cap``).

    work [W, 2] (group, node) with distinct rows; the candidates of work item w are flat[ptr[w]:ptr[w + 1]];
    adj [G, n, width] and deg [G, n] receive the lists.
    """
    for w in prange(work.shape[0]):
        g, v = work[w, 0], work[w, 1]
        cand, cand_d = _sorted_candidates(rows[g], v, flat[ptr[w] : ptr[w + 1]], metric)
        deg[g, v] = _prune(rows[g], cand, cand_d, cap, metric, adj[g, v])


@njit(cache=True)
def in_edges(adj, deg, n, with_own):
    """For every node, its in-edge sources (ascending), after its own out-edges if ``with_own``, as CSR.

    adj [G, n, width], deg [G, n]; returns work [G * n, 2] (group, node), ptr [G * n + 1], flat int32.
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


@njit(cache=True, fastmath=FASTMATH)
def _append_new(rows_g, node, row, cnt, raw, metric):
    """Append the rows of ``raw`` not yet in row[:cnt] to ``row``, nearest to ``node`` first, while it has room.

    Returns the new count.
    """
    cand, _ = _sorted_candidates(rows_g, node, raw, metric)
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
def merge_extra(rows, work, ptr, src, extra, extra_deg, metric, adj, deg):
    """Out-edges += extra edges, then += reverse extra edges, while a list has room (adj's width).

    work [G * n, 2] (group, node) and src[ptr[w]:ptr[w + 1]]: the in-edge sources of the extra edges.
    """
    for w in prange(work.shape[0]):
        g, v = work[w, 0], work[w, 1]
        cnt = _append_new(rows[g], v, adj[g, v], np.int64(deg[g, v]), extra[g, v, : extra_deg[g, v]], metric)
        deg[g, v] = _append_new(rows[g], v, adj[g, v], cnt, src[ptr[w] : ptr[w + 1]], metric)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def search_own(rows, n, graph, entries, ef, cap, metric, extra, extra_deg, pool_i, pool_d, pool_x, visited):
    """Every node beam-searches its own vector from its group's entry point; its pruned results -> extra [G, n, cap]."""
    groups = entries.shape[0]
    for t in prange(groups * n):
        g = t // n
        v = t - g * n
        th = numba.get_thread_id()
        size, _ = beam_search(rows[g], n, graph, g, entries[g], rows[g, v], ef, ef, metric,
                              pool_i[th], pool_d[th], pool_x[th], visited[th])
        cand, cand_d = _sorted_candidates(rows[g], v, pool_i[th, :size], metric)
        extra_deg[g, v] = _prune(rows[g], cand, cand_d, cap, metric, extra[g, v])


@njit(cache=True)
def to_arena(adj, deg, n, node_cap):
    """The arena layout of a fixed-width adjacency adj [G, >= n, width], deg [G, >= n]: each list gets a
    run exactly its length. Returns start [G, node_cap] int32, count and room [G, node_cap] uint8,
    edges [G, arena_capacity(longest total)] int32, fill [G] int64, garbage [G] int64."""
    groups = adj.shape[0]
    start = np.zeros((groups, node_cap), np.int32)
    count = np.zeros((groups, node_cap), np.uint8)
    room = np.zeros((groups, node_cap), np.uint8)
    fill = np.zeros(groups, np.int64)
    for g in range(groups):
        for v in range(n):
            start[g, v] = fill[g]
            count[g, v] = deg[g, v]
            room[g, v] = deg[g, v]
            fill[g] += deg[g, v]
    edges = np.empty((groups, arena_capacity(fill.max())), np.int32)
    for g in range(groups):
        for v in range(n):
            edges[g, start[g, v] : start[g, v] + deg[g, v]] = adj[g, v, : deg[g, v]]
    return start, count, room, edges, fill, np.zeros(groups, np.int64)


@njit(cache=True)
def compact_arena(graph, n, extra):
    """The same lists without the garbage runs: a new arena in which node v keeps its room, in node order,
    with room for ``extra`` more slots (and the growth slack) per group.

    Returns (start, edges, fill, garbage) of the compacted arena."""
    start, count, room, edges, _, _ = graph
    groups = start.shape[0]
    new_start = np.zeros_like(start)
    fill = np.zeros(groups, np.int64)
    for g in range(groups):
        for v in range(n):
            new_start[g, v] = fill[g]
            fill[g] += room[g, v]
    new_edges = np.empty((groups, _grown_capacity(fill.max() + extra)), np.int32)
    for g in range(groups):
        for v in range(n):
            new_edges[g, new_start[g, v] : new_start[g, v] + count[g, v]] = edges[g, start[g, v] : start[g, v] + count[g, v]]
    return new_start, new_edges, fill, np.zeros(groups, np.int64)


@njit(cache=True)
def grown_room(room, cap):
    """The run a full list of ``room`` slots moves to: a quarter longer, at least 4 slots more, at most ``cap``."""
    return min(cap, room + max(4, room // 4))


@njit(cache=True)
def _push(graph, g, v, u, cap):
    """Append u to v's list; a full list moves to a longer run (``grown_room``) at the arena's end. False
    when the list is at ``cap`` or the arena has no room left: the caller prunes instead."""
    start, count, room, edges, fill, garbage = graph
    c = np.int64(count[g, v])
    if c < room[g, v]:
        edges[g, start[g, v] + c] = u
        count[g, v] = c + 1
        return True
    grown = grown_room(np.int64(room[g, v]), cap)
    if grown <= room[g, v] or fill[g] + grown > edges.shape[1]:
        return False
    s0, s1 = start[g, v], fill[g]
    edges[g, s1 : s1 + c] = edges[g, s0 : s0 + c]
    garbage[g] += room[g, v]
    start[g, v] = s1
    room[g, v] = grown
    fill[g] = s1 + grown
    edges[g, s1 + c] = u
    count[g, v] = c + 1
    return True


@njit(cache=True, fastmath=FASTMATH)
def _add_edge(rows_g, graph, g, v, u, cap, metric, scratch):
    """Add the edge v -> u: pushed, or, at the cap, v's list and u pruned back to its room."""
    if _push(graph, g, v, u, cap):
        return
    start, count, room, edges, _, _ = graph
    c = np.int64(count[g, v])
    s0 = start[g, v]
    scratch[:c] = edges[g, s0 : s0 + c]
    scratch[c] = u
    cand, cand_d = _sorted_candidates(rows_g, v, scratch[: c + 1], metric)
    count[g, v] = _prune(rows_g, cand, cand_d, room[g, v], metric, edges[g, s0 : s0 + room[g, v]])


@njit(inline="always")
def _reach(graph, g, start_node, reached, queue):
    """Mark every node reachable from ``start_node`` in group ``g`` (breadth-first)."""
    start, count, _, edges, _, _ = graph
    reached[start_node] = True
    queue[0] = start_node
    head, tail = 0, 1
    while head < tail:
        v = queue[head]
        head += 1
        for j in range(start[g, v], start[g, v] + count[g, v]):
            u = edges[g, j]
            if not reached[u]:
                reached[u] = True
                queue[tail] = u
                tail += 1


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def span(rows, n, graph, entries, ef, cap, metric, pool_i, pool_d, pool_x, visited):
    """Make every node reachable from its group's entry point (groups in parallel).

    A breadth-first pass marks what the entry reaches. Each node u still unreached is searched for
    (its own vector, by ``metric``, a beam of ``ef``) among the reached nodes; the nearest one whose
    list is below ``cap`` links to it (if all are at the cap, the nearest prunes its list to take u).
    That makes u's whole component reachable. Costs a pass over the edges, plus one short search per
    component (on roar's graphs: the keys whose reverse connectivity edges found their hubs full).
    """
    start, count, room, edges, _, _ = graph
    for g in prange(entries.shape[0]):
        th = numba.get_thread_id()
        reached = np.zeros(n, np.bool_)
        queue = np.empty(n, np.int32)
        scratch = np.empty(cap + 1, np.int32)
        _reach(graph, g, entries[g], reached, queue)
        for u in range(n):
            if reached[u]:
                continue
            size, _ = beam_search(rows[g], n, graph, g, entries[g], rows[g, u], ef, 1, metric,
                                  pool_i[th], pool_d[th], pool_x[th], visited[th])
            linked = False
            for a in range(size):
                p = pool_i[th, a]
                if reached[p] and count[g, p] < cap and _push(graph, g, p, u, cap):
                    linked = True
                    break
            if not linked:
                _add_edge(rows[g], graph, g, pool_i[th, 0], u, cap, metric, scratch)
            _reach(graph, g, u, reached, queue)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def insert_nodes(rows, n_old, t, graph, entries, ef, M, width, cap, metric, cooc, conn,
                 pool_i, pool_d, pool_x, visited):
    """Link rows n_old..n_old+t-1 of every group into its graph, in row order (groups in parallel).

    Each new node gets a run of ``width`` slots and beam-searches its own vector (by ``metric``) over
    the nodes before it. Its out-edges are its pruned and filled candidates ``cooc[g, v - n_old]``
    (int32, -1 padded; e.g. keys it co-occurs with in recent queries' results) followed by ``conn`` of
    the pruned search results, or, without candidates, the pruned search results alone (M). It is then
    added to each of those neighbours' lists (``_add_edge``: pushed, or pruned at ``cap``). A group with
    no nodes yet takes its first node as entry point. The caller leaves room in the arena for ``t``
    runs of ``width`` and their neighbours' moves.
    """
    start, count, room, edges, fill, _ = graph
    for g in prange(entries.shape[0]):
        th = numba.get_thread_id()
        scratch = np.empty(cap + 1, np.int32)
        for v in range(n_old, n_old + t):
            start[g, v] = fill[g]
            count[g, v] = 0
            room[g, v] = width
            fill[g] += width
            if entries[g] < 0:
                entries[g] = v
                continue
            size, _ = beam_search(rows[g], v, graph, g, entries[g], rows[g, v], ef, ef, metric,
                                  pool_i[th], pool_d[th], pool_x[th], visited[th])
            row = edges[g, start[g, v] : start[g, v] + width]
            cand, cand_d = _sorted_candidates(rows[g], v, pool_i[th, :size], metric)
            given, given_d = _sorted_candidates(rows[g], v, cooc[g, v - n_old], metric)
            if given.shape[0] == 0:
                cnt = _prune(rows[g], cand, cand_d, min(M, width), metric, row)
            else:
                cnt = _prune(rows[g], given, given_d, min(M, width), metric, row)
                cnt = _append_new(rows[g], v, row[: min(cnt + conn, width)], np.int64(cnt), pool_i[th, :size],
                                  metric)
            count[g, v] = cnt
            for a in range(cnt):
                _add_edge(rows[g], graph, g, np.int64(row[a]), v, cap, metric, scratch)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def mean_rows(keys):
    """Mean row of each group of keys [G, n, D] (any kernel dtype) -> [G, D] fp32."""
    groups, n, dim = keys.shape
    out = np.zeros((groups, dim), np.float32)
    for g in prange(groups):
        for v in range(n):
            for d in range(dim):
                out[g, d] += f32(keys[g, v, d])
        for d in range(dim):
            out[g, d] /= n
    return out


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def nearest_rows(keys, centre):
    """Row of each group nearest (L2) to centre [G, D]: [G] int64."""
    groups, n, dim = keys.shape
    out = np.empty(groups, np.int64)
    for g in prange(groups):
        best, arg = np.inf, 0
        for v in range(n):
            s = np.float32(0.0)
            for d in range(dim):
                x = f32(keys[g, v, d]) - centre[g, d]
                s += x * x
            if s < best:
                best, arg = s, v
        out[g] = arg
    return out
