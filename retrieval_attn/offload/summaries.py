"""Block summaries of the offloaded rows, kept beside the ``KVStore``, and the numba kernels that estimate
from them (or from a sample of the rows) the attention over the rows a decode step did not retrieve.

``BlockSummaries`` splits each group's offloaded positions into blocks of ``block`` consecutive rows
(row ``i`` is in block ``i // block``: blocks are positions, so a spilled row always lands in the last
block and no summary is ever rebuilt) and keeps, per (group, block), the row count and the fp32 sums
of the keys and of the values. ``update``
folds in the rows the store gained since the last call, all groups in one numba call.

Estimators, one numba ``prange`` over every (group, query) pair of a layer, GIL released, writing into
buffers the caller made once; each returns a partial attention ``(out, lse)`` (fp32, natural-log lse,
``-inf`` and zeros when nothing is left) over exactly the rows *not* in that query's retrieved ids:

- ``estimate_blocks``: each block stands for its unretrieved rows by their count ``c``, mean key and
  mean value, the retrieved rows' keys and values taken out of the sums exactly. Log-weight of a
  block: ``log c + scale * q . mean_key``. A block of one row is that row: the estimate is exact at
  ``block = 1``. A block's weight is a lower bound of the mass its rows hold (Jensen: mean of exp >=
  exp of mean), short by the factor ``mean_j exp(s_j - mean s)`` of its logits' spread, which grows
  with block size (a second-moment correction from per-dimension key variances overshot by orders of
  magnitude on the embedded model, whose key dimensions are strongly correlated: bench/README.md).
- ``estimate_sample``: one row drawn uniformly in each stratum of ``stride`` consecutive positions
  (the draws ``u`` in [0, 1) come from the caller's seeded generator), skipped for a query that
  retrieved it; the kept rows weigh ``unretrieved / kept`` each (importance weights of a uniform
  proposal). At ``stride = 1`` every row is drawn: exact.

Ids outside ``[0, n)`` (``-1``: none) are ignored; ids are assumed distinct (an index returns each row
once). This module knows nothing about indexes, engines or models.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..rows import f32, grown_capacity

__all__ = ["BlockSummaries", "estimate_blocks", "estimate_sample", "tail_nbytes"]


@njit(parallel=True, nogil=True, cache=True)
def _fold_rows(keys, values, start, stop, block, sum_k, sum_v, count):
    """Add rows [start, stop) of keys/values [G, cap, D] into their blocks' sums [G, nb, D] and counts [G, nb]."""
    groups, _, dim = keys.shape
    for g in prange(groups):
        for r in range(start, stop):
            b = r // block
            count[g, b] += 1
            for d in range(dim):
                sum_k[g, b, d] += f32(keys[g, r, d])
                sum_v[g, b, d] += f32(values[g, r, d])


class BlockSummaries:
    """Count, key sum and value sum per block of ``block`` offloaded positions, for ``groups`` key sets of
    dimension ``head_dim``: sum_k, sum_v (groups, blocks, head_dim) fp32, count (groups, blocks) int32.
    Grown by a quarter like the store, or ``reserve``d."""

    def __init__(self, groups: int, head_dim: int, block: int):
        self.groups, self.head_dim, self.block = groups, head_dim, block
        self.n = 0  # rows folded in
        self._alloc(0)

    def _alloc(self, blocks: int) -> None:
        g, d = self.groups, self.head_dim
        self.sum_k = np.zeros((g, blocks, d), np.float32)
        self.sum_v = np.zeros((g, blocks, d), np.float32)
        self.count = np.zeros((g, blocks), np.int32)

    @property
    def blocks(self) -> int:
        """Blocks that hold at least one row."""
        return -(-self.n // self.block)

    def reserve(self, rows: int) -> None:
        """Make room for the blocks of ``rows`` rows (no-op if there is)."""
        need = -(-rows // self.block)
        if need <= self.count.shape[1]:
            return
        old = (self.sum_k, self.sum_v, self.count)
        self._alloc(need)
        used = self.blocks
        for new, was in zip((self.sum_k, self.sum_v, self.count), old):
            new[:, :used] = was[:, :used]

    def update(self, keys, values, n: int) -> None:
        """Fold in rows [self.n, n) of the store's kernel rows keys/values (G, cap, D)."""
        if n <= self.n:
            return
        if -(-n // self.block) > self.count.shape[1]:
            self.reserve(max(keys.shape[1], grown_capacity(n)))
        _fold_rows(keys, values, self.n, n, self.block, self.sum_k, self.sum_v, self.count)
        self.n = n

    @property
    def nbytes(self) -> int:
        """Bytes held (allocated capacity)."""
        return self.sum_k.nbytes + self.sum_v.nbytes + self.count.nbytes

    @staticmethod
    def estimate_nbytes(groups: int, rows: int, head_dim: int, block: int) -> int:
        """Bytes of the summaries of ``rows`` rows per group (what ``nbytes`` is after ``reserve(rows)``)."""
        return groups * math.ceil(rows / block) * (2 * head_dim * 4 + 4)

    def __repr__(self) -> str:
        return f"BlockSummaries(groups={self.groups}, block={self.block}, rows={self.n})"


def tail_nbytes(method: str, groups: int, group: int, rows: int, head_dim: int, block: int, stride: int) -> int:
    """Host bytes of one layer's tail estimate over ``rows`` offloaded rows per group: the summaries of
    ``"mean"`` (``BlockSummaries.estimate_nbytes``), or the draws of ``"sample"``, plus the fp64 scratch of
    the estimators and the fp32 out and lse (``engine.tail.TailEstimate``)."""
    width = math.ceil(rows / (block if method == "mean" else stride))  # blocks or strata
    own = BlockSummaries.estimate_nbytes(groups, rows, head_dim, block) if method == "mean" else groups * width * 8
    scratch = (2 if method == "mean" else 1) * groups * group * width * 8
    return own + scratch + groups * group * (head_dim + 1) * 4


@njit(parallel=True, nogil=True, cache=True, fastmath={"contract", "nsz"})
def estimate_blocks(q, ids, keys, values, n, block, sum_k, sum_v, count, scale, logit, left, out, lse):
    """Block-summary estimate of the attention of each query over its unretrieved rows (module docstring).

    q [G, m, D] fp32; ids [G, m, k] int64 retrieved rows (k may be 0); keys/values [G, cap, D] kernel
    rows; n rows; summaries sum_k, sum_v [G, nb, D], count [G, nb]; scratch logit, left [G, m, >= blocks] fp64; writes out [G, m, D] fp32, lse [G, m] fp32.
    """
    groups, m, dim = q.shape
    k = ids.shape[2]
    nb = (n + block - 1) // block
    for t in prange(groups * m):
        g = t // m
        i = t - g * m
        lg = logit[g, i]
        c = left[g, i]
        for b in range(nb):
            s = 0.0
            for d in range(dim):
                s += q[g, i, d] * sum_k[g, b, d]
            lg[b] = s
            c[b] = count[g, b]
        for j in range(k):
            r = ids[g, i, j]
            if r < 0 or r >= n:
                continue
            b = r // block
            s = 0.0
            for d in range(dim):
                s += q[g, i, d] * f32(keys[g, r, d])
            lg[b] -= s
            c[b] -= 1.0
        top = -np.inf
        for b in range(nb):
            if c[b] < 0.5:
                lg[b] = -np.inf
                continue
            w = scale * lg[b] / c[b] + np.log(c[b])
            lg[b] = w
            top = max(top, w)
        for d in range(dim):
            out[g, i, d] = 0.0
        if top == -np.inf:
            lse[g, i] = -np.inf
            continue
        total = 0.0
        for b in range(nb):
            if lg[b] == -np.inf:
                continue
            w = np.exp(lg[b] - top)
            total += w
            lg[b] = w / c[b]  # the weight of each of the block's rows in the value sum
            for d in range(dim):
                out[g, i, d] += lg[b] * sum_v[g, b, d]
        for j in range(k):
            r = ids[g, i, j]
            if r < 0 or r >= n:
                continue
            b = r // block
            if c[b] < 0.5:
                continue
            for d in range(dim):
                out[g, i, d] -= lg[b] * f32(values[g, r, d])
        for d in range(dim):
            out[g, i, d] /= total
        lse[g, i] = top + np.log(total)


@njit(parallel=True, nogil=True, cache=True, fastmath={"contract", "nsz"})
def estimate_sample(q, ids, keys, values, n, stride, u, scale, logit, out, lse):
    """Sampled estimate of the attention of each query over its unretrieved rows (module docstring).

    q [G, m, D] fp32; ids [G, m, k] int64; keys/values [G, cap, D] kernel rows; n rows; u [G, >= strata]
    uniform draws in [0, 1), one per stratum of ``stride`` rows, shared by the queries of a group;
    scratch logit [G, m, >= strata] fp64; writes out [G, m, D] fp32, lse [G, m] fp32.
    """
    groups, m, dim = q.shape
    k = ids.shape[2]
    ns = (n + stride - 1) // stride
    for t in prange(groups * m):
        g = t // m
        i = t - g * m
        lg = logit[g, i]
        for s in range(ns):
            lg[s] = 0.0
        retrieved = 0
        for j in range(k):
            r = ids[g, i, j]
            if r < 0 or r >= n:
                continue
            retrieved += 1
            s = r // stride
            lo = s * stride
            size = min(stride, n - lo)
            if lo + min(int(u[g, s] * size), size - 1) == r:
                lg[s] = -np.inf  # this stratum's draw was retrieved: it is not part of the tail
        kept = 0
        top = -np.inf
        for s in range(ns):
            if lg[s] == -np.inf:
                continue
            lo = s * stride
            size = min(stride, n - lo)
            r = lo + min(int(u[g, s] * size), size - 1)
            x = 0.0
            for d in range(dim):
                x += q[g, i, d] * f32(keys[g, r, d])
            lg[s] = scale * x
            top = max(top, lg[s])
            kept += 1
        for d in range(dim):
            out[g, i, d] = 0.0
        if kept == 0 or n - retrieved <= 0:
            lse[g, i] = -np.inf
            continue
        total = 0.0
        for s in range(ns):
            if lg[s] == -np.inf:
                continue
            w = np.exp(lg[s] - top)
            total += w
            lo = s * stride
            size = min(stride, n - lo)
            r = lo + min(int(u[g, s] * size), size - 1)
            for d in range(dim):
                out[g, i, d] += w * f32(values[g, r, d])
        for d in range(dim):
            out[g, i, d] /= total
        lse[g, i] = top + np.log(total) + np.log((n - retrieved) / kept)
