"""``KVStore``: the offloaded keys and values of one layer, all KV heads, in growable CPU memory.

The one owner of offloaded rows. Storage is the model's dtype (bf16/fp16 stay half, fp32 stays fp32),
contiguous ``(groups, capacity, head_dim)`` per tensor, where a group is one (batch element, KV head)
pair; row ``i`` of a group is the ``i``-th token offloaded for it, which is also the id an index
returns. The indexes read the keys in place through ``key_source`` and the CPU attention the values
through ``kernel_values`` (``retrieval_attn.rows``: half-precision rows widened to fp32 on load), so
no second copy exists. Memory is pinned when CUDA is available so device -> host copies are
asynchronous: appends from a GPU convert nothing, return before the rows land (when the copy is
contiguous), and ``synchronize`` waits for them before the CPU reads. ``stage`` copies rows towards
the store without adding them yet, ``commit`` then adds them (a decode step stages the row that
leaves the window before the step's one device sync, so it has landed when the step commits it).
Growth adds a quarter, so appends are amortised O(1); ``reserve`` sizes it exactly for a planned
context instead.

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
        self._copied: torch.cuda.Event | None = None  # recorded after the last asynchronous copy in
        self._pending = False  # a copy recorded in ``_copied`` may not have landed yet
        self._landing: tuple[torch.Tensor, torch.Tensor] | None = None  # pinned K, V rows staged from a GPU
        self._staged: tuple[torch.Tensor, torch.Tensor] | None = None  # views of the landing rows not yet committed
        self._k = self._alloc(max(capacity, 1))
        self._v = self._alloc(max(capacity, 1))

    def __getstate__(self) -> dict:
        """Copies (``copy.deepcopy``, ``RetrievalAttention.fork``) hold landed rows and no CUDA event."""
        self.synchronize()
        return {**self.__dict__, "_copied": None, "_landing": None, "_staged": None}

    def _alloc(self, capacity: int) -> torch.Tensor:
        return torch.empty((self.groups, capacity, self.head_dim), dtype=self.dtype, pin_memory=self.pin_memory)

    @property
    def capacity(self) -> int:
        return self._k.shape[1]

    @property
    def key_source(self) -> _StoreKeys:
        """The keys as an index reads them (``index.base.KeySource``), in place. A view made per call, so the
        store holds no reference to itself: it is freed as soon as its last user lets go, not at the next
        garbage collection (a store is most of a cache's memory)."""
        return _StoreKeys(self)

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

    def _room_for(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Check k, v (groups, t, head_dim) of the store's dtype and make room for their t rows; return t."""
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
        return t

    def _record_copy(self) -> None:
        """Mark an asynchronous copy in: ``synchronize`` waits for it (the event is made once, then re-recorded)."""
        if self._copied is None:
            self._copied = torch.cuda.Event()
        self._copied.record()
        self._pending = True

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k, v (groups, t, head_dim) of the store's dtype, on any device (copied, never converted)."""
        t = self._room_for(k, v)
        asynchronous = self.pin_memory and k.is_cuda  # device -> pinned host copies return at once
        self._k[:, self.n : self.n + t].copy_(k, non_blocking=asynchronous)
        self._v[:, self.n : self.n + t].copy_(v, non_blocking=asynchronous)
        if asynchronous:
            self._record_copy()
        self.n += t

    def stage(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Copy k, v (groups, t, head_dim) of the store's dtype towards the rows after the last one, which
        ``commit(t)`` then adds; returns t. From a GPU the copy goes, asynchronously, into a contiguous
        pinned landing buffer (made at the first call, reused while t fits): a copy into the rows
        themselves, strided across groups, would go through a temporary and wait for the device.
        ``commit`` moves the landed rows in; a device sync in between (the step's) makes that free."""
        t = self._room_for(k, v)
        if not (self.pin_memory and k.is_cuda):
            self._k[:, self.n : self.n + t].copy_(k)
            self._v[:, self.n : self.n + t].copy_(v)
            return t
        size = self.groups * t * self.head_dim
        if self._landing is None or self._landing[0].numel() < size:
            self._landing = tuple(torch.empty(size, dtype=self.dtype, pin_memory=True) for _ in range(2))
        self._staged = tuple(buf[:size].view(self.groups, t, self.head_dim) for buf in self._landing)  # [G, t, D]
        self._staged[0].copy_(k, non_blocking=True)
        self._staged[1].copy_(v, non_blocking=True)
        self._record_copy()
        return t

    def commit(self, t: int) -> None:
        """The ``t`` rows staged last become the store's last rows."""
        if self._staged is not None:
            self.synchronize()
            self._k[:, self.n : self.n + t] = self._staged[0]
            self._v[:, self.n : self.n + t] = self._staged[1]
            self._staged = None
        self.n += t

    def synchronize(self) -> None:
        """Wait until every appended row has landed (copies from a GPU are asynchronous); call before reading
        rows on the CPU. Rows that already landed cost no device sync."""
        if self._pending:
            if not self._copied.query():
                self._copied.synchronize()
            self._pending = False

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
