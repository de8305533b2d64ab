"""``sketch``: the codes' first stage and the exact second stage, as an index and in the engine's decode step.

References: ``flat`` (exact top-k) and the engine with ``flat``; the codes rebuilt from the store's rows;
the quantisation's error bound; the memory planner's figures against what was allocated.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from retrieval_attn import RetrievalAttention, RetrievalConfig
from retrieval_attn.index import available_indexes, make_index
from retrieval_attn.index.sketch import _scratch_for
from retrieval_attn.planner import MemoryBudgetError, ModelShape, plan_memory

G, N, D, M = 3, 3000, 64, 4


def data(seed: int = 0, n: int = N):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((G, n, D), dtype=np.float32) * np.linspace(0.2, 3.0, D, dtype=np.float32)
    queries = rng.standard_normal((G, M, D), dtype=np.float32)
    return keys, queries


def test_sketch_is_listed_and_its_parameters_are_checked():
    assert "sketch" in available_indexes()
    with pytest.raises(ValueError, match=r"'bits' must be one of 1, 2, 4, 8, got 3"):
        make_index("sketch", bits=3)
    with pytest.raises(ValueError, match=r"top_k must be <= the candidates \(400\) of index 'sketch', got 500"):
        RetrievalConfig(index="sketch", top_k=500, index_params={"candidates": 400})
    assert RetrievalConfig(index="sketch", top_k=500).index_params == {}  # candidates follow top_k: 2000
    keys, queries = data()
    index = make_index("sketch", candidates=50)
    index.build(keys)
    with pytest.raises(ValueError, match=r"candidates \(50\) must be >= k \(60\)"):
        index.search(queries, 60)


@pytest.mark.device
@pytest.mark.parametrize("bits", [1, 4, 8])
def test_candidates_covering_every_key_give_exactly_flat(device, bits):
    keys, queries = data()
    flat = make_index("flat")
    flat.build(keys)
    sketch = make_index("sketch", bits=bits, candidates=N)
    sketch.build(keys, device=device)
    assert sketch.codes.device.type == device
    want, got = flat.search(queries, 100), sketch.search(queries, 100)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.scores, want.scores)  # the same fp32 sums, in the same order
    assert (got.scored == N).all()


@pytest.mark.device
def test_approximate_scores_are_within_the_quantisation_bound(device):
    """|q . k - approximate| <= sum_d |q_d| step_d / 2 for keys inside the build's ranges; the GPU's torch
    path and the CPU's numba kernel agree."""
    keys, queries = data(1)
    index = make_index("sketch", bits=4)
    index.build(keys, device=device)
    q = torch.from_numpy(queries).to(device)
    approx = index.approximate_scores(q).cpu()  # [G, M, N]
    exact = torch.bmm(torch.from_numpy(queries), torch.from_numpy(keys).transpose(1, 2))
    bound = 0.5 * (torch.from_numpy(queries).abs() * index._step.cpu()[:, None]).sum(-1, keepdim=True)
    assert ((approx - exact).abs() <= bound * (1 + 1e-4) + 1e-4).all()
    scratch = _scratch_for(index.device)
    scaled = q * index._step[:, None]
    bias = torch.bmm(q, index._lo[:, :, None])
    via_torch = index._approximate_torch(scaled, bias, torch.empty((G, M, N), device=device)).cpu()
    assert scratch.nbytes > 0
    torch.testing.assert_close(via_torch, approx, rtol=1e-5, atol=1e-4)


def test_recall_at_4x_candidates_on_structured_keys():
    keys, queries = data(2, n=20000)
    flat, sketch = make_index("flat"), make_index("sketch")
    flat.build(keys)
    sketch.build(keys)
    want, got = flat.search(queries, 100), sketch.search(queries, 100)
    recall = (got.ids[..., None] == want.ids[..., None, :]).any(-1).mean(-1)  # [G, M]
    assert recall.min() >= 0.9, recall
    assert (got.scored == 400).all()


@pytest.mark.device
def test_codes_written_on_spill_equal_codes_rebuilt_from_the_store(device):
    torch.manual_seed(0)
    config = RetrievalConfig(sink_tokens=8, window_tokens=32, top_k=16, index="sketch", serve_while_building=False)
    layer = RetrievalAttention(config, num_heads=4, num_kv_heads=2, head_dim=32)
    layer.prefill(*(torch.randn(1, h, 600, 32, device=device) for h in (4, 2, 2)))
    for _ in range(40):  # the first step builds; each spills one row into the store and the codes
        layer.decode(*(torch.randn(1, h, 1, 32, device=device) * 1.5 for h in (4, 2, 2)))
    index, store = layer.indexing.index, layer.store
    built = 600 - 40
    assert index.name == "sketch" and len(index) == store.n == built + 40
    assert index.codes.device.type == device
    torch.testing.assert_close(index.codes.cpu(), index.coded_rows(0, store.n), rtol=0, atol=0)
    fresh = make_index("sketch")
    fresh.build(store.key_source, n=built)
    torch.testing.assert_close(index.codes[:, :built].cpu(), fresh.codes.cpu(), rtol=0, atol=0)
    assert index.saturated > 0  # the spilled keys (scaled by 1.5) left the build's ranges: counted


@pytest.mark.device
@pytest.mark.parametrize("placement", ["cpu", "device"])
def test_engine_with_every_key_a_candidate_decodes_as_flat(device, placement):
    outs = {}
    for name, params in (("flat", {}), ("sketch", {"candidates": 4000})):
        torch.manual_seed(0)
        config = RetrievalConfig(sink_tokens=16, window_tokens=64, top_k=32, index=name, index_params=params,
                                 retrieved_attention=placement, serve_while_building=False)
        layer = RetrievalAttention(config, num_heads=8, num_kv_heads=2, head_dim=64)
        layer.prefill(*(torch.randn(1, h, 1500, 64, device=device) for h in (8, 2, 2)))
        outs[name] = torch.cat([layer.decode(*(torch.randn(1, h, 1, 64, device=device) for h in (8, 2, 2)))
                                for _ in range(6)])
        stats = layer.stats
    assert stats.index == "sketch" and stats.keys_scanned_fraction == 1.0
    assert stats.device_bytes > layer.window.nbytes  # the codes are on the layer's device
    parts = stats.step_seconds
    assert parts["device_scoring"] > 0 if device == "cpu" else True
    if placement == "cpu":  # the same exact scores and top-k, read from the store in place
        torch.testing.assert_close(outs["sketch"], outs["flat"], rtol=0, atol=0)
        assert parts["cpu_search"] > 0 and parts["device_exact"] == 0
    else:  # exact scores summed on the device (another order): equal top-k, attention to fp32 rounding
        torch.testing.assert_close(outs["sketch"], outs["flat"], rtol=1e-5, atol=1e-5)
        assert parts["cpu_gather"] > 0 and parts["cpu_search"] == 0


@pytest.mark.device
def test_engine_telemetry_sees_the_sketch_retrieval(device):
    torch.manual_seed(1)
    config = RetrievalConfig(sink_tokens=16, window_tokens=64, top_k=32, index="sketch", telemetry=True,
                             retrieved_attention="device", serve_while_building=False)
    layer = RetrievalAttention(config, num_heads=8, num_kv_heads=2, head_dim=64)
    layer.prefill(*(torch.randn(1, h, 1200, 64, device=device) for h in (8, 2, 2)))
    for _ in range(3):
        layer.decode(*(torch.randn(1, h, 1, 64, device=device) for h in (8, 2, 2)))
    assert layer.retrieval.ids is not None and layer.retrieval.ids.shape == (2, 4, 32)
    recall, _ = layer.telemetry.tensors()  # [steps, query heads]
    assert recall.shape[0] == 3 and recall.min() >= 0.9  # candidates 400 of 1120 random keys: near exact


@pytest.mark.device
def test_planner_counts_the_codes_and_buffers_as_allocated(device):
    shape = ModelShape(num_layers=1, hidden_size=128, num_heads=8, num_kv_heads=2, head_dim=64,
                       intermediate_size=256, vocab_size=64, weight_bytes=0)
    context = 3000
    config = RetrievalConfig(sink_tokens=16, window_tokens=64, top_k=32, index="sketch", serve_while_building=False)
    plan = plan_memory(shape, context, config, dtype=torch.float32, device=device, check_available=False)
    held: dict[str, int] = {}

    def run():  # a fresh thread: its first-stage buffers are this engine's alone
        torch.manual_seed(2)
        layer = RetrievalAttention(config, num_heads=8, num_kv_heads=2, head_dim=64)
        layer.reserve(context)
        layer.prefill(*(torch.randn(1, h, context - 8, 64, device=device) for h in (8, 2, 2)))
        for _ in range(8):
            layer.decode(*(torch.randn(1, h, 1, 64, device=device) for h in (8, 2, 2)))
        held["codes"] = layer.indexing.index.device_nbytes
        held["shared"] = _scratch_for(torch.device(device)).nbytes

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert held["codes"] == plan.device["index (sketch) codes, all layers"]  # 2 x 2920 x 32 B + ranges
    assert held["codes"] == 2 * (context - 80) * 32 + 2 * 2 * 64 * 4
    assert 0 < held["shared"] <= plan.device["index (sketch) first-stage buffers (shared)"]


def test_planner_refuses_a_device_budget_the_codes_do_not_fit():
    shape = ModelShape(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                       intermediate_size=14336, vocab_size=128256, weight_bytes=16_060_522_496)
    config = RetrievalConfig(gpu_memory_gib=16, index="sketch")
    plan = plan_memory(shape, 131072, config, device="cuda", check_available=False)
    codes = plan.device["index (sketch) codes, all layers"]
    assert codes == 32 * 8 * (131072 - 640) * 64 + 32 * 2 * 8 * 128 * 4  # 64 B per key and head: 1/4 of bf16
    refused = plan_memory(shape, 131072, config, device="cuda")
    refused = type(refused)(**{**refused.__dict__, "device_available": 16 << 30})
    with pytest.raises(MemoryBudgetError, match=r"index \(sketch\) codes, all layers 1\.99 GiB"):
        refused.check()


@pytest.mark.slow
def test_recall_on_the_embedded_models_real_keys(smollm):
    """recall@100 >= 0.95 on every KV head with 4 x 100 candidates (one layer, 4K tokens)."""
    from retrieval_attn.evaluation import builtin_token_ids, capture_layers
    from retrieval_attn.index.dense import exact_top_keys

    model, tokenizer = smollm
    layer, tokens, sink, window, test = 16, 4096, 128, 512, 32
    cap = capture_layers(model, builtin_token_ids(tokenizer, tokens), [layer], progress=False)
    q, k = cap.q[layer], cap.k[layer]
    groups = k.shape[0]
    keys = np.ascontiguousarray(k[:, sink : tokens - test - window])
    queries = np.ascontiguousarray(q[:, tokens - test :].reshape(groups, -1, q.shape[2]))
    exact = exact_top_keys(queries, keys, keys.shape[1], 100)
    index = make_index("sketch", candidates=400)
    index.build(keys)
    res = index.search(queries, 100)
    recall = (res.ids[..., None] == exact[:, :, None, :]).any(-1).mean(-1).mean(-1)  # [G]
    assert recall.min() >= 0.95, recall
