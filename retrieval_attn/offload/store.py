"""``KVStore``: the offloaded keys and values of one layer, all KV heads, in growable CPU memory.

The one owner of offloaded rows. Storage is the model's dtype (bf16/fp16 stay half, fp32 stays fp32),
contiguous ``(groups, capacity, head_dim)`` per tensor, where a group is one (batch element, KV head)
pair; row ``i`` of a group is the ``i``-th token offloaded for it, which is also the id an index
returns. The indexes read the keys in place through ``key_source`` and the CPU attention the values
through ``kernel_values`` (``retrieval_attn.rows``: half-precision rows widened to fp32 on load), so
no second copy exists. Memory is pinned when CUDA is available so device -> host copies are
asynchronous: appends from a GPU return before the rows land and convert nothing, and
``synchronize`` waits for them before the CPU reads. Growth adds a quarter, so appends are amortised
O(1); ``reserve`` sizes it exactly for a planned context instead.

This module knows nothing about indexes or models.
"""

from __future__ import annotations

import numpy as np
import torch

from ..rows import KERNEL_DTYPES, grown_capacity, kernel_array

__all__ = ["KVStore"]


class _StoreKeys:
    """The store's keys as an index's key source (``index.base.KeySource``): rows read in place."""

    def __init__(self, store: KVStore):
        self._store = store

    @property
    def n(self) -> int:
        return self._store.n

    def kernel_rows(self) -> np.ndarray:
        return kernel_array(self._store._k)


class KVStore:
    """Growable CPU storage of offloaded K and V for ``groups`` key sets of dimension ``head_dim``, in ``dtype``."""

    def __init__(self, groups: int, head_dim: int, dtype: torch.dtype = torch.float32, capacity: int = 1024,
                 pin_memory: bool | None = None):
        if dtype not in KERNEL_DTYPES:
            raise ValueError(f"KVStore dtype must be one of {list(KERNEL_DTYPES)}, got {dtype}")
        self.groups, self.head_dim, self.dtype = groups, head_dim, dtype
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.n = 0
        self._copied: torch.cuda.Event | None = None  # recorded after the last asynchronous append
        self._k = self._alloc(max(capacity, 1))
        self._v = self._alloc(max(capacity, 1))
        self.key_source = _StoreKeys(self)

    def _alloc(self, capacity: int) -> torch.Tensor:
        return torch.empty((self.groups, capacity, self.head_dim), dtype=self.dtype, pin_memory=self.pin_memory)

    @property
    def capacity(self) -> int:
        return self._k.shape[1]

    def reserve(self, capacity: int) -> None:
        """Grow to hold ``capacity`` rows now (no-op if it already does), so appends up to it never reallocate."""
        if capacity > self.capacity:
            self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        self.synchronize()
        new_k, new_v = self._alloc(capacity), self._alloc(capacity)
        new_k[:, : self.n] = self._k[:, : self.n]
        new_v[:, : self.n] = self._v[:, : self.n]
        self._k, self._v = new_k, new_v

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k, v (groups, t, head_dim) of the store's dtype, on any device (copied, never converted)."""
        t = k.shape[1]
        if k.shape != (self.groups, t, self.head_dim) or v.shape != k.shape:
            raise ValueError(
                f"KVStore.append: k {tuple(k.shape)} and v {tuple(v.shape)} must both be "
                f"({self.groups}, t, {self.head_dim})"
            )
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise ValueError(f"KVStore.append: k and v must be {self.dtype} (the store's dtype), got {k.dtype}, {v.dtype}")
        if self.n + t > self.capacity:
            self._grow(grown_capacity(self.n + t))
        asynchronous = self.pin_memory and k.is_cuda  # device -> pinned host copies return at once
        self._k[:, self.n : self.n + t].copy_(k, non_blocking=asynchronous)
        self._v[:, self.n : self.n + t].copy_(v, non_blocking=asynchronous)
        if asynchronous:
            self._copied = torch.cuda.Event()
            self._copied.record()
        self.n += t

    def synchronize(self) -> None:
        """Wait until every appended row has landed (copies from a GPU are asynchronous); call before reading rows on the CPU."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    @property
    def keys(self) -> torch.Tensor:
        """Stored keys (groups, n, head_dim), a view."""
        return self._k[:, : self.n]

    @property
    def values(self) -> torch.Tensor:
        """Stored values (groups, n, head_dim), a view."""
        return self._v[:, : self.n]

    def kernel_values(self) -> np.ndarray:
        """The whole values buffer (groups, capacity, head_dim) as the CPU kernels read it, a view."""
        return kernel_array(self._v)

    @property
    def nbytes(self) -> int:
        """Bytes held (allocated capacity of K and V)."""
        return self._k.nbytes + self._v.nbytes
