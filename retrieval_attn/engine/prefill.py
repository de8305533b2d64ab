"""Exact attention of a chunk of new tokens over everything an engine holds, the two ways it runs.

``prompt_attention``: while the prompt is read (chunked prefill, before any decode step), one copy of
the context on the chunk's device, [device part, offloaded rows, chunk], and sdpa over it in blocks of
queries: the fused kernels of the device, transient memory of one context copy (the planner's
"prefill attention keys/values (the whole prompt)").

``turn_attention``: a chunk after decoding (a new turn of a conversation). The chunk's queries attend
over the device window (its slots in any order: every held token precedes the chunk), the offloaded
rows brought to the chunk's device ``block`` rows at a time (each block moved once, seen by every
query; on a CPU device the blocks are views of the store, nothing is copied) and the chunk itself
(causally), in tiles of ``block`` queries by ``block`` keys; each tile's partial attention (out, lse)
is merged into the result by log-sum-exp. The transient memory is one tile, whatever the context
(the planner's "prefill attention of a turn (one tile)").
Why blocks move to the device rather than the queries to the CPU: a chunk of n queries costs
4 n Hq D flops per offloaded row, which a GPU does at once while a CPU does ~1e11 flops/s; moving a
row costs 4 Hkv D bytes (bf16 K and V), and at PCIe's ~2.5e10 bytes/s the CPU wins only for chunks
of a few tokens.

Knows the window's buffers and the store's rows as tensors; nothing of the index or transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import merge_state, partial_attention
from ..offload import KVStore
from .window import DeviceWindow

__all__ = ["prompt_attention", "turn_attention"]


def _spans(n: int, block: int) -> list[tuple[int, int]]:
    """[i0, i1) ranges of at most ``block`` covering range(n)."""
    return [(i, min(n, i + block)) for i in range(0, n, block)]


def prompt_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: DeviceWindow, store: KVStore, block: int, scale: float
) -> torch.Tensor:
    """Exact causal attention of a prompt chunk q (B, Hq, n, D), k, v (B, Hkv, n, D) over the ``p`` tokens
    held (``window``'s and ``store``'s) and the chunk: query i sees the past and chunk tokens j <= i.
    Queries go in blocks of ``block``. Returns out (B, Hq, n, D), q's dtype."""
    b, hkv, n, d = k.shape
    f, off = window.filled, store.n
    p = f + off
    if p:
        # one copy of the context on the device: [B, Hkv, p + n, D] = device part, offloaded part, chunk
        shape = (b, hkv, p + n, d)
        keys_all, vals_all = q.new_empty(shape), q.new_empty(shape)
        for dst, dev, stored, new in ((keys_all, window.k, store.keys, k), (vals_all, window.v, store.values, v)):
            dst[:, :, :f] = dev[:, :, :f]
            dst[:, :, f:p].copy_(stored.reshape(b, hkv, off, d), non_blocking=True)
            dst[:, :, p:] = new
    else:
        keys_all, vals_all = k, v
    out = torch.empty_like(q)
    for i0, i1 in _spans(n, block):
        keys, vals = keys_all[:, :, : p + i1], vals_all[:, :, : p + i1]  # [B, Hkv, p + i1, D]
        mask = None
        if p or i0:  # query i0 + r sees the past and chunk tokens j <= i0 + r
            cols = torch.arange(p + i1, device=q.device)
            mask = cols[None, :] <= torch.arange(i0, i1, device=q.device)[:, None] + p
        out[:, :, i0:i1] = F.scaled_dot_product_attention(
            q[:, :, i0:i1], keys, vals, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
        )
    return out


def turn_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: DeviceWindow, store: KVStore, block: int, scale: float
) -> torch.Tensor:
    """Exact attention of a chunk q (B, Hq, n, D), k, v (B, Hkv, n, D) after decoding, over every token
    held (the window's ``filled`` slots, the store's rows) and the chunk's tokens j <= i, in blocks of
    ``block`` queries by ``block`` keys merged by lse. Returns out (B, Hq, n, D), fp32."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    out = q.new_zeros((b, hq, n, d), dtype=torch.float32)  # [B, Hq, n, D], merged part by part
    lse = q.new_full((b, hq, n), float("-inf"), dtype=torch.float32)  # [B, Hq, n]; -inf: nothing seen yet
    spans = _spans(n, block)

    def attend(i0: int, i1: int, keys: torch.Tensor, vals: torch.Tensor, causal: bool = False) -> None:
        """Merge the attention of queries [i0, i1) over keys, vals (B, Hkv, t, D) into out, lse."""
        o, s = partial_attention(q[:, :, i0:i1], keys, vals, scale, causal=causal, validate=False)
        out[:, :, i0:i1], lse[:, :, i0:i1] = merge_state(out[:, :, i0:i1], lse[:, :, i0:i1], o, s, validate=False)

    store.synchronize()  # rows appended from a GPU have landed before the CPU side of a copy reads them
    for r0, r1 in _spans(store.n, block):  # each block of offloaded rows moves once and serves every query
        rows = [x[:, r0:r1].reshape(b, hkv, r1 - r0, d).to(q.device, non_blocking=True)  # [B, Hkv, rows, D]
                for x in (store.keys, store.values)]
        for i0, i1 in spans:
            attend(i0, i1, *rows)
    f = window.filled
    for i0, i1 in spans:
        attend(i0, i1, window.k[:, :, :f], window.v[:, :, :f])  # [B, Hkv, f, D], slots in any order
        for j0, j1 in _spans(i0, block):  # the chunk's tokens before this query block
            attend(i0, i1, k[:, :, j0:j1], v[:, :, j0:j1])
        attend(i0, i1, k[:, :, i0:i1], v[:, :, i0:i1], causal=True)  # query i0 + r sees i0 .. i0 + r
    return out
