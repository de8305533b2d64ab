"""The dense, exact parts of the graph builds, done in bulk: top keys of training queries, exact L2
neighbours of keys, and approximate nearest *covered* keys for the connectivity step.

All three are matrix products plus a selection, run with torch on the build's device (the GPU when
the layer's tensors are there, else the CPU's threads) in blocks of bounded size: key rows are read
in their kernel dtype (``retrieval_attn.rows``) and widened to fp32 block by block, so no fp32 copy
of a layer's keys is ever held. ``nearest_covered`` ends in a numba scan of the probed clusters.

Costs per key (D = head dim): ``exact_top_keys`` s x D multiply-adds per key for s training queries;
``exact_l2_neighbours`` n x D (quadratic: keygraph is a baseline); ``nearest_covered`` ~2 sqrt(2 c) x D
for c covered keys (assignment to sqrt(2 c) centroids, then a scan of two clusters of ~sqrt(c / 2)).
This module knows nothing about engines or models.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numba import njit, prange

from ..rows import FASTMATH
from .graph_kernels import L2, distance, sorted_insert

__all__ = ["fp32_rows", "exact_top_keys", "exact_l2_neighbours", "nearest_covered"]

_BLOCK_ELEMENTS = 1 << 24  # ~64 MiB of fp32 per score or key block


def fp32_rows(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Kernel rows (..., D) (fp32, or bf16/fp16 bits) as an fp32 tensor on ``device``."""
    t = torch.from_numpy(np.ascontiguousarray(rows))
    if rows.dtype == np.uint16:
        t = t.view(torch.bfloat16)
    elif rows.dtype == np.int16:
        t = t.view(torch.float16)
    return t.to(device).float()


def _device(device: Any) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def exact_top_keys(queries: np.ndarray, rows: np.ndarray, n: int, k: int, device: Any = None) -> np.ndarray:
    """Rows of the ``k`` largest inner products among the first ``n`` key rows, best first.

    queries [G, m, D] fp32, rows [G, cap, D] kernel rows -> [G, m, k] int32. On ``device`` (None: CPU),
    a group at a time, queries in chunks whose score block stays near 64 MiB.
    """
    groups, m, _ = queries.shape
    device = _device(device)
    out = np.empty((groups, m, k), np.int32)
    chunk = max(1, _BLOCK_ELEMENTS // max(n, 1))
    for g in range(groups):
        key_t = fp32_rows(rows[g, :n], device).T  # [D, n]
        for s in range(0, m, chunk):
            q = torch.from_numpy(np.ascontiguousarray(queries[g, s : s + chunk])).to(device)  # [c, D]
            out[g, s : s + chunk] = torch.topk(q @ key_t, k, dim=1, sorted=True).indices.cpu().numpy()
    return out


def exact_l2_neighbours(rows: np.ndarray, n: int, k: int, device: Any = None) -> np.ndarray:
    """Rows of the ``k`` nearest keys in L2 (self included), nearest first: [G, n, k] int32.

    |x - y|^2 ranks like |y|^2 - 2 x . y for a fixed x; computed in blocks of rows.
    """
    groups = rows.shape[0]
    device = _device(device)
    out = np.empty((groups, n, k), np.int32)
    chunk = max(1, _BLOCK_ELEMENTS // max(n, 1))
    for g in range(groups):
        base = fp32_rows(rows[g, :n], device)  # [n, D]
        sq = (base * base).sum(dim=1)  # [n]
        for s in range(0, n, chunk):
            rank = 2 * base[s : s + chunk] @ base.T - sq  # [c, n], larger is nearer
            out[g, s : s + chunk] = torch.topk(rank, k, dim=1, sorted=True).indices.cpu().numpy()
    return out


def nearest_covered(rows: np.ndarray, n: int, covered: np.ndarray, k: int, device: Any = None,
                    iters: int = 2, probes: int = 2, seed: int = 0) -> np.ndarray:
    """The ``k`` approximately nearest (L2) covered keys of every key (itself excluded): [G, n, k] int32,
    nearest first, -1 where fewer exist.

    covered [G, n] bool marks the keys the graph already reaches (roar: those some training query
    selected). Per group: ``iters`` Lloyd steps fit sqrt(2 c) centroids to the c covered keys
    (starting from covered keys drawn with ``seed``), every covered key joins its nearest centroid's
    cluster, every key probes the clusters of its ``probes`` nearest centroids, and a numba scan
    keeps the k nearest members.
    """
    groups = rows.shape[0]
    device = _device(device)
    out = np.full((groups, n, k), -1, np.int32)
    rng = np.random.default_rng(seed)
    for g in range(groups):
        members = np.flatnonzero(covered[g])  # rows of the covered keys
        c = members.shape[0]
        if c == 0:
            continue
        clusters = max(1, int(round((2 * c) ** 0.5)))
        keys = fp32_rows(rows[g, :n], device)  # [n, D]
        db = keys[torch.from_numpy(members).to(device)]  # [c, D]
        centroids = db[torch.from_numpy(np.sort(rng.choice(c, clusters, replace=False))).to(device)]  # [C, D]
        for _ in range(iters):
            assign = _nearest_centroids(db, centroids, 1)[:, 0]  # [c]
            sums = torch.zeros_like(centroids).index_add_(0, assign, db)
            counts = torch.zeros(clusters, device=device).index_add_(0, assign, torch.ones(c, device=device))
            centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
        assign = _nearest_centroids(db, centroids, 1)[:, 0].cpu().numpy()
        order = np.argsort(assign, kind="stable")
        starts = np.zeros(clusters + 1, np.int64)
        starts[1:] = np.cumsum(np.bincount(assign, minlength=clusters))
        probe = _nearest_centroids(keys, centroids, min(probes, clusters)).cpu().numpy()  # [n, p]
        _scan_clusters(rows[g], members[order].astype(np.int64), starts, probe, out[g])
    return out


def _nearest_centroids(x: torch.Tensor, centroids: torch.Tensor, p: int) -> torch.Tensor:
    """Indices of the ``p`` nearest centroids (L2) of each row of x [r, D], in blocks: [r, p] int64."""
    half_sq = 0.5 * (centroids * centroids).sum(dim=1)  # [C]
    chunk = max(1, _BLOCK_ELEMENTS // max(centroids.shape[0], 1))
    return torch.cat([torch.topk(x[s : s + chunk] @ centroids.T - half_sq, p, dim=1).indices
                      for s in range(0, x.shape[0], chunk)])


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _scan_clusters(rows_g, members, starts, probe, out):
    """For each key v: its k nearest (L2) among ``members[starts[c]:starts[c + 1]]`` of its probed clusters.

    rows_g [cap, D] kernel rows, members [c] int64 grouped by cluster, probe [n, p] int64; writes out [n, k]."""
    n, k = out.shape
    l2 = np.int64(L2)
    for v in prange(n):
        best_d = np.full(k, np.inf, np.float32)
        best_i = np.full(k, -1, np.int32)
        for pi in range(probe.shape[1]):
            c = probe[v, pi]
            for j in range(starts[c], starts[c + 1]):
                u = members[j]
                if u == v:
                    continue
                s = distance(rows_g[v], rows_g[u], l2)
                if s < best_d[k - 1]:
                    sorted_insert(best_i, best_d, k, u, s)
        out[v] = best_i
