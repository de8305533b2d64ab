"""What a retrieval holds of exact attention: recall@k and attention mass, the one implementation of each.

The engine's telemetry (every decode step, on the side) and the evaluation tools (sweep, eval,
benchmarks) measure with these two functions, so their figures mean the same thing:

- ``recall_at_k``: recall@k of returned ids against the exact top-k, by intersection, tolerant to
  ties at the k-th score (a returned key whose exact score reaches the k-th best within
  ``RECALL_RTOL`` of its magnitude counts as a hit); -1 ids and repeats miss;
- ``attention_mass``: the softmax mass of every visible key held by a static part (given by its
  log-sum-exp) plus the returned keys. 1.0 means the attention equals full attention.

Both take torch tensors or NumPy arrays (NumPy in, NumPy out), compute in float64 on the CPU, and
know nothing about indexes, engines or models.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

__all__ = ["RECALL_RTOL", "recall_at_k", "attention_mass"]

RECALL_RTOL = 1e-5

Array = Union[torch.Tensor, np.ndarray]


def _picked(ids: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n) bool: the rows ``ids`` (..., k) name, each once; -1 (and any id outside [0, n)) names nothing."""
    valid = (ids >= 0) & (ids < n)
    marks = torch.zeros((*ids.shape[:-1], n), dtype=torch.uint8)
    # amax, not a plain scatter: a repeated row must not let a later "invalid" write clear an earlier mark
    marks.scatter_reduce_(-1, torch.where(valid, ids, 0), valid.to(torch.uint8), reduce="amax")
    return marks.bool()


def _out(x: torch.Tensor, like: Array) -> Array:
    return x.numpy() if isinstance(like, np.ndarray) else x


def recall_at_k(ids: Array, scores: Array, k: int, rtol: float = RECALL_RTOL) -> Array:
    """Recall@k of each query's returned ids.

    Parameters
    ----------
    ids : (..., >= k) int, rows returned per query, best first; only the first k count.
    scores : (..., n) exact scores (inner products) of each query with every indexed key, n >= k.
    k : the size of the exact top-k set.

    Returns
    -------
    (...) float64 in [0, 1]: distinct returned rows whose exact score reaches the k-th best
    (minus ``rtol`` times its magnitude, at least 1), over k.
    """
    ids_t, s = torch.as_tensor(ids).long(), torch.as_tensor(scores).double()
    if ids_t.shape[-1] < k:
        raise ValueError(f"recall_at_k: need at least k={k} ids per query, got {ids_t.shape[-1]}")
    if not 1 <= k <= s.shape[-1]:
        raise ValueError(f"recall_at_k: k must be in [1, {s.shape[-1]}] (the scored keys), got {k}")
    kth = s.topk(k, dim=-1).values[..., -1:]  # (..., 1)
    in_top = s >= kth - rtol * kth.abs().clamp(min=1.0)  # (..., n): ties at the k-th included
    hits = (_picked(ids_t[..., :k], s.shape[-1]) & in_top).sum(-1)
    return _out(hits.double() / k, scores)


def attention_mass(ids: Array | None, scores: Array, scale: float, lse_static: Array) -> Array:
    """Softmax mass held by the static keys plus the keys ``ids``, per query.

    Parameters
    ----------
    ids : (..., k) int rows of the keys kept from ``scores`` (-1 and repeats ignored), or None (none kept).
    scores : (..., n) raw scores q . key of every key outside the static part.
    scale : logit scale: the softmax runs over ``scale * scores`` and the static part.
    lse_static : (...) natural-log log-sum-exp of the static part's scaled logits (-inf: empty).

    Returns
    -------
    (...) float64 in [0, 1].
    """
    logits = torch.as_tensor(scores).double() * scale  # (..., n)
    lse_s = torch.as_tensor(lse_static).double()
    lse = torch.logaddexp(lse_s, torch.logsumexp(logits, dim=-1))  # every visible key
    mass = torch.exp(lse_s - lse)
    if ids is not None:
        keep = _picked(torch.as_tensor(ids).long(), logits.shape[-1])
        mass = mass + (torch.exp(logits - lse[..., None]) * keep).sum(-1)
    return _out(mass, scores)
