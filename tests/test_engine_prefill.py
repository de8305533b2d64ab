"""engine.prefill: the blocked attention of a turn equals the one-copy attention of a prompt chunk, over a
window whose ring has turned, whatever the tile size and dtype."""

from __future__ import annotations

import pytest
import torch

from retrieval_attn.attention import reference_attention
from retrieval_attn.engine.prefill import prompt_attention, turn_attention
from retrieval_attn.engine.window import DeviceWindow
from retrieval_attn.offload import KVStore

from .conftest import random_qkv


@pytest.mark.parametrize("block", [1, 5, 64, 1024])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_turn_attention_equals_full_attention_over_a_turned_ring(block, dtype, tol):
    b, hq, hkv, d, sink, window, past, n = 2, 6, 2, 16, 3, 8, 90, 37
    q, k, v = random_qkv(b, hq, hkv, past + n, d, seed=31, dtype=dtype)
    ring = DeviceWindow(sink, window, b, hkv, d, dtype, torch.device("cpu"))
    store = KVStore(b * hkv, d, dtype=dtype)
    spilled = ring.append(k[:, :, :80], v[:, :, :80])  # [B, Hkv, 69, D] offloaded
    store.append(*(x.reshape(b * hkv, -1, d) for x in spilled))
    for t in range(80, past):  # decode steps turn the ring: its slots are no longer in age order
        out_k, out_v = ring.outgoing()
        store.append(out_k.reshape(b * hkv, 1, d).clone(), out_v.reshape(b * hkv, 1, d).clone())
        ring.write(k[:, :, t : t + 1], v[:, :, t : t + 1])
        ring.advance()
    assert ring.head != 0 and store.n == past - sink - window
    chunk = (x[:, :, past:] for x in (q, k, v))
    out = turn_attention(*chunk, ring, store, block, d**-0.5)
    assert out.dtype == torch.float32 and out.shape == (b, hq, n, d)
    ref = reference_attention(q.float(), k.float(), v.float(), d**-0.5)[:, :, past:]
    assert (out.double() - ref).abs().max() <= tol
    prompt = prompt_attention(*(x[:, :, past:] for x in (q, k, v)), ring, store, block, d**-0.5)
    assert (prompt.double() - ref).abs().max() <= tol  # slot order does not matter to the one-copy path either
