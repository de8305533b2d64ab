"""``GraphIndex``: the storage, growth, ``add`` and search shared by the graph backends (``roar``, ``keygraph``).

Subclasses decide the graph a build starts from (``_adjacency``); the kernels (``graph_kernels``) do
the work. Keys are read in place from the index's key rows (the engine's store, in the model's
dtype); the index itself holds only the adjacency, the entry points and per-thread search scratch.

Storage of one layer, ``G`` groups (a ``Graph``): every node's neighbour list is one run of a
per-group arena ``edges [G, arena]`` int32, located by ``start [G, nodes]`` int32 with ``count`` and
``room`` ``[G, nodes]`` uint8. A build gives each list a run exactly its length; a list that fills
up while decoding adds keys moves to a run a quarter longer (``graph_kernels.grown_room``, up to
``max_degree``), and the runs left behind are compacted away once they are an eighth of the slots in
use (checked before every insert chunk). Bytes per key and head: 6 + 4 x its degree, plus the room
of the lists added keys moved and the garbage below that eighth: ~86 bytes at roar's average degree
of ~20 on the embedded model, a sixth of a bf16 key and value of dimension 128. The arena's growth
slack (a quarter after each compaction) is allocated, but resident only once written. A build
holds, transiently, a fixed-width ``[G, n, max_degree]`` int32 adjacency, converted to the arena at
its end.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar, NamedTuple

import numba
import numpy as np

from ..rows import grown_capacity
from .base import KeyIndex, Param, SearchResult
from .dense import nearest_covered
from .graph_kernels import (
    arena_capacity, compact_arena, grown_room, in_edges, insert_nodes, link, mean_rows, merge_extra, nearest_rows,
    search_graph, search_own, span, to_arena,
)

__all__ = ["Graph", "SearchScratch", "GraphIndex", "DEGREE_CAP"]

_INSERT_CHUNK = 64  # keys linked per add() step: bounds the arena room reserved for one insert_nodes call and
# the transient of the co-occurrence candidates of the keys inserted (``estimate_add_nbytes``)
_GARBAGE_SHARE = 8  # the arena is compacted once the runs moves left behind exceed 1/8 of the slots in use

# the dtypes of a ``Graph``'s arrays (made by ``graph_kernels.to_arena``/``compact_arena``; tests/test_index.py
# checks a built graph against them): the planner's byte figures are derived from them
NODE_DTYPES = (np.int32, np.uint8, np.uint8)  # start, count, room: one entry per node
EDGE_DTYPE = np.int32  # one arena slot per edge
GROUP_DTYPES = (np.int64, np.int64)  # fill, garbage: one entry per group
NODE_BYTES = sum(np.dtype(t).itemsize for t in NODE_DTYPES)
EDGE_BYTES = np.dtype(EDGE_DTYPE).itemsize
GROUP_BYTES = sum(np.dtype(t).itemsize for t in GROUP_DTYPES)
DEGREE_CAP = int(np.iinfo(NODE_DTYPES[1]).max)  # a list's count and room are uint8: the cap of every degree
_SPAN_EF = 16  # beam of span's searches: a near reached node with room is all it needs


class Graph(NamedTuple):
    """The adjacency of one layer's graph (see the module docstring); a tuple numba kernels take whole."""

    start: np.ndarray  # [G, nodes] int32: each list's run in the arena
    count: np.ndarray  # [G, nodes] uint8: neighbours in it
    room: np.ndarray  # [G, nodes] uint8: its length
    edges: np.ndarray  # [G, arena] int32
    fill: np.ndarray  # [G] int64: arena slots in use (runs and garbage)
    garbage: np.ndarray  # [G] int64: slots of runs left behind by moves

    @classmethod
    def from_adjacency(cls, adj: np.ndarray, deg: np.ndarray, n: int, nodes: int) -> Graph:
        """The arena layout of adj [G, >= n, width] with deg [G, >= n], room for ``nodes`` nodes."""
        return cls(*to_arena(adj, deg, n, nodes))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self)


class SearchScratch:
    """Per-thread beam-search scratch, grown on demand and reused: pool ids, distances, expanded flags,
    and the visited bitset, one row per numba thread."""

    def __init__(self) -> None:
        self.arrays = self._alloc(0, 0)

    @staticmethod
    def _alloc(ef: int, n: int) -> tuple[np.ndarray, ...]:
        threads = numba.config.NUMBA_NUM_THREADS
        return (np.empty((threads, ef), np.int32), np.empty((threads, ef), np.float32),
                np.empty((threads, ef), np.bool_), np.zeros((threads, (n + 63) >> 6), np.uint64))

    def get(self, ef: int, n: int) -> tuple[np.ndarray, ...]:
        """Scratch for beams of width ``ef`` over ``n`` nodes (grown by a quarter when too small)."""
        pool, _, _, visited = self.arrays
        if pool.shape[1] < ef or visited.shape[1] < (n + 63) >> 6:
            # a quarter more beam than asked: ef widens a little with every few keys added (ef_growth)
            beam = pool.shape[1] if pool.shape[1] >= ef else ef + ef // 4
            self.arrays = self._alloc(beam, max(grown_capacity(n), visited.shape[1] * 64))
        return self.arrays

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


class GraphIndex(KeyIndex):
    """Base of the numba graph backends: arena storage, growth, ``add`` and inner-product beam search.

    Subclasses implement ``_adjacency(train_queries)``: the fixed-width adjacency ``[G, n, width]``
    int32 and degrees ``[G, n]`` of the built graph (it may also replace the default entry points
    ``self._entries``, the key nearest in L2 to its group's mean key); ``link_metric`` is the
    distance that builds the graph and links added keys (``IP`` or ``L2``); ``conn_degree`` the edges
    an added key takes beyond its candidates. After the build every node is made reachable from its
    group's entry point (``graph_kernels.span``). Search always ranks by inner product.
    """

    link_metric: ClassVar[int]
    search_params = ("ef",)
    params: ClassVar[dict[str, Param]] = {
        "M": Param(32, 2, DEGREE_CAP, doc="out-degree cap of the pruned candidate lists"),
        "build_ef": Param(64, 1, None, doc="beam width of add()'s search for a new key's neighbours"),
        "ef": Param(128, 1, None, doc="search beam width (queue length); must be >= k"),
        "max_degree": Param(64, 2, DEGREE_CAP, doc="cap of every neighbour list (reverse and connectivity edges "
                            "stop there; a full list prunes)"),
        "ef_growth": Param(0.5, 0.0, 2.0, kind=float, doc="search effort follows the keys added since the "
                           "build: ef x (keys / keys built) ** ef_growth (0: a fixed ef)"),
    }

    @classmethod
    def expected_degree(cls, config: dict[str, Any]) -> float:
        """Mean out-degree of a built graph: the planner's figure (an upper one: random keys, whose lists
        all fill, measured in tests/test_planner.py)."""
        return float(config["max_degree"])

    @classmethod
    def _insert_width(cls, config: dict[str, Any]) -> int:
        """The run a key inserted by ``add`` starts with: its candidates and connectivity edges."""
        return min(config["max_degree"], config["M"] + cls.conn_degree(config))

    @classmethod
    def estimate_nbytes(cls, groups: int, n: int, dim: int, params: dict[str, Any], queries: int = 1,
                        k: int = 100, added: int = 0) -> int:
        """The arena, start/count/room of every node, entries, per-thread scratch.

        Built over all ``n`` keys: every list a run of ``expected_degree`` and the build's slack
        (``arena_capacity``). With ``added`` keys inserted later (a conversation's turns), the lists they
        reach (their own, and built lists their edges, pushed back, reach) fill up and move to runs
        one growth step longer (``grown_room``), half of it empty on average; the arena is compacted to a
        quarter more than its runs plus one insert chunk's reserve (``grown_capacity``), and the
        garbage of later moves stays inside it; the node arrays grow by a quarter too. An upper
        figure: on random keys a quarter built, three quarters added, it is 1.0-1.4x what the graph
        holds (tests/test_planner.py).
        """
        config = cls.resolved_params(params)
        degree = cls.expected_degree(config)
        if added:
            cap, width = config["max_degree"], cls._insert_width(config)
            out = min(width, degree)  # an added key's out-edges, each pushed back into its neighbour's list
            live = degree * (n - added) + 2 * out * added
            # lists that moved: the added keys' own, and the built lists their edges reach (drawn at random)
            moved = added + (n - added) * (1 - np.exp(-out * added / max(n - added, 1)))
            # a moved list keeps on average half a growth step of empty room; no list grows past the cap
            runs = int(min(cap * n, live + moved * (grown_room(int(np.ceil(degree)), cap) - degree) / 2))
            # the arena is reallocated only by a compaction: to a quarter more than the runs and the room
            # one insert chunk reserves (its new runs and neighbour moves); the garbage stays inside it
            slots, nodes = grown_capacity(runs + _INSERT_CHUNK * width * (1 + cap)), grown_capacity(n)
        else:
            slots, nodes = arena_capacity(int(degree * n)), n
        ef = min(config["ef"], max(n, 1))
        scratch = numba.config.NUMBA_NUM_THREADS * (ef * 9 + ((grown_capacity(n) + 63) >> 6) * 8)
        return groups * slots * EDGE_BYTES + groups * (nodes * NODE_BYTES + GROUP_BYTES) + scratch

    @classmethod
    def estimate_build_nbytes(cls, groups: int, n: int, dim: int, params: dict[str, Any], train: int = 0) -> int:
        """The fixed-width build adjacency (max_degree) and its degrees, the candidate lists (CSR and
        work items), and one group's keys in fp32."""
        config = cls.resolved_params(params)
        return groups * n * (config["max_degree"] * EDGE_BYTES + 4 + 16 + 8 + 16 * 4) + n * dim * 4

    def replacing(self, previous: KeyIndex) -> None:
        """Keep the search effort of the index this rebuild replaces: the beam widens from the keys the first
        build held, so a rebuild over the keys decoding added does not narrow it back to ``ef`` (recall at a
        fixed ef falls as the graph grows, whether the keys were added or built)."""
        if isinstance(previous, GraphIndex):
            self._built = min(self._built, previous._built)

    def _build(self, train_queries: np.ndarray | None) -> None:
        groups, n, rows = self.groups, len(self), self.rows()
        self._built = n  # keys the build indexed; search widens its beam as add() grows the graph past them
        # entry point: the key nearest (L2) to its group's mean key; -1 while a group has no keys
        self._entries = np.full(groups, -1, np.int64)
        self._scratch = SearchScratch()
        if n == 0:
            self._graph = Graph.from_adjacency(np.empty((groups, 0, 1), np.int32), np.zeros((groups, 0), np.int32),
                                               0, 0)
            return
        self._entries[:] = nearest_rows(rows[:, :n], mean_rows(rows[:, :n]))
        adj, deg = self._adjacency(train_queries)
        self._graph = Graph.from_adjacency(adj, deg, n, n)
        del adj, deg
        ef = min(_SPAN_EF, n)
        span(rows, n, self._graph, self._entries, ef, self.config["max_degree"], self.link_metric,
             *self._scratch.get(ef, n))

    @classmethod
    def conn_degree(cls, config: dict[str, Any]) -> int:
        """Edges of a key linked by ``add`` beyond its candidates."""
        return config["M"]

    @abstractmethod
    def _adjacency(self, train_queries: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The built graph over the first ``len(self)`` rows: adj [G, n, width] int32, deg [G, n] int32."""

    def connect(self, adj: np.ndarray, deg: np.ndarray, covered: np.ndarray, conn: int, candidates: int = 16) -> None:
        """Connectivity step of a build: link every key to ``conn`` of its nearest ``covered`` keys, both ways.

        adj [G, n, width] and deg [G, n] hold the graph so far (``link_metric`` lists); covered [G, n]
        bool marks the keys it reaches. Each key's ``candidates`` approximately nearest covered keys
        (``dense.nearest_covered``, in bulk) are pruned to ``conn`` and appended to its list, then
        every key is appended to the lists of the keys it chose, while a list has room.
        """
        groups, n = deg.shape
        if conn == 0 or n < 2:
            return
        rows = self.rows()
        near = nearest_covered(rows, n, covered, min(candidates, n - 1), self.build_device)  # [G, n, c]
        extra = np.empty((groups, n, conn), np.int32)
        extra_deg = np.zeros((groups, n), np.int32)
        nodes = np.arange(groups * n)
        work = np.stack([nodes // n, nodes % n], axis=1)  # [G * n, 2] (group, node)
        link(rows, work, np.arange(groups * n + 1, dtype=np.int64) * near.shape[2], near.ravel(), conn,
             self.link_metric, extra, extra_deg)
        self._merge(adj, deg, extra, extra_deg)

    def connect_by_search(self, adj: np.ndarray, deg: np.ndarray, conn: int) -> None:
        """Connectivity step of a build, RoarGraph's: every key beam-searches its own vector (``build_ef``)
        from its group's entry point in the graph so far and links to ``conn`` of the pruned results,
        both ways, while lists have room. One search per key: ~5x the cost of ``connect``."""
        groups, n = deg.shape
        extra = np.empty((groups, n, conn), np.int32)
        extra_deg = np.zeros((groups, n), np.int32)
        ef = min(self.config["build_ef"], n)
        search_own(self.rows(), n, Graph.from_adjacency(adj, deg, n, n), self._entries, ef, conn, self.link_metric,
                   extra, extra_deg, *self._scratch.get(ef, n))
        self._merge(adj, deg, extra, extra_deg)

    def _merge(self, adj: np.ndarray, deg: np.ndarray, extra: np.ndarray, extra_deg: np.ndarray) -> None:
        """Append each node's ``extra`` edges to its list, then the reverse edges, while lists have room."""
        work, in_ptr, in_src = in_edges(extra, extra_deg, deg.shape[1], False)
        merge_extra(self.rows(), work, in_ptr, in_src, extra, extra_deg, self.link_metric, adj, deg)

    def _add(self, n_old: int, t: int) -> None:
        g = self._graph
        if n_old + t > g.start.shape[1]:  # room for more nodes: grow start, count, room by a quarter
            nodes = grown_capacity(n_old + t)
            grown = [np.zeros((self.groups, nodes), a.dtype) for a in (g.start, g.count, g.room)]
            for new, old in zip(grown, (g.start, g.count, g.room)):
                new[:, :n_old] = old[:, :n_old]
            self._graph = g._replace(start=grown[0], count=grown[1], room=grown[2])
        width, cap = self._insert_width(self.config), self.config["max_degree"]
        ef = min(self.config["build_ef"], n_old + t)
        for first in range(n_old, n_old + t, _INSERT_CHUNK):
            chunk = min(_INSERT_CHUNK, n_old + t - first)
            self._reserve_arena(first, chunk * width * (1 + cap))  # each new run, and each neighbour's move
            cands = self._insert_candidates(first, chunk)  # [G, chunk, E]
            insert_nodes(self.rows(), first, chunk, self._graph, self._entries, ef, self.config["M"], width, cap,
                         self.link_metric, cands, self.conn_degree(self.config), *self._scratch.get(ef, first + chunk))
        self._reserve_arena(n_old + t, 0)

    def _reserve_arena(self, n: int, slots: int) -> None:
        """Make ``slots`` free arena slots per group for the first ``n`` nodes' lists, compacting away the
        runs left behind when the arena is too short or they exceed an eighth of the slots in use."""
        g = self._graph
        if g.garbage.max() * _GARBAGE_SHARE > g.fill.max() or g.fill.max() + slots > g.edges.shape[1]:
            start, edges, fill, garbage = compact_arena(g, n, slots)
            self._graph = g._replace(start=start, edges=edges, fill=fill, garbage=garbage)

    def _insert_candidates(self, first: int, t: int) -> np.ndarray:
        """Given candidates of new keys ``first .. first + t - 1`` (groups, t, E) int32, -1 padded; none by
        default. ``add`` asks for one chunk of at most ``_INSERT_CHUNK`` keys at a time."""
        return np.full((self.groups, t, 0), -1, np.int32)

    def _own_nbytes(self) -> int:
        return self._graph.nbytes + self._entries.nbytes + self._scratch.nbytes

    def degrees(self) -> np.ndarray:
        """Out-degree of every indexed node, (groups, n) int64 (for measurements)."""
        return self._graph.count[:, : len(self)].astype(np.int64)

    def _search(self, queries: np.ndarray, k: int, config: dict[str, Any], out: SearchResult) -> None:
        ef = config["ef"]
        if ef < k:
            raise ValueError(f"index {self.name!r}: ef ({ef}) must be >= k ({k})")
        # the beam widens as decoding adds keys: a graph's recall at a fixed ef falls as its key set grows
        grown = len(self) / max(self._built, 1)
        if grown > 1 and self.config["ef_growth"]:
            ef = int(np.ceil(ef * grown ** self.config["ef_growth"]))
        # a queue as long as the key set already holds every key: a longer one would only allocate more
        ef = min(ef, len(self))
        search_graph(self.rows(), len(self), self._graph, self._entries, queries, k, ef, out.ids, out.scores,
                     out.scored, *self._scratch.get(ef, len(self)))
