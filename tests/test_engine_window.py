"""DeviceWindow: the rows that leave it on append and on decode, oldest first, and attention over what it holds."""

from __future__ import annotations

import torch

from retrieval_attn.attention import reference_attention
from retrieval_attn.engine.window import DeviceWindow

from .conftest import random_qkv

FP32_TOL = 1e-5


def test_append_and_advance_spill_exactly_the_oldest_window_rows(device):
    sink, window, prompt, total = 3, 5, 19, 30
    _, k, v = (x.to(device) for x in random_qkv(2, 2, 2, total, 4, seed=1))
    w = DeviceWindow(sink, window, 2, 2, 4, k.dtype, k.device)
    spilled, start = [], 0
    for size in (2, 4, 1, 9, 3):  # fits, fits, fills up to 7 of 8, spills 8 (ring and chunk), spills 3
        out = w.append(k[:, :, start : start + size], v[:, :, start : start + size])
        assert (out is None) == (start + size <= sink + window)
        spilled += [out] if out is not None else []
        start += size
    assert start == prompt and (w.seen, w.filled) == (prompt, sink + window)
    for i, x in enumerate((k, v)):  # spilled: everything between the sink and the window, oldest first
        assert torch.equal(torch.cat([s[i] for s in spilled], dim=2), x[:, :, sink : prompt - window])
        assert torch.equal(w.in_age_order()[i], x[:, :, prompt - window : prompt])
        assert torch.equal((w.k, w.v)[i][:, :, :sink], x[:, :, :sink])
    for t in range(prompt, total):  # decode: each step spills the oldest window token, then takes its slot
        w.write(k[:, :, t : t + 1], v[:, :, t : t + 1])
        out_k, out_v = (x.clone() for x in w.outgoing())  # views of a slot that advance overwrites
        w.advance()
        assert torch.equal(out_k, k[:, :, t - window : t - window + 1])
        assert torch.equal(out_v, v[:, :, t - window : t - window + 1])
    assert torch.equal(w.in_age_order()[0], k[:, :, total - window : total]) and w.seen == total


def test_nothing_spills_until_the_buffer_is_full():
    _, k, v = random_qkv(1, 1, 1, 6, 4, seed=3)
    w = DeviceWindow(2, 3, 1, 1, 4, k.dtype, k.device)
    w.append(k[:, :, :2], v[:, :, :2])
    for t in range(2, 5):
        w.write(k[:, :, t : t + 1], v[:, :, t : t + 1])
        assert w.outgoing() is None
        w.advance()
    assert w.filled == 5 and torch.equal(w.k[:, :, :5], k[:, :, :5])
    w.write(k[:, :, 5:6], v[:, :, 5:6])
    assert torch.equal(w.outgoing()[0], k[:, :, 2:3])  # the oldest window token, not a sink token


def test_attend_covers_the_held_tokens_and_the_written_decode_token(device):
    sink, window, n, d = 2, 4, 20, 8
    q, k, v = (x.to(device) for x in random_qkv(1, 4, 2, n + 1, d, seed=2))
    w = DeviceWindow(sink, window, 1, 2, d, k.dtype, k.device)
    w.append(k[:, :, :n], v[:, :, :n])
    w.write(k[:, :, n:], v[:, :, n:])
    out, lse = w.attend(q[:, :, n:], d**-0.5)
    keep = torch.cat([torch.arange(sink), torch.arange(n - window, n + 1)])  # sink, window, the new token
    ref = reference_attention(q[:, :, n:], k[:, :, keep], v[:, :, keep], d**-0.5, causal=False)
    assert out.shape == (1, 4, 1, d) and lse.shape == (1, 4, 1)
    assert (out.double() - ref).abs().max() <= FP32_TOL
    assert w.nbytes == 2 * 1 * 2 * (sink + window + 1) * d * 4
