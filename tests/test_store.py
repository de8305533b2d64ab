"""KVStore: growth, gather by id, byte accounting."""

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


def test_gather_in_bulk_and_converts_dtype():
    store = KVStore(groups=2, head_dim=3)
    k = torch.randn(2, 6, 3, dtype=torch.bfloat16)
    store.append(k, k)
    ids = torch.tensor([[[5, 0], [1, 1]], [[2, 3], [4, 5]]])  # [groups, m, k]
    gk, gv = store.gather(ids)
    assert gk.shape == (2, 2, 2, 3) and gk.dtype == torch.float32
    assert torch.equal(gk[1, 0, 1], k[1, 3].float()) and torch.equal(gv[0, 0, 0], k[0, 5].float())


def test_bad_input():
    store = KVStore(groups=2, head_dim=3)
    with pytest.raises(ValueError, match=r"must both be \(2, t, 3\)"):
        store.append(torch.zeros(2, 1, 4), torch.zeros(2, 1, 4))
    store.append(torch.zeros(2, 2, 3), torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 1\]"):
        store.gather(torch.tensor([[2], [0]]))
