"""Insertion drift: does an index keep its recall while decoding adds keys to it?

``insertion_drift`` replays the decode of one layer from captured queries and keys (``capture``):
the index is built at the end of prefill, each step's queries (all heads) search it, then the key
leaving the window is added, as the engine does; recall@k is measured against exact search at every
step and, at the end, against an index rebuilt from scratch. ``bench/add_recall.py`` prints it.

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

__all__ = ["insertion_drift"]


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
