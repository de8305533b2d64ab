"""Maximum-inner-product indexes over offloaded keys, one file per backend behind ``KeyIndex``.

Backends are found by name through the lazy registry (``registry``): ``make_index(name)`` imports
that backend's module on first use, so importing this package loads no faiss or hnswlib. The names
below are loaded on first use too (PEP 562): importing the package, or ``RetrievalConfig`` through the
registry, loads neither numba nor torch (``retrieval-attn --help`` stays fast).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names

if TYPE_CHECKING:
    from .base import KeyIndex, Param, SearchResult
    from .registry import (
        AUTO, AUTO_FLAT_BELOW, available_indexes, backend_for, index_class, index_params_for, make_index,
        make_index_for, missing_library, params_class, parse_index_param, register_index, resolve_index,
    )
    from .threads import ThreadChooser, cpu_threads, thread_budget

__all__ = [
    "AUTO",
    "AUTO_FLAT_BELOW",
    "KeyIndex",
    "Param",
    "SearchResult",
    "ThreadChooser",
    "available_indexes",
    "backend_for",
    "cpu_threads",
    "index_class",
    "index_params_for",
    "make_index",
    "make_index_for",
    "missing_library",
    "params_class",
    "parse_index_param",
    "register_index",
    "resolve_index",
    "thread_budget",
]

_WHERE = {**dict.fromkeys(__all__, "registry"), "KeyIndex": "base", "Param": "base", "SearchResult": "base",
          "ThreadChooser": "threads", "cpu_threads": "threads", "thread_budget": "threads"}


__getattr__ = lazy_names(__name__, _WHERE, globals())
