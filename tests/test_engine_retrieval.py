"""HostRetrieval: q to the host, search and attention over the retrieved rows, the result back on q's device."""

from __future__ import annotations

import pytest
import torch

from retrieval_attn import RetrievalConfig
from retrieval_attn.engine.retrieval import HostRetrieval
from retrieval_attn.engine.stats import StepTimer
from retrieval_attn.index import make_index
from retrieval_attn.offload import KVStore

from .conftest import gathered_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FP32_TOL = 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["cpu", "device"])
def test_retrieved_part_equals_attention_over_the_searched_rows(where, device):
    b, hkv, group, d, n, top_k = 2, 2, 3, 8, 50, 10
    g = torch.Generator().manual_seed(4)
    store = KVStore(b * hkv, d)
    store.append(torch.randn(b * hkv, n, d, generator=g), torch.randn(b * hkv, n, d, generator=g))
    index = make_index("flat")
    index.build(store.keys.numpy())
    timer = StepTimer()
    cfg = RetrievalConfig(top_k=12, retrieved_attention=where)  # the step asks for fewer: views of the buffers
    retrieval = HostRetrieval(cfg, b * hkv, group, d, d**-0.5, pin_memory=device == "cuda", timer=timer)
    q = torch.randn(b, hkv * group, 1, d, generator=g).to(device)  # [B, Hq, 1, D]
    retrieval.copy_query(q)
    retrieval.start(index, store, top_k).result()
    out, lse = retrieval.fetch(q, top_k)
    res = index.search(q.reshape(b * hkv, group, d).cpu().numpy(), top_k)
    ids = torch.from_numpy(res.ids)  # [G, group, top_k]
    ref_out, ref_lse = gathered_reference(torch.from_numpy(res.scores), ids, store.values, d**-0.5)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and out.device == q.device
    assert (out.cpu().reshape(ref_out.shape) - ref_out).abs().max() <= FP32_TOL
    assert (lse.cpu().reshape(ref_lse.shape) - ref_lse).abs().max() <= FP32_TOL
    assert torch.equal(retrieval.ids, ids)
    assert (retrieval.retrieved, retrieval.scanned, retrieval.scanned_fraction) == (b * hkv * group * top_k,
                                                                                    b * hkv * group * n, 1.0)
    assert timer.seconds["cpu_search"] > 0 and timer.seconds["transfer"] > 0
    retrieval.clear()
    assert (retrieval.retrieved, retrieval.scanned, retrieval.ids) == (0, 0, None)
