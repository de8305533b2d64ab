"""The ``KeyIndex`` protocol, its search result, parameter validation, and where an index reads its keys.

An index holds the offloaded keys of *all heads of one layer* as ``groups`` independent key sets (one
per batch element and KV head) and answers maximum-inner-product queries for all of them in one call.
Ids are rows in insertion order, so they are also rows of the CPU KV store that holds the values.

Where the keys live. An index reads its keys from a *key source*: any object with ``n`` (rows held
per group) and ``kernel_rows()`` (the whole ``(groups, capacity, dim)`` buffer as the kernels read
it: fp32, or bf16/fp16 bits, see ``retrieval_attn.rows``), which only ever appends rows. The engine
hands its ``KVStore``'s keys as the source, so the keys live once, in the model's dtype, and
``add()`` without arguments indexes what the store appended. Given a plain fp32 array instead, an
index keeps its own growable copy (``GrowableKeys``): the standalone use of the tools and tests.
Backends whose library must own its vectors (faiss, hnswlib) copy what they index, in fp32, and
count it in ``nbytes``.

Queries, scores and results are NumPy fp32/int64. This module knows nothing about torch models,
caches or the engine; it does not import the config.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from ..rows import grown_capacity

__all__ = ["KeyIndex", "KeySource", "Param", "SearchResult", "GrowableKeys"]


@dataclass(frozen=True)
class Param:
    """One tunable parameter of a backend: its type, inclusive range and default."""

    default: int | float
    low: int | float
    high: int | float | None = None
    kind: type = int
    doc: str = ""

    def check(self, owner: str, name: str, value: Any) -> int | float:
        """Return ``value`` if it is of the right type and in range, else raise ValueError naming it."""
        allowed = f"[{self.low}, {'inf' if self.high is None else self.high}]"
        ok_type = isinstance(value, (int, np.integer)) if self.kind is int else isinstance(value, (int, float, np.number))
        if isinstance(value, bool) or not ok_type:
            raise ValueError(f"{owner}: parameter {name!r} must be {self.kind.__name__} in {allowed}, got {value!r}")
        if value < self.low or (self.high is not None and value > self.high) or value != value:
            raise ValueError(f"{owner}: parameter {name!r} must be in {allowed}, got {value!r}")
        return self.kind(value)


@dataclass
class SearchResult:
    """What ``KeyIndex.search`` returns (or fills, when given one to reuse).

    ids : (groups, m, k) int64, rows of the retrieved keys, best first.
    scores : (groups, m, k) fp32, exact inner products q . key of those rows.
    scored : (groups, m) int64, keys whose score was computed for each query (the cost of the search).
    """

    ids: np.ndarray
    scores: np.ndarray
    scored: np.ndarray

    @classmethod
    def empty(cls, groups: int, m: int, k: int) -> SearchResult:
        """Uninitialised arrays for ``m`` queries of ``groups`` groups and ``k`` results each."""
        return cls(np.empty((groups, m, k), np.int64), np.empty((groups, m, k), np.float32),
                   np.empty((groups, m), np.int64))

    def scored_fraction(self, n: int) -> float:
        """Mean fraction of the ``n`` keys per group that were scored."""
        return float(self.scored.mean()) / max(n, 1)


class KeySource(Protocol):
    """Where an index reads its keys: rows only ever appended, read in place."""

    n: int

    def kernel_rows(self) -> np.ndarray:
        """The whole (groups, capacity, dim) buffer: fp32, or bf16/fp16 bits (``retrieval_attn.rows``)."""


class GrowableKeys:
    """An index's own fp32 copy of its keys, (groups, capacity, dim), growing by a quarter: a ``KeySource``."""

    def __init__(self, keys: np.ndarray):
        groups, n, dim = keys.shape
        self._buf = np.empty((groups, grown_capacity(n), dim), dtype=np.float32)
        self._buf[:, :n] = keys
        self.n = n

    def append(self, keys: np.ndarray) -> None:
        """Append keys (groups, t, dim) after the filled rows."""
        t = keys.shape[1]
        if self.n + t > self._buf.shape[1]:
            buf = np.empty((self._buf.shape[0], grown_capacity(self.n + t), self._buf.shape[2]), dtype=np.float32)
            buf[:, : self.n] = self._buf[:, : self.n]
            self._buf = buf
        self._buf[:, self.n : self.n + t] = keys
        self.n += t

    def kernel_rows(self) -> np.ndarray:
        return self._buf

    @property
    def nbytes(self) -> int:
        return self._buf.nbytes


class KeyIndex(ABC):
    """Maximum-inner-product index over the keys of all heads of one layer.

    Subclasses set ``name`` and ``params`` (name -> Param); build-time parameters are given to the
    constructor, search-time ones (``search_params``) may also be overridden per ``search`` call.
    They implement ``_build``, ``_add`` and ``_search`` over ``self.rows()`` (the kernel rows, of which
    the first ``len(self)`` per group are indexed) and report the bytes they hold (``_own_nbytes``,
    the source's rows excluded).
    """

    name: ClassVar[str]
    params: ClassVar[dict[str, Param]] = {}
    search_params: ClassVar[tuple[str, ...]] = ()
    uses_train_queries: ClassVar[bool] = False

    def __init__(self, **params: Any):
        self.config = self.resolved_params(params)
        self.groups = 0
        self.dim = 0
        self.build_seconds = 0.0
        self.build_device: Any = None
        self._source: Any = None  # a KeySource: the caller's, or our own GrowableKeys
        self._n = 0  # keys indexed per group (the source may hold more, not yet added)

    @classmethod
    def resolved_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Every parameter's value: the defaults overridden by ``params``, which are checked."""
        return {**{k: p.default for k, p in cls.params.items()}, **cls.validate_params(params)}

    @classmethod
    def validate_params(cls, params: dict[str, Any], only: tuple[str, ...] | None = None) -> dict[str, Any]:
        """``params`` checked against ``only`` (default: all parameters); unknown or out-of-range raise ValueError."""
        allowed = cls.params if only is None else {k: cls.params[k] for k in only}
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(
                f"index {cls.name!r}: unknown parameter(s) {unknown}; allowed: {sorted(allowed) or 'none'}"
            )
        return {k: allowed[k].check(f"index {cls.name!r}", k, v) for k, v in params.items()}

    def rows(self) -> np.ndarray:
        """The key rows (groups, capacity, dim) this index reads, as the kernels see them."""
        return self._source.kernel_rows()

    @property
    def owns_keys(self) -> bool:
        """True when the index keeps its own copy of the keys (it was built from a plain array)."""
        return isinstance(self._source, GrowableKeys)

    def build(self, keys: np.ndarray | KeySource, train_queries: np.ndarray | None = None, device: Any = None,
              n: int | None = None) -> None:
        """Index ``keys``: an fp32 array (groups, n, dim), copied, or a ``KeySource`` whose rows are read in place.

        ``train_queries`` (groups, m, dim) fp32 are prefill queries of each group. ``device`` (a torch
        device or its name; None: the CPU) is where a backend may run the dense, exact part of its
        build, such as roar's training-query top lists. ``n``: with a key source, index its first ``n``
        rows only (default: all it holds); ``add()`` indexes the rest later.
        """
        if isinstance(keys, np.ndarray):
            source = GrowableKeys(_check_array("keys", keys))
        elif hasattr(keys, "kernel_rows") and hasattr(keys, "n"):
            source = keys
        else:
            raise ValueError(f"keys must be a numpy array (groups, n, dim) or a key source, got {type(keys).__name__}")
        rows = source.kernel_rows()
        n = source.n if n is None else n
        if rows.ndim != 3 or rows.shape[0] == 0 or rows.shape[2] == 0 or not 0 <= n <= source.n <= rows.shape[1]:
            raise ValueError(f"keys: a key source must hold (groups>=1, capacity, dim>=1) rows and n <= its rows, "
                             f"got {rows.shape} and n={n}")
        if train_queries is None and self.uses_train_queries:
            raise ValueError(f"index {self.name!r} needs train_queries (groups, m, dim): the prefill queries of each group")
        if train_queries is not None:
            train_queries = _check_array("train_queries", train_queries)
            if train_queries.shape[0] != rows.shape[0] or train_queries.shape[2] != rows.shape[2]:
                raise ValueError(
                    f"train_queries {train_queries.shape} must have keys' groups and dim {rows.shape[0], rows.shape[2]}"
                )
        self._source, self._n = source, n
        self.groups, self.dim = rows.shape[0], rows.shape[2]
        self.build_device = device
        start = time.perf_counter()
        self._build(train_queries)
        self.build_seconds = time.perf_counter() - start

    def add(self, keys: np.ndarray | None = None) -> None:
        """Index more keys, as rows ``len(self), len(self) + 1, ...``.

        An index that owns its keys takes them as ``keys`` (groups, t, dim) fp32. An index over a key
        source takes no argument: it indexes the rows the source appended since (``keys`` must be None).
        """
        if self.dim == 0:
            raise RuntimeError(f"index {self.name!r}: add() before build()")
        n_old = self._n
        if self.owns_keys:
            if keys is None:
                raise ValueError(f"index {self.name!r} owns its keys: add(keys) needs keys (groups, t, dim)")
            keys = _check_array("keys", keys)
            if keys.shape[0] != self.groups or keys.shape[2] != self.dim:
                raise ValueError(f"keys {keys.shape} must have groups={self.groups} and dim={self.dim}")
            self._source.append(keys)
        elif keys is not None:
            raise ValueError(f"index {self.name!r} reads a key source: add() takes no keys, it indexes the rows appended")
        t = self._source.n - n_old
        if t:
            self._n = self._source.n
            self._add(n_old, t)

    def replacing(self, previous: KeyIndex) -> None:
        """Take over from ``previous``, the index this one (a rebuild) replaces: by default nothing to keep."""

    def search(self, queries: np.ndarray, k: int, out: SearchResult | None = None, **params: Any) -> SearchResult:
        """Top-``k`` keys by inner product for queries (groups, m, dim) fp32 of each group.

        ``out``: a result of the right shape (groups, m, k) to fill instead of allocating one (the
        engine reuses one per decode step).
        """
        queries = _check_array("queries", queries)
        if queries.shape[0] != self.groups or queries.shape[2] != self.dim:
            raise ValueError(f"queries {queries.shape} must have groups={self.groups} and dim={self.dim}")
        n = len(self)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
            raise ValueError(f"k must be an int in [1, {n}] (the number of indexed keys), got {k!r}")
        config = {**self.config, **self.validate_params(params, only=self.search_params)} if params else self.config
        shape = (*queries.shape[:2], int(k))
        if out is None:
            out = SearchResult.empty(*shape)
        elif out.ids.shape != shape or out.scores.shape != shape or out.scored.shape != shape[:2]:
            raise ValueError(f"out must hold (groups, m, k) = {shape} results, got ids {out.ids.shape}")
        self._search(queries, int(k), config, out)
        return out

    @classmethod
    def estimate_nbytes(cls, groups: int, n: int, dim: int, params: dict[str, Any], queries: int = 1,
                        k: int = 100, added: int = 0) -> int:
        """Bytes an index over ``n`` keys per group of a key source holds besides the source's rows: its
        structures and search scratch, for searches of ``queries`` queries per group and ``k`` results
        (the memory planner's figure, per layer; a backend that copies its keys counts the copy).
        ``added`` of the ``n`` keys are inserted by ``add`` after the build (a conversation's turns);
        backends whose structures grow differently from a build over all ``n`` count it."""
        return 0

    @classmethod
    def estimate_shared_nbytes(cls, groups: int, n: int, dim: int, params: dict[str, Any], queries: int = 1) -> int:
        """Bytes the backend's searches share across indexes (one buffer per searching thread, not per layer)."""
        return 0

    @classmethod
    def estimate_add_nbytes(cls, groups: int, dim: int, params: dict[str, Any], queries: int = 1, k: int = 100) -> int:
        """Bytes ``add`` holds while it inserts keys, beyond ``estimate_nbytes``: the transient of one insert,
        bounded whatever the number of keys added (for searches of ``queries`` queries per group, ``k`` results)."""
        return 0

    @classmethod
    def estimate_build_nbytes(cls, groups: int, n: int, dim: int, params: dict[str, Any], train: int = 0) -> int:
        """Bytes a build over ``n`` keys per group (``train`` training queries per group) holds while it
        runs, beyond ``estimate_nbytes``: the transient peak of one build in flight."""
        return 0

    def __len__(self) -> int:
        """Keys indexed per group."""
        return self._n

    @property
    def nbytes(self) -> int:
        """Bytes of memory held by the index: its structures, and its own copy of the keys if it keeps one."""
        if not self.dim:
            return 0
        return self._own_nbytes() + (self._source.nbytes if self.owns_keys else 0)

    def _own_nbytes(self) -> int:
        """Bytes of the backend's own structures (the key rows of a source excluded)."""
        return 0

    @abstractmethod
    def _build(self, train_queries: np.ndarray | None) -> None: ...

    @abstractmethod
    def _add(self, n_old: int, t: int) -> None:
        """Index rows n_old .. n_old + t - 1 of ``self.rows()``."""

    @abstractmethod
    def _search(self, queries: np.ndarray, k: int, config: dict[str, Any], out: SearchResult) -> None:
        """Fill ``out`` for queries (groups, m, dim)."""


def _check_array(name: str, a: np.ndarray) -> np.ndarray:
    """A C-contiguous fp32 3-D array with finite values, or ValueError naming ``name``."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array (groups, n, dim), got {type(a).__name__}")
    if a.ndim != 3 or a.shape[2] == 0 or a.shape[0] == 0:
        raise ValueError(f"{name} must have shape (groups>=1, n, dim>=1), got {a.shape}")
    if a.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got {a.dtype}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return np.ascontiguousarray(a)
