"""The one recall@k and attention mass (``retrieval_attn.metrics``) on hand-made data."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_attn.metrics import attention_mass, recall_at_k


def test_recall_at_k_by_intersection_with_ties():
    scores = np.array([[5.0, 4.0, 3.0, 3.0, 1.0]])  # keys 2 and 3 tie for 3rd place
    assert recall_at_k(np.array([[0, 1, 2]]), scores, 3)[0] == 1.0
    assert recall_at_k(np.array([[3, 1, 0]]), scores, 3)[0] == 1.0  # the tied key counts too
    assert recall_at_k(np.array([[0, 4, 1]]), scores, 3)[0] == pytest.approx(2 / 3)
    assert recall_at_k(np.array([[0, 0, -1]]), scores, 3)[0] == pytest.approx(1 / 3)  # repeats and -1 miss
    assert recall_at_k(np.array([[0, 1, 4, 2]]), scores, 2)[0] == 1.0  # only the first k count


def test_attention_mass_matches_hand_computation():
    mid = np.array([[1.0, 2.0, 0.0]])  # q . key of 3 middle keys
    static = np.array([[0.5]])
    scale = 2.0
    w = np.exp(scale * np.array([1.0, 2.0, 0.0, 0.5]))
    p = w / w.sum()
    lse_static = np.log(np.exp(scale * static).sum(-1))  # the static keys' log-sum-exp
    got = attention_mass(np.array([[1, -1]]), mid, scale, lse_static)[0]
    assert got == pytest.approx(p[1] + p[3], rel=1e-12)
    assert attention_mass(np.array([[0, 1, 2]]), mid, scale, lse_static)[0] == pytest.approx(1.0, rel=1e-12)
    assert attention_mass(np.array([[2, 2]]), mid, scale, lse_static)[0] == pytest.approx(p[2] + p[3], rel=1e-12)
