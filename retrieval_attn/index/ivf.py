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
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import faiss
import numpy as np

from .base import KeyIndex, Param
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
    def estimate_nbytes(cls, groups: int, n: int, dim: int, params: dict[str, Any]) -> int:
        """Centroids plus each key's vector and int64 id in its inverted list (``nbytes``' formula)."""
        nlist = cls.resolved_params(params)["nlist"]
        return groups * (nlist * dim * 4 + n * (dim * 4 + 8))

    def _build(self, keys: np.ndarray, train_queries: np.ndarray | None) -> None:
        groups, n, dim = keys.shape
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

    def _add(self, keys: np.ndarray) -> None:
        with _threads_for(keys.shape[1]):
            for g, index in enumerate(self._indexes):
                index.add(keys[g])  # faiss numbers them ntotal, ntotal + 1, ...: the row order
        self._sizes = None

    def __len__(self) -> int:
        return self._indexes[0].ntotal if self.dim else 0

    def _list_sizes(self) -> np.ndarray:
        """Keys per inverted list, [G, nlist] int64 (cached until the next add)."""
        if self._sizes is None:
            nlist = self.config["nlist"]
            self._sizes = np.array(
                [[index.invlists.list_size(c) for c in range(nlist)] for index in self._indexes], np.int64
            )
        return self._sizes

    @property
    def nbytes(self) -> int:
        if not self.dim:
            return 0
        centroids = self.config["nlist"] * self.dim * 4
        per_key = self.dim * 4 + 8  # the vector and its int64 id in an inverted list
        return len(self._indexes) * (centroids + len(self) * per_key)

    def _search(self, queries: np.ndarray, k: int, config: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        nprobe, nlist = config["nprobe"], self.config["nlist"]
        self._check_nprobe(nprobe)
        groups, m, _ = queries.shape
        sizes = self._list_sizes()  # [G, nlist]
        ids = np.empty((groups, m, k), np.int64)
        scores = np.empty((groups, m, k), np.float32)
        scored = np.empty((groups, m), np.int64)
        with _threads_for(m):
            for g, index in enumerate(self._indexes):
                rows, probes = np.arange(m), nprobe
                while rows.size:
                    index.nprobe = probes
                    cell_scores, cells = index.quantizer.search(queries[g, rows], probes)  # [r, probes]
                    top, found = index.search_preassigned(queries[g, rows], k, cells, cell_scores)  # [r, k]
                    ids[g, rows], scores[g, rows] = found, top
                    scored[g, rows] = sizes[g, cells].sum(axis=1)
                    rows = rows[found[:, -1] < 0]  # probed cells held fewer than k keys
                    probes = min(2 * probes, nlist)
        return ids, scores, scored
