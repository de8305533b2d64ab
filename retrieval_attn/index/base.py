"""The ``KeyIndex`` protocol, its search result, parameter validation, and the growable key buffer.

An index holds the offloaded keys of *all heads of one layer* as ``groups`` independent key sets (one
per batch element and KV head) and answers maximum-inner-product queries for all of them in one call.
Arrays at this boundary are NumPy, fp32 and C-contiguous; ids are rows in insertion order, so they are
also rows of the CPU KV store that holds the matching values.

This module knows nothing about torch models, caches or the engine; it does not import the config.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "KeyIndex",
    "Param",
    "SearchResult",
    "GrowableKeys",
    "build_capacity",
]


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
    """What ``KeyIndex.search`` returns.

    ids : (groups, m, k) int64, rows of the retrieved keys, best first.
    scores : (groups, m, k) fp32, exact inner products q . key of those rows.
    scored : (groups, m) int64, keys whose score was computed for each query (the cost of the search).
    """

    ids: np.ndarray
    scores: np.ndarray
    scored: np.ndarray

    def scored_fraction(self, n: int) -> float:
        """Mean fraction of the ``n`` keys per group that were scored."""
        return float(self.scored.mean()) / max(n, 1)


class GrowableKeys:
    """A (groups, capacity, dim) fp32 NumPy buffer that grows by doubling; ``view`` is the filled part."""

    def __init__(self, groups: int, dim: int, capacity: int = 1024):
        self._buf = np.empty((groups, max(capacity, 1), dim), dtype=np.float32)
        self.n = 0

    @classmethod
    def holding(cls, keys: np.ndarray) -> GrowableKeys:
        """A buffer holding a copy of keys (groups, n, dim), with ``build_capacity(n)`` rows."""
        buf = cls(keys.shape[0], keys.shape[2], capacity=build_capacity(keys.shape[1]))
        buf.append(keys)
        return buf

    def append(self, keys: np.ndarray) -> None:
        """Append keys (groups, t, dim) after the filled rows."""
        t = keys.shape[1]
        if self.n + t > self._buf.shape[1]:
            cap = max(self.n + t, 2 * self._buf.shape[1])
            buf = np.empty((self._buf.shape[0], cap, self._buf.shape[2]), dtype=np.float32)
            buf[:, : self.n] = self._buf[:, : self.n]
            self._buf = buf
        self._buf[:, self.n : self.n + t] = keys
        self.n += t

    @property
    def view(self) -> np.ndarray:
        """The filled rows, (groups, n, dim), without a copy."""
        return self._buf[:, : self.n]

    @property
    def buffer(self) -> np.ndarray:
        """The whole C-contiguous (groups, capacity, dim) buffer, rows ``n`` on unused (for kernels that index rows)."""
        return self._buf

    @property
    def nbytes(self) -> int:
        return self._buf.nbytes


class KeyIndex(ABC):
    """Maximum-inner-product index over the keys of all heads of one layer.

    Subclasses set ``name`` and ``params`` (name -> Param); build-time parameters are given to the
    constructor, search-time ones may also be overridden per ``search`` call.
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

    def build(self, keys: np.ndarray, train_queries: np.ndarray | None = None, device: Any = None) -> None:
        """Index ``keys`` (groups, n, dim); ``train_queries`` (groups, m, dim) are prefill queries of each group.

        ``device`` (a torch device or its name; None: the CPU) is where a backend may run the dense,
        exact part of its build, such as roar's training-query top lists.
        """
        keys = _check_array("keys", keys)
        if train_queries is None and self.uses_train_queries:
            raise ValueError(f"index {self.name!r} needs train_queries (groups, m, dim): the prefill queries of each group")
        if train_queries is not None:
            train_queries = _check_array("train_queries", train_queries)
            if train_queries.shape[0] != keys.shape[0] or train_queries.shape[2] != keys.shape[2]:
                raise ValueError(
                    f"train_queries {train_queries.shape} must have keys' groups and dim {keys.shape[0], keys.shape[2]}"
                )
        self.groups, self.dim = keys.shape[0], keys.shape[2]
        self.build_device = device
        start = time.perf_counter()
        self._build(keys, train_queries)
        self.build_seconds = time.perf_counter() - start

    def add(self, keys: np.ndarray) -> None:
        """Insert keys (groups, t, dim) after the existing ones; their ids continue the row numbering."""
        keys = _check_array("keys", keys)
        if self.dim == 0:
            raise RuntimeError(f"index {self.name!r}: add() before build()")
        if keys.shape[0] != self.groups or keys.shape[2] != self.dim:
            raise ValueError(f"keys {keys.shape} must have groups={self.groups} and dim={self.dim}")
        if keys.shape[1]:
            self._add(keys)

    def search(self, queries: np.ndarray, k: int, **params: Any) -> SearchResult:
        """Top-``k`` keys by inner product for queries (groups, m, dim) of each group."""
        queries = _check_array("queries", queries)
        if queries.shape[0] != self.groups or queries.shape[2] != self.dim:
            raise ValueError(f"queries {queries.shape} must have groups={self.groups} and dim={self.dim}")
        n = len(self)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
            raise ValueError(f"k must be an int in [1, {n}] (the number of indexed keys), got {k!r}")
        config = {**self.config, **self.validate_params(params, only=self.search_params)} if params else self.config
        return SearchResult(*self._search(queries, int(k), config))

    @classmethod
    def estimate_nbytes(cls, groups: int, n: int, dim: int, params: dict[str, Any]) -> int:
        """Bytes an index of ``n`` keys per group will hold (the memory planner's figure).

        Default: the backend's own fp32 copy of the keys, in a ``GrowableKeys`` of ``build_capacity(n)``
        rows (an index built over ``n`` keys), plus ``_bytes_per_row`` for each of those rows.
        """
        rows = groups * build_capacity(n)
        return rows * (dim * 4 + cls._bytes_per_row(cls.resolved_params(params)))

    @classmethod
    def _bytes_per_row(cls, config: dict[str, Any]) -> int:
        """Bytes besides the key itself per row of the backend's key buffer (0: a plain copy)."""
        return 0

    @abstractmethod
    def __len__(self) -> int:
        """Keys per group."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of memory held by the index (its own copy of the keys included)."""

    @abstractmethod
    def _build(self, keys: np.ndarray, train_queries: np.ndarray | None) -> None: ...

    @abstractmethod
    def _add(self, keys: np.ndarray) -> None: ...

    @abstractmethod
    def _search(
        self, queries: np.ndarray, k: int, config: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def build_capacity(n: int) -> int:
    """Rows an index built over ``n`` keys allocates: a quarter more (at least 1024) for decode's adds.

    Decoding adds one key per step, usually far fewer than the prompt's; doubling room would cost as
    much memory as the keys themselves at long contexts. Beyond it, the buffer doubles.
    """
    return n + max(1024, n // 4)


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
