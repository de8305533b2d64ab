"""``RetrievalAttention``: the per-layer state machine of retrieval-attn, and its library API.

One engine serves one attention layer. ``prefill(q, k, v)`` runs exact causal attention and splits
the keys/values: the first ``sink_tokens`` and the last ``window_tokens`` stay on the tensors' device,
the rest go to a CPU ``KVStore``. The first ``decode`` builds the key index over the offloaded keys;
each ``decode(q, k, v)`` then attends on the device over sink + window + the new token, retrieves the
top-k offloaded keys of every query head from the index on the CPU, attends over them there, and
merges both parts exactly by log-sum-exp. The new token joins the window; once the window is full,
its oldest token spills to the CPU store and into the index.

A decode step leaves no hardware idle: q is copied once into a preallocated (pinned, on CUDA)
host buffer; with ``config.overlap`` the CPU part (search of all heads of the layer, then attention
over the retrieved rows, two numba calls that release the GIL) runs on a worker thread while the
device attends over sink + window, and only out and lse of each query head come back. The index can
be built on a background thread as soon as prefill ends (``start_index_build``), overlapping the
prefill of later layers; the first decode waits for it. With ``config.rebuild_growth`` set, once
decoding has grown the index by that fraction of the keys it was built over, a fresh index is
built in the background, trained on the recent decode queries, and swapped in when ready; the
steps meanwhile use the old one.

Device layout (one buffer per K and V): ``(batch, kv_heads, sink + window + 1, head_dim)``; slots
``[0, sink)`` hold the sink, ``[sink, sink + window)`` are a ring of the window, and the last slot
receives the new token of a decode step before it replaces the oldest window token. Until the
buffer fills, tokens simply occupy slots ``[0, seen)`` in order.

``RetrievalConfig(retrieve=False)`` skips the index and the retrieval (the sink + window baseline);
``RetrievalConfig(telemetry=True)`` makes every decode step also measure, exactly, what retrieval
missed (``self.telemetry``, see ``retrieval_attn.telemetry``). ``fork(config)`` copies an engine
after prefill to decode with other settings, so one exact prefill serves several of them.

Plain tensors in, tensors out: this module knows nothing about transformers or tokenizers.
"""

from __future__ import annotations

import copy
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import numba
import torch
import torch.nn.functional as F

from .attention import merge_state, partial_attention, scored_attention
from .config import RetrievalConfig
from .index import cpu_threads, make_index, params_class, resolve_index
from .offload import KVStore, attend_rows, gather_rows
from .telemetry import LayerTelemetry, step_recall_and_mass

__all__ = ["RetrievalAttention", "EngineStats", "STEP_PARTS"]

# Parts of a decode step timed in ``EngineStats.step_seconds``.
STEP_PARTS = ("device_attention", "cpu_search", "cpu_attention", "transfer")

# One worker runs the CPU part of decode steps (overlap), one builds indexes in the background; each
# call waits for its own future, so engines used from several threads stay independent.
_CPU_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval-attn-cpu")
_INDEX_BUILDER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval-attn-build")


@dataclass(frozen=True)
class EngineStats:
    """Where the tokens of one layer are, and what the last decode step cost.

    ``index`` is the backend in use ("" before the first decode builds it; ``auto`` resolved).
    ``keys_scanned_last_step`` sums, over all query heads of the batch, the offloaded keys whose score
    the index computed in the last decode step; ``keys_scanned_fraction`` is its mean per query head
    divided by the keys indexed at that moment. ``index_build_seconds`` is the last build's (or
    rebuild's) time; ``index_rebuilds`` counts the background rebuilds swapped in. ``step_seconds`` splits the last decode step into
    ``STEP_PARTS``: device attention over sink + window (CUDA event time on a GPU), CPU search, CPU
    attention over the retrieved rows, and host/device copies of q and of the retrieved part's result.
    With ``overlap`` the device attention and the two CPU parts run at the same time.
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
    index_build_seconds: float = 0.0
    index_rebuilds: int = 0
    step_seconds: Mapping[str, float] = field(default_factory=lambda: MappingProxyType(dict.fromkeys(STEP_PARTS, 0.0)))


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
        self._reserved = 0  # offloaded rows to allocate at the first prefill (``reserve``)
        self.reset()

    def reserve(self, tokens: int) -> None:
        """Size the CPU store for a context of ``tokens`` tokens per sequence at the first prefill (memory planning)."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"tokens must be an int >= 1, got {tokens!r}")
        self._reserved = max(0, tokens - self._device_capacity)
        if self._store is not None:
            self._store.reserve(self._reserved)

    def reset(self) -> None:
        """Forget every token: wait for an index build in flight, drop the device buffers, the (pinned) CPU
        store and the index; next comes a prefill."""
        for pending in (getattr(self, "_build_future", None), getattr(self, "_rebuild", None)):
            if pending is not None:
                pending.exception()  # wait; a failed build is of no interest once its tokens are dropped
        self._build_future: Future | None = None
        self._rebuild: Future | None = None  # background rebuild: its future, returning (index, keys it holds)
        self._rebuilds = 0
        self._built_n = 0  # keys per group the index in use was built over
        self._recent_q: torch.Tensor | None = None  # [G, rebuild_queries, group, D] ring of decode queries
        self._recent_steps = 0
        self._host: dict[str, torch.Tensor] = {}  # preallocated host buffers of the decode step
        self._stream: torch.cuda.Stream | None = None
        self._step_seconds = dict.fromkeys(STEP_PARTS, 0.0)
        self._device_events: tuple | None = None  # CUDA (start, end) of the last device attention
        self._build_seconds = 0.0
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
        self._retrieved_ids: torch.Tensor | None = None  # [G, group, k] of the last step
        self.telemetry = LayerTelemetry() if self.config.telemetry else None

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
        if not bool(torch.isfinite(q).all() & torch.isfinite(k).all() & torch.isfinite(v).all()):  # one device sync
            bad = next(name for name, t in (("q", q), ("k", k), ("v", v)) if not bool(torch.isfinite(t).all()))
            raise ValueError(f"{bad} contains NaN or Inf; nothing was stored")
        if not decode and self._decoding:
            raise ValueError("prefill called after decode started; call reset() to start a new sequence")
        if not decode and self._build_future is not None:
            raise ValueError("prefill called after start_index_build(); call reset() to start a new sequence")

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
        self._store.reserve(self._reserved)
        pin = k.device.type == "cuda"
        groups = b * self.num_kv_heads
        # q, out: [B * Hkv, group, D], lse: [B * Hkv, group] (row j of group g is query head g % Hkv * group + j)
        for name, shape in (("q", (groups, self.group, self.head_dim)), ("out", (groups, self.group, self.head_dim)),
                            ("lse", (groups, self.group))):
            self._host[name] = torch.empty(shape, dtype=torch.float32, pin_memory=pin)
        if self.config.retrieved_attention == "device":
            top_k = self.config.top_k
            self._host["scores"] = torch.empty((groups, self.group, top_k), dtype=torch.float32, pin_memory=pin)
            self._host["values"] = torch.empty((groups, self.group, top_k, self.head_dim), dtype=torch.float32,
                                               pin_memory=pin)

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
        self._store.append(kg, vg)  # asynchronous from a GPU: prefill does not wait for it
        if self._index is not None and len(self._index):  # an empty index is built by the next decode
            self._store.synchronize()
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
        p = f + off  # tokens before this chunk, visible to all of its queries
        if p:
            # one copy of the context on the device: [B, Hkv, p + n, D] = device part, offloaded part, chunk
            shape = (b, self.num_kv_heads, p + n, self.head_dim)
            keys_all, vals_all = q.new_empty(shape), q.new_empty(shape)
            for dst, dev, stored, new in ((keys_all, self._k_dev, self._store.keys, k),
                                          (vals_all, self._v_dev, self._store.values, v)):
                dst[:, :, :f] = dev[:, :, :f]
                dst[:, :, f:p].copy_(stored.reshape(b, self.num_kv_heads, off, self.head_dim), non_blocking=True)
                dst[:, :, p:] = new
        else:
            keys_all, vals_all = k, v
        out = torch.empty_like(q)
        step = self.config.prefill_block
        for i0 in range(0, n, step):
            i1 = min(n, i0 + step)
            keys, vals = keys_all[:, :, : p + i1], vals_all[:, :, : p + i1]  # [B, Hkv, p + i1, D]
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

    def start_index_build(self) -> None:
        """Start building the index over the offloaded keys on a background thread; decode waits for it.

        Call it after the last prefill chunk (``RetrievalCache.last_prefill_chunk`` does, layer by
        layer), so the build of this layer overlaps the prefill of the next ones. Without it, the first
        ``decode`` builds the index itself. A second call is a no-op; prefill afterwards is an error.
        """
        if self.seen == 0:
            raise ValueError("start_index_build called before prefill")
        if self._build_future is None and not self._decoding and self.config.retrieve:
            self._build_future = _INDEX_BUILDER.submit(self._build_index, self._store_device)

    def _build_index(self, device: torch.device | None) -> None:
        """Index the offloaded keys (by the first decode, and again while none were offloaded yet); the
        exact training top lists are computed on ``device``."""
        start = time.perf_counter()
        self._store.synchronize()
        with cpu_threads(self.config.cpu_threads):
            name = resolve_index(self.config.index, self._store.n)
            index = make_index(name, **(self.config.index_params if name != "flat" else {}))
            if self._store.n:
                train = self._train.queries().numpy() if self._train is not None and index.uses_train_queries else None
                index.build(self._store.keys.numpy(), train, device=device)
                self._train = None  # only the first build over offloaded keys trains on prefill queries
        self._index, self._built_n = index, self._store.n
        self._build_seconds = time.perf_counter() - start

    def _rebuilt_index(self, n: int, train: torch.Tensor | None, device: torch.device) -> tuple:
        """A new index over the first ``n`` offloaded keys of each group, trained on ``train`` (G, m, D)
        decode queries; runs on the builder thread while decoding goes on with the old index."""
        start = time.perf_counter()
        with cpu_threads(self.config.cpu_threads):
            index = make_index(self._index.name, **(self.config.index_params if self._index.name != "flat" else {}))
            keys = self._store.keys[:, :n].numpy()  # rows < n are never rewritten; appends go after them
            index.build(keys, train.numpy() if train is not None else None, device=device)
        return index, n, time.perf_counter() - start

    def _maybe_rebuild(self) -> None:
        """Swap in a finished rebuild (after adding the keys spilled meanwhile), or start one when due."""
        if self._rebuild is not None and self._rebuild.done():
            index, n, seconds = self._rebuild.result()  # re-raises a failed rebuild's error
            self._rebuild = None
            if self._store.n > n:
                self._store.synchronize()
                index.add(self._store.keys[:, n:].numpy())
            self._index, self._built_n, self._build_seconds = index, n, seconds
            self._rebuilds += 1
        growth = self.config.rebuild_growth
        due = growth is not None and self._index.name != "flat" and len(self._index) >= (1 + growth) * self._built_n
        if self._rebuild is None and due and self._recent_steps:
            train = None
            if self._index.uses_train_queries:  # the recent decode queries: [G, steps * group, D]
                steps = min(self._recent_steps, self._recent_q.shape[1])
                train = self._recent_q[:, :steps].reshape(self._recent_q.shape[0], -1, self.head_dim).clone()
            self._store.synchronize()
            self._rebuild = _INDEX_BUILDER.submit(self._rebuilt_index, self._store.n, train, self._store_device)

    def _remember_query(self) -> None:
        """Keep this step's queries (the host buffer) in the ring that trains rebuilds."""
        if self._recent_q is None:
            g, m, d = self._host["q"].shape
            self._recent_q = torch.empty((g, self.config.rebuild_queries, m, d), dtype=torch.float32)
        self._recent_q[:, self._recent_steps % self._recent_q.shape[1]] = self._host["q"]
        self._recent_steps += 1

    def _wait_for_index(self) -> None:
        """Make sure an index over the offloaded keys exists: wait for the background build, or build here."""
        if not self.config.retrieve:  # the sink + window baseline has no index
            self._decoding = True
        elif not self._decoding:
            if self._build_future is not None:
                self._build_future.result()  # re-raises a failed build's error
            else:
                self._build_index(self._store_device)
            self._decoding = True
        elif self._store.n and not len(self._index):  # a prompt shorter than sink + window: its first spill
            self._build_index(self._store_device)
        else:
            self._maybe_rebuild()

    @property
    def _store_device(self) -> torch.device:
        """The device of this layer's tensors (where dense work of the index build runs)."""
        return self._k_dev.device

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
        self._wait_for_index()
        cap = self._device_capacity
        slot = min(self.seen, cap)  # where the new token goes: next free slot, or the scratch slot
        self._k_dev[:, :, slot : slot + 1] = k
        self._v_dev[:, :, slot : slot + 1] = v
        n_off = self._store.n
        self._scanned_last = self._retrieved_last = 0
        self._scanned_fraction_last = 0.0
        self._step_seconds = dict.fromkeys(STEP_PARTS, 0.0)
        self._retrieved_ids = None
        if n_off and self.config.retrieve:
            top_k = min(self.config.top_k, n_off)
            t0 = time.perf_counter()
            self._host["q"].copy_(q.reshape(self._host["q"].shape), non_blocking=True)
            if q.is_cuda:
                torch.cuda.current_stream(q.device).synchronize()  # q is on the host before the CPU reads it
            self._step_seconds["transfer"] += time.perf_counter() - t0
            if self.config.rebuild_growth is not None:
                self._remember_query()
            if self.config.overlap:
                cpu_part = _CPU_WORKER.submit(self._cpu_part, top_k)
                o, lse = self._device_attention(q, slot)
                cpu_part.result()
            else:
                self._cpu_part(top_k)
                o, lse = self._device_attention(q, slot)
            lse_device = lse  # [B, Hq, 1]
            o, lse = merge_state(o, lse, *self._retrieved_part(q, top_k), validate=False)
        else:
            o, lse = self._device_attention(q, slot)
            lse_device = lse
        if self.telemetry is not None and n_off:
            self._record_telemetry(q, lse_device, lse, min(self.config.top_k, n_off))
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

    def _record_telemetry(self, q: torch.Tensor, lse_device: torch.Tensor, lse_merged: torch.Tensor, k: int) -> None:
        """Exact recall@k and mass held of this step (``telemetry.step_recall_and_mass``) into ``self.telemetry``."""
        self._store.synchronize()
        g = self._store.groups
        # qg: [G, group, D] fp32 on the CPU: the host copy when this step retrieved, else q itself
        qg = self._host["q"] if self._retrieved_ids is not None else (
            q.reshape(g, self.group, self.head_dim).float().cpu())
        lse_d = lse_device.reshape(g, self.group).float().cpu()  # [G, group]
        self.telemetry.record(*step_recall_and_mass(qg, self._store.keys, self._retrieved_ids, lse_d, self.scale, k))

    def _device_attention(self, q: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q (B, Hq, 1, D) over device slots [0, slot] -> out (B, Hq, 1, D), lse (B, Hq, 1), fp32."""
        if q.is_cuda:
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            events[0].record()
        t0 = time.perf_counter()
        # inputs were checked by _check and the buffer holds only checked tokens: no second device sync
        o, lse = partial_attention(q, self._k_dev[:, :, : slot + 1], self._v_dev[:, :, : slot + 1], self.scale,
                                   validate=False)
        if q.is_cuda:
            events[1].record()
            self._device_events = events
        else:
            self._step_seconds["device_attention"] = time.perf_counter() - t0
        return o, lse

    def _cpu_part(self, top_k: int) -> None:
        """Search all heads of the layer for the query in the host buffer, then attend over what was found.

        ``retrieved_attention="cpu"``: writes out and lse to the host buffers; ``"device"``: writes the
        scores and gathers the values of the retrieved rows for the device to attend over.
        """
        with cpu_threads(self.config.cpu_threads):
            t0 = time.perf_counter()
            res = self._index.search(self._host["q"].numpy(), top_k)  # ids, scores: [B * Hkv, group, top_k]
            t1 = time.perf_counter()
            if self.config.retrieved_attention == "cpu":
                attend_rows(res.scores, res.ids, self._store.values.numpy(), self.scale,
                            self._host["out"].numpy(), self._host["lse"].numpy())
            else:
                scores, values = self._device_inputs(top_k)
                scores.numpy()[:] = res.scores
                gather_rows(res.ids, self._store.values.numpy(), values.numpy())
            t2 = time.perf_counter()
        self._step_seconds["cpu_search"], self._step_seconds["cpu_attention"] = t1 - t0, t2 - t1
        self._scanned_last = int(res.scored.sum())
        self._scanned_fraction_last = res.scored_fraction(len(self._index))
        self._retrieved_last = int(res.ids.size)
        self._retrieved_ids = torch.from_numpy(res.ids)  # [G, group, top_k], for telemetry

    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        """This engine's CUDA stream for host -> device copies of the retrieved part (created once)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _device_inputs(self, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous views of the host buffers for ``top_k`` rows: scores (G, group, top_k), values (G, group, top_k, D)."""
        g, m = self._host["q"].shape[:2]
        scores = self._host["scores"].view(-1)[: g * m * top_k].view(g, m, top_k)
        values = self._host["values"].view(-1)[: g * m * top_k * self.head_dim].view(g, m, top_k, self.head_dim)
        return scores, values

    def _retrieved_part(self, q: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The retrieved part of the step on q's device: out (B, Hq, 1, D), lse (B, Hq, 1), fp32."""
        b = q.shape[0]
        t0 = time.perf_counter()
        shipped = (self._host["out"], self._host["lse"]) if self.config.retrieved_attention == "cpu" else (
            self._device_inputs(top_k))
        if q.is_cuda:  # on the copy stream, which the compute stream then waits for
            main, stream = torch.cuda.current_stream(q.device), self._copy_stream(q.device)
            with torch.cuda.stream(stream):
                moved = [x.to(q.device, non_blocking=True) for x in shipped]
            main.wait_stream(stream)
            for x in moved:
                x.record_stream(main)
        else:
            moved = [x.to(q.device) for x in shipped]
        if self.config.retrieved_attention == "cpu":
            out, lse = moved
        else:
            out, lse = scored_attention(moved[0], moved[1], self.scale)  # [G, group, D], [G, group]
        self._step_seconds["transfer"] += time.perf_counter() - t0
        return out.reshape(b, self.num_heads, 1, self.head_dim), lse.reshape(b, self.num_heads, 1)

    def fork(self, config: RetrievalConfig) -> RetrievalAttention:
        """A copy of this engine, after prefill and before any decode, that decodes with ``config``.

        Prefill is exact whatever the index, so one prefill serves several decode settings. ``config``
        must keep this engine's ``sink_tokens`` and ``window_tokens`` (the device layout); an index that
        trains on prefill queries (roar) needs an engine whose own index kept them (prefill with such
        an index). Tensors, CPU store and query sample are copied; this engine is unchanged.
        """
        if not isinstance(config, RetrievalConfig):
            raise ValueError(f"config must be a RetrievalConfig, got {type(config).__name__}")
        if self._decoding or self._build_future is not None or self._rebuild is not None:
            raise ValueError("fork is only possible before the first decode and before start_index_build()")
        layout = ("sink_tokens", "window_tokens")
        if any(getattr(config, f) != getattr(self.config, f) for f in layout):
            raise ValueError(
                f"fork: config must keep sink_tokens={self.config.sink_tokens} and window_tokens="
                f"{self.config.window_tokens}, got {config.sink_tokens} and {config.window_tokens}"
            )
        trains = params_class(config.index).uses_train_queries
        if trains and self._train is None and self.seen:
            raise ValueError(
                f"fork: index {config.index!r} trains on prefill queries, which this engine's index "
                f"{self.config.index!r} did not keep; prefill with a config whose index trains (e.g. roar)"
            )
        train, self._train = self._train, None  # copy the sample only where the new index uses it
        twin = copy.deepcopy(self, memo={id(self.config): self.config})  # the frozen config is shared
        self._train = train
        twin.config = config
        twin._train = copy.deepcopy(train) if trains else None
        twin.telemetry = LayerTelemetry() if config.telemetry else None
        return twin

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
            index_build_seconds=self._build_seconds,
            index_rebuilds=self._rebuilds,
            step_seconds=MappingProxyType(self._measured_step_seconds()),
        )

    def _measured_step_seconds(self) -> dict[str, float]:
        """The last decode step's ``STEP_PARTS``, the device attention read from its CUDA events if any."""
        seconds = dict(self._step_seconds)
        if self._device_events is not None:
            self._device_events[1].synchronize()
            seconds["device_attention"] = self._device_events[0].elapsed_time(self._device_events[1]) / 1000
        return seconds
