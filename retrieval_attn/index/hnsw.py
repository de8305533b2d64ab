"""``hnsw``: hnswlib's HNSW graph built and searched by inner product, one hnswlib index per group.

This is the off-the-shelf key-only baseline. hnswlib keeps its own fp32 copy of every key (its
element data: vector, level-0 links, label; it cannot read ours) and answers the queries; the scores
are recomputed exactly from the key source's rows. Because hnswlib's Python API does not report how
many distances a search computed, the cost (``scored``) is measured by *replaying* each search on
the same graph: the link lists are read from the index's pickled state (``__getstate__``: level-0
blocks in ``data_level0``, upper levels in ``link_lists``) and a numba kernel follows hnswlib's
algorithm — greedy descent through the upper levels, then a best-first beam of ``max(ef, k)`` at
level 0 (``graph_kernels.beam_search`` over the level-0 lists as a ``graph.Graph``) — counting every
distance computation (hnswlib computes the entry point's distance twice, so does the replay). The
replay reads the keys from the source's rows and finds the same ids as hnswlib up to float ties; the
tests check that.

Determinism: each group's index is built single-threaded (hnswlib's parallel inserts depend on
thread timing) and the groups are built on parallel Python threads (hnswlib releases the GIL).

Cost note: the link lists are re-read from the whole pickled state on the first search after a
build or ``add``, which copies the index; fine for measuring, not meant for a decode loop.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import hnswlib
import numpy as np
from numba import njit, prange

from ..rows import FASTMATH, grown_capacity, to_float32
from .base import KeyIndex, Param, SearchResult
from .dense import fp32_rows
from .graph import Graph
from .graph_kernels import IP, beam_search, distance
from .registry import register_index

__all__ = ["HnswIndex"]

_SEED = 100


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _replay(keys, n, level0, upper, upper_ptr, words_per_level, entries, top_levels, queries, k, ef,
            ids, scored):
    """Replay hnswlib searches of queries [G, m, D]: writes the ids [G, m, k] found and the distance count [G, m].

    keys [G, cap, D] kernel rows; level 0: a ``graph.Graph`` (CSR lists); upper levels: node i of group
    g has its level-l block (count word, then links) at upper[upper_ptr[g, i] + (l - 1) * words_per_level].
    """
    groups, m = queries.shape[0], queries.shape[1]
    ip = np.int64(IP)  # a plain int64, as graph.search_graph passes it: one compiled beam_search
    for t in prange(groups * m):
        g = t // m
        i = t - g * m
        q = queries[g, i]
        cur = entries[g]
        cur_d = distance(q, keys[g, cur], ip)
        cnt = 1
        for level in range(top_levels[g], 0, -1):
            changed = True
            while changed:
                changed = False
                base = upper_ptr[g, cur] + (level - 1) * words_per_level
                for j in range(upper[base] & 0xFFFF):
                    cand = upper[base + 1 + j]
                    d = distance(q, keys[g, cand], ip)
                    cnt += 1
                    if d < cur_d:
                        cur_d = d
                        cur = cand
                        changed = True
        pool_i, pool_d = np.empty(ef, np.int32), np.empty(ef, np.float32)
        pool_x, visited = np.empty(ef, np.bool_), np.empty((n + 63) >> 6, np.uint64)
        _, c0 = beam_search(keys[g], n, level0, g, cur, q, ef, k, ip, pool_i, pool_d, pool_x, visited)
        for j in range(k):
            ids[g, i, j] = pool_i[j]
        scored[g, i] = cnt + c0


@register_index
class HnswIndex(KeyIndex):
    """hnswlib HNSW per group (space 'ip'); ids from ``knn_query``, ``scored`` from a counting replay."""

    name = "hnsw"
    search_params = ("ef",)
    params = {
        "M": Param(16, 2, 512, doc="hnswlib M: links per node on upper levels (2M at level 0)"),
        "ef_construction": Param(200, 1, None, doc="hnswlib beam width while inserting"),
        "ef": Param(128, 1, None, doc="search beam width; must be >= k"),
    }

    @classmethod
    def estimate_nbytes(cls, groups: int, n: int, dim: int, params: dict[str, Any], queries: int = 1,
                        k: int = 100, added: int = 0) -> int:
        """hnswlib's element data (fp32 vector, 2M level-0 links, count, label) for the rows it allocates,
        and the replay's level-0 lists (the same whether keys were built or ``added``)."""
        m = cls.resolved_params(params)["M"]
        return groups * grown_capacity(n) * (dim * 4 + 2 * m * 4 + 4 + 8) + groups * n * (2 * m * 4 + 8)

    @classmethod
    def estimate_build_nbytes(cls, groups: int, n: int, dim: int, params: dict[str, Any], train: int = 0) -> int:
        """The fp32 copy of the keys handed to hnswlib."""
        return groups * n * dim * 4

    def _build(self, train_queries: np.ndarray | None) -> None:
        self._indexes = []
        for _ in range(self.groups):
            index = hnswlib.Index(space="ip", dim=self.dim)
            index.init_index(max_elements=grown_capacity(len(self)), M=self.config["M"],
                             ef_construction=self.config["ef_construction"], random_seed=_SEED)
            self._indexes.append(index)
        self._insert(0, len(self))

    def _add(self, n_old: int, t: int) -> None:
        for index in self._indexes:
            if index.get_max_elements() < n_old + t:
                index.resize_index(grown_capacity(n_old + t))
        self._insert(n_old, t)

    def _insert(self, first: int, t: int) -> None:
        """Add rows first .. first + t - 1 of every group: one thread per group, single-threaded inserts."""
        self._graph = None  # the replay's copy of the links is stale
        if t == 0:
            return
        keys = to_float32(self.rows()[:, first : first + t])  # [G, t, D]: hnswlib copies them anyway
        labels = np.arange(first, first + t)
        with ThreadPoolExecutor(max_workers=len(self._indexes)) as pool:
            list(pool.map(lambda g: self._indexes[g].add_items(keys[g], labels, num_threads=1),
                          range(len(self._indexes))))

    def _own_nbytes(self) -> int:
        graph = self._links()
        return graph["level0"].nbytes + graph["upper"].nbytes + graph["upper_ptr"].nbytes + graph["hnswlib_bytes"]

    def _links(self) -> dict[str, Any]:
        """The link lists of every group as numba-friendly arrays, read from hnswlib's pickled state."""
        if self._graph is not None:
            return self._graph
        groups, n = self.groups, len(self)
        states = [index.__getstate__()[0] for index in self._indexes]
        max_m0, words_per_level = states[0]["max_M0"], states[0]["size_links_per_element"] // 4
        adj0 = np.zeros((groups, n, max_m0), np.int32)
        deg0 = np.zeros((groups, n), np.int32)
        upper_ptr = np.zeros((groups, n), np.int64)
        uppers, offset, hnswlib_bytes = [], 0, 0
        for g, s in enumerate(states):
            block = s["data_level0"].view(np.uint32).reshape(n, s["size_data_per_element"] // 4)  # [n, words]
            labels = block[:, s["label_offset"] // 4]  # low word of each 64-bit label
            if not np.array_equal(labels, np.arange(n)):
                raise RuntimeError("hnsw: internal ids differ from insertion order; the replay needs them equal")
            deg0[g, :n] = block[:, 0] & 0xFFFF
            adj0[g, :n] = block[:, 1 : 1 + max_m0]
            words = s["element_levels"][:n].astype(np.int64) * words_per_level  # [n] upper-level words per node
            upper_ptr[g, :n] = offset + np.cumsum(words) - words
            uppers.append(s["link_lists"].view(np.uint32))
            offset += uppers[-1].shape[0]
            hnswlib_bytes += s["max_elements"] * s["size_data_per_element"] + s["link_lists"].nbytes
        self._graph = {
            "level0": Graph.from_adjacency(adj0, deg0, n, n),
            "upper": np.concatenate(uppers).astype(np.int32),
            "upper_ptr": upper_ptr,
            "words_per_level": words_per_level,
            "entries": np.array([s["enterpoint_node"] for s in states], np.int64),
            "top_levels": np.array([s["max_level"] for s in states], np.int64),
            "hnswlib_bytes": hnswlib_bytes,
        }
        return self._graph

    def replay(self, queries: np.ndarray, k: int, ef: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids [G, m, k] and distance computations [G, m] of the replayed hnswlib search (queries [G, m, D])."""
        graph = self._links()
        ids = np.empty((*queries.shape[:2], k), np.int64)
        scored = np.empty(queries.shape[:2], np.int64)
        _replay(self.rows(), len(self), graph["level0"], graph["upper"], graph["upper_ptr"],
                graph["words_per_level"], graph["entries"], graph["top_levels"], queries, k, ef, ids, scored)
        return ids, scored

    def _search(self, queries: np.ndarray, k: int, config: dict[str, Any], out: SearchResult) -> None:
        ef = config["ef"]
        if ef < k:
            raise ValueError(f"index 'hnsw': ef ({ef}) must be >= k ({k})")
        groups = queries.shape[0]
        ef = min(ef, len(self))  # the same search: a queue as long as the key set holds every key
        for g, index in enumerate(self._indexes):
            index.set_ef(ef)
            out.ids[g] = index.knn_query(queries[g], k=k)[0]  # [m, k] labels; its distances are 1 - ip
        found = fp32_rows(self.rows()[np.arange(groups)[:, None, None], out.ids], "cpu").numpy()  # [G, m, k, D]
        out.scores[:] = np.einsum("gmkd,gmd->gmk", found, queries)  # exact q . key
        _, out.scored[:] = self.replay(queries, k, ef)
