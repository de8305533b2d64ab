"""RetrievalAttention: exactness against full attention at every decode step, and input validation."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from retrieval_attn import RetrievalAttention, RetrievalConfig
from retrieval_attn.attention import reference_attention
from retrieval_attn.engine.indexing import Phase

from .conftest import gathered_reference, random_qkv

STEP_PARTS = {"q_wait", "device_to_host", "cpu_search", "cpu_attention", "host_to_device", "device_attention",
              "device_idle", "cpu_idle", "device_scoring", "cpu_gather", "device_exact"}

FP32_TOL = 1e-5  # the issue's bound for fp32 inputs
BF16_TOL = 2e-2  # bf16 inputs: the output itself is rounded to bf16 (8 bits of mantissa)


def run_engine(engine, q, k, v, prompt, chunks=(None,), device="cpu"):
    """Prefill the first `prompt` tokens (in the given chunk sizes), decode the rest, on ``device``; return all
    outputs, on the CPU."""
    q, k, v = q.to(device), k.to(device), v.to(device)
    outs, start = [], 0
    for size in chunks:
        end = prompt if size is None else min(prompt, start + size)
        outs.append(engine.prefill(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]))
        start = end
    assert start == prompt
    for t in range(prompt, q.shape[2]):
        outs.append(engine.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1]))
    out = torch.cat(outs, dim=2)
    assert out.device == q.device
    return out.cpu()


@pytest.mark.parametrize(
    "batch, hq, hkv, chunks, dtype",
    [
        (1, 4, 4, (None,), torch.float32),  # MHA
        (2, 6, 2, (None,), torch.float32),  # GQA, batch 2
        (2, 6, 2, (7, 13, 1, 100), torch.float32),  # chunked prefill, uneven chunks
        (1, 9, 3, (None,), torch.bfloat16),
        (1, 9, 3, (None,), torch.float16),  # fp16 rows read in place by the search and the CPU attention
    ],
)
def test_decode_equals_full_attention_at_every_step(batch, hq, hkv, chunks, dtype, device):
    sink, window, prompt, total, d = 5, 8, 60, 120, 16  # 60 decode steps: many more spills than the window holds
    q, k, v = random_qkv(batch, hq, hkv, total, d, seed=7, dtype=dtype)
    engine = RetrievalAttention(RetrievalConfig(sink_tokens=sink, window_tokens=window, top_k=total, index="flat"), hq, hkv, d)
    out = run_engine(engine, q, k, v, prompt, chunks, device)
    ref = reference_attention(q.float(), k.float(), v.float(), d**-0.5)
    assert out.dtype == dtype
    err = (out.double() - ref).abs().amax(dim=(0, 1, 3))  # per position
    assert err.max() <= (FP32_TOL if dtype == torch.float32 else BF16_TOL), f"worst position {int(err.argmax())}"
    s = engine.stats
    assert (s.seen_tokens, s.device_tokens, s.offloaded_tokens) == (total, sink + window, total - sink - window)
    assert s.retrieved_last_step == batch * hq * (total - 1 - sink - window)


def test_chunked_prefill_equals_one_call(device):
    q, k, v = random_qkv(2, 6, 3, 80, 8, seed=2)
    cfg = RetrievalConfig(sink_tokens=4, window_tokens=6, top_k=3, prefill_block=5)
    one = run_engine(RetrievalAttention(cfg, 6, 3, 8), q, k, v, 50, device=device)
    chunked = run_engine(RetrievalAttention(cfg, 6, 3, 8), q, k, v, 50, chunks=(3, 17, 30), device=device)
    assert (one - chunked).abs().max() <= FP32_TOL


def test_short_prompt_everything_on_device():
    q, k, v = random_qkv(1, 2, 1, 10, 4, seed=4)
    engine = RetrievalAttention(RetrievalConfig(sink_tokens=4, window_tokens=8, top_k=1), 2, 1, 4)
    out = run_engine(engine, q, k, v, 3)  # 10 tokens < sink + window: nothing is offloaded
    assert (out.double() - reference_attention(q, k, v, 0.5)).abs().max() <= FP32_TOL
    assert engine.stats.offloaded_tokens == 0 and engine.stats.keys_scanned_last_step == 0


def test_small_top_k_retrieves_exactly_top_k_and_counts_scans():
    q, k, v = random_qkv(1, 4, 2, 300, 8, seed=5)
    engine = RetrievalAttention(RetrievalConfig(sink_tokens=4, window_tokens=16, top_k=10), 4, 2, 8)
    out = run_engine(engine, q, k, v, 299)
    s = engine.stats
    assert s.retrieved_last_step == 4 * 10
    assert s.keys_scanned_last_step == 4 * (299 - 20) and s.keys_scanned_fraction == 1.0  # flat scans all
    assert torch.isfinite(out).all()
    assert s.cpu_bytes > 0 and s.device_bytes == 2 * 1 * 2 * (4 + 16 + 1) * 8 * 4


def test_reset_starts_over():
    q, k, v = random_qkv(1, 2, 2, 40, 4, seed=6)
    engine = RetrievalAttention(RetrievalConfig(sink_tokens=2, window_tokens=4, top_k=100, index="flat"), 2, 2, 4)
    first = run_engine(engine, q, k, v, 20)
    engine.reset()
    assert engine.stats.seen_tokens == 0
    assert torch.equal(run_engine(engine, q, k, v, 20), first)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: RetrievalAttention(RetrievalConfig(), 6, 4, 8), r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"),
        (lambda: RetrievalAttention(RetrievalConfig(), 0, 1, 8), r"num_heads must be an int >= 1"),
        (lambda: RetrievalAttention(RetrievalConfig(), 4, 2, 8, scale=-1.0), r"scale must be a finite number > 0"),
        (lambda: RetrievalAttention({"top_k": 3}, 4, 2, 8), r"config must be a RetrievalConfig"),
        (lambda: RetrievalConfig(top_k=-1), r"top_k must be an int >= 1, got -1"),
        (lambda: RetrievalConfig(window_tokens=0), r"window_tokens must be an int >= 1, got 0"),
        (lambda: RetrievalAttention(RetrievalConfig(cpu_threads=10**6), 4, 2, 8), r"cpu_threads must be in \[1, \d+\]"),
    ],
)
def test_bad_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((1, 4, 3, 8), (1, 2, 3), (1, 2, 3, 8)), r"k must have rank 4"),
        (((4, 3, 8), (1, 2, 3, 8), (1, 2, 3, 8)), r"q must have rank 4"),
        (((1, 4, 3, 8), (1, 2, 3, 6), (1, 2, 3, 6)), r"head_dim of q \(8\) and k \(6\)"),
        (((1, 4, 3, 6), (1, 2, 3, 6), (1, 2, 3, 6)), r"head_dim of q \(6\)"),
        (((1, 6, 3, 8), (1, 2, 3, 8), (1, 2, 3, 8)), r"q has 6 heads, the engine was built for num_heads=4"),
        (((1, 4, 3, 8), (1, 1, 3, 8), (1, 1, 3, 8)), r"k has 1 heads"),
        (((2, 4, 3, 8), (1, 2, 3, 8), (1, 2, 3, 8)), r"must agree in batch and seq_len"),
        (((1, 4, 3, 8), (1, 2, 3, 8), (1, 2, 4, 8)), r"k .* and v .* must have the same shape"),
        (((1, 4, 0, 8), (1, 2, 0, 8), (1, 2, 0, 8)), r"seq_len must be >= 1"),
    ],
)
def test_bad_prefill_input(shapes, message):
    engine = RetrievalAttention(RetrievalConfig(), 4, 2, 8)
    with pytest.raises(ValueError, match=message):
        engine.prefill(*(torch.zeros(s) for s in shapes))
    assert engine.stats.seen_tokens == 0  # nothing happened


def test_bad_call_order_and_types(device):
    engine = RetrievalAttention(RetrievalConfig(), 4, 2, 8)
    zeros = lambda *shape: torch.zeros(shape, device=device)  # noqa: E731
    one = (zeros(1, 4, 1, 8), zeros(1, 2, 1, 8), zeros(1, 2, 1, 8))
    with pytest.raises(ValueError, match="decode called before prefill"):
        engine.decode(*one)
    with pytest.raises(ValueError, match="must be float32, bfloat16 or float16"):
        engine.prefill(one[0].long(), one[1], one[2])
    engine.prefill(zeros(1, 4, 3, 8), zeros(1, 2, 3, 8), zeros(1, 2, 3, 8))
    with pytest.raises(ValueError, match=r"one new token per sequence \(seq_len 1\)"):
        engine.decode(zeros(1, 4, 2, 8), zeros(1, 2, 2, 8), zeros(1, 2, 2, 8))
    with pytest.raises(ValueError, match="batch size changed from 1 to 2"):
        engine.decode(zeros(2, 4, 1, 8), zeros(2, 2, 1, 8), zeros(2, 2, 1, 8))
    bad = one[1].clone()
    bad[0, 1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="k contains NaN or Inf"):
        engine.decode(one[0], bad, one[2])
    assert engine.stats.seen_tokens == 3  # the bad step left no trace
    engine.prefill(*one)  # the bad step left the sequence open to more prompt
    for _ in range(3):  # the window (128 + 512) holds them all: no retrieval yet, the flag alone is checked
        engine.decode(*one)
    with pytest.raises(ValueError, match="q contains NaN or Inf"):
        engine.decode(torch.full_like(one[0], float("inf")), one[1], one[2])
    assert engine.stats.seen_tokens == 7
    with pytest.raises(ValueError, match=r"must have the same shape"):  # a new turn is checked as any prefill
        engine.prefill(zeros(1, 4, 2, 8), zeros(1, 2, 2, 8), zeros(1, 2, 1, 8))


@pytest.mark.parametrize(
    "index, params",
    [
        ("roar", {"ef": 200}),
        ("keygraph", {"ef": 200}),
        ("hnsw", {"ef": 200}),
        ("ivf", {"nlist": 4, "nprobe": 4}),
        ("auto", {"ef": 200}),
    ],
)
def test_every_backend_is_exact_when_its_search_covers_all_keys(index, params):
    q, k, v = random_qkv(2, 6, 2, 110, 16, seed=9)
    cfg = RetrievalConfig(sink_tokens=5, window_tokens=8, top_k=200, index=index, index_params=params)
    engine = RetrievalAttention(cfg, 6, 2, 16)
    out = run_engine(engine, q, k, v, 60)  # the index is built on 47 keys, then 50 spills are added
    assert (out.double() - reference_attention(q, k, v, 0.25)).abs().max() <= FP32_TOL
    assert engine.stats.retrieved_last_step == 2 * 6 * (109 - 13)
    assert engine.stats.index == ("flat" if index == "auto" else index)  # auto: 47 keys, below the crossover


@pytest.mark.parametrize("index", ["flat", "roar"])
def test_overlapped_path_equals_sequential_path(index, device):
    """The CPU part on a worker thread (overlap) gives bit-identical outputs to running it inline."""
    q, k, v = random_qkv(2, 6, 2, 700, 16, seed=11)
    base = dict(sink_tokens=8, window_tokens=32, top_k=20, index=index)
    outs = {}
    for overlap in (True, False):
        engine = RetrievalAttention(RetrievalConfig(overlap=overlap, **base), 6, 2, 16)
        outs[overlap] = run_engine(engine, q, k, v, 600, device=device)
        assert engine.stats.retrieved_last_step == 2 * 6 * 20
    assert torch.equal(outs[True], outs[False])


def test_retrieved_attention_on_device_equals_cpu(device):
    """Shipping the retrieved scores and values to the device gives the CPU kernel's result."""
    q, k, v = random_qkv(1, 9, 3, 300, 16, seed=12)
    outs = {}
    for where in ("cpu", "device"):
        cfg = RetrievalConfig(sink_tokens=4, window_tokens=16, top_k=30, retrieved_attention=where)
        outs[where] = run_engine(RetrievalAttention(cfg, 9, 3, 16), q, k, v, 250, device=device)
    assert (outs["cpu"] - outs["device"]).abs().max() <= FP32_TOL
    full = RetrievalConfig(sink_tokens=4, window_tokens=16, top_k=300, index="flat", retrieved_attention="device")
    out = run_engine(RetrievalAttention(full, 9, 3, 16), q, k, v, 250, device=device)
    assert (out.double() - reference_attention(q, k, v, 16**-0.5)).abs().max() <= FP32_TOL


def test_fork_gets_host_buffers_for_its_own_config():
    """A fork to retrieved_attention="device" (or a larger top_k) has the host buffers its config needs."""
    q, k, v = random_qkv(1, 4, 2, 80, 8, seed=14)
    layout = dict(sink_tokens=2, window_tokens=4)
    source = RetrievalAttention(RetrievalConfig(top_k=5, **layout), 4, 2, 8)
    source.prefill(q[:, :, :60], k[:, :, :60], v[:, :, :60])
    target = RetrievalConfig(top_k=9, retrieved_attention="device", **layout)
    fresh = RetrievalAttention(target, 4, 2, 8)
    fresh.prefill(q[:, :, :60], k[:, :, :60], v[:, :, :60])
    twin = source.fork(target)
    for t in range(60, 80):
        step = (q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
        assert torch.equal(twin.decode(*step), fresh.decode(*step))


@pytest.mark.parametrize("index", ["flat", "roar"])
def test_background_index_build_equals_build_at_first_decode(index, device):
    q, k, v = random_qkv(1, 4, 2, 600, 16, seed=13)
    # waiting for the build: every step retrieves with the built index, whatever the build's timing
    cfg = RetrievalConfig(sink_tokens=8, window_tokens=32, top_k=20, index=index, serve_while_building=False)
    inline = run_engine(RetrievalAttention(cfg, 4, 2, 16), q, k, v, 500, device=device)
    q, k, v = q.to(device), k.to(device), v.to(device)
    engine = RetrievalAttention(cfg, 4, 2, 16)
    outs = [engine.prefill(q[:, :, :500], k[:, :, :500], v[:, :, :500])]
    engine.start_index_build()
    engine.start_index_build()  # a second call is a no-op
    for t in range(500, 600):
        outs.append(engine.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1]))
    assert torch.equal(torch.cat(outs, dim=2).cpu(), inline)
    s = engine.stats
    assert s.index == index and s.index_build_seconds > 0
    assert set(s.step_seconds) == STEP_PARTS and all(x >= 0 for x in s.step_seconds.values())
    for part in ("cpu_search", "device_attention", "device_to_host", "host_to_device"):
        assert s.step_seconds[part] > 0, part


def test_exact_search_serves_while_the_background_build_runs(monkeypatch):
    """Decode does not wait for a background build: flat (exact top-k) serves until the build lands, then
    the built index takes over after indexing the keys spilled meanwhile."""
    import threading

    from retrieval_attn.engine import indexing

    q, k, v = random_qkv(1, 4, 2, 600, 16, seed=14)
    layout = dict(sink_tokens=8, window_tokens=32, top_k=20)
    built_all, gate = threading.Event(), threading.Event()
    first_build = indexing.IndexLifecycle._first_build

    def held(self, store, n, train, device):  # roar's build lands only when the test lets it (flat's at once)
        built = first_build(self, store, n, train, device)
        if self.config.index == "roar":
            built_all.set()
            gate.wait()
        return built

    monkeypatch.setattr(indexing.IndexLifecycle, "_first_build", held)
    engine = RetrievalAttention(RetrievalConfig(index="roar", **layout), 4, 2, 16)
    exact = RetrievalAttention(RetrievalConfig(index="flat", **layout), 4, 2, 16)
    engine.prefill(q[:, :, :500], k[:, :, :500], v[:, :, :500])
    exact.prefill(q[:, :, :500], k[:, :, :500], v[:, :, :500])
    engine.start_index_build()
    assert built_all.wait(timeout=120)  # over the 460 keys offloaded by prefill
    for t in range(500, 520):  # the build is held: these steps are served by exact search
        step = (q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
        assert torch.equal(engine.decode(*step), exact.decode(*step))
    assert engine.stats.index == "flat (index building)" and engine.stats.keys_scanned_fraction == 1.0
    gate.set()
    engine.wait_for_index()
    for t in range(520, 540):
        engine.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
    s = engine.stats
    assert s.index == "roar" and len(engine.indexing.index) == s.offloaded_tokens  # caught up with the spills
    assert engine.indexing.built_n == 460 and s.keys_scanned_fraction < 1.0


def test_start_index_build_needs_a_prefill():
    engine = RetrievalAttention(RetrievalConfig(), 4, 2, 16)
    with pytest.raises(ValueError, match="before prefill"):
        engine.start_index_build()


def test_cpu_kernel_equals_the_gathered_reference():
    """offload.attend_rows (numba, preallocated outputs) against the float64 reference, wide logits."""
    import numpy as np

    from retrieval_attn.offload import attend_rows

    g = torch.Generator().manual_seed(3)
    values = torch.randn(6, 400, 32, generator=g)
    ids = torch.randint(0, 400, (6, 3, 64), generator=g)
    scores = torch.randn(6, 3, 64, generator=g) * 200  # logits far beyond exp's range without the max shift
    out, lse = np.empty((6, 3, 32), np.float32), np.empty((6, 3), np.float32)
    attend_rows(scores.numpy(), ids.numpy(), values.numpy(), 0.5, out, lse)
    ref_out, ref_lse = gathered_reference(scores, ids, values, 0.5)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    assert np.abs(out - ref_out.numpy()).max() <= 1e-5 and np.abs(lse - ref_lse.numpy()).max() <= 1e-3


def _interrupt_once(obj, name):
    """Make ``obj.name`` raise KeyboardInterrupt on its next call only."""
    original = getattr(obj, name)

    def interrupted(*args, **kwargs):
        setattr(obj, name, original)
        raise KeyboardInterrupt

    setattr(obj, name, interrupted)


def test_interrupted_retrieval_changes_nothing(device):
    q, k, v = random_qkv(1, 4, 2, 60, 8, seed=11)
    cfg = RetrievalConfig(sink_tokens=3, window_tokens=5, top_k=6, index="flat")
    clean, hit = RetrievalAttention(cfg, 4, 2, 8), RetrievalAttention(cfg, 4, 2, 8)
    expected = run_engine(clean, q, k, v, 40, device=device)
    q, k, v = q.to(device), k.to(device), v.to(device)
    hit.prefill(q[:, :, :40], k[:, :, :40], v[:, :, :40])
    outs = [hit.decode(q[:, :, 40:41], k[:, :, 40:41], v[:, :, 40:41])]
    before = hit.stats
    _interrupt_once(hit.indexing.index, "search")  # Ctrl-C while the CPU side searches: before any state change
    with pytest.raises(KeyboardInterrupt):
        hit.decode(q[:, :, 41:42], k[:, :, 41:42], v[:, :, 41:42])
    assert (hit.stats.seen_tokens, hit.stats.offloaded_tokens) == (before.seen_tokens, before.offloaded_tokens)
    outs += [hit.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1]) for t in range(41, 60)]
    assert torch.equal(torch.cat(outs, dim=2).cpu(), expected[:, :, 40:])


def test_interrupted_state_update_refuses_until_reset_and_reset_frees_storage(device):
    import gc
    import weakref

    q, k, v = (x.to(device) for x in random_qkv(1, 4, 2, 60, 8, seed=12))
    engine = RetrievalAttention(RetrievalConfig(sink_tokens=3, window_tokens=5, top_k=6, index="flat"), 4, 2, 8)
    engine.prefill(q[:, :, :40], k[:, :, :40], v[:, :, :40])
    engine.decode(q[:, :, 40:41], k[:, :, 40:41], v[:, :, 40:41])
    _interrupt_once(engine.indexing.index, "add")  # Ctrl-C between the store append and the index insert of a spill
    with pytest.raises(KeyboardInterrupt):
        engine.decode(q[:, :, 41:42], k[:, :, 41:42], v[:, :, 41:42])
    with pytest.raises(ValueError, match=r"interrupted .* call reset\(\) first"):
        engine.decode(q[:, :, 42:43], k[:, :, 42:43], v[:, :, 42:43])
    store = weakref.ref(engine.store._k)  # pinned when CUDA is present: must not outlive reset
    engine.reset()
    gc.collect()
    assert store() is None
    fresh = RetrievalAttention(engine.config, 4, 2, 8)
    assert torch.equal(run_engine(engine, q, k, v, 40, device=device), run_engine(fresh, q, k, v, 40, device=device))


def test_background_rebuild_swaps_in_an_index_over_every_key():
    """Decoding grows the index past rebuild_growth: a rebuilt index (trained on decode queries) is swapped
    in, holds every offloaded key, and with the search covering all keys the output stays exact."""
    q, k, v = random_qkv(1, 4, 2, 700, 16, seed=21)
    cfg = RetrievalConfig(sink_tokens=8, window_tokens=16, top_k=700, index="roar", index_params={"ef": 700},
                          rebuild_growth=0.5, rebuild_queries=64)
    engine = RetrievalAttention(cfg, 4, 2, 16)
    out = run_engine(engine, q, k, v, 200)
    s = engine.stats
    assert s.index_rebuilds >= 1  # 176 keys at build: a rebuild is due at 264 (more follow, timing permitting)
    assert len(engine.indexing.index) == s.offloaded_tokens  # the swapped-in index caught up with the spills
    assert (out.double() - reference_attention(q, k, v, 16**-0.5)).abs().max() <= FP32_TOL
    off = RetrievalAttention(RetrievalConfig(sink_tokens=8, window_tokens=16, top_k=50, index="roar",
                                             rebuild_growth=None), 4, 2, 16)
    run_engine(off, q, k, v, 200)
    assert off.stats.index_rebuilds == 0


def reference_in_slices(q, k, v, scale, rows=256):
    """reference_attention of every position, ``rows`` query positions at a time (bounded memory)."""
    n = q.shape[2]
    return torch.cat([reference_attention(q[:, :, a : a + rows], k[:, :, : a + rows], v[:, :, : a + rows], scale)
                      for a in range(0, n, rows)], dim=2)


def run_turns(engine, q, k, v, plan):
    """Feed the positions in order by ``plan``: ("p", n) one prefill of n tokens, ("d", n) n decode steps;
    returns every output, (B, Hq, positions, D)."""
    outs, t = [], 0
    for kind, n in plan:
        if kind == "p":
            outs.append(engine.prefill(q[:, :, t : t + n], k[:, :, t : t + n], v[:, :, t : t + n]))
        else:
            outs += [engine.decode(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1]) for i in range(t, t + n)]
        t += n
    return torch.cat(outs, dim=2)


# a 2,100-token document, answers, a 300-token turn (more than sink + window: it spills), a 1-token
# turn (a prefill, not a decode step), a turn longer than the window again
CONVERSATION = (("p", 2100), ("d", 30), ("p", 300), ("d", 20), ("p", 1), ("d", 4), ("p", 129), ("d", 16))


@pytest.mark.parametrize(
    "batch, hq, hkv, dtype, block, index",
    [
        (1, 4, 2, torch.float32, 1024, "flat"),
        (2, 6, 2, torch.float32, 100, "roar"),  # turns in tiles of 100 queries x 100 rows
        (1, 9, 3, torch.bfloat16, 1024, "flat"),
    ],
)
def test_turns_after_decoding_equal_full_attention_at_every_step(batch, hq, hkv, dtype, block, index):
    """prefill, decode, prefill, decode, ... on the engine API: every position equals full attention
    (sink 64, window 128, top_k covering everything), and every offloaded key is indexed."""
    total, d = sum(n for _, n in CONVERSATION), 16
    q, k, v = random_qkv(batch, hq, hkv, total, d, seed=17, dtype=dtype)
    cfg = RetrievalConfig(sink_tokens=64, window_tokens=128, top_k=total, index=index, prefill_block=block,
                          index_params={"ef": total} if index == "roar" else {})
    engine = RetrievalAttention(cfg, hq, hkv, d)
    out = run_turns(engine, q, k, v, CONVERSATION)
    ref = reference_in_slices(q.float(), k.float(), v.float(), d**-0.5)
    assert out.dtype == dtype
    err = (out.double() - ref).abs().amax(dim=(0, 1, 3))  # per position
    assert err.max() <= (FP32_TOL if dtype == torch.float32 else BF16_TOL), f"worst position {int(err.argmax())}"
    s = engine.stats
    assert (s.seen_tokens, s.device_tokens, s.offloaded_tokens) == (total, 192, total - 192)
    assert len(engine.indexing.index) == total - 192 and s.index == index


@pytest.mark.parametrize("serve_while_building", [False, True])
def test_prefill_after_start_index_build_is_the_next_turn(serve_while_building):
    """A prefill after start_index_build is a turn: exact, its spills indexed (by the build it waits for, or by
    the exact stand-in serving until the build lands, whose keys the build then catches up with)."""
    q, k, v = random_qkv(1, 4, 2, 700, 16, seed=19)
    engine = RetrievalAttention(RetrievalConfig(sink_tokens=8, window_tokens=32, top_k=700, index="roar",
                                                index_params={"ef": 700}, serve_while_building=serve_while_building),
                                4, 2, 16)
    outs = [engine.prefill(q[:, :, :500], k[:, :, :500], v[:, :, :500])]
    engine.start_index_build()
    outs.append(engine.prefill(q[:, :, 500:600], k[:, :, 500:600], v[:, :, 500:600]))  # an answer of no token
    assert len(engine.indexing.index) == 600 - 40  # the turn's spills too
    assert engine.indexing.phase is Phase.BUILT or serve_while_building
    outs += [engine.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1]) for t in range(600, 700)]
    ref = reference_attention(q, k, v, 16**-0.5)
    assert (torch.cat(outs, dim=2).double() - ref).abs().max() <= FP32_TOL
    engine.wait_for_index()
    engine.decode(q[:, :, 699:700], k[:, :, 699:700], v[:, :, 699:700])  # takes the build in
    assert engine.stats.index == "roar" and len(engine.indexing.index) == engine.stats.offloaded_tokens


def test_a_turn_during_the_background_build_does_not_train_it(monkeypatch):
    """The first build trains on the prompt's sampled queries, however the builder thread is timed: here it is
    held before it reads its training queries until a turn has been prefilled (and sampled) meanwhile; the
    queries it trains on are still exactly those sampled before start_index_build."""
    import retrieval_attn.engine.indexing as indexing

    q, k, v = random_qkv(1, 4, 2, 640, 16, seed=31)
    cfg = RetrievalConfig(sink_tokens=8, window_tokens=32, top_k=20, index="roar", serve_while_building=True)
    gate, trained = threading.Event(), []
    make = indexing.make_index_for

    def held_make_index_for(*args, **kwargs):  # the builder thread waits here for the turn to end
        assert gate.wait(timeout=60), "the turn did not end"
        index = make(*args, **kwargs)
        build = index.build

        def build_recording(keys, train_queries=None, **kw):
            trained.append(None if train_queries is None else torch.from_numpy(np.array(train_queries)))
            return build(keys, train_queries, **kw)

        index.build = build_recording
        return index

    monkeypatch.setattr(indexing, "make_index_for", held_make_index_for)
    engine = RetrievalAttention(cfg, 4, 2, 16)
    engine.prefill(q[:, :, :500], k[:, :, :500], v[:, :, :500])
    prompt_sample = engine.indexing.train.queries().clone()  # [G, positions, D]
    engine.start_index_build()
    engine.prefill(q[:, :, 500:600], k[:, :, 500:600], v[:, :, 500:600])  # a turn while the build is held
    gate.set()
    engine.wait_for_index()
    assert len(trained) == 1 and trained[0].shape == prompt_sample.shape == (2, 500, 16)
    assert torch.equal(trained[0], prompt_sample)
    for t in range(600, 640):
        engine.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
    assert engine.stats.index == "roar" and len(engine.indexing.index) == engine.stats.offloaded_tokens


def test_a_long_turn_trains_the_rebuild_it_triggers(monkeypatch):
    """With rebuild_growth, a turn that grows the index past it keeps its queries in the rebuild ring: the
    rebuild started at the next decode step trains on them, and is swapped in holding every key."""
    from retrieval_attn.engine.indexing import IndexLifecycle

    q, k, v = random_qkv(1, 4, 2, 760, 16, seed=23)
    cfg = RetrievalConfig(sink_tokens=8, window_tokens=16, top_k=760, index="roar", index_params={"ef": 760},
                          rebuild_growth=0.5, rebuild_queries=64)
    engine = RetrievalAttention(cfg, 4, 2, 16)
    trained = []
    built = IndexLifecycle._built  # the first build's training queries, then the rebuild's
    monkeypatch.setattr(IndexLifecycle, "_built", lambda self, name, store, n, train, device: (
        trained.append(torch.from_numpy(train)), built(self, name, store, n, train, device))[1])
    outs = [run_turns(engine, q, k, v, (("p", 300), ("d", 2), ("p", 400)))]  # the index: 276 keys, then 676
    assert engine.indexing.phase is Phase.BUILT  # due, not started: decode starts rebuilds
    outs.append(engine.decode(q[:, :, 702:703], k[:, :, 702:703], v[:, :, 702:703]))
    engine.indexing.pending.result()
    outs += [engine.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1]) for t in range(703, 760)]
    # the ring when that decode step started the rebuild: the turn's last 64 positions; [G, steps * group, D]
    steps = q[:, :, 638:702].reshape(2, 2, 64, 16).transpose(1, 2)
    assert len(trained) == 2
    assert torch.equal(trained[1].sort(dim=1).values, steps.reshape(2, -1, 16).sort(dim=1).values)
    assert engine.stats.index_rebuilds == 1 and len(engine.indexing.index) == engine.stats.offloaded_tokens
    ref = reference_attention(q, k, v, 16**-0.5)
    assert (torch.cat(outs, dim=2).double() - ref).abs().max() <= FP32_TOL


def test_interrupted_turn_changes_nothing_or_refuses_until_reset(monkeypatch):
    """Ctrl-C during a turn's attention leaves the engine as it was; during the insertion of its spills
    the engine refuses every call until reset."""
    import retrieval_attn.engine.prefill as prefill_module

    q, k, v = random_qkv(1, 4, 2, 200, 8, seed=29)
    cfg = RetrievalConfig(sink_tokens=3, window_tokens=5, top_k=200, index="flat")
    plan = (("p", 100), ("d", 10), ("p", 50), ("d", 40))
    expected = run_turns(RetrievalAttention(cfg, 4, 2, 8), q, k, v, plan)
    engine = RetrievalAttention(cfg, 4, 2, 8)
    outs = [run_turns(engine, q, k, v, plan[:2])]
    before = engine.stats
    _interrupt_once(prefill_module, "partial_attention")
    with pytest.raises(KeyboardInterrupt):
        engine.prefill(q[:, :, 110:160], k[:, :, 110:160], v[:, :, 110:160])
    assert engine.stats == before
    outs.append(engine.prefill(q[:, :, 110:160], k[:, :, 110:160], v[:, :, 110:160]))
    outs += [engine.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1]) for t in range(160, 200)]
    assert torch.equal(torch.cat(outs, dim=2), expected)

    _interrupt_once(engine.indexing.index, "add")
    with pytest.raises(KeyboardInterrupt):
        engine.prefill(q[:, :, :30], k[:, :, :30], v[:, :, :30])
    with pytest.raises(ValueError, match=r"interrupted .* call reset\(\) first"):
        engine.prefill(q[:, :, :30], k[:, :, :30], v[:, :, :30])
    engine.reset()
    assert torch.equal(run_turns(engine, q, k, v, plan), expected)
