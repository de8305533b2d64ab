"""Selection on the layer's device: a decode step's retrieval for an index that scores compact key codes
where the layer runs (``sketch``), with the exact second stage where the rows are.

``DeviceSelection`` is the engine's retrieval part for such an index; it keeps ``HostRetrieval``'s
interface (``to_host``, ``search``/``start``/``wait``, ``fetch``, the counts of the last search), so
the decode step orders it the same way. Per step and layer:

1. first stage (``device_scoring``), on the layer's device, all query heads in one batched op: the
   approximate scores of every key's code and the top ``candidates`` ids per query head
   (``SketchIndex.candidates``; no host round trip);
2. the candidate ids to the host (``device_to_host``: one copy into a pinned buffer, waited for by an
   event; on a CPU device nothing moves);
3. the exact second stage, where ``config.retrieved_attention`` says the retrieved keys are attended:
   ``"cpu"``: exact scores of the candidates from the store's rows read in place, their top-k
   (``cpu_search``) and attention over them (``cpu_attention``); only out and lse go to the device
   (``fetch``, as ``HostRetrieval``). ``"device"``: the candidates' K and V rows gathered into pinned
   buffers (``cpu_gather``), one copy of each to the device (``host_to_device``), and there their exact
   scores, top-k and attention (``device_exact``).

Which placement is faster on a GPU is measured by the first GPU run (``bench/decode.py``); on a CPU
device ``"cpu"`` reads the rows in place and ``"device"`` runs the same code with the CPU as the
device. A step whose index is not a device-selecting one (the exact stand-in while the sketch builds)
runs ``HostRetrieval``'s search. Every buffer is made at the first step that needs it and reused while
``candidates`` and ``top_k`` stay.

It reads the index and the store it is handed; it knows nothing about how the index is built, the
device window, or transformers.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from ..attention import scored_attention
from ..index import SearchResult, cpu_threads
from ..index.sketch import exact_top_k
from ..offload import KVStore, gather_rows
from ..rows import kernel_array
from .retrieval import HostRetrieval, Searched

__all__ = ["DeviceSelection"]


class DeviceSelection(HostRetrieval):
    """The retrieved part of one layer's decode steps when the index selects on the device (see the module
    docstring); constructed like ``HostRetrieval``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._q_device: torch.Tensor | None = None  # the step's q [G, group, D] on the layer's device
        self._stream: torch.cuda.Stream | None = None  # the decoding thread's stream, used by the worker too
        self._first: tuple[torch.Tensor, torch.Tensor] | None = None  # [G, group, c] fp32, int64 on the device
        self._cand: torch.Tensor | None = None  # [G, group, c] int64 on the host (pinned on CUDA)
        self._cand_landed: torch.cuda.Event | None = None
        self._work: tuple[np.ndarray, np.ndarray] | None = None  # exact [G, group, c] fp32, best [G, group, k] int64
        self._gathered: tuple[torch.Tensor, ...] | None = None  # K, V [G, group, c, D] host (pinned), then device
        self._device_result: tuple[torch.Tensor, torch.Tensor] | None = None  # out [G, group, D], lse [G, group]
        self.selected_on_device = False  # the last search ran the first stage on the device

    def to_host(self, q: torch.Tensor | None, finite: torch.Tensor) -> bool:
        if q is not None:
            self._q_device = q.reshape(self.q.shape)  # [G, group, D], a view
            self._stream = torch.cuda.current_stream(q.device) if q.is_cuda else None
        return super().to_host(q, finite)

    def search(self, index, store: KVStore, top_k: int, threads: int) -> Searched:
        self._device_result = None
        self.selected_on_device = getattr(index, "selects_on_device", False)
        if not self.selected_on_device:
            return super().search(index, store, top_k, threads)
        stream = self._stream
        search_s = attention_s = 0.0
        with cpu_threads(threads), (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
            t0 = time.perf_counter()
            c = index.candidate_count(top_k)
            cand = self._candidates(index, c, top_k, stream)  # [G, group, c] int64 on the host
            if self.config.retrieved_attention == "cpu":
                res = self._result
                t1 = time.perf_counter()
                exact_top_k(store.key_source.kernel_rows(), cand.numpy(), self.q.numpy(), top_k, res.ids, res.scores,
                            self._work)
                t2 = time.perf_counter()
                self.placement.attend(res, store, top_k)
                t3 = time.perf_counter()
                search_s, attention_s = t2 - t1, t3 - t2
            else:
                t1 = time.perf_counter()
                self._device_second_stage(store, cand, top_k, stream)
                attention_s = time.perf_counter() - t1  # the gather and the device's exact stage
            done = time.perf_counter()
        g, m = self.q.shape[:2]
        return Searched(g * m * c, c / max(len(index), 1), g * m * top_k, search_s, attention_s, done, threads)

    def _buffers(self, c: int, top_k: int, device: torch.device, pinned: bool) -> None:
        """The step's buffers for ``c`` candidates and ``top_k`` results, made when either changes."""
        g, m, d = self.q.shape
        if self._first is not None and self._first[0].shape[2] == c and self._result.ids.shape[2] == top_k:
            return
        self._first = (torch.empty((g, m, c), dtype=torch.float32, device=device),
                       torch.empty((g, m, c), dtype=torch.int64, device=device))
        self._cand = torch.empty((g, m, c), dtype=torch.int64, pin_memory=pinned)
        self._work = (np.empty((g, m, c), np.float32), np.empty((g, m, top_k), np.int64))
        self._result = SearchResult.empty(g, m, top_k)
        self._result_ids = torch.from_numpy(self._result.ids)
        if self.config.retrieved_attention == "device":
            dtype = self.placement.values.dtype
            host = tuple(torch.empty((g, m, c, d), dtype=dtype, pin_memory=pinned) for _ in range(2))
            self._gathered = host + (tuple(torch.empty_like(x, device=device) for x in host) if pinned else host)

    def _candidates(self, index, c: int, top_k: int, stream: torch.cuda.Stream | None) -> torch.Tensor:
        """The first stage on the device, then its ids on the host: (G, group, c) int64."""
        q = self._q_device
        self._buffers(c, top_k, q.device, q.is_cuda)
        with self.timer.span("device_scoring", stream):
            cand = index.candidates(q, c, self._first)  # [G, group, c] on the device
        if stream is None:
            return cand  # already where the rows are
        if self._cand_landed is None:
            self._cand_landed = torch.cuda.Event()
        with self.timer.span("device_to_host", stream):
            self._cand.copy_(cand, non_blocking=True)
        self._cand_landed.record(stream)
        self._cand_landed.synchronize()  # only the first stage and this copy: the window attention may go on
        return self._cand

    def _device_second_stage(self, store: KVStore, cand: torch.Tensor, top_k: int,
                             stream: torch.cuda.Stream | None) -> None:
        """Gather the candidates' rows, move them to the device once, and there take their exact scores,
        the top-k and the attention over it."""
        k_host, v_host, k_dev, v_dev = self._gathered
        t0 = time.perf_counter()
        ids = cand.numpy()
        gather_rows(ids, store.key_source.kernel_rows(), kernel_array(k_host))
        gather_rows(ids, store.kernel_values(), kernel_array(v_host))
        self.timer.seconds["cpu_gather"] = time.perf_counter() - t0
        if stream is not None:
            with self.timer.span("host_to_device", stream):
                k_dev.copy_(k_host, non_blocking=True)
                v_dev.copy_(v_host, non_blocking=True)
        with self.timer.span("device_exact", stream):
            q = self._q_device.float()
            exact = torch.matmul(k_dev.float(), q[..., None])[..., 0]  # [G, group, c]
            scores, best = torch.topk(exact, top_k, dim=-1, sorted=True)  # [G, group, k]
            d = v_dev.shape[-1]
            values = torch.gather(v_dev, 2, best[..., None].expand(*best.shape, d))  # [G, group, k, D]
            self._device_result = scored_attention(scores, values, self.placement.scale)
        if self.config.telemetry or self.config.estimate_tail:  # the rows retrieved: telemetry, the tail excludes them
            self._result_ids.copy_(torch.gather(self._first[1], 2, best).cpu())

    def fetch(self, q: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._device_result is None:
            return super().fetch(q, top_k)
        out, lse = self._device_result
        return out.reshape(q.shape), lse.reshape(q.shape[:3])

