"""The key index of one layer through its life, as a state machine (``Phase``):

``SAMPLING`` (the prompt is read; prefill queries are sampled to train the index) -> ``BUILDING`` (the
prompt is over; the first build runs on the builder thread, an exact stand-in may serve meanwhile)
-> ``BUILT`` (the index serves; spilled keys are inserted) <-> ``REBUILDING`` (a background rebuild,
trained on a ring of recent decode queries and those of the turns after decoding, is swapped in when
it lands). A foreground build (the first decode step without ``start_index_build``) goes from
``SAMPLING`` straight to ``BUILT``, and so does the sink + window baseline, which holds no index.

"The prompt is over" is this state machine's: any phase after ``SAMPLING``. A build trains on
queries handed to it by value when it starts (the prefill sample, frozen then; the rebuild ring, copied);
its work on the builder thread returns a ``Built`` result (the index, the keys it holds, its seconds), which the
decoding thread takes in; the builder writes no field the decoding thread reads.

Owns the index and the builder thread (``_INDEX_BUILDER``). The keys live in the engine's ``KVStore``,
handed to each call: this module reads them and never writes them. It knows nothing about the device
window, the retrieval's host buffers or the step timing, nor about transformers.
"""

from __future__ import annotations

import enum
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from ..config import RetrievalConfig
from ..index import cpu_threads, make_index, make_index_for, params_class
from ..offload import KVStore

__all__ = ["IndexLifecycle", "Phase", "Built"]

# Builds indexes in the background; each engine waits for its own future, so engines used from several
# threads stay independent.
_INDEX_BUILDER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval-attn-build")


class _QuerySample:
    """Prefill queries kept to train a query-aware index: at most ``cap`` positions, one query each per
    KV head, in the queries' dtype on the CPU.

    Keeps positions ``p`` with ``p % stride == 0``; when more than ``cap`` are held, the stride doubles
    and every other kept position is dropped. At position ``p`` it keeps query head ``p % group`` of
    each GQA group, so the sample spans positions and heads alike with one vector per position (as
    good as a random subset of every head's queries, measured on the embedded model's real queries,
    at a group-th of the memory). The sample depends only on the positions seen, so chunked and
    one-call prefill train the same index.
    """

    def __init__(self, cap: int | None):
        self.cap, self.stride = cap, 1
        self._chunks: list[tuple[torch.Tensor, torch.Tensor]] = []  # (positions [m], queries [G, m, D])

    def add(self, q: torch.Tensor, start: int, num_kv_heads: int) -> None:
        """Keep the sampled positions of q (B, Hq, n, D) whose first token is at position ``start``."""
        b, hq, n, d = q.shape
        group = hq // num_kv_heads
        pos = torch.arange(start, start + n)
        keep = pos % self.stride == 0
        cols, heads = (keep.nonzero()[:, 0], pos[keep] % group)  # [m] each: column in the chunk, head in the group
        qs = q.view(b, num_kv_heads, group, n, d)[:, :, heads.to(q.device), cols.to(q.device)]  # [B, Hkv, m, D]
        self._chunks.append((pos[keep], qs.reshape(b * num_kv_heads, -1, d).cpu()))
        while self.cap is not None and sum(len(p) for p, _ in self._chunks) > self.cap:
            self.stride *= 2
            self._chunks = [(p[p % self.stride == 0], x[:, p % self.stride == 0]) for p, x in self._chunks]

    def queries(self) -> torch.Tensor:
        """The kept queries of every group, (groups, positions, D) fp32, contiguous."""
        return torch.cat([x for _, x in self._chunks], dim=1).float().contiguous()


class Phase(enum.Enum):
    """Where an ``IndexLifecycle`` is (the module docstring draws the transitions)."""

    SAMPLING = "sampling"
    BUILDING = "building"
    BUILT = "built"
    REBUILDING = "rebuilding"


class Built(NamedTuple):
    """What a build returns to the decoding thread."""

    index: object  # the KeyIndex
    keys: int  # keys per group it was built over
    seconds: float


class IndexLifecycle:
    """The index over one layer's offloaded keys, from the first build to the background rebuilds.

    Parameters
    ----------
    config : the backend (``index``, ``index_params``), ``retrieve``, ``cpu_threads``,
        ``serve_while_building``, ``rebuild_growth`` and ``rebuild_queries``.
    """

    def __init__(self, config: RetrievalConfig):
        self.config = config
        self.phase = Phase.SAMPLING
        self.index = None  # the KeyIndex in use; None until the first build
        cls = params_class(config.index)
        cap = cls.resolved_params(dict(config.index_params)).get("train_queries")
        self.train = _QuerySample(cap) if cls.uses_train_queries else None  # until the first build over keys
        self.pending: Future | None = None  # the build (BUILDING) or rebuild (REBUILDING) in flight, -> Built
        self.standing_in = False  # BUILDING: exact flat search serves until the build lands
        self.rebuilds = 0  # rebuilds swapped in
        self.built_n = 0  # keys per group the index in use was built over
        self.build_seconds = 0.0  # of the last build or rebuild
        self._recent_q: torch.Tensor | None = None  # [G, rebuild_queries, group, D] ring of decode queries
        self._recent_steps = 0

    @property
    def prompt_over(self) -> bool:
        """A decode step ran or the build started: later prefills are turns of a conversation."""
        return self.phase is not Phase.SAMPLING

    def finish_build(self) -> None:
        """Block until the background first build (if one is in flight) has finished, re-raising its error."""
        if self.phase is Phase.BUILDING:
            self.pending.result()

    def wait(self) -> None:
        """Wait for the build in flight; its error is dropped (of no interest once its tokens are)."""
        if self.pending is not None:
            self.pending.exception()

    def sample(self, q: torch.Tensor, start: int, num_kv_heads: int) -> None:
        """Keep prefill queries q (B, Hq, n, D), first token at position ``start``, if the backend trains on them."""
        if self.train is not None:
            self.train.add(q, start, num_kv_heads)

    def start_build(self, store: KVStore, device: torch.device) -> None:
        """SAMPLING -> BUILDING: build the index over the store's keys on the builder thread, trained on the
        sample as it is now (``_frozen_sample``); ``ready`` takes it in."""
        self.pending = _INDEX_BUILDER.submit(self._first_build, store, store.n, self._frozen_sample(store), device)
        self.phase = Phase.BUILDING

    def _frozen_sample(self, store: KVStore) -> np.ndarray | None:
        """The training queries of the first build over the store's keys, (G, m, D) fp32, taken by value on the
        decoding thread: later prefills (turns) cannot change what that build trains on. The sample ends
        there; a build over no keys (a prompt shorter than sink + window) leaves it sampling for the first
        build over keys."""
        if self.train is None or not store.n:
            return None
        queries = self.train.queries().numpy()
        self.train = None
        return queries

    def _first_build(self, store: KVStore, n: int, train: np.ndarray | None, device: torch.device | None) -> Built:
        """An index over the first ``n`` offloaded keys, trained on ``train`` (the frozen prefill sample)."""
        store.synchronize()
        return self._built(self.config.index, store, n, train, device)

    def _built(self, name: str, store: KVStore, n: int, train: np.ndarray | None,
               device: torch.device | None) -> Built:
        """``name``'s index over the first ``n`` offloaded keys of each group, trained on ``train`` (G, m, D)
        fp32 when the backend uses training queries (their exact top lists computed on ``device``).
        Rows < n are never rewritten; appends go after them."""
        start = time.perf_counter()
        with cpu_threads(self.config.cpu_threads):
            index = make_index_for(name, self.config.index_params, n, self.config.top_k)
            if n:
                index.build(store.key_source, train if index.uses_train_queries else None, device=device, n=n)
        return Built(index, n, time.perf_counter() - start)

    def _take(self, built: Built, store: KVStore) -> None:
        """Serve with ``built`` (-> BUILT), after it indexes the keys spilled meanwhile."""
        if store.n > built.keys:
            store.synchronize()
            built.index.add()
        self.index, self.built_n, self.build_seconds = built
        self.pending, self.standing_in, self.phase = None, False, Phase.BUILT

    def ready(self, store: KVStore, device: torch.device) -> None:
        """Make sure an index over the offloaded keys serves this decode step (the prompt is over after it).

        SAMPLING: build here (the baseline without retrieval builds nothing). BUILDING: take the
        build if it is done (or wait for it unless ``serve_while_building``), else serve with exact
        search over the store (``flat``, nothing to build) until it is. BUILT: build an index that was
        empty once keys spilled, else start a rebuild when due. REBUILDING: swap in a finished rebuild.
        """
        if not self.config.retrieve:
            self.phase = Phase.BUILT
            return
        if self.phase is Phase.SAMPLING:
            self._take(self._first_build(store, store.n, self._frozen_sample(store), device), store)
            return
        if self.phase is Phase.BUILDING:
            if not (self.pending.done() or not self.config.serve_while_building):
                if not self.standing_in:  # exact search over the store serves until the build lands
                    self.index, self.built_n, self.standing_in = make_index("flat"), store.n, True
                    self.index.build(store.key_source)
                return
            self._take(self.pending.result(), store)  # re-raises a failed build's error
        if store.n and not len(self.index):  # a prompt shorter than sink + window: its first spill
            self._take(self._first_build(store, store.n, self._frozen_sample(store), device), store)
        else:
            self._maybe_rebuild(store, device)

    def add(self, store: KVStore) -> None:
        """Insert the rows the store appended since into the index, once it holds keys (an empty one is
        built by the next decode)."""
        if self.index is not None and len(self.index):
            store.synchronize()
            self.index.add()  # it reads the store's new rows in place

    def remember(self, q: torch.Tensor) -> None:
        """Keep a decode step's queries q (G, group, D), CPU fp32, in the ring that trains rebuilds."""
        self._remember_steps(q[:, None])

    def remember_chunk(self, q: torch.Tensor, num_kv_heads: int) -> None:
        """Keep the queries of a prefill chunk after decoding, q (B, Hq, n, D), as n steps of the ring that
        trains rebuilds (its last ``rebuild_queries`` positions): a long turn's keys are what a rebuild
        then links by the turn's own queries."""
        b, hq, n, d = q.shape
        m = min(n, self.config.rebuild_queries)
        steps = q[:, :, n - m :].reshape(b * num_kv_heads, hq // num_kv_heads, m, d)  # [G, group, m, D]
        self._remember_steps(steps.transpose(1, 2).float().cpu())

    def _remember_steps(self, q: torch.Tensor) -> None:
        """Write steps q (G, m, group, D), CPU fp32, into the ring after the last one (m <= its length)."""
        g, m, group, d = q.shape
        if self._recent_q is None:
            self._recent_q = torch.empty((g, self.config.rebuild_queries, group, d), dtype=torch.float32)
        slots = (self._recent_steps + torch.arange(m)) % self._recent_q.shape[1]
        self._recent_q[:, slots] = q
        self._recent_steps += m

    def _maybe_rebuild(self, store: KVStore, device: torch.device) -> None:
        """REBUILDING: swap in a finished rebuild (after adding the keys spilled meanwhile). BUILT: start a
        rebuild when due (-> REBUILDING)."""
        if self.phase is Phase.REBUILDING:
            if not self.pending.done():
                return
            built = self.pending.result()  # re-raises a failed rebuild's error
            built.index.replacing(self.index)
            self._take(built, store)
            self.rebuilds += 1
        growth = self.config.rebuild_growth
        due = growth is not None and self.index.name != "flat" and len(self.index) >= (1 + growth) * self.built_n
        if due and self._recent_steps:
            train = None
            if self.index.uses_train_queries:  # the recent decode queries: [G, steps * group, D]
                steps = min(self._recent_steps, self._recent_q.shape[1])
                g, d = self._recent_q.shape[0], self._recent_q.shape[-1]
                train = self._recent_q[:, :steps].reshape(g, -1, d).numpy().copy()  # by value
            store.synchronize()  # on the builder thread while decoding goes on with the old index
            self.pending = _INDEX_BUILDER.submit(self._built, self.index.name, store, store.n, train, device)
            self.phase = Phase.REBUILDING
