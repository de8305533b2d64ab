"""Maximum-inner-product indexes over offloaded keys, one file per backend behind ``KeyIndex``.

Importing this package registers every backend, so ``make_index(name)`` finds it by name.
"""

from . import flat, hnsw, ivf, keygraph, roar  # noqa: F401  (register "flat", "hnsw", "ivf", "keygraph", "roar")
from .auto import AUTO, AUTO_FLAT_BELOW, params_class, resolve_index
from .base import KeyIndex, Param, SearchResult, available_indexes, index_class, make_index, register_index
from .threads import cpu_threads

__all__ = [
    "AUTO",
    "AUTO_FLAT_BELOW",
    "KeyIndex",
    "Param",
    "SearchResult",
    "available_indexes",
    "cpu_threads",
    "index_class",
    "make_index",
    "params_class",
    "register_index",
    "resolve_index",
]
