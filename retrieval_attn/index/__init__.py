"""Maximum-inner-product indexes over offloaded keys, one file per backend behind ``KeyIndex``.

Importing this package registers every backend, so ``make_index(name)`` finds it by name.
"""

from . import flat  # noqa: F401  (registers "flat")
from .base import KeyIndex, Param, SearchResult, available_indexes, index_class, make_index, register_index

__all__ = ["KeyIndex", "Param", "SearchResult", "available_indexes", "index_class", "make_index", "register_index"]
