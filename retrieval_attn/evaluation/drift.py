"""Insertion drift: does an index keep its recall while decoding adds keys to it?

``insertion_drift`` replays the decode of one layer from captured queries and keys (``capture``):
the index is built at the end of prefill, each step's queries (all heads) search it, then the key
leaving the window is added, as the engine does; recall@k is measured against exact search at every
step and, at the end, against an index rebuilt from scratch. ``bench/add_recall.py`` prints it.
``turn_drift`` does the same for a conversation's next turn, which adds many keys at once: add()
against rebuilds trained on the turn's queries or on every query so far (``bench/multiturn.py``).

Positions default to the library's ``RetrievalConfig`` defaults (sink, window, top_k). This module
knows index backends and the one recall@k (``retrieval_attn.metrics``); it runs no model.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np
from tqdm import tqdm

from ..config import RetrievalConfig
from ..index import make_index
from ..metrics import recall_at_k

__all__ = ["insertion_drift", "turn_drift"]


def insertion_drift(
    q: np.ndarray,
    k: np.ndarray,
    backend: str,
    params: Mapping[str, Any],
    prefill: int,
    steps: int,
    sink: int = RetrievalConfig.sink_tokens,
    window: int = RetrievalConfig.window_tokens,
    top_k: int = RetrievalConfig.top_k,
    progress: bool = True,
) -> dict[str, Any]:
    """Recall of an index that grows by ``add`` during decoding, step by step, against a rebuild.

    Replays decoding of one layer from q (Hq, n, D), k (Hkv, n, D): the index is built on the middle
    keys [sink, prefill - window) (trained on the queries before ``prefill``); at step t the queries of
    position p = prefill + t search it (one call, all heads), then the key leaving the window
    (p - window) is added, as the engine does. Returns per-step mean recall@top_k against exact search
    over the keys indexed at that step, the seconds of each search and add, and the recall of the
    last 64 steps' queries on an index rebuilt from scratch over the final keys.
    """
    hq, n, dim = q.shape
    groups = k.shape[0]
    rep = hq // groups
    if not (sink + top_k <= prefill - window and prefill + steps <= n):
        raise ValueError(f"need sink + top_k <= prefill - window and prefill + steps <= {n}")
    qg = q.reshape(groups, rep, n, dim)  # query head h -> group h // rep

    def build(end: int) -> Any:
        index = make_index(backend, **params)
        train = np.ascontiguousarray(qg[:, :, :end].reshape(groups, -1, dim)) if index.uses_train_queries else None
        index.build(np.ascontiguousarray(k[:, sink : end - window]), train)
        return index

    index = build(prefill)
    recall = np.empty(steps)
    search_s, add_s = np.empty(steps), np.empty(steps)
    for t in tqdm(range(steps), desc=f"{backend} add drift", disable=not progress):
        p = prefill + t
        queries = np.ascontiguousarray(qg[:, :, p])  # [G, rep, D]
        start = time.perf_counter()
        res = index.search(queries, top_k)
        search_s[t] = time.perf_counter() - start
        exact = np.einsum("grd,gnd->grn", queries, k[:, sink : p - window])  # [G, rep, n_indexed]
        recall[t] = recall_at_k(res.ids, exact, top_k).mean()
        start = time.perf_counter()
        index.add(np.ascontiguousarray(k[:, p - window : p - window + 1]))
        add_s[t] = time.perf_counter() - start
    last = min(64, steps)
    rebuilt = build(prefill + steps - last)
    rebuilt_recall = []
    for t in range(steps - last, steps):
        p = prefill + t
        queries = np.ascontiguousarray(qg[:, :, p])
        exact = np.einsum("grd,gnd->grn", queries, k[:, sink : prefill + steps - last - window])
        rebuilt_recall.append(recall_at_k(rebuilt.search(queries, top_k).ids, exact, top_k).mean())
    return {
        "recall": recall,
        "search_s": search_s,
        "add_s": add_s,
        "rebuilt_recall_last": float(np.mean(rebuilt_recall)),
    }


def turn_drift(
    q: np.ndarray,
    k: np.ndarray,
    backend: str,
    params: Mapping[str, Any],
    prefill: int,
    turn: int,
    answer: int = 32,
    probes: int = 64,
    sink: int = RetrievalConfig.sink_tokens,
    window: int = RetrievalConfig.window_tokens,
    top_k: int = RetrievalConfig.top_k,
) -> dict[str, float]:
    """Recall of an index after a turn of ``turn`` tokens is added at once, three ways.

    Replays one layer from q (Hq, n, D), k (Hkv, n, D): the index is built over the keys of a
    ``prefill``-token document, trained on its queries; an answer of ``answer`` decode steps searches
    it (roar links keys added later by those searches' results); then the turn's keys spill all at
    once: [prefill - window, prefill + turn - window). The queries of the ``probes`` positions after the
    turn (the next answer) search three indexes over the same keys: the one grown by ``add``, one
    rebuilt trained on the turn's queries (what ``rebuild_growth`` trains on after a long turn), and one
    rebuilt trained on every query so far. Returns their mean recall@top_k and the seconds of the add
    and of each rebuild (keys ``add``, ``rebuilt_turn``, ``rebuilt_all``, ``*_s``).
    """
    hq, n, dim = q.shape
    groups = k.shape[0]
    rep = hq // groups
    end = prefill + turn
    if not (sink + top_k <= prefill - window and end + answer + probes <= n):
        raise ValueError(f"need sink + top_k <= prefill - window and prefill + turn + answer + probes <= {n}")
    qg = q.reshape(groups, rep, n, dim)  # query head h -> group h // rep
    keys = k[:, sink : end - window]

    def built(first: int, last: int, n_keys: int) -> tuple[Any, float]:
        """An index over the first n_keys keys trained on the queries of positions [first, last)."""
        index = make_index(backend, **params)
        train = None
        if index.uses_train_queries:
            train = np.ascontiguousarray(qg[:, :, first:last].reshape(groups, -1, dim))
        start = time.perf_counter()
        index.build(np.ascontiguousarray(keys[:, :n_keys]), train)
        return index, time.perf_counter() - start

    grown, _ = built(0, prefill, prefill - window - sink)
    for p in range(prefill, prefill + answer):  # the answer's searches (their results link the turn's keys)
        grown.search(np.ascontiguousarray(qg[:, :, p]), top_k)
    start = time.perf_counter()
    grown.add(np.ascontiguousarray(keys[:, prefill - window - sink :]))
    add_s = time.perf_counter() - start
    on_turn, turn_s = built(prefill, end, keys.shape[1])
    on_all, all_s = built(0, end, keys.shape[1])
    recall = {"add": [], "rebuilt_turn": [], "rebuilt_all": []}
    for p in range(end + answer, end + answer + probes):
        queries = np.ascontiguousarray(qg[:, :, p])  # [G, rep, D]
        exact = np.einsum("grd,gnd->grn", queries, keys)  # [G, rep, keys]
        for name, index in zip(recall, (grown, on_turn, on_all)):
            recall[name].append(recall_at_k(index.search(queries, top_k).ids, exact, top_k).mean())
    return {**{name: float(np.mean(r)) for name, r in recall.items()},
            "add_s": add_s, "rebuild_turn_s": turn_s, "rebuild_all_s": all_s}
