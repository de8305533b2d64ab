"""Index backends as the tools name them, and what such a name means for an index of a given size.

A *backend spec* is ``name[:param=v1,v2,...]...`` (``BackendSpec``, ``parse_backend_spec``): the sweep
gives the one search-time parameter of a backend several values (its grid, searched on one index)
and eval's methods give every parameter one value. ``plan_backend`` resolves a spec against the index
registry for a number of keys: the build parameters (checked), the search grid, and the label the
results use. ``warm_up`` compiles every backend once so that no JIT compilation is timed.

This module knows the index registry and nothing of models, captures or results files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

from ..index import index_class, make_index, missing_library

__all__ = [
    "BackendSpec",
    "BackendPlan",
    "DEFAULT_BACKENDS",
    "parse_backend_spec",
    "plan_backend",
    "warm_up",
]

GRAPH_EF_GRID = (100, 150, 200, 300, 500, 800)
HNSW_EF_GRID = (100, 200, 400, 800, 1600)
IVF_NPROBE_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SKETCH_CANDIDATES_GRID = (100, 200, 400, 800)  # 1, 2, 4, 8 x the default top_k


@dataclass(frozen=True)
class BackendSpec:
    """An index backend as a tool names it: its registry name and parameter values.

    ``params`` maps a parameter name to its values. The one search-time parameter of the backend
    (``KeyIndex.search_params``, e.g. ``ef``, ``nprobe``) may take several values: that is the grid,
    searched on one index; every other parameter takes one value and is given at build. Omitted
    parameters keep the backend's defaults, except ivf's ``nlist``, which defaults to 4 * sqrt(keys).
    """

    name: str
    params: Mapping[str, tuple[int | float, ...]] = field(default_factory=dict)

    def __str__(self) -> str:
        return ":".join([self.name, *(f"{k}={','.join(str(v) for v in vs)}" for k, vs in self.params.items())])


DEFAULT_BACKENDS = tuple(spec for spec in (  # those whose library is installed here (hnswlib, faiss-cpu)
    BackendSpec("flat"),
    BackendSpec("roar", {"ef": GRAPH_EF_GRID}),
    BackendSpec("keygraph", {"ef": GRAPH_EF_GRID}),
    BackendSpec("hnsw", {"ef": HNSW_EF_GRID, "M": (32,)}),
    BackendSpec("ivf", {"nprobe": IVF_NPROBE_GRID}),
    BackendSpec("sketch", {"candidates": SKETCH_CANDIDATES_GRID}),
) if missing_library(spec.name) is None)


def parse_backend_spec(text: str) -> BackendSpec:
    """``"name[:param=v1,v2,...]..."`` -> BackendSpec, e.g. ``"hnsw:ef=100,400:M=32"``."""
    name, *parts = text.strip().split(":")
    if not name:
        raise ValueError(f"backend spec {text!r}: empty backend name")
    params: dict[str, tuple[int | float, ...]] = {}
    for part in parts:
        key, eq, values = part.partition("=")
        if not eq or not key or not values:
            raise ValueError(f"backend spec {text!r}: expected param=v1,v2,... after ':', got {part!r}")
        try:
            params[key] = tuple(float(v) if "." in v or "e" in v else int(v) for v in values.split(","))
        except ValueError:
            raise ValueError(f"backend spec {text!r}: values of {key!r} must be numbers, got {values!r}") from None
    return BackendSpec(name, params)


@dataclass(frozen=True)
class BackendPlan:
    """A backend resolved against the registry for one number of keys."""

    name: str
    build: dict[str, int | float]
    grid_param: str | None
    grid: tuple[int | float | None, ...]
    label: str  # the backend's name in results: with the build parameters the spec fixed, e.g. "roar(conn=4)"


def plan_backend(spec: BackendSpec, n_keys: int, notes: set[str]) -> BackendPlan:
    """Build parameters and search grid of ``spec`` for an index of ``n_keys`` keys.

    Grid values that cannot apply (ivf ``nprobe`` above ``nlist``) are dropped with a note.
    """
    cls = index_class(spec.name)
    unknown = sorted(set(spec.params) - set(cls.params))
    if unknown:
        raise ValueError(f"backend {spec.name!r}: unknown parameter(s) {unknown}; allowed: {sorted(cls.params)}")
    grid_names = [p for p in spec.params if p in cls.search_params]
    multi = [p for p, vs in spec.params.items() if len(vs) > 1 and p not in cls.search_params]
    if multi or len(grid_names) > 1:
        raise ValueError(
            f"backend {spec.name!r}: only one search-time parameter {list(cls.search_params)} may take several "
            f"values, got {spec.params}"
        )
    build = {p: vs[0] for p, vs in spec.params.items() if p not in grid_names}
    label = f"{spec.name}({' '.join(f'{p}={v}' for p, v in build.items())})" if build else spec.name
    if spec.name == "ivf" and "nlist" not in build:
        build["nlist"] = int(max(1, min(n_keys, round(4 * math.sqrt(n_keys)))))
    cls.validate_params(build)
    if not grid_names:
        return BackendPlan(spec.name, build, None, (None,), label)
    name = grid_names[0]
    grid = []
    for v in spec.params[name]:
        cls.validate_params({name: v}, only=(name,))
        if name == "nprobe" and "nlist" in build and v > build["nlist"]:
            notes.add(f"{spec.name}: nprobe={v} skipped at {n_keys} keys (nlist={build['nlist']})")
        else:
            grid.append(v)
    return BackendPlan(spec.name, build, name, tuple(grid), label)


def warm_up(plans: Iterable[BackendPlan], dim: int) -> None:
    """Build and search each backend once on small random data (top-10, default parameters), so JIT
    compilation is not timed."""
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((1, 512, dim), dtype=np.float32)
    train = rng.standard_normal((1, 256, dim), dtype=np.float32)
    for plan in plans:
        build = {**plan.build, "nlist": 16, "nprobe": 1} if plan.name == "ivf" else plan.build
        index = make_index(plan.name, **build)
        index.build(keys, train if index.uses_train_queries else None)
        index.search(train[:, :4], 10)
