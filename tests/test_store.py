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


def test_staged_rows_join_at_commit_and_land_first(device):
    """stage copies rows towards the store (from a GPU: asynchronously, into a pinned landing buffer);
    they are not part of it until commit, which puts them after the rows already there."""
    store = KVStore(groups=2, head_dim=4, dtype=torch.bfloat16)
    first = torch.randn(2, 5, 4).to(torch.bfloat16)
    store.append(first.to(device), -first.to(device))
    rows = [torch.randn(2, 1, 4).to(torch.bfloat16) for _ in range(3)]
    for i, row in enumerate(rows):
        if device == "cuda":
            torch.cuda._sleep(1_000_000)  # the copy lands late
        assert store.stage(row.to(device), -row.to(device)) == 1
        assert store.n == 5 + i  # not yet
        store.commit(1)
    expected = torch.cat([first, *rows], dim=1)
    store.synchronize()
    assert store.n == 8 and torch.equal(store.keys, expected) and torch.equal(store.values, -expected)
    assert store.keys.is_pinned() == (device == "cuda")


def test_a_store_is_freed_when_its_last_user_lets_go_without_a_garbage_collection():
    """No reference cycle through the store (its key source is a view made per call): its rows, most of a
    cache's memory, go back at once, not at the next collection (an eval of nine cells held 5.5 GB)."""
    import gc
    import weakref

    store = KVStore(2, 8)
    store.append(torch.randn(2, 5, 8), torch.randn(2, 5, 8))
    assert store.key_source.n == 5
    gone = weakref.ref(store)
    gc.disable()
    try:
        del store
        assert gone() is None
    finally:
        gc.enable()
