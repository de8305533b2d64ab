"""The memory planner: its figures match what the runtime allocates, and over-budget requests are refused first."""

from __future__ import annotations

import pytest
import torch

from retrieval_attn import RetrievalAttention, RetrievalConfig
from retrieval_attn.index import make_index
from retrieval_attn.offload import KVStore
from retrieval_attn.planner import GIB, MemoryBudgetError, ModelShape, plan_memory

LLAMA3_8B = ModelShape(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                       intermediate_size=14336, vocab_size=128256, weight_bytes=16_060_522_496)


def test_plan_counts_offloaded_kv_and_device_window_exactly():
    cfg = RetrievalConfig(sink_tokens=128, window_tokens=512, index="flat")
    plan = plan_memory(LLAMA3_8B, 131072, cfg, dtype=torch.bfloat16, device="cuda", check_available=False)
    n_off = 131072 - 640
    assert plan.cpu["offloaded KV (bfloat16)"] == 32 * 2 * 8 * n_off * 128 * 2  # the model's dtype
    assert plan.device["sink + window KV"] == 32 * 2 * 8 * 641 * 128 * 2
    assert plan.device["weights"] == LLAMA3_8B.weight_bytes
    assert plan.device_available is None and plan.cpu_available is None
    plan.check()  # nothing available is known: nothing to refuse


def test_conversation_plan_holds_every_turn_on_the_host_and_one_turn_tile_on_the_device():
    """A 100K-token document growing to 128K by turns: the host side is planned for 128K, the one-copy
    prefill attention for the document, and each turn's attention for one tile of prefill_block^2 scores."""
    cfg = RetrievalConfig(sink_tokens=128, window_tokens=512, index="flat")
    one = plan_memory(LLAMA3_8B, 131072, cfg, device="cuda", check_available=False)
    chat = plan_memory(LLAMA3_8B, 131072, cfg, device="cuda", check_available=False, prompt_tokens=100_000)
    assert chat.cpu == one.cpu  # every turn and answer offloaded and indexed
    assert chat.device["prefill attention keys/values (the whole prompt) (transient)"] == 2 * 8 * 100_000 * 128 * 2
    assert "prefill attention of a turn (one tile) (transient)" not in one.device
    tile = chat.device["prefill attention of a turn (one tile) (transient)"]
    assert 2 * 32 * 1024 * 1024 * 4 < tile < 0.5 * GIB  # scores and probabilities of 1024 x 1024, and the rest
    with pytest.raises(ValueError, match=r"prompt_tokens \(9\) must be <= context_tokens \(8\)"):
        plan_memory(LLAMA3_8B, 8, cfg, check_available=False, prompt_tokens=9)


def test_conversation_plan_counts_the_index_grown_by_turns_and_the_rebuilds():
    """A graph grown by add from the document's keys holds more than one built over them all: the plan of a
    conversation counts it; with rebuild_growth, the query ring and a second index per layer in flight."""
    cfg = RetrievalConfig(sink_tokens=128, window_tokens=512, index="roar")
    one = plan_memory(LLAMA3_8B, 131072, cfg, device="cuda", check_available=False)
    chat = plan_memory(LLAMA3_8B, 131072, cfg, device="cuda", check_available=False, prompt_tokens=32_768)
    roar, n_off = make_index("roar"), 131072 - 640
    assert chat.cpu["index (roar)"] == 32 * type(roar).estimate_nbytes(8, n_off, 128, {}, 4, 100, 131072 - 32_768)
    assert 1.3 * one.cpu["index (roar)"] < chat.cpu["index (roar)"] < 3 * one.cpu["index (roar)"]
    assert not any("rebuild" in item for item in chat.cpu)
    rebuilding = plan_memory(LLAMA3_8B, 131072, RetrievalConfig(sink_tokens=128, window_tokens=512, index="roar",
                                                                rebuild_growth=0.5, rebuild_queries=256),
                             device="cuda", check_available=False, prompt_tokens=32_768)
    ring = 32 * 8 * 256 * 4 * 128 * 4  # layers x groups x steps x group x D, fp32
    assert rebuilding.cpu["rebuild training ring (fp32)"] == ring
    assert rebuilding.cpu["rebuilds: a second index and its training queries per layer (transient)"] == (
        one.cpu["index (roar)"] + ring)  # each layer's rebuild is a build over all its keys


def test_conversation_plan_names_the_backend_auto_chose_at_the_first_build():
    """auto resolves at the first build over keys: a conversation's engine keeps flat for a document under
    AUTO_FLAT_BELOW keys however long the turns grow it, and its plan says so (a one-prompt plan of the same
    length says roar); the rebuild ring the plan counts is the one the engine holds."""
    from retrieval_attn.index import AUTO_FLAT_BELOW

    cfg = RetrievalConfig(sink_tokens=4, window_tokens=8, top_k=4, rebuild_growth=1.0, rebuild_queries=16)
    g = torch.Generator().manual_seed(0)
    prompt, total = 1000, AUTO_FLAT_BELOW + 1100
    q, k, v = (torch.randn(1, h, total, 8, generator=g) for h in (2, 1, 1))
    engine = RetrievalAttention(cfg, 2, 1, 8)
    engine.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])
    engine.decode(q[:, :, prompt : prompt + 1], k[:, :, prompt : prompt + 1], v[:, :, prompt : prompt + 1])
    engine.prefill(q[:, :, prompt + 1 : -1], k[:, :, prompt + 1 : -1], v[:, :, prompt + 1 : -1])  # a long turn
    engine.decode(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:])
    assert engine.store.n > AUTO_FLAT_BELOW and engine.stats.index == "flat"
    shape = ModelShape(1, 16, 2, 1, 8, 32, 10, 0)
    plan = plan_memory(shape, total, cfg, dtype=torch.float32, check_available=False, prompt_tokens=prompt)
    assert "index (flat)" in plan.cpu and plan.cpu["rebuild training ring (fp32)"] == engine.indexing._recent_q.nbytes
    assert not any(item.startswith("rebuilds") for item in plan.cpu)  # flat is never rebuilt
    assert "index (roar)" in plan_memory(shape, total, cfg, dtype=torch.float32, check_available=False).cpu


@pytest.mark.parametrize("name", ["flat", "roar", "keygraph", "hnsw", "ivf"])
def test_index_estimate_bounds_an_index_grown_by_turns(name):
    """Built over a quarter of the keys, the rest added in two turns: estimate_nbytes(added=...) bounds what
    the index holds, within 1.4x (graph lists that fill up move to longer runs, and the arena keeps an
    insert's reserve: without ``added`` the graphs' estimate is under half of it)."""
    g = torch.Generator().manual_seed(0)
    n, d = 4096, 32
    keys = torch.randn(2, n, d, generator=g).bfloat16()
    store = KVStore(2, d, dtype=keys.dtype)
    store.append(keys[:, : n // 4], keys[:, : n // 4])
    params = {"nlist": 16, "nprobe": 4} if name == "ivf" else {}
    index = make_index(name, **params)
    index.build(store.key_source, torch.randn(2, n // 4, d, generator=g).numpy() if index.uses_train_queries else None)
    for a, b in ((n // 4, n // 2), (n // 2, n)):  # two turns
        store.append(keys[:, a:b], keys[:, a:b])
        index.add()
        index.search(torch.randn(2, 3, d, generator=g).numpy(), 10)
    cls = type(index)
    est = cls.estimate_nbytes(2, n, d, params, queries=3, k=10, added=3 * n // 4)
    assert index.nbytes <= est <= 1.4 * index.nbytes + 4096
    if name in ("roar", "keygraph"):
        assert cls.estimate_nbytes(2, n, d, params, queries=3, k=10) < 0.5 * index.nbytes


@pytest.mark.parametrize("name", ["flat", "roar", "keygraph", "hnsw", "ivf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_index_estimate_bounds_what_the_index_holds(name, dtype):
    """On random keys read from a store, estimate_nbytes (+ the shared search buffers) is what the index holds
    after a build and a search, within 10% (graphs: their expected degree is measured on random keys)."""
    g = torch.Generator().manual_seed(0)
    n, d = 8192, 64
    keys = torch.randn(2, n, d, generator=g).to(dtype)
    store = KVStore(2, d, dtype=dtype)
    store.append(keys, keys)
    params = {"nlist": 16, "nprobe": 4} if name == "ivf" else {}
    index = make_index(name, **params)
    index.build(store.key_source, torch.randn(2, n, d, generator=g).numpy() if index.uses_train_queries else None)
    index.search(torch.randn(2, 3, d, generator=g).numpy(), 10)
    cls = type(index)
    est = cls.estimate_nbytes(2, n, d, params, queries=3, k=10)
    assert 0.9 * est <= index.nbytes <= 1.1 * est + 4096
    assert not index.owns_keys  # graphs and flat read the store's rows in place; faiss/hnswlib count their copy
    assert cls.estimate_shared_nbytes(2, n, d, params, queries=3) >= (2 * 3 * n * 4 if name == "flat" else 0)


def test_engine_store_matches_plan_when_reserved():
    cfg = RetrievalConfig(sink_tokens=4, window_tokens=8, top_k=4, index="flat")
    shape = ModelShape(1, 32, 4, 2, 8, 64, 100, 0)
    plan = plan_memory(shape, 3000, cfg, dtype=torch.float32, check_available=False)
    engine = RetrievalAttention(cfg, 4, 2, 8)
    engine.reserve(3000)
    x = torch.randn(1, 4, 2999, 8)
    engine.prefill(x, x[:, :2], x[:, :2])
    engine.decode(x[:, :, :1], x[:, :2, :1], x[:, :2, :1])
    assert engine.store.nbytes == plan.cpu["offloaded KV (float32)"]


def test_over_budget_request_is_refused_with_needed_and_available_bytes():
    cfg = RetrievalConfig(gpu_memory_gib=24)
    fits = plan_memory(LLAMA3_8B, 1 << 19, cfg, device="cuda", check_available=False)
    assert fits.device_total <= 24 * GIB  # 512K tokens fit a 24 GiB card
    over = plan_memory(LLAMA3_8B, 1 << 22, cfg, device="meta")  # 4M: the prefill's context copy is 16 GiB
    with pytest.raises(MemoryBudgetError) as err:
        over.check()
    msg = str(err.value)
    assert over.device_available == 24 * GIB and over.device_total > 24 * GIB
    assert "4194304 tokens" in msg and "meta memory needs" in msg and f"{over.device_total} bytes" in msg and f"{24 * GIB} bytes" in msg


def test_retrieval_cache_refuses_before_any_work(smollm):
    """RetrievalCache(max_context=...) checks the plan at construction: nothing is allocated or run."""
    from retrieval_attn.hf import RetrievalCache

    model, _ = smollm
    cfg = RetrievalConfig(gpu_memory_gib=0.001)
    with pytest.raises(MemoryBudgetError, match="device budget needs .* bytes .* but 1073741 bytes"):
        RetrievalCache(model, cfg, max_context=4096)
    cache = RetrievalCache(model, RetrievalConfig(), max_context=4096)
    assert cache.memory_plan.device["weights"] == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    assert all(layer.engine.seen == 0 for layer in cache.layers)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_plan_rejects_bad_context(bad):
    with pytest.raises(ValueError, match="context_tokens must be an int >= 1"):
        plan_memory(LLAMA3_8B, bad, RetrievalConfig(), check_available=False)


@pytest.mark.parametrize("bad", [0, -2.0, float("inf"), float("nan"), "24", True])
def test_config_rejects_bad_gpu_budget(bad):
    with pytest.raises(ValueError, match="gpu_memory_gib must be a finite number > 0"):
        RetrievalConfig(gpu_memory_gib=bad)


def test_context_beyond_cpu_ram_is_refused_with_the_numbers():
    """A context whose offloaded KV cannot fit in this machine's available RAM is refused at construction."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from retrieval_attn.hf import RetrievalCache
    from retrieval_attn.planner import available_cpu_bytes

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    with pytest.raises(MemoryBudgetError, match=r"host memory .* needs \d+ bytes .* but \d+ bytes"):
        RetrievalCache(model, RetrievalConfig(index="flat"), max_context=1 << 30)  # ~1e9 tokens x 2 layers
    assert available_cpu_bytes() < (1 << 30) * 2 * 2 * 2 * 16 * 4  # what the store alone would need
