"""The estimate of the unretrieved attention (``estimate_tail``): the kernels against float64 references,
the engine's three-way merge against full attention where the estimate is exact, determinism, edge cases,
telemetry, the planner's count, the config and the eval's method names."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from retrieval_attn import RetrievalAttention, RetrievalConfig
from retrieval_attn.attention import reference_attention
from retrieval_attn.engine.telemetry import TAIL_FIELDS, summarise
from retrieval_attn.evaluation.methods import method_config
from retrieval_attn.offload import BlockSummaries, KVStore, estimate_blocks, estimate_sample
from retrieval_attn.planner import ModelShape, plan_memory
from retrieval_attn.rows import kernel_array

from .conftest import random_qkv

SINK, WINDOW, PROMPT, TOTAL, D = 4, 8, 100, 112, 16  # 88 rows offloaded at the first decode
EXACT = 1e-5  # fp32 sums against float64 references


def _unretrieved_reference(q, keys, values, ids, scale):
    """float64 attention of q (G, m, D) over the rows of keys/values (G, n, D) not in ids (G, m, k):
    out (G, m, D), lse (G, m); -inf and zeros where none is left."""
    g, m, _ = q.shape
    n = keys.shape[1]
    logits = torch.einsum("gmd,gnd->gmn", q.double(), keys.double()) * scale
    left = torch.ones(g, m, n, dtype=torch.bool)
    for a in range(g):
        for b in range(m):
            left[a, b, [int(r) for r in ids[a, b] if 0 <= r < n]] = False
    logits = logits.masked_fill(~left, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    p = torch.where(left, torch.exp(logits - torch.where(torch.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    return torch.einsum("gmn,gnd->gmd", p, values.double()), lse


def _block_mean_reference(q, keys, values, ids, scale, block):
    """float64 block-mean estimate: each block's unretrieved rows as (count, mean key, mean value)."""
    g, m, d = q.shape
    n = keys.shape[1]
    out, lse = torch.zeros(g, m, d, dtype=torch.float64), torch.full((g, m), float("-inf"), dtype=torch.float64)
    for a in range(g):
        for b in range(m):
            gone = {int(r) for r in ids[a, b] if 0 <= r < n}
            weights, means = [], []
            for start in range(0, n, block):
                rows = [r for r in range(start, min(n, start + block)) if r not in gone]
                if rows:
                    mk, mv = keys[a, rows].double().mean(0), values[a, rows].double().mean(0)
                    weights.append(torch.log(torch.tensor(len(rows), dtype=torch.float64)) + scale * q[a, b].double() @ mk)
                    means.append(mv)
            if weights:
                w = torch.stack(weights)
                lse[a, b] = torch.logsumexp(w, 0)
                out[a, b] = (torch.softmax(w, 0)[:, None] * torch.stack(means)).sum(0)
    return out, lse


def _inputs(n=50, g=3, m=2, k=7, seed=0, dtype=torch.float32):
    """q (g, m, D) fp32, a store of n rows in dtype, distinct retrieved ids (g, m, k) int64 with some -1."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(g, m, D, generator=gen)
    store = KVStore(g, D, dtype=dtype, capacity=n + 5)
    store.append(torch.randn(g, n, D, generator=gen).to(dtype), torch.randn(g, n, D, generator=gen).to(dtype))
    ids = torch.stack([torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(m)]) for _ in range(g)])
    ids[0, 0, -1] = -1  # an index may return fewer rows
    return q, store, ids.long().contiguous()


def _run_blocks(q, store, ids, block, scale):
    s = BlockSummaries(store.groups, D, block)
    keys, values = kernel_array(store._k), store.kernel_values()
    s.update(keys, values, store.n)
    g, m = q.shape[:2]
    work = np.empty((2, g, m, s.blocks))
    out, lse = np.empty((g, m, D), np.float32), np.empty((g, m), np.float32)
    estimate_blocks(q.numpy(), ids.numpy(), keys, values, store.n, block, s.sum_k, s.sum_v, s.count, scale,
                    work[0], work[1], out, lse)
    return torch.from_numpy(out), torch.from_numpy(lse)


def _run_sample(q, store, ids, stride, scale, u):
    keys, values = kernel_array(store._k), store.kernel_values()
    g, m = q.shape[:2]
    work = np.empty((g, m, u.shape[1]))
    out, lse = np.empty((g, m, D), np.float32), np.empty((g, m), np.float32)
    estimate_sample(q.numpy(), ids.numpy(), keys, values, store.n, stride, u, scale, work, out, lse)
    return torch.from_numpy(out), torch.from_numpy(lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_per_block_and_every_row_sampled_are_exact_attention_over_the_unretrieved_rows(dtype):
    q, store, ids = _inputs(dtype=dtype)
    scale = D**-0.5
    ref_out, ref_lse = _unretrieved_reference(q, store.keys, store.values, ids, scale)
    u = np.random.default_rng(0).random((store.groups, store.n))
    for out, lse in (_run_blocks(q, store, ids, 1, scale), _run_sample(q, store, ids, 1, scale, u)):
        assert torch.allclose(out.double(), ref_out, atol=EXACT) and torch.allclose(lse.double(), ref_lse, atol=EXACT)


def test_block_means_match_their_reference_and_leave_out_fully_retrieved_blocks():
    q, store, ids = _inputs(n=40, k=10, seed=1)
    ids[1, 1, :8] = torch.arange(8, 16)  # block 1 (rows 8..15) entirely retrieved by this head
    scale = D**-0.5
    out, lse = _run_blocks(q, store, ids, 8, scale)
    ref_out, ref_lse = _block_mean_reference(q, store.keys, store.values, ids, scale, 8)
    assert torch.allclose(out.double(), ref_out, atol=EXACT) and torch.allclose(lse.double(), ref_lse, atol=EXACT)
    # the mean-key weight is a lower bound of the block's mass (Jensen), never above the exact lse
    _, exact_lse = _unretrieved_reference(q, store.keys, store.values, ids, scale)
    assert bool((lse.double() <= exact_lse + EXACT).all())


def test_sampled_estimate_matches_its_reference_with_the_same_draws():
    q, store, ids = _inputs(n=45, k=6, seed=2)
    scale, stride = D**-0.5, 4
    strata = -(-store.n // stride)
    u = np.random.default_rng(5).random((store.groups, strata))
    ids[2, 0, 0] = int(min(int(u[2, 3] * stride), stride - 1) + 3 * stride)  # a drawn row that is retrieved
    out, lse = _run_sample(q, store, ids, stride, scale, u)
    for a in range(store.groups):
        for b in range(q.shape[1]):
            gone = {int(r) for r in ids[a, b] if r >= 0}
            drawn = [s * stride + min(int(u[a, s] * min(stride, store.n - s * stride)), stride - 1) for s in range(strata)]
            kept = [r for r in drawn if r not in gone]
            logits = scale * store.keys[a, kept].double() @ q[a, b].double()
            want = torch.logsumexp(logits, 0) + np.log((store.n - len(gone)) / len(kept))
            assert abs(float(lse[a, b]) - float(want)) < EXACT
            assert torch.allclose(out[a, b].double(), torch.softmax(logits, 0) @ store.values[a, kept].double(),
                                  atol=EXACT)


def _engine(device, **kw):
    config = RetrievalConfig(sink_tokens=SINK, window_tokens=WINDOW, index="flat", estimate_tail=True, **kw)
    return RetrievalAttention(config, 6, 2, D)


def _decode_all(engine, q, k, v, prompt=PROMPT):
    engine.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])
    return torch.cat([engine.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
                      for t in range(prompt, q.shape[2])], dim=2)


def _full(q, k, v, prompt=PROMPT):
    return torch.cat([reference_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], D**-0.5)
                      for t in range(prompt, q.shape[2])], dim=2)


@pytest.mark.parametrize("tail", [dict(tail_method="mean", tail_block=1), dict(tail_method="sample", tail_stride=1)])
@pytest.mark.parametrize("retrieve", [True, False])
def test_three_way_merge_equals_full_attention_when_the_estimate_is_exact(device, tail, retrieve):
    q, k, v = (x.to(device) for x in random_qkv(2, 6, 2, TOTAL, D, seed=7))
    q = q * 2  # peaked enough that top-5 alone is far from full attention
    out = _decode_all(_engine(device, top_k=5, retrieve=retrieve, **tail), q, k, v)
    full = _full(q.cpu(), k.cpu(), v.cpu())
    assert out.device.type == device and torch.allclose(out.cpu().double(), full, atol=EXACT)
    without = _decode_all(RetrievalAttention(RetrievalConfig(sink_tokens=SINK, window_tokens=WINDOW, index="flat",
                                                             top_k=5, retrieve=retrieve), 6, 2, D), q, k, v)
    assert float((without.cpu().double() - full).abs().max()) > 100 * EXACT  # the estimate is what closes the gap


def test_estimates_are_deterministic_under_a_seed(device):
    q, k, v = (x.to(device) for x in random_qkv(1, 6, 2, TOTAL, D, seed=8))
    runs = [_decode_all(_engine(device, top_k=5, tail_method="sample", tail_stride=8, tail_seed=s), q, k, v)
            for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    means = [_decode_all(_engine(device, top_k=5, tail_method="mean", tail_block=8), q, k, v) for _ in range(2)]
    assert torch.equal(means[0], means[1])


@pytest.mark.parametrize("method", ["mean", "sample"])
def test_no_nan_with_an_empty_store_all_keys_retrieved_or_extreme_logits(device, method):
    q, k, v = (x.to(device) for x in random_qkv(1, 6, 2, TOTAL, D, seed=9))
    tail = dict(tail_method=method, tail_block=4, tail_stride=4)
    short = _decode_all(_engine(device, top_k=5, **tail), q[:, :, :12], k[:, :, :12], v[:, :, :12], prompt=6)
    assert torch.allclose(short.cpu().double(), _full(q[:, :, :12].cpu(), k[:, :, :12].cpu(), v[:, :, :12].cpu(), 6),
                          atol=EXACT)  # nothing offloaded for the first steps, then a few rows
    every = _decode_all(_engine(device, top_k=1000, **tail), q, k, v)  # every row retrieved: the tail is empty
    assert torch.allclose(every.cpu().double(), _full(q.cpu(), k.cpu(), v.cpu()), atol=EXACT)
    sign = torch.where(torch.arange(D, device=device) % 2 == 0, 1.0, -1.0)
    kx = k.sign() * sign * 25.0  # |q . k| * scale reaches ~1e4 when q is large too
    qx = q.sign() * 100.0
    out = _decode_all(_engine(device, top_k=5, **tail), qx, kx, v)
    assert bool(torch.isfinite(out).all())
    exact = _decode_all(_engine(device, top_k=5, tail_method=method, tail_block=1, tail_stride=1), qx, kx, v)
    # an fp32 lse near 1e4 carries ~1e-3 of rounding into each merge weight (as the two-part merge does)
    assert float((exact.cpu().double() - _full(qx.cpu(), kx.cpu(), v.cpu())).abs().max()) < 2e-2


def test_telemetry_measures_the_estimate_against_exact_attention(device):
    q, k, v = (x.to(device) for x in random_qkv(1, 6, 2, TOTAL, D, seed=10))
    exact = _engine(device, top_k=5, tail_method="mean", tail_block=1, telemetry=True)
    rough = _engine(device, top_k=5, tail_method="mean", tail_block=16, telemetry=True)
    _decode_all(exact, q * 2, k, v)
    _decode_all(rough, q * 2, k, v)
    steps = TOTAL - PROMPT
    fields = exact.telemetry.tail_tensors()
    assert set(fields) == set(TAIL_FIELDS) and fields["out_err"].shape == (steps, 6)
    assert float(fields["out_err"].max()) < 1e-4 and float((fields["tail_mass_ratio"] - 1).abs().max()) < 1e-4
    assert torch.allclose(fields["tail_added"], fields["tail_exact"], atol=1e-4)
    assert float(fields["out_err_top_k"].min()) > 1e-3  # without the estimate the output is off
    _, mass = exact.telemetry.tensors()
    assert torch.allclose(fields["tail_exact"], 1 - mass, atol=1e-4)
    row = summarise(rough.telemetry)
    assert row["tail_mass_ratio_mean"] <= 1 + 1e-6  # block means under-estimate (Jensen)
    assert row["out_err_mean"] < row["out_err_top_k_mean"]  # and still bring the output closer
    added = rough.tail.added.tensor()  # kept without telemetry too: mean and worst head per step
    assert added.shape == (steps, 2) and bool((added[:, 0] <= added[:, 1]).all()) and bool((added > 0).all())


def test_the_planner_counts_the_summaries_within_five_percent_of_the_bf16_kv():
    shape = ModelShape(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                       intermediate_size=14336, vocab_size=128256, weight_bytes=0)
    for method in ("mean", "sample"):
        config = RetrievalConfig(estimate_tail=True, tail_method=method)
        plan = plan_memory(shape, 131072, config, check_available=False)
        tail = plan.cpu[f"tail estimate ({method})"]
        kv = plan.cpu["offloaded KV (bfloat16)"]
        assert 0 < tail <= 0.05 * kv
    assert not any(k.startswith("tail") for k in plan_memory(shape, 131072, RetrievalConfig(), check_available=False).cpu)


def test_the_engine_holds_what_the_planner_counts():
    q, k, v = random_qkv(1, 6, 2, TOTAL, D, seed=11)
    engine = _engine("cpu", top_k=5, tail_method="mean", tail_block=8)
    engine.reserve(TOTAL)
    _decode_all(engine, q, k, v)
    summaries = engine.tail.summaries
    assert summaries.nbytes == BlockSummaries.estimate_nbytes(2, TOTAL - SINK - WINDOW, D, 8)
    assert engine.stats.cpu_bytes >= engine.store.nbytes + engine.tail.nbytes


def test_config_refuses_bad_tail_settings():
    for bad in (dict(estimate_tail=1), dict(tail_method="moment"), dict(tail_block=0), dict(tail_stride=0),
                dict(tail_seed=-1), dict(tail_block=2.0)):
        with pytest.raises(ValueError, match=f"RetrievalConfig.{next(iter(bad))}"):
            RetrievalConfig(**bad)
    assert RetrievalConfig().estimate_tail is False and RetrievalConfig().tail_method == "sample"


def test_eval_method_names_set_the_estimate_and_top_k():
    base = RetrievalConfig(index="flat", tail_method="sample")
    c = method_config("roar+mean:top_k=50", base)
    assert (c.index, c.top_k, c.estimate_tail, c.tail_method) == ("roar", 50, True, "mean")
    assert method_config("flat+tail", base).tail_method == "sample"
    sw = method_config("sink+window+mean", base)
    assert sw.retrieve is False and sw.estimate_tail and sw.tail_method == "mean"
    assert dataclasses.replace(method_config("flat:top_k=400", base)).top_k == 400
    c = method_config("flat+mean:tail_block=16:tail_stride=4", base)
    assert (c.tail_block, c.tail_stride, c.index_params) == (16, 4, {})
    for bad in ("flat+nope", "nope+mean"):
        with pytest.raises(ValueError):
            method_config(bad, base)
