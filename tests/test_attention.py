"""The split-attention math: partial attention, the lse merge, gathered attention, against a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval_attn import merge_state
from retrieval_attn.attention import partial_attention, reference_attention

from .conftest import random_qkv

TOL = 1e-5  # fp32 against float64, values of order 1


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    hkv=st.integers(1, 3),
    group=st.integers(1, 4),
    n=st.integers(1, 9),
    t=st.integers(2, 70),
    d=st.sampled_from([1, 4, 16, 64]),
    data=st.data(),
)
def test_merge_of_any_split_equals_full_attention(batch, hkv, group, n, t, d, data):
    split = data.draw(st.integers(0, t))  # 0 or t: one side is empty
    q, k, v = random_qkv(batch, hkv * group, hkv, t, d, seed=data.draw(st.integers(0, 10**6)))
    q = q[:, :, :n]
    scale = d**-0.5
    o_a, lse_a = partial_attention(q, k[:, :, :split], v[:, :, :split], scale)
    o_b, lse_b = partial_attention(q, k[:, :, split:], v[:, :, split:], scale)
    o, lse = merge_state(o_a, lse_a, o_b, lse_b)
    ref = reference_attention(q, k, v, scale, causal=False)
    assert (o.double() - ref).abs().max() <= TOL
    logits = torch.matmul(q.double(), k.double().repeat_interleave(group, 1).transpose(-1, -2)) * scale
    assert (lse.double() - torch.logsumexp(logits, -1)).abs().max() <= TOL * 10


def test_causal_partial_attention_matches_reference():
    q, k, v = random_qkv(2, 6, 2, 33, 16, seed=1)
    o, _ = partial_attention(q[:, :, -10:], k, v, 0.25, causal=True)  # last 10 queries over 33 keys
    ref = reference_attention(q[:, :, -10:], k, v, 0.25, causal=True)
    assert (o.double() - ref).abs().max() <= TOL


@pytest.mark.parametrize("magnitude", [1e2, 1e4, -1e4])
def test_extreme_logits_stay_finite_and_exact(magnitude):
    o_a, o_b = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    lse_a = torch.full((2, 3), magnitude)
    lse_b = torch.full((2, 3), magnitude - 2.0)
    o, lse = merge_state(o_a, lse_a, o_b, lse_b)
    w_a = 1 / (1 + math.exp(-2.0))
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    assert torch.allclose(o, w_a * o_a + (1 - w_a) * o_b, atol=1e-5)
    assert torch.allclose(lse, torch.full_like(lse, magnitude + math.log1p(math.exp(-2.0))), rtol=1e-6)


def test_partial_attention_with_huge_logits_has_no_nan():
    q = torch.full((1, 1, 1, 4), 100.0)
    k = torch.stack([torch.full((4,), 25.0), torch.full((4,), -25.0)])[None, None]  # logits +-1e4
    v = torch.randn(1, 1, 2, 4)
    o, lse = partial_attention(q, k, v, scale=1.0)
    assert torch.allclose(o[0, 0, 0], v[0, 0, 0]) and torch.allclose(lse, torch.tensor(1e4))


def test_empty_side_is_identity_and_both_empty_is_zero():
    o_a, lse_a = torch.randn(4, 5, 16), torch.randn(4, 5)
    empty_o, empty_lse = torch.zeros(4, 5, 16), torch.full((4, 5), float("-inf"))
    o, lse = merge_state(o_a, lse_a, empty_o, empty_lse)
    assert torch.equal(lse, lse_a) and torch.allclose(o, o_a)
    o, lse = merge_state(empty_o, empty_lse, o_a, lse_a)
    assert torch.equal(lse, lse_a) and torch.allclose(o, o_a)
    o, lse = merge_state(empty_o, empty_lse, empty_o, empty_lse)
    assert torch.equal(o, empty_o) and torch.isneginf(lse).all()


def test_merge_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="lse_a"):
        merge_state(torch.zeros(2, 3, 4), torch.zeros(2, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3))
