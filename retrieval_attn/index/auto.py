"""``auto``: the default backend choice, ``flat`` for small key sets and ``roar`` for large ones.

The crossover is measured, not guessed: below ``AUTO_FLAT_BELOW`` keys per group, exact search of all
heads of a layer (one batched matmul + top-k) is at least as fast on CPU as the graph search at the
recall the sweep targets, and it is exact; above it the graph wins by a growing margin (see the
``auto`` section of bench/README.md for the measurement). ``index_params`` given with ``auto``
are roar's.
"""

from __future__ import annotations

from .base import KeyIndex, index_class

__all__ = ["AUTO", "AUTO_FLAT_BELOW", "AUTO_GRAPH", "resolve_index", "params_class"]

AUTO = "auto"
AUTO_GRAPH = "roar"
AUTO_FLAT_BELOW = 16384  # keys per group; measured on the embedded model, see bench/README.md


def resolve_index(name: str, n_keys: int) -> str:
    """The backend that ``name`` means for an index of ``n_keys`` keys per group."""
    if name != AUTO:
        return name
    return "flat" if n_keys < AUTO_FLAT_BELOW else AUTO_GRAPH


def params_class(name: str) -> type[KeyIndex]:
    """The backend class whose parameters ``name`` takes (``auto`` takes roar's)."""
    return index_class(AUTO_GRAPH if name == AUTO else name)
