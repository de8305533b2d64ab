"""KVStore: growth, order, byte accounting."""

from __future__ import annotations

import pytest
import torch

from retrieval_attn.offload import KVStore


def test_append_grows_and_keeps_order():
    store = KVStore(groups=3, head_dim=4, capacity=2)
    chunks = [torch.randn(3, t, 4) for t in (1, 3, 5, 1)]
    for c in chunks:
        store.append(c, -c)
    allk = torch.cat(chunks, dim=1)
    assert store.n == 10 and store.capacity >= 10
    assert torch.equal(store.keys, allk) and torch.equal(store.values, -allk)
    assert store.nbytes == 2 * 3 * store.capacity * 4 * 4


def test_bad_input():
    store = KVStore(groups=2, head_dim=3)
    with pytest.raises(ValueError, match=r"must both be \(2, t, 3\)"):
        store.append(torch.zeros(2, 1, 4), torch.zeros(2, 1, 4))
