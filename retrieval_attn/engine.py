"""``RetrievalAttention``: the per-layer state machine of retrieval-attn, and its library API.

One engine serves one attention layer. ``prefill(q, k, v)`` runs exact causal attention and splits
the keys/values: the first ``sink_tokens`` and the last ``window_tokens`` stay on the tensors' device,
the rest go to a CPU ``KVStore``. The first ``decode`` builds the key index over the offloaded keys;
each ``decode(q, k, v)`` then attends on the device over sink + window + the new token, retrieves the
top-k offloaded keys of every query head from the index on the CPU, attends over them there, and
merges both parts exactly by log-sum-exp. The new token joins the window; once the window is full,
its oldest token spills to the CPU store and into the index.

Device layout (one buffer per K and V): ``(batch, kv_heads, sink + window + 1, head_dim)``; slots
``[0, sink)`` hold the sink, ``[sink, sink + window)`` are a ring of the window, and the last slot
receives the new token of a decode step before it replaces the oldest window token. Until the
buffer fills, tokens simply occupy slots ``[0, seen)`` in order.

Plain tensors in, tensors out: this module knows nothing about transformers or tokenizers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numba
import torch
import torch.nn.functional as F

from .attention import gathered_attention, merge_state, partial_attention
from .config import RetrievalConfig
from .index import cpu_threads, make_index, params_class, resolve_index
from .offload import KVStore

__all__ = ["RetrievalAttention", "EngineStats"]


@dataclass(frozen=True)
class EngineStats:
    """Where the tokens of one layer are, and what the last decode step cost.

    ``index`` is the backend in use ("" before the first decode builds it; ``auto`` resolved).
    ``keys_scanned_last_step`` sums, over all query heads of the batch, the offloaded keys whose score
    the index computed in the last decode step; ``keys_scanned_fraction`` is its mean per query head
    divided by the keys indexed at that moment.
    """

    index: str
    seen_tokens: int
    device_tokens: int
    offloaded_tokens: int
    keys_scanned_last_step: int
    keys_scanned_fraction: float
    retrieved_last_step: int
    cpu_bytes: int
    device_bytes: int


class _QuerySample:
    """Prefill queries kept to train a query-aware index, at most ``cap`` positions, in CPU fp32.

    Keeps positions ``p`` with ``p % stride == 0``; when more than ``cap`` are held, the stride doubles
    and every other kept position is dropped. The sample depends only on the positions seen, so chunked
    and one-call prefill train the same index.
    """

    def __init__(self, cap: int | None):
        self.cap, self.stride = cap, 1
        self._chunks: list[tuple[torch.Tensor, torch.Tensor]] = []  # (positions [m], queries [G, group, m, D])

    def add(self, q: torch.Tensor, start: int, num_kv_heads: int) -> None:
        """Keep the sampled positions of q (B, Hq, n, D) whose first token is at position ``start``."""
        b, hq, n, d = q.shape
        pos = torch.arange(start, start + n)
        keep = pos % self.stride == 0
        qs = q[:, :, keep.to(q.device)].float().cpu()  # [B, Hq, m, D]
        self._chunks.append((pos[keep], qs.reshape(b * num_kv_heads, hq // num_kv_heads, -1, d)))
        while self.cap is not None and sum(len(p) for p, _ in self._chunks) > self.cap:
            self.stride *= 2
            self._chunks = [(p[p % self.stride == 0], x[:, :, p % self.stride == 0]) for p, x in self._chunks]

    def queries(self) -> torch.Tensor:
        """The kept queries of every group, (groups, group_size * positions, D), contiguous."""
        x = torch.cat([x for _, x in self._chunks], dim=2)  # [G, group, m, D]
        return x.reshape(x.shape[0], -1, x.shape[-1]).contiguous()


class RetrievalAttention:
    """Attention for one layer with the middle of the KV cache offloaded to the CPU and retrieved.

    Parameters
    ----------
    config : what stays on the device, top_k, the index backend.
    num_heads : query heads (Hq); must be a multiple of num_kv_heads (GQA).
    num_kv_heads : key/value heads (Hkv).
    head_dim : D.
    scale : logit scale; default ``head_dim ** -0.5``.
    """

    def __init__(
        self, config: RetrievalConfig, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None
    ):
        if not isinstance(config, RetrievalConfig):
            raise ValueError(f"config must be a RetrievalConfig, got {type(config).__name__}")
        for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if scale is not None and not (isinstance(scale, (int, float)) and scale > 0 and scale != float("inf")):
            raise ValueError(f"scale must be a finite float > 0, got {scale!r}")
        if config.cpu_threads is not None and config.cpu_threads > numba.config.NUMBA_NUM_THREADS:
            raise ValueError(
                f"RetrievalConfig.cpu_threads must be in [1, {numba.config.NUMBA_NUM_THREADS}] on this machine "
                f"(os.cpu_count()={os.cpu_count()}), got {config.cpu_threads}"
            )
        self.config = config
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.scale = float(scale) if scale is not None else head_dim**-0.5
        self.reset()

    def reset(self) -> None:
        """Forget every token: drop the device buffers, the (pinned) CPU store and the index; next comes a prefill."""
        self.seen = 0
        self._batch: int | None = None
        self._k_dev: torch.Tensor | None = None  # [B, Hkv, sink + window + 1, D]
        self._v_dev: torch.Tensor | None = None
        self._ring_head = 0  # ring slot (relative to sink) holding the oldest window token
        self._store: KVStore | None = None
        self._index = None
        cls = params_class(self.config.index)
        cap = cls.resolved_params(dict(self.config.index_params)).get("train_queries")
        self._train = _QuerySample(cap) if cls.uses_train_queries else None
        self._decoding = False
        self._dirty = False  # True while a call updates the state: an interruption there leaves it set
        self._scanned_last = 0
        self._scanned_fraction_last = 0.0
        self._retrieved_last = 0

    # ------------------------------------------------------------------ validation

    def _check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decode: bool) -> None:
        """Raise ValueError naming the argument for any shape, dtype or device mismatch."""
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{name} must have rank 4 (batch, heads, seq_len, head_dim), got shape {tuple(t.shape)}")
            if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        b, hq, n, d = q.shape
        if hq != self.num_heads:
            raise ValueError(f"q has {hq} heads, the engine was built for num_heads={self.num_heads}")
        if k.shape[1] != self.num_kv_heads:
            raise ValueError(f"k has {k.shape[1]} heads, the engine was built for num_kv_heads={self.num_kv_heads}")
        if d != self.head_dim or k.shape[3] != self.head_dim:
            raise ValueError(f"head_dim of q ({d}) and k ({k.shape[3]}) must equal the engine's head_dim={self.head_dim}")
        if k.shape != v.shape:
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
        if k.shape[0] != b or k.shape[2] != n:
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and seq_len")
        if b < 1 or n < 1:
            raise ValueError(f"batch and seq_len must be >= 1, got q shape {tuple(q.shape)}")
        if k.device != q.device or v.device != q.device:
            raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
        if q.device.type == "meta":
            raise ValueError("q, k, v are meta tensors (no data); pass tensors on a real device")
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise ValueError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if self._dirty:
            raise ValueError("an earlier call was interrupted while it updated the engine's state; call reset() first")
        if self._batch is not None and b != self._batch:
            raise ValueError(f"batch size changed from {self._batch} to {b}; call reset() first")
        if self._k_dev is not None and (q.dtype, q.device) != (self._k_dev.dtype, self._k_dev.device):
            raise ValueError(
                f"q, k, v are {q.dtype} on {q.device}, the engine holds {self._k_dev.dtype} on "
                f"{self._k_dev.device}; call reset() first to change dtype or device"
            )
        if decode and n != 1:
            raise ValueError(f"decode takes one new token per sequence (seq_len 1), got seq_len {n}")
        if decode and self.seen == 0:
            raise ValueError("decode called before prefill")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf; nothing was stored")
        if not decode and self._decoding:
            raise ValueError("prefill called after decode started; call reset() to start a new sequence")

    # ------------------------------------------------------------------ layout helpers

    @property
    def _device_capacity(self) -> int:
        return self.config.sink_tokens + self.config.window_tokens

    def _filled(self) -> int:
        """Tokens currently held on the device."""
        return min(self.seen, self._device_capacity)

    def _allocate(self, k: torch.Tensor) -> None:
        b = k.shape[0]
        self._batch = b
        shape = (b, self.num_kv_heads, self._device_capacity + 1, self.head_dim)
        self._k_dev = torch.empty(shape, dtype=k.dtype, device=k.device)
        self._v_dev = torch.empty(shape, dtype=k.dtype, device=k.device)
        self._store = KVStore(b * self.num_kv_heads, self.head_dim)

    def _window_in_age_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full window ring, oldest first: k, v (B, Hkv, window, D)."""
        s, h = self.config.sink_tokens, self._ring_head
        order = torch.cat([torch.arange(h, self.config.window_tokens), torch.arange(0, h)]) + s
        order = order.to(self._k_dev.device)
        return self._k_dev[:, :, order], self._v_dev[:, :, order]

    def _to_groups(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, t, D) -> (B * Hkv, t, D)."""
        return x.reshape(-1, x.shape[2], x.shape[3])

    def _offload(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Move k, v (B, Hkv, t, D) to the CPU store, and into the index once it exists."""
        if k.shape[2] == 0:
            return
        kg, vg = self._to_groups(k), self._to_groups(v)
        self._store.append(kg, vg)
        if self._index is not None and len(self._index):  # an empty index is built by the next decode
            self._index.add(self._store.keys[:, -k.shape[2] :].numpy())

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add a chunk k, v (B, Hkv, c, D) after the tokens seen so far, spilling what leaves the window."""
        c, cap, s, w = k.shape[2], self._device_capacity, self.config.sink_tokens, self.config.window_tokens
        free = max(0, min(c, cap - self.seen))
        if free:
            f = self._filled()
            self._k_dev[:, :, f : f + free] = k[:, :, :free]
            self._v_dev[:, :, f : f + free] = v[:, :, :free]
        rest = c - free
        if rest:
            # ring (oldest first) followed by the new tokens: the first `rest` spill, the last `w` stay
            wk, wv = self._window_in_age_order()
            seq_k = torch.cat([wk, k[:, :, free:]], dim=2)
            seq_v = torch.cat([wv, v[:, :, free:]], dim=2)
            self._offload(seq_k[:, :, :rest], seq_v[:, :, :rest])
            self._k_dev[:, :, s : s + w] = seq_k[:, :, rest:]
            self._v_dev[:, :, s : s + w] = seq_v[:, :, rest:]
            self._ring_head = 0
        self.seen += c

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Exact causal attention for a chunk of new tokens, then store them.

        Parameters
        ----------
        q : (batch, num_heads, n, head_dim), post-RoPE.
        k, v : (batch, num_kv_heads, n, head_dim), post-RoPE keys.

        Returns
        -------
        out : (batch, num_heads, n, head_dim), q's dtype and device.

        May be called several times before the first ``decode`` (chunked prefill); the result equals
        one call on the concatenated chunks.
        """
        self._check(q, k, v, decode=False)
        if self._k_dev is None:
            self._allocate(k)
        b, n = q.shape[0], q.shape[2]
        f, off = self._filled(), self._store.n
        # past_k/v: [B, Hkv, f + off, D], every token before this chunk (visible to all of its queries)
        past_k, past_v = self._k_dev[:, :, :f], self._v_dev[:, :, :f]
        if off:
            shape = (b, self.num_kv_heads, off, self.head_dim)
            off_k = self._store.keys.reshape(shape).to(device=q.device, dtype=q.dtype, non_blocking=True)
            off_v = self._store.values.reshape(shape).to(device=q.device, dtype=q.dtype, non_blocking=True)
            past_k, past_v = torch.cat([past_k, off_k], dim=2), torch.cat([past_v, off_v], dim=2)
        p = past_k.shape[2]
        out = torch.empty_like(q)
        step = self.config.prefill_block
        for i0 in range(0, n, step):
            i1 = min(n, i0 + step)
            keys = torch.cat([past_k, k[:, :, :i1]], dim=2) if p else k[:, :, :i1]  # [B, Hkv, p + i1, D]
            vals = torch.cat([past_v, v[:, :, :i1]], dim=2) if p else v[:, :, :i1]
            mask = None
            if p or i0:  # query i0 + r sees the past and chunk tokens j <= i0 + r
                cols = torch.arange(p + i1, device=q.device)
                mask = cols[None, :] <= torch.arange(i0, i1, device=q.device)[:, None] + p
            out[:, :, i0:i1] = F.scaled_dot_product_attention(
                q[:, :, i0:i1], keys, vals, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True
            )
        self._dirty = True
        if self._train is not None:
            self._train.add(q, self.seen, self.num_kv_heads)
        self._append(k, v)
        self._dirty = False
        return out

    def _build_index(self) -> None:
        """Index the offloaded keys (called by the first decode, and again while none were offloaded yet)."""
        name = resolve_index(self.config.index, self._store.n)
        self._index = make_index(name, **(self.config.index_params if name != "flat" else {}))
        if self._store.n:
            train = self._train.queries().numpy() if self._train is not None and self._index.uses_train_queries else None
            self._index.build(self._store.keys.numpy(), train)
            self._train = None  # only the first build trains on prefill queries

    @torch.no_grad()
    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of one new token per sequence over everything seen, with retrieval from the CPU.

        Parameters
        ----------
        q : (batch, num_heads, 1, head_dim), post-RoPE.
        k, v : (batch, num_kv_heads, 1, head_dim).

        Returns
        -------
        out : (batch, num_heads, 1, head_dim), q's dtype and device.
        """
        self._check(q, k, v, decode=True)
        if not self._decoding or (self._store.n and not len(self._index)):  # short prompts: first spill
            with cpu_threads(self.config.cpu_threads):
                self._build_index()
            self._decoding = True
        cap = self._device_capacity
        slot = min(self.seen, cap)  # where the new token goes: next free slot, or the scratch slot
        self._k_dev[:, :, slot : slot + 1] = k
        self._v_dev[:, :, slot : slot + 1] = v
        o, lse = partial_attention(q, self._k_dev[:, :, : slot + 1], self._v_dev[:, :, : slot + 1], self.scale)
        n_off = self._store.n
        self._scanned_last = self._retrieved_last = 0
        self._scanned_fraction_last = 0.0
        if n_off:
            with cpu_threads(self.config.cpu_threads):
                o_r, lse_r = self._retrieve(q, min(self.config.top_k, n_off))
            o, lse = merge_state(o, lse, o_r.to(q.device, non_blocking=True), lse_r.to(q.device, non_blocking=True))
        self._dirty = True  # everything above only computed; from here on the state changes
        if slot == cap:  # buffer full: the oldest window token spills, the new one takes its slot
            ring = self.config.sink_tokens + self._ring_head
            self._offload(self._k_dev[:, :, ring : ring + 1], self._v_dev[:, :, ring : ring + 1])
            self._k_dev[:, :, ring] = self._k_dev[:, :, cap]
            self._v_dev[:, :, ring] = self._v_dev[:, :, cap]
            self._ring_head = (self._ring_head + 1) % self.config.window_tokens
        self.seen += 1
        self._dirty = False
        return o.to(q.dtype)

    def _retrieve(self, q: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """CPU side of decode: search and attend for q (B, Hq, 1, D) -> out (B, Hq, 1, D), lse (B, Hq, 1)."""
        b = q.shape[0]
        # qg: [B * Hkv, group, D], row j of group g is query head g % Hkv * group + j
        qg = q.reshape(b * self.num_kv_heads, self.group, self.head_dim).float().cpu().contiguous()
        res = self._index.search(qg.numpy(), top_k)
        self._scanned_last = int(res.scored.sum())
        self._scanned_fraction_last = res.scored_fraction(len(self._index))
        self._retrieved_last = int(res.ids.size)
        ids = torch.from_numpy(res.ids)  # [G, group, top_k]
        out, lse = gathered_attention(torch.from_numpy(res.scores), ids, self._store.values, self.scale)
        return out.reshape(b, self.num_heads, 1, self.head_dim), lse.reshape(b, self.num_heads, 1)

    @property
    def stats(self) -> EngineStats:
        """Token placement and the cost of the last decode step."""
        off = self._store.n if self._store is not None else 0
        dev_bytes = self._k_dev.nbytes + self._v_dev.nbytes if self._k_dev is not None else 0
        cpu_bytes = (self._store.nbytes if self._store is not None else 0) + (
            self._index.nbytes if self._index is not None else 0
        )
        return EngineStats(
            index=self._index.name if self._index is not None else "",
            seen_tokens=self.seen,
            device_tokens=self._filled(),
            offloaded_tokens=off,
            keys_scanned_last_step=self._scanned_last,
            keys_scanned_fraction=self._scanned_fraction_last,
            retrieved_last_step=self._retrieved_last,
            cpu_bytes=cpu_bytes,
            device_bytes=dev_bytes,
        )
