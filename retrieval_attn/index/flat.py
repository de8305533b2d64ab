"""``flat``: exact top-k by brute force, all heads of a layer in one batched matmul + top-k.

It scores every key, so it is the recall reference and the fastest choice for small contexts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import GrowableKeys, KeyIndex
from .registry import register_index

__all__ = ["FlatIndex"]


@register_index
class FlatIndex(KeyIndex):
    """Exact maximum-inner-product search over every key (torch bmm + topk on CPU threads)."""

    name = "flat"

    def _build(self, keys: np.ndarray, train_queries: np.ndarray | None) -> None:
        self._keys = GrowableKeys.holding(keys)

    def _add(self, keys: np.ndarray) -> None:
        self._keys.append(keys)

    def __len__(self) -> int:
        return self._keys.n if self.dim else 0

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes if self.dim else 0

    def _search(self, queries: np.ndarray, k: int, config: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys = torch.from_numpy(self._keys.view)  # [G, n, D], a view of the buffer
        q = torch.from_numpy(queries)  # [G, m, D]
        scores = torch.bmm(q, keys.transpose(1, 2))  # [G, m, n]
        top, ids = torch.topk(scores, k, dim=-1, sorted=True)  # [G, m, k]
        scored = np.full(queries.shape[:2], len(self), dtype=np.int64)
        return ids.numpy(), top.numpy(), scored
