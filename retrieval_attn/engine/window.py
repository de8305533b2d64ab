"""``DeviceWindow``: the tokens of one layer that stay on the device, the sink and a ring of the most recent.

One buffer per K and V, ``(batch, kv_heads, sink + window + 1, head_dim)``: slots ``[0, sink)`` hold
the sink, ``[sink, sink + window)`` are a ring of the window, and the last slot receives the new token
of a decode step before it replaces the oldest window token. Until the buffer fills, tokens simply
occupy slots ``[0, seen)`` in order.

The window hands back the rows that leave it and knows nothing about where they go: not the CPU
store, the index, the retrieval or the step timing, nor transformers.
"""

from __future__ import annotations

import torch

from ..attention import partial_attention

__all__ = ["DeviceWindow"]


class DeviceWindow:
    """Sink + ring buffers of K and V on one device, and attention over them.

    Parameters
    ----------
    sink_tokens, window_tokens : the layout (``RetrievalConfig``).
    batch, num_kv_heads, head_dim : B, Hkv and D of the buffers.
    dtype, device : those of the layer's tensors.
    """

    def __init__(
        self, sink_tokens: int, window_tokens: int, batch: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device,
    ):
        self.sink_tokens, self.window_tokens = sink_tokens, window_tokens
        shape = (batch, num_kv_heads, sink_tokens + window_tokens + 1, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)  # [B, Hkv, sink + window + 1, D]
        self.v = torch.empty(shape, dtype=dtype, device=device)  # [B, Hkv, sink + window + 1, D]
        self.head = 0  # ring slot (relative to the sink) holding the oldest window token
        self.seen = 0  # tokens that entered the window, the spilled ones included

    @property
    def capacity(self) -> int:
        """Tokens the window holds once full: sink + window."""
        return self.sink_tokens + self.window_tokens

    @property
    def filled(self) -> int:
        """Tokens held; also the slot a decode token is written to (the spare slot once full)."""
        return min(self.seen, self.capacity)

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def in_age_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full window ring, oldest first: k, v (B, Hkv, window, D)."""
        s, h = self.sink_tokens, self.head
        order = torch.cat([torch.arange(h, self.window_tokens), torch.arange(0, h)]) + s
        order = order.to(self.k.device)
        return self.k[:, :, order], self.v[:, :, order]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Add a chunk k, v (B, Hkv, c, D) after the tokens seen so far (prefill).

        Returns
        -------
        The rows pushed out of the window, oldest first: k, v (B, Hkv, t, D) with t >= 1, or None when
        the chunk fits. They are not views of the window buffers.
        """
        c, s, w = k.shape[2], self.sink_tokens, self.window_tokens
        free = max(0, min(c, self.capacity - self.seen))
        if free:
            f = self.filled
            self.k[:, :, f : f + free] = k[:, :, :free]
            self.v[:, :, f : f + free] = v[:, :, :free]
        rest = c - free
        spilled = None
        if rest:
            # ring (oldest first) followed by the new tokens: the first `rest` spill, the last `w` stay
            wk, wv = self.in_age_order()
            seq_k = torch.cat([wk, k[:, :, free:]], dim=2)  # [B, Hkv, window + rest, D]
            seq_v = torch.cat([wv, v[:, :, free:]], dim=2)
            self.k[:, :, s : s + w] = seq_k[:, :, rest:]
            self.v[:, :, s : s + w] = seq_v[:, :, rest:]
            self.head = 0
            spilled = seq_k[:, :, :rest], seq_v[:, :, :rest]
        self.seen += c
        return spilled

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put a decode token k, v (B, Hkv, 1, D) in slot ``filled``, where ``attend`` sees it."""
        slot = self.filled
        self.k[:, :, slot : slot + 1] = k
        self.v[:, :, slot : slot + 1] = v

    def attend(self, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q (B, Hq, 1, D) over slots [0, filled] (the held tokens and the written decode
        token) -> out (B, Hq, 1, D), lse (B, Hq, 1), fp32."""
        slot = self.filled
        # inputs were checked by the engine and the buffer holds only checked tokens: no second device sync
        return partial_attention(q, self.k[:, :, : slot + 1], self.v[:, :, : slot + 1], scale, validate=False)

    def outgoing(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The token the next ``advance`` spills, the oldest of the ring: k, v (B, Hkv, 1, D), or None
        while the buffer has room. Views of its slot, which ``advance`` overwrites: read them first."""
        if self.seen < self.capacity:
            return None
        ring = self.sink_tokens + self.head
        return self.k[:, :, ring : ring + 1], self.v[:, :, ring : ring + 1]

    def advance(self) -> None:
        """The written decode token joins the window; once the buffer is full it takes the slot of the
        oldest window token (``outgoing``) and the ring moves on."""
        cap = self.capacity
        if self.seen >= cap:
            ring = self.sink_tokens + self.head
            self.k[:, :, ring] = self.k[:, :, cap]
            self.v[:, :, ring] = self.v[:, :, cap]
            self.head = (self.head + 1) % self.window_tokens
        self.seen += 1
