"""HostRetrieval: q to the host, search and attention over the retrieved rows, the result back on q's device;
and what a decode step costs beyond its kernels: the buffers it makes (none after warm-up), the device
syncs (one per layer and step), and the copies it waits for (all of them, on a busy GPU too)."""

from __future__ import annotations

import pytest
import torch

from retrieval_attn import RetrievalAttention, RetrievalConfig
from retrieval_attn.attention import reference_attention
from retrieval_attn.engine.retrieval import HostRetrieval
from retrieval_attn.engine.stats import StepTimer
from retrieval_attn.index import make_index
from retrieval_attn.offload import KVStore

from .conftest import count_buffers, count_device_syncs, gathered_reference, random_qkv

FP32_TOL = 1e-5


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
    assert retrieval.to_host(q, torch.tensor(True, device=device))
    retrieval.wait(retrieval.start(index, store, top_k), device == "cuda")
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
    seconds = timer.measured()
    assert all(seconds[p] > 0 for p in ("device_to_host", "cpu_search", "cpu_attention", "host_to_device"))
    assert not retrieval.to_host(None, torch.tensor(False, device=device))  # the flag alone
    retrieval.clear()
    assert (retrieval.retrieved, retrieval.scanned, retrieval.ids) == (0, 0, None)


@pytest.fixture(params=["cpu", "device"])
def where(request) -> str:
    """Where the retrieved part is attended (``RetrievalConfig.retrieved_attention``)."""
    return request.param


def decode_steps(engine, q, k, v, start, stop):
    """Decode positions [start, stop) of q, k, v (B, H, T, D) one step at a time; the outputs (B, Hq, n, D)."""
    return torch.cat([engine.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
                      for t in range(start, stop)], dim=2)


@pytest.mark.parametrize("index, dtype", [("flat", torch.float32), ("roar", torch.float32),
                                          ("flat", torch.bfloat16)])
def test_decode_step_makes_no_buffer_after_warm_up(index, dtype, where, device, monkeypatch):
    """Host buffers, the search's result arrays, CUDA events, the copy stream and the device buffers of the
    retrieved part are made by the first decode steps; later steps make none (the engine was reserved
    for the context, so the store never grows)."""
    q, k, v = (x.to(device) for x in random_qkv(2, 6, 2, 400, 16, seed=3, dtype=dtype))
    cfg = RetrievalConfig(sink_tokens=4, window_tokens=16, top_k=20, index=index, retrieved_attention=where)
    engine = RetrievalAttention(cfg, 6, 2, 16)
    engine.reserve(400)
    engine.prefill(q[:, :, :300], k[:, :, :300], v[:, :, :300])
    decode_steps(engine, q, k, v, 300, 303)  # warm-up: builds the index, makes the step's buffers
    with count_buffers(monkeypatch) as made:
        decode_steps(engine, q, k, v, 303, 310)
        engine.stats  # reading the step's times makes nothing either
    assert not made, "buffers made in a decode step after warm-up:\n" + "\n".join(f"{w} at\n{s}" for w, s in made)


def test_buffer_count_sees_a_per_step_allocation(device, monkeypatch):
    """The counter above is not blind: a step that makes its search result anew is caught."""
    q, k, v = (x.to(device) for x in random_qkv(1, 4, 2, 120, 8, seed=5))
    engine = RetrievalAttention(RetrievalConfig(sink_tokens=4, window_tokens=8, top_k=6, index="flat"), 4, 2, 8)
    engine.prefill(q[:, :, :100], k[:, :, :100], v[:, :, :100])
    decode_steps(engine, q, k, v, 100, 102)
    with count_buffers(monkeypatch) as made:
        engine.retrieval._result = None
        decode_steps(engine, q, k, v, 102, 103)
    assert sorted(w for w, _ in made) == ["SearchResult.empty"] + ["np.empty"] * 3  # ids, scores, scored


@pytest.mark.parametrize("index", ["flat", "roar"])
def test_one_device_sync_per_layer_and_step(index, where, device, monkeypatch):
    """A decode step waits for the device once (q, the finiteness flag and the spilled row land together);
    the copy back, the merge and the spill enqueue without waiting."""
    q, k, v = (x.to(device) for x in random_qkv(1, 8, 2, 400, 16, seed=6, dtype=torch.bfloat16))
    cfg = RetrievalConfig(sink_tokens=4, window_tokens=16, top_k=20, index=index, retrieved_attention=where)
    engine = RetrievalAttention(cfg, 8, 2, 16)
    engine.reserve(400)
    engine.prefill(q[:, :, :300], k[:, :, :300], v[:, :, :300])
    decode_steps(engine, q, k, v, 300, 303)
    with count_device_syncs(monkeypatch) as syncs:
        decode_steps(engine, q, k, v, 303, 313)
    assert len(syncs) <= 10, syncs
    short = RetrievalAttention(RetrievalConfig(sink_tokens=4, window_tokens=64, top_k=20, index=index), 8, 2, 16)
    short.prefill(q[:, :, :20], k[:, :, :20], v[:, :, :20])  # nothing offloaded: the finiteness flag alone
    with count_device_syncs(monkeypatch) as syncs:
        decode_steps(short, q, k, v, 20, 30)
    assert len(syncs) <= 10, syncs


def test_sync_count_sees_a_read_of_a_device_value(device, monkeypatch):
    """The counter above is not blind, on a GPU or on the CPU: reading one value into Python is counted."""
    x = torch.ones(3, device=device)
    with count_device_syncs(monkeypatch) as syncs:
        x.sum().item()
        bool(x.all())
    assert len(syncs) >= 2, syncs


def test_copies_land_before_they_are_read(where, device):
    """Exact at every step on a busy device: a long kernel queued before each step (q and the spilled row
    reach the host late) and on the copy stream before each copy back (the retrieved part lands late);
    the host buffers and the store are pinned on CUDA, so those copies are asynchronous."""
    sink, window, prompt, total, d = 4, 8, 80, 120, 16
    q, k, v = (x.to(device) for x in random_qkv(1, 6, 2, total, d, seed=8))
    cfg = RetrievalConfig(sink_tokens=sink, window_tokens=window, top_k=total, index="flat", retrieved_attention=where)
    engine = RetrievalAttention(cfg, 6, 2, d)
    outs = [engine.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])]
    for t in range(prompt, total):
        if device == "cuda":
            torch.cuda._sleep(1_000_000)  # ~0.5 ms of device work ahead of this step's q
            if engine.retrieval.stream is not None:
                with torch.cuda.stream(engine.retrieval.stream):
                    torch.cuda._sleep(1_000_000)
        outs.append(engine.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1]))
    ref = reference_attention(q.cpu(), k.cpu(), v.cpu(), d**-0.5)
    assert (torch.cat(outs, dim=2).cpu().double() - ref).abs().max() <= FP32_TOL
    pinned = device == "cuda"
    assert engine.retrieval.q.is_pinned() == pinned and engine.store.keys.is_pinned() == pinned
