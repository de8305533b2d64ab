"""Insertion drift: the replay of decode-time adds (and a turn's adds at once) to an index, on exact search."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_attn.evaluation.drift import insertion_drift, turn_drift


def test_insertion_drift_replays_decode_and_is_exact_for_flat():
    g = np.random.default_rng(0)
    q = g.standard_normal((4, 400, 8)).astype(np.float32)  # [Hq, n, D], 2 KV heads
    k = g.standard_normal((2, 400, 8)).astype(np.float32)
    r = insertion_drift(q, k, "flat", {}, prefill=300, steps=50, sink=4, window=16, top_k=10, progress=False)
    assert r["recall"].shape == (50,) and (r["recall"] == 1.0).all() and r["rebuilt_recall_last"] == 1.0
    with pytest.raises(ValueError, match="prefill \\+ steps"):
        insertion_drift(q, k, "flat", {}, prefill=300, steps=200, sink=4, window=16, top_k=10, progress=False)


def test_turn_drift_adds_a_turn_at_once_and_is_exact_for_flat():
    """A turn's keys added in one call and both rebuilds hold the same keys: exact search finds the
    exact top-k in all three (recall 1); roar's recalls are fractions; a replay longer than q is refused.
    (The seconds it reports are measurements for bench/, not asserted here.)"""
    g = np.random.default_rng(0)
    q = g.standard_normal((4, 500, 8)).astype(np.float32)  # [Hq, n, D], 2 KV heads
    k = g.standard_normal((2, 500, 8)).astype(np.float32)
    r = turn_drift(q, k, "flat", {}, prefill=200, turn=150, answer=10, probes=20, sink=4, window=16, top_k=10)
    assert (r["add"], r["rebuilt_turn"], r["rebuilt_all"]) == (1.0, 1.0, 1.0)
    r = turn_drift(q, k, "roar", {"ef": 32}, prefill=200, turn=150, answer=10, probes=20, sink=4, window=16,
                   top_k=10)
    assert all(0.5 < r[name] <= 1.0 for name in ("add", "rebuilt_turn", "rebuilt_all"))  # 8 dims: easy
    with pytest.raises(ValueError, match=r"prefill \+ turn \+ answer \+ probes <= 500"):
        turn_drift(q, k, "flat", {}, prefill=200, turn=300, answer=10, probes=20, sink=4, window=16, top_k=10)
