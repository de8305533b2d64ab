"""IndexLifecycle: the prefill query sample, the build, the insertion of spilled keys, the background rebuild."""

from __future__ import annotations

import torch

from retrieval_attn import RetrievalConfig
from retrieval_attn.engine.indexing import IndexLifecycle, Phase, _QuerySample
from retrieval_attn.offload import KVStore

CPU = torch.device("cpu")


def test_train_query_sample_is_independent_of_chunking_and_capped():
    q = torch.randn(2, 6, 100, 4)  # [B, Hq, n, D], 3 KV heads -> groups of 2 query heads
    one, chunked = _QuerySample(cap=30), _QuerySample(cap=30)
    one.add(q, 0, num_kv_heads=3)
    for start, end in ((0, 7), (7, 64), (64, 100)):
        chunked.add(q[:, :, start:end], start, num_kv_heads=3)
    assert torch.equal(one.queries(), chunked.queries())
    kept = one.queries()
    assert kept.shape == (6, 25, 4)  # stride 4: positions 0, 4, ..., 96, one query head each
    # group 1 (batch 0, KV head 1: query heads 2 and 3): position p keeps head 2 + p % 2, i.e. head 2
    assert torch.equal(kept[1], q[0, 2, ::4])
    q[0, 3, 1::2] = 7.0  # an odd position's query (head 3 of group 1) is kept when the stride is 1
    two = _QuerySample(cap=200)
    two.add(q, 0, num_kv_heads=3)
    assert torch.equal(two.queries()[1, 1::2], q[0, 3, 1::2]) and torch.equal(two.queries()[1, ::2], q[0, 2, ::2])


def test_spilled_keys_enter_the_index_once_built_and_a_due_rebuild_swaps_in_over_every_key():
    keys = torch.randn(2, 170, 8, generator=torch.Generator().manual_seed(5))  # [G, n, D]
    store = KVStore(2, 8)
    store.append(keys[:, :100], keys[:, :100])
    lifecycle = IndexLifecycle(RetrievalConfig(index="roar", rebuild_growth=0.5, rebuild_queries=8))
    lifecycle.add(store)  # no index yet: nothing to insert into
    assert lifecycle.index is None
    lifecycle.sample(torch.randn(1, 4, 100, 8), 0, num_kv_heads=2)
    lifecycle.ready(store, CPU)  # no background build started: builds here, on the prefill queries
    assert (lifecycle.index.name, len(lifecycle.index), lifecycle.built_n, lifecycle.train) == ("roar", 100, 100, None)
    for i in range(100, 160):  # 60 spills: the rebuild is due at 150 keys (growth 0.5)
        store.append(keys[:, i : i + 1], keys[:, i : i + 1])
        lifecycle.add(store)
        assert len(lifecycle.index) == i + 1
        lifecycle.remember(torch.randn(2, 2, 8))  # a decode step's queries [G, group, D]
        lifecycle.ready(store, CPU)
    if lifecycle.phase is Phase.REBUILDING:  # not swapped in yet: wait for it, spill more, swap it in
        lifecycle.pending.result()
        store.append(keys[:, 160:], keys[:, 160:])
        lifecycle.add(store)
        lifecycle.ready(store, CPU)
    assert lifecycle.rebuilds == 1 and lifecycle.built_n == 150 and lifecycle.phase is Phase.BUILT
    assert len(lifecycle.index) == store.n  # the keys spilled during the rebuild were added before the swap
