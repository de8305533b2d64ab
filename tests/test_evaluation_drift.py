"""Insertion drift: the replay of decode-time adds to an index, checked on exact search."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_attn.evaluation.drift import insertion_drift


def test_insertion_drift_replays_decode_and_is_exact_for_flat():
    g = np.random.default_rng(0)
    q = g.standard_normal((4, 400, 8)).astype(np.float32)  # [Hq, n, D], 2 KV heads
    k = g.standard_normal((2, 400, 8)).astype(np.float32)
    r = insertion_drift(q, k, "flat", {}, prefill=300, steps=50, sink=4, window=16, top_k=10, progress=False)
    assert r["recall"].shape == (50,) and (r["recall"] == 1.0).all() and r["rebuilt_recall_last"] == 1.0
    with pytest.raises(ValueError, match="prefill \\+ steps"):
        insertion_drift(q, k, "flat", {}, prefill=300, steps=200, sink=4, window=16, top_k=10, progress=False)
