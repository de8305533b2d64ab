"""Telemetry (recall@k and attention mass per decode step), the sink + window baseline, and engine forks."""

from __future__ import annotations

import math

import pytest
import torch

from retrieval_attn import RetrievalAttention, RetrievalConfig
from retrieval_attn.attention import reference_attention
from retrieval_attn.evaluation.report import format_telemetry_table, plot_telemetry
from retrieval_attn.engine.telemetry import step_recall_and_mass, summarise

from .conftest import random_qkv

SINK, WINDOW, PROMPT, TOTAL, D = 4, 8, 100, 110, 16  # 88 keys offloaded at the first decode


def _decode_all(engine, q, k, v):
    """Prefill PROMPT tokens, decode the rest; outputs of the decode steps (B, Hq, TOTAL - PROMPT, D)."""
    engine.prefill(q[:, :, :PROMPT], k[:, :, :PROMPT], v[:, :, :PROMPT])
    return torch.cat(
        [engine.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1]) for t in range(PROMPT, TOTAL)], dim=2
    )


def test_flat_covering_every_key_has_recall_and_mass_one():
    q, k, v = random_qkv(2, 6, 2, TOTAL, D, seed=3)
    engine = RetrievalAttention(
        RetrievalConfig(sink_tokens=SINK, window_tokens=WINDOW, top_k=1000, index="flat", telemetry=True), 6, 2, D
    )
    out = _decode_all(engine, q, k, v)
    plain = RetrievalAttention(RetrievalConfig(sink_tokens=SINK, window_tokens=WINDOW, top_k=1000, index="flat"), 6, 2, D)
    assert torch.equal(out, _decode_all(plain, q, k, v)) and plain.telemetry is None  # measuring changes nothing
    recall, mass = engine.telemetry.tensors()
    assert recall.shape == mass.shape == (TOTAL - PROMPT, 2 * 6)  # (steps, batch * heads)
    assert torch.equal(recall, torch.ones_like(recall))
    assert torch.allclose(mass, torch.ones_like(mass), atol=1e-5)
    row = summarise(engine.telemetry)
    assert row["steps"] == TOTAL - PROMPT and row["recall_min"] == 1.0 and abs(row["mass_min"] - 1) < 1e-5


def test_small_top_k_and_no_retrieval_hold_less_mass():
    q, k, v = random_qkv(1, 4, 2, TOTAL, D, seed=4)
    q = q * 3  # peaked attention: the top keys matter
    base = dict(sink_tokens=SINK, window_tokens=WINDOW, index="flat", telemetry=True)
    exact_small = RetrievalAttention(RetrievalConfig(top_k=4, **base), 4, 2, D)
    none = RetrievalAttention(RetrievalConfig(top_k=4, retrieve=False, **base), 4, 2, D)
    _decode_all(exact_small, q, k, v)
    _decode_all(none, q, k, v)
    r_small, m_small = exact_small.telemetry.tensors()
    r_none, m_none = none.telemetry.tensors()
    assert torch.equal(r_small, torch.ones_like(r_small))  # flat returns the exact top-4
    assert bool((m_small < 1 - 1e-4).all())  # but the other offloaded keys hold mass
    assert torch.equal(r_none, torch.zeros_like(r_none))  # nothing retrieved
    assert bool((m_none < m_small).all())  # the device part alone holds less than device + top-4


def test_step_recall_and_mass_on_a_constructed_case():
    # one group, one query, keys with scores 5, 4, 3, 2, 1 (q = e0, keys = s * e0); retrieve ids 0 and 3
    qg = torch.zeros(1, 1, 4)
    qg[0, 0, 0] = 1.0
    scores = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    keys = torch.zeros(1, 5, 4)
    keys[0, :, 0] = scores
    ids = torch.tensor([[[0, 3]]])
    scale, lse_device = 0.5, torch.tensor([[1.0]])
    recall, mass = step_recall_and_mass(qg, keys, ids, lse_device, scale, k=2)
    assert recall.item() == 0.5  # exact top-2 is {0, 1}: id 3 misses
    total = math.exp(1.0) + sum(math.exp(s * scale) for s in scores.tolist())
    held = math.exp(1.0) + math.exp(5 * scale) + math.exp(2 * scale)
    assert abs(mass.item() - held / total) < 1e-6
    recall, _ = step_recall_and_mass(qg, keys, None, lse_device, scale, k=2)
    assert recall.item() == 0.0
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\]"):
        step_recall_and_mass(qg, keys, ids, lse_device, scale, k=6)


def test_retrieve_false_attends_to_sink_and_window_only():
    q, k, v = random_qkv(1, 4, 2, TOTAL, D, seed=5)
    engine = RetrievalAttention(RetrievalConfig(sink_tokens=SINK, window_tokens=WINDOW, retrieve=False), 4, 2, D)
    out = _decode_all(engine, q, k, v)
    assert engine.stats.index == "" and engine.stats.offloaded_tokens == TOTAL - SINK - WINDOW
    for i, t in enumerate(range(PROMPT, TOTAL)):
        keep = torch.cat([torch.arange(SINK), torch.arange(t - WINDOW, t + 1)])  # sink, window, new token
        ref = reference_attention(q[:, :, t : t + 1], k[:, :, keep], v[:, :, keep], D**-0.5, causal=False)
        assert (out[:, :, i : i + 1] - ref).abs().max() < 1e-5


@pytest.mark.parametrize("index", ["flat", "roar"])
def test_fork_decodes_like_a_fresh_engine(index):
    q, k, v = random_qkv(1, 4, 2, TOTAL, D, seed=6)
    layout = dict(sink_tokens=SINK, window_tokens=WINDOW, top_k=8)
    source = RetrievalAttention(RetrievalConfig(index="roar", **layout), 4, 2, D)
    source.prefill(q[:, :, :PROMPT], k[:, :, :PROMPT], v[:, :, :PROMPT])
    target = RetrievalConfig(index=index, telemetry=True, **layout)
    twin = source.fork(target)
    fresh = RetrievalAttention(target, 4, 2, D)
    fresh.prefill(q[:, :, :PROMPT], k[:, :, :PROMPT], v[:, :, :PROMPT])
    for t in range(PROMPT, TOTAL):
        step = (q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
        assert torch.equal(twin.decode(*step), fresh.decode(*step))
    assert twin.stats.index == index and twin.telemetry.steps == TOTAL - PROMPT
    assert source.seen == PROMPT and source.stats.index == ""  # the source is untouched
    with pytest.raises(ValueError, match="sink_tokens=4 and window_tokens=8"):
        source.fork(RetrievalConfig(sink_tokens=SINK, window_tokens=WINDOW + 1))
    flat_source = RetrievalAttention(RetrievalConfig(index="flat", **layout), 4, 2, D)
    flat_source.prefill(q[:, :, :PROMPT], k[:, :, :PROMPT], v[:, :, :PROMPT])
    with pytest.raises(ValueError, match="trains on prefill queries"):
        flat_source.fork(RetrievalConfig(index="roar", **layout))
    with pytest.raises(ValueError, match="before the first decode"):
        twin.fork(target)


def test_bad_flags_raise_and_summary_outputs(tmp_path):
    for name in ("retrieve", "telemetry"):
        with pytest.raises(ValueError, match=f"RetrievalConfig.{name} must be True or False"):
            RetrievalConfig(**{name: 1})
    rows = [{"layer": 0, "steps": 3, "recall_mean": 0.9, "recall_worst_head": 0.8, "recall_min": 0.5,
             "mass_mean": 0.99, "mass_worst_head": 0.98, "mass_min": 0.9}]
    table = format_telemetry_table(rows)
    assert "recall worst head" in table and "0.9900" in table
    path = plot_telemetry({"flat": rows}, tmp_path / "t.png", "test", 100)
    assert path.stat().st_size > 1000
