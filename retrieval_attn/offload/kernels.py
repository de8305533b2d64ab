"""numba kernels of the CPU side of a decode step: attention over the retrieved rows, and gathering them.

Both take every (group, query) pair of a layer in one call, run one ``prange`` over them with the
GIL released (so a decode step can run them on a worker thread while the device computes), and
write into outputs the caller allocated once: nothing is allocated per step. Values are read in the
store's dtype (half-precision rows widened to fp32 on load); sums are fp32. ``scores`` are the raw
inner products q . key the index already computed for the rows it returned, so attention only reads
the values. Exponentials are taken after subtracting each row's maximum; the lse is natural-log.

This module knows nothing about indexes, engines or models.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..rows import FASTMATH, f32

__all__ = ["attend_rows", "gather_rows"]


@njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def attend_rows(scores, ids, values, scale, out, lse):
    """Softmax attention of each query over its own retrieved rows.

    scores [G, m, k] fp32 (raw q . key), ids [G, m, k] int64 rows of ``values`` [G, cap, D] (kernel rows:
    fp32, or bf16/fp16 bits widened on load, ``retrieval_attn.rows``);
    writes out [G, m, D] fp32 and lse [G, m] fp32 (``-inf`` and zeros when k == 0).
    """
    groups, m, k = scores.shape
    dim = values.shape[2]
    for t in prange(groups * m):
        g = t // m
        i = t - g * m
        out[g, i, :] = 0.0
        if k == 0:
            lse[g, i] = -np.inf
            continue
        top = scores[g, i, 0] * scale
        for j in range(1, k):
            top = max(top, scores[g, i, j] * scale)
        total = np.float32(0.0)
        for j in range(k):
            w = np.exp(scores[g, i, j] * scale - top)
            total += w
            row = ids[g, i, j]
            for d in range(dim):
                out[g, i, d] += w * f32(values[g, row, d])
        for d in range(dim):
            out[g, i, d] /= total
        lse[g, i] = top + np.log(total)


@njit(parallel=True, nogil=True, cache=True)
def gather_rows(ids, values, out):
    """Copy the rows ``ids`` [G, m, k] int64 of ``values`` [G, cap, D] into out [G, m, k, D] (same dtype, as is)."""
    groups, m, k = ids.shape
    for t in prange(groups * m):
        g = t // m
        i = t - g * m
        for j in range(k):
            out[g, i, j, :] = values[g, ids[g, i, j], :]
