"""Names of a package loaded on first use (PEP 562): the one ``__getattr__`` the packages that defer
their imports share (the root package, ``index``, ``serve``), so importing them stays cheap.

Imports nothing but ``importlib``.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

__all__ = ["lazy_names"]


def lazy_names(package: str, where: Mapping[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports name ``n`` from its submodule ``where[n]`` on
    first use and keeps it in ``namespace`` (the package's ``globals()``), so later reads skip it."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{where[name]}", package), name)
        namespace[name] = value
        return value

    return __getattr__
