"""Maximum-inner-product indexes over offloaded keys, one file per backend behind ``KeyIndex``.

Backends are found by name through the lazy registry (``registry``): ``make_index(name)`` imports
that backend's module on first use, so importing this package loads no faiss or hnswlib.
"""

from .base import KeyIndex, Param, SearchResult
from .registry import (
    AUTO,
    AUTO_FLAT_BELOW,
    available_indexes,
    backend_for,
    index_class,
    index_params_for,
    make_index,
    make_index_for,
    missing_library,
    params_class,
    parse_index_param,
    register_index,
    resolve_index,
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
