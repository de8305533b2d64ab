"""The registry of index backends: name -> module, imported on first use, and the ``auto`` rule.

Backends live one per module; each registers its class with ``register_index`` when its module is
imported. The built-in ones are listed here by module, so naming one imports that module only:
importing the package (or ``RetrievalConfig``) loads no faiss or hnswlib, and a machine without
them still runs every other backend: ``available_indexes`` leaves out a backend whose library is
missing (``missing_library``), and naming it is refused with the library's name.

``auto`` is the default choice: ``flat`` (exact) below ``AUTO_FLAT_BELOW`` offloaded keys per
group, ``roar`` from there on. The crossover is measured, not guessed: below it exact search of all
heads of a layer (one batched matmul + top-k) is at least as fast on CPU as the graph search at the
recall the sweep targets, and it is exact; above it the graph wins by a growing margin (the ``auto``
section of bench/README.md). ``index_params`` given with ``auto`` are roar's; ``backend_for`` is the
one place that applies this rule.

``ef`` follows ``top_k``: a graph backend's search queue ``ef`` must hold at least the ``top_k`` keys a
search returns, so where the caller set no ``ef`` an index is made with ``max(default ef, top_k)``
(``index_params_for``, which ``RetrievalConfig`` and ``backend_for`` apply). ``sketch``'s
``candidates`` follow ``top_k`` the same way, at ``CANDIDATES_PER_K`` per key retrieved:
``max(default, 4 * top_k)``.

This module knows nothing about torch models, caches or the engine.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any, Mapping

from ..checks import missing_library_message

if TYPE_CHECKING:
    from .base import KeyIndex

__all__ = [
    "AUTO", "AUTO_GRAPH", "AUTO_FLAT_BELOW", "CANDIDATES_PER_K", "register_index", "available_indexes", "missing_library", "index_class",
    "make_index", "params_class", "resolve_index", "backend_for", "make_index_for", "index_params_for",
    "parse_index_param",
]

AUTO = "auto"
AUTO_GRAPH = "roar"
AUTO_FLAT_BELOW = 16384  # keys per group; measured on the embedded model, see bench/README.md
CANDIDATES_PER_K = 4  # sketch's candidates per key retrieved where unset (its recall on real keys, bench/README.md)

# built-in backends: name -> module of this package that registers it
_MODULES = {"flat": "flat", "roar": "roar", "keygraph": "keygraph", "hnsw": "hnsw", "ivf": "ivf", "sketch": "sketch"}
# built-in backends that need a library of their own: name -> (module, package that installs it)
_LIBRARIES = {"hnsw": ("hnswlib", "hnswlib"), "ivf": ("faiss", "faiss-cpu")}
_REGISTRY: dict[str, type[KeyIndex]] = {}


def register_index(cls: type[KeyIndex]) -> type[KeyIndex]:
    """Class decorator: make a backend available by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def missing_library(name: str) -> str | None:
    """The package that built-in backend ``name`` needs and this machine lacks (``"hnswlib"``,
    ``"faiss-cpu"``), or None. Looks the library up without importing it."""
    module, package = _LIBRARIES.get(name, (None, None))
    if module is None or name in _REGISTRY:
        return None
    try:
        found = importlib.util.find_spec(module) is not None
    except ValueError:  # a module in sys.modules without a spec: taken as present
        found = True
    return None if found else package


def available_indexes() -> list[str]:
    """Names of the backends usable here (built-in and registered), whether or not their module is loaded
    yet: a built-in backend whose library is not installed (``missing_library``) is left out."""
    return sorted({*(name for name in _MODULES if missing_library(name) is None), *_REGISTRY})


def index_class(name: str) -> type[KeyIndex]:
    """The backend class registered as ``name`` (its module imported on first use), or ValueError listing
    the usable names (and naming the library a known backend lacks)."""
    if isinstance(name, str) and name not in _REGISTRY and name in _MODULES:
        if (package := missing_library(name)) is not None:
            raise ValueError(f"index {name!r} {missing_library_message(package)}; use one of {available_indexes()}")
        importlib.import_module(f"{__package__}.{_MODULES[name]}")
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"index must be one of {available_indexes()}, got {name!r}")
    return _REGISTRY[name]


def make_index(name: str, **params: Any) -> KeyIndex:
    """A new, empty index of backend ``name`` with validated ``params``."""
    return index_class(name)(**params)


def params_class(name: str) -> type[KeyIndex]:
    """The backend class whose parameters ``name`` takes (``auto`` takes roar's)."""
    return index_class(AUTO_GRAPH if name == AUTO else name)


def resolve_index(name: str, n_keys: int) -> str:
    """The backend that ``name`` means for an index of ``n_keys`` keys per group."""
    if name != AUTO:
        return name
    return "flat" if n_keys < AUTO_FLAT_BELOW else AUTO_GRAPH


def index_params_for(name: str, params: Mapping[str, Any], top_k: int) -> dict[str, Any]:
    """The parameters an index of ``name`` (``auto``: roar's) that retrieves ``top_k`` keys is made with:
    ``params``, plus, when the backend searches with a queue ``ef`` that ``params`` leaves unset,
    ``ef = top_k`` where ``top_k`` exceeds the default ``ef``. So any ``top_k`` works without tuning
    ``ef``; an ``ef`` the caller set is kept as given (and must be >= ``top_k``)."""
    out = dict(params)
    declared = params_class(name).params
    ef = declared.get("ef")
    if ef is not None and "ef" not in out and top_k > ef.default:
        out["ef"] = top_k
    candidates = declared.get("candidates")  # sketch: its second stage's candidates follow top_k too
    if candidates is not None and "candidates" not in out and CANDIDATES_PER_K * top_k > candidates.default:
        out["candidates"] = CANDIDATES_PER_K * top_k
    return out


def backend_for(name: str, params: Mapping[str, Any], n_keys: int, top_k: int) -> tuple[str, dict[str, Any]]:
    """The backend and the parameters it is built with, for ``name`` (possibly ``auto``) and its
    configured ``params``, over ``n_keys`` keys per group, retrieving ``top_k`` keys per query
    (``index_params_for``): ``auto`` resolved to flat drops roar's."""
    backend = resolve_index(name, n_keys)
    return backend, ({} if backend == "flat" else index_params_for(name, params, top_k))


def make_index_for(name: str, params: Mapping[str, Any], n_keys: int, top_k: int) -> KeyIndex:
    """A new, empty index of what ``name`` with ``params`` means over ``n_keys`` keys per group, for
    retrieving ``top_k`` keys per query."""
    backend, backend_params = backend_for(name, params, n_keys, top_k)
    return make_index(backend, **backend_params)


def parse_index_param(name: str, text: str) -> tuple[str, int | float]:
    """``"PARAM=VALUE"`` -> (param, value) for backend ``name`` (``auto``: roar's), the value read as the
    parameter's declared type and checked against its range; ValueError names what is allowed."""
    cls = params_class(name)
    key, eq, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not eq or not key or not value:
        raise ValueError(f"index parameter {text!r}: expected NAME=VALUE, e.g. ef=300")
    if key not in cls.params:
        raise ValueError(f"index {cls.name!r}: unknown parameter {key!r}; allowed: {sorted(cls.params) or 'none'}")
    param = cls.params[key]
    try:
        number = param.kind(value)
    except ValueError:
        raise ValueError(
            f"index {cls.name!r}: parameter {key!r} must be {param.kind.__name__}, got {value!r}"
        ) from None
    return key, cls.validate_params({key: number})[key]
