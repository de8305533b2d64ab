"""``ivf``: faiss ``IndexIVFFlat`` with inner product, one faiss index per group.

The clustering baseline: keys are split into ``nlist`` k-means cells, and a query scans the cells
of its ``nprobe`` best centroids. ``scored`` is the number of keys in the probed cells (the
quantizer's choice is made once and passed to ``search_preassigned``, so the count is exactly what
was scanned; centroid scores are not counted). When the probed cells hold fewer than ``k`` keys,
that query is searched again with twice the probes until it has ``k`` results, and ``scored``
counts the cells of that last search, so ids are always valid rows.

Threads: groups are handled one after another, each call on faiss' OpenMP threads. Training and
large batches use faiss' thread count (all cores unless ``faiss.omp_set_num_threads`` said
otherwise); calls on fewer than ``PARALLEL_ROWS`` vectors (a decode step's queries, a spilled key)
run on one thread, because waking a thread team costs far more than such a call (measured: adding 8
keys took 2.4 ms on 2 threads and 0.01 ms on one). k-means uses faiss' fixed seed, so builds are
deterministic.

Memory: faiss keeps its own fp32 copy of every key in the inverted lists (with an int64 id); the
index counts it in ``nbytes`` and the planner in ``estimate_nbytes``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import faiss
import numpy as np

from ..rows import to_float32
from .base import KeyIndex, Param, SearchResult
from .registry import register_index

__all__ = ["IvfIndex", "PARALLEL_ROWS"]

PARALLEL_ROWS = 256


@contextmanager
def _threads_for(rows: int) -> Iterator[None]:
    """Run the faiss calls inside on one OpenMP thread if they handle fewer than PARALLEL_ROWS vectors."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1 if rows < PARALLEL_ROWS else before)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


@register_index
class IvfIndex(KeyIndex):
    """faiss IVF-Flat per group, maximum inner product; keys stay in faiss' inverted lists."""

    name = "ivf"
    search_params = ("nprobe",)
    params = {
        "nlist": Param(256, 1, None, doc="k-means cells per group; at most the number of keys at build"),
        "nprobe": Param(32, 1, None, doc="cells scanned per query; at most nlist"),
    }

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._check_nprobe(self.config["nprobe"])

    def _check_nprobe(self, nprobe: int) -> None:
        if nprobe > self.config["nlist"]:
            raise ValueError(f"index 'ivf': nprobe ({nprobe}) must be <= nlist ({self.config['nlist']})")

    @classmethod
    def estimate_nbytes(cls, groups: int, n: int, dim: int, params: dict[str, Any], queries: int = 1,
                        k: int = 100, added: int = 0) -> int:
        """Centroids plus each key's vector and int64 id in its inverted list (``nbytes``' formula; the
        same whether keys were built or ``added``)."""
        nlist = cls.resolved_params(params)["nlist"]
        return groups * (nlist * dim * 4 + n * (dim * 4 + 8))

    @classmethod
    def estimate_build_nbytes(cls, groups: int, n: int, dim: int, params: dict[str, Any], train: int = 0) -> int:
        """The fp32 copy of the keys handed to faiss."""
        return groups * n * dim * 4

    def _build(self, train_queries: np.ndarray | None) -> None:
        groups, n, dim = self.groups, len(self), self.dim
        keys = to_float32(self.rows()[:, :n])  # [G, n, D]: faiss keeps its own copy of the vectors
        nlist = self.config["nlist"]
        if nlist > n:
            raise ValueError(f"index 'ivf': nlist ({nlist}) must be <= the number of keys per group ({n}) to train")
        self._indexes = []
        for g in range(groups):
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.min_points_per_centroid = 1  # few keys per cell is expected here: train on all of them, no warning
            index.train(keys[g])
            index.add(keys[g])
            self._indexes.append(index)
        self._sizes = None

    def _add(self, n_old: int, t: int) -> None:
        keys = to_float32(self.rows()[:, n_old : n_old + t])  # [G, t, D]
        with _threads_for(t):
            for g, index in enumerate(self._indexes):
                index.add(keys[g])  # faiss numbers them ntotal, ntotal + 1, ...: the row order
        self._sizes = None

    def _list_sizes(self) -> np.ndarray:
        """Keys per inverted list, [G, nlist] int64 (cached until the next add)."""
        if self._sizes is None:
            nlist = self.config["nlist"]
            self._sizes = np.array(
                [[index.invlists.list_size(c) for c in range(nlist)] for index in self._indexes], np.int64
            )
        return self._sizes

    def _own_nbytes(self) -> int:
        centroids = self.config["nlist"] * self.dim * 4
        per_key = self.dim * 4 + 8  # the vector and its int64 id in an inverted list
        return len(self._indexes) * (centroids + len(self) * per_key)

    def _search(self, queries: np.ndarray, k: int, config: dict[str, Any], out: SearchResult) -> None:
        nprobe, nlist = config["nprobe"], self.config["nlist"]
        self._check_nprobe(nprobe)
        m = queries.shape[1]
        sizes = self._list_sizes()  # [G, nlist]
        with _threads_for(m):
            for g, index in enumerate(self._indexes):
                rows, probes = np.arange(m), nprobe
                while rows.size:
                    index.nprobe = probes
                    cell_scores, cells = index.quantizer.search(queries[g, rows], probes)  # [r, probes]
                    top, found = index.search_preassigned(queries[g, rows], k, cells, cell_scores)  # [r, k]
                    out.ids[g, rows], out.scores[g, rows] = found, top
                    out.scored[g, rows] = sizes[g, cells].sum(axis=1)
                    rows = rows[found[:, -1] < 0]  # probed cells held fewer than k keys
                    probes = min(2 * probes, nlist)
