"""The host side of a decode step's retrieval: preallocated host buffers (pinned on CUDA), the copy of q
to the host, the CPU worker that searches the index and attends over the retrieved rows, and the
return of the retrieved part to the device on a copy stream.

Owns the CPU worker thread (``_CPU_WORKER``), one layer's host buffers, its copy stream and the
counts of the last search. It reads the index and the store it is handed; it knows nothing about
how the index is built, the device window, or transformers.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..attention import scored_attention
from ..config import RetrievalConfig
from ..index import SearchResult, cpu_threads
from ..offload import KVStore, attend_rows, gather_rows
from ..rows import kernel_array
from .stats import StepTimer

__all__ = ["HostRetrieval"]

# Runs the CPU part of decode steps (overlap); each step waits for its own future, so engines used from
# several threads stay independent.
_CPU_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval-attn-cpu")


class HostRetrieval:
    """The retrieved part of one layer's decode steps: q to the host, search and attention on the CPU,
    the result back to the device.

    Parameters
    ----------
    config : ``top_k`` (sizes the buffers of ``retrieved_attention="device"``), ``retrieved_attention``
        and ``cpu_threads``.
    groups : B * Hkv, the key sets of the store.
    group : query heads per KV head.
    head_dim : D.
    scale : logit scale.
    pin_memory : pin the host buffers (the layer's tensors are on a GPU).
    timer : the engine's ``StepTimer``, credited with the search, the CPU attention and the copies.
    dtype : the store's dtype, that of the values shipped for ``retrieved_attention="device"``.
    """

    def __init__(
        self, config: RetrievalConfig, groups: int, group: int, head_dim: int, scale: float, pin_memory: bool,
        timer: StepTimer, dtype: torch.dtype = torch.float32,
    ):
        self.config, self.scale, self.timer = config, scale, timer
        # q, out: [B * Hkv, group, D], lse: [B * Hkv, group] (row j of group g is query head g % Hkv * group + j)
        self.q = torch.empty((groups, group, head_dim), dtype=torch.float32, pin_memory=pin_memory)
        self.out = torch.empty((groups, group, head_dim), dtype=torch.float32, pin_memory=pin_memory)
        self.lse = torch.empty((groups, group), dtype=torch.float32, pin_memory=pin_memory)
        self.scores: torch.Tensor | None = None  # [B * Hkv, group, top_k], retrieved_attention="device" only
        self.values: torch.Tensor | None = None  # [B * Hkv, group, top_k, D], retrieved_attention="device" only
        if config.retrieved_attention == "device":
            top_k = config.top_k
            self.scores = torch.empty((groups, group, top_k), dtype=torch.float32, pin_memory=pin_memory)
            self.values = torch.empty((groups, group, top_k, head_dim), dtype=dtype, pin_memory=pin_memory)
        self._stream: torch.cuda.Stream | None = None
        self._result: SearchResult | None = None  # the search's output arrays, reused while top_k stays
        self.clear()

    def clear(self) -> None:
        """Forget the last search: a step that retrieves nothing reports zeros."""
        self.scanned = 0  # keys scored, summed over the query heads of the batch
        self.scanned_fraction = 0.0  # their mean per query head over the keys indexed
        self.retrieved = 0  # ids returned, summed over the query heads
        self.ids: torch.Tensor | None = None  # [G, group, top_k] rows retrieved, for telemetry

    def copy_query(self, q: torch.Tensor) -> None:
        """Copy q (B, Hq, 1, D) into the host buffer ``self.q`` and wait until it has landed."""
        t0 = time.perf_counter()
        self.q.copy_(q.reshape(self.q.shape), non_blocking=True)
        if q.is_cuda:
            torch.cuda.current_stream(q.device).synchronize()  # q is on the host before the CPU reads it
        self.timer.seconds["transfer"] += time.perf_counter() - t0

    def start(self, index, store: KVStore, top_k: int) -> Future:
        """``search`` on the CPU worker thread; the caller attends on the device meanwhile, then waits."""
        return _CPU_WORKER.submit(self.search, index, store, top_k)

    def search(self, index, store: KVStore, top_k: int) -> None:
        """Search all heads of the layer for the query in the host buffer, then attend over what was found.

        ``retrieved_attention="cpu"``: writes out and lse to the host buffers; ``"device"``: writes the
        scores and gathers the values of the retrieved rows for the device to attend over.
        """
        with cpu_threads(self.config.cpu_threads):
            t0 = time.perf_counter()
            if self._result is None or self._result.ids.shape[2] != top_k:
                self._result = SearchResult.empty(*self.q.shape[:2], top_k)
                self._result_ids = torch.from_numpy(self._result.ids)  # the same memory, for telemetry
            res = index.search(self.q.numpy(), top_k, out=self._result)  # ids, scores: [B * Hkv, group, top_k]
            t1 = time.perf_counter()
            if self.config.retrieved_attention == "cpu":
                attend_rows(res.scores, res.ids, store.kernel_values(), self.scale, self.out.numpy(), self.lse.numpy())
            else:
                scores, values = self._device_inputs(top_k)
                scores.numpy()[:] = res.scores
                gather_rows(res.ids, store.kernel_values(), kernel_array(values))
            t2 = time.perf_counter()
        self.timer.seconds["cpu_search"], self.timer.seconds["cpu_attention"] = t1 - t0, t2 - t1
        self.scanned = int(res.scored.sum())
        self.scanned_fraction = res.scored_fraction(len(index))
        self.retrieved = int(res.ids.size)
        self.ids = self._result_ids

    def _device_inputs(self, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous views of the host buffers for ``top_k`` rows: scores (G, group, top_k), values
        (G, group, top_k, D)."""
        g, m, d = self.q.shape
        scores = self.scores.view(-1)[: g * m * top_k].view(g, m, top_k)
        values = self.values.view(-1)[: g * m * top_k * d].view(g, m, top_k, d)
        return scores, values

    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        """This layer's CUDA stream for host -> device copies of the retrieved part (created once)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def fetch(self, q: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The retrieved part of the step, after ``search``, on q's device: out (B, Hq, 1, D), lse (B, Hq, 1),
        fp32."""
        t0 = time.perf_counter()
        cpu = self.config.retrieved_attention == "cpu"
        shipped = (self.out, self.lse) if cpu else self._device_inputs(top_k)
        if q.is_cuda:  # on the copy stream, which the compute stream then waits for
            main, stream = torch.cuda.current_stream(q.device), self._copy_stream(q.device)
            with torch.cuda.stream(stream):
                moved = [x.to(q.device, non_blocking=True) for x in shipped]
            main.wait_stream(stream)
            for x in moved:
                x.record_stream(main)
        else:
            moved = [x.to(q.device) for x in shipped]
        if cpu:
            out, lse = moved
        else:
            out, lse = scored_attention(moved[0], moved[1], self.scale)  # [G, group, D], [G, group]
        self.timer.seconds["transfer"] += time.perf_counter() - t0
        return out.reshape(q.shape), lse.reshape(q.shape[:3])
