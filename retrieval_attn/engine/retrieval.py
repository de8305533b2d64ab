"""The host side of a decode step's retrieval: preallocated host buffers (pinned on CUDA), the copy of q
to the host, the CPU worker that searches the index and attends over the retrieved rows, and the
return of the retrieved part to the device on a copy stream.

Owns the CPU worker thread (``_CPU_WORKER``), one layer's host buffers, the device buffers the
retrieved part lands in, its copy stream and the counts of the last search. Everything a step uses is
made at the first step that needs it and reused after (the search's result arrays while ``top_k``
stays): a step's work is copies and kernels. It reads the index and the store it is handed; it knows
nothing about how the index is built, the device window, or transformers.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..attention import scored_attention
from ..config import RetrievalConfig
from ..index import SearchResult, ThreadChooser, cpu_threads
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
    config : ``top_k`` (sizes the buffers of ``retrieved_attention="device"``), ``retrieved_attention``.
    groups : B * Hkv, the key sets of the store.
    group : query heads per KV head.
    head_dim : D.
    scale : logit scale.
    pin_memory : pin the host buffers (the layer's tensors are on a GPU).
    timer : the engine's ``StepTimer``, credited with the copies, the search, the CPU attention and the waits.
    dtype : the store's dtype, that of the values shipped for ``retrieved_attention="device"``.
    threads : the CPU threads of the search and the attention: an int (``RetrievalConfig.cpu_threads``),
        or a ``ThreadChooser`` that picks them call by call.
    """

    def __init__(
        self, config: RetrievalConfig, groups: int, group: int, head_dim: int, scale: float, pin_memory: bool,
        timer: StepTimer, dtype: torch.dtype = torch.float32, threads: int | ThreadChooser = 1,
    ):
        self.config, self.scale, self.timer, self.threads = config, scale, timer, threads
        # q, out: [B * Hkv, group, D], lse: [B * Hkv, group] (row j of group g is query head g % Hkv * group + j)
        self.q = torch.empty((groups, group, head_dim), dtype=torch.float32, pin_memory=pin_memory)
        self.out = torch.empty((groups, group, head_dim), dtype=torch.float32, pin_memory=pin_memory)
        self.lse = torch.empty((groups, group), dtype=torch.float32, pin_memory=pin_memory)
        self.finite = torch.empty((), dtype=torch.bool, pin_memory=pin_memory)  # the step's q, k, v had no NaN/Inf
        self.scores: torch.Tensor | None = None  # [B * Hkv, group, top_k], retrieved_attention="device" only
        self.values: torch.Tensor | None = None  # [B * Hkv, group, top_k, D], retrieved_attention="device" only
        if config.retrieved_attention == "device":
            top_k = config.top_k
            self.scores = torch.empty((groups, group, top_k), dtype=torch.float32, pin_memory=pin_memory)
            self.values = torch.empty((groups, group, top_k, head_dim), dtype=dtype, pin_memory=pin_memory)
        self.stream: torch.cuda.Stream | None = None  # host -> device copies, made at the first fetch on CUDA
        self._order: tuple[torch.cuda.Event, torch.cuda.Event] | None = None  # (readers done, copies landed)
        self._landing: tuple[torch.Tensor, ...] | None = None  # device copies of the shipped host buffers
        self._result: SearchResult | None = None  # the search's output arrays, reused while top_k stays
        self._result_ids: torch.Tensor | None = None  # _result.ids as a tensor (the same memory), for telemetry
        self._done = 0.0  # perf_counter when the worker finished its last search
        self.clear()

    @property
    def thread_count(self) -> int:
        """The CPU threads the search uses now (``ThreadChooser.current``, or the fixed count)."""
        return self.threads.current if isinstance(self.threads, ThreadChooser) else self.threads

    def clear(self) -> None:
        """Forget the last search: a step that retrieves nothing reports zeros."""
        self.scanned = 0  # keys scored, summed over the query heads of the batch
        self.scanned_fraction = 0.0  # their mean per query head over the keys indexed
        self.retrieved = 0  # ids returned, summed over the query heads
        self.ids: torch.Tensor | None = None  # [G, group, top_k] rows retrieved, for telemetry

    def to_host(self, q: torch.Tensor | None, finite: torch.Tensor) -> bool:
        """Copy q (B, Hq, 1, D) into ``self.q`` (when the step searches; None: it does not) and the step's
        0-d finiteness flag into ``self.finite``, and wait until both have landed: the one device sync
        of the step on a GPU, which also covers every copy enqueued before it on the same stream (the
        rows spilled to the store). Returns the flag."""
        stream = torch.cuda.current_stream(finite.device) if finite.is_cuda else None
        with self.timer.span("device_to_host", stream):
            if q is not None:
                self.q.copy_(q.reshape(self.q.shape), non_blocking=True)
            self.finite.copy_(finite, non_blocking=True)
        if stream is not None:
            with self.timer.span("cpu_idle"):
                stream.synchronize()  # q is on the host before the CPU reads it
        return bool(self.finite)

    def start(self, index, store: KVStore, top_k: int) -> Future:
        """``search`` on the CPU worker thread; the caller attends on the device meanwhile, then ``wait``s."""
        return _CPU_WORKER.submit(self.search, index, store, top_k)

    def wait(self, cpu_part: Future, cuda: bool) -> None:
        """Wait for the worker's ``search`` (re-raising its error); on a CPU-only machine, time the wait as
        the device side's idle time and the worker's lead as the CPU side's."""
        t0 = time.perf_counter()
        cpu_part.result()
        if not cuda:
            t1 = time.perf_counter()
            self.timer.seconds["device_idle"] += t1 - t0
            self.timer.seconds["cpu_idle"] += max(0.0, t0 - self._done)

    def search(self, index, store: KVStore, top_k: int) -> None:
        """Search all heads of the layer for the query in the host buffer, then attend over what was found.

        ``retrieved_attention="cpu"``: writes out and lse to the host buffers; ``"device"``: writes the
        scores and gathers the values of the retrieved rows for the device to attend over.
        """
        chooser = self.threads if isinstance(self.threads, ThreadChooser) else None
        threads = chooser.pick() if chooser is not None else self.threads
        with cpu_threads(threads):
            t0 = time.perf_counter()
            if self._result is None or self._result.ids.shape[2] != top_k:
                self._result = SearchResult.empty(*self.q.shape[:2], top_k)
                self._result_ids = torch.from_numpy(self._result.ids)
            res = index.search(self.q.numpy(), top_k, out=self._result)  # ids, scores: [B * Hkv, group, top_k]
            t1 = time.perf_counter()
            if self.config.retrieved_attention == "cpu":
                attend_rows(res.scores, res.ids, store.kernel_values(), self.scale, self.out.numpy(), self.lse.numpy())
            else:
                scores, values = self._host_inputs(top_k)
                scores.numpy()[:] = res.scores
                gather_rows(res.ids, store.kernel_values(), kernel_array(values))
            t2 = time.perf_counter()
        self.timer.seconds["cpu_search"], self.timer.seconds["cpu_attention"] = t1 - t0, t2 - t1
        self._done = t2
        if chooser is not None:
            chooser.record(threads, t2 - t0)
        self.scanned = int(res.scored.sum())
        self.scanned_fraction = res.scored_fraction(len(index))
        self.retrieved = int(res.ids.size)
        self.ids = self._result_ids

    @staticmethod
    def _views(scores: torch.Tensor, values: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous views of buffers sized for ``config.top_k`` holding ``top_k`` rows: scores (G, group,
        top_k), values (G, group, top_k, D)."""
        g, m, _, d = values.shape
        return (scores.view(-1)[: g * m * top_k].view(g, m, top_k),
                values.view(-1)[: g * m * top_k * d].view(g, m, top_k, d))

    def _host_inputs(self, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The host buffers of ``retrieved_attention="device"`` for ``top_k`` rows."""
        return self._views(self.scores, self.values, top_k)

    def _shipped(self, top_k: int) -> tuple[torch.Tensor, ...]:
        """The host buffers that go to the device: out and lse, or scores and values of ``top_k`` rows."""
        return (self.out, self.lse) if self.config.retrieved_attention == "cpu" else self._host_inputs(top_k)

    def _landing_buffers(self, device: torch.device, top_k: int) -> tuple[torch.Tensor, ...]:
        """Device buffers the shipped host buffers are copied into, made at the first fetch and reused."""
        if self._landing is None:
            full = (self.out, self.lse) if self.config.retrieved_attention == "cpu" else (self.scores, self.values)
            self._landing = tuple(torch.empty_like(x, device=device) for x in full)
        if self.config.retrieved_attention == "cpu":
            return self._landing
        return self._views(*self._landing, top_k)

    def fetch(self, q: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The retrieved part of the step, after ``search``, on q's device: out (B, Hq, 1, D), lse (B, Hq, 1),
        fp32.

        On CUDA the host buffers are copied into this layer's device buffers on its copy stream, which
        first waits for the compute stream (the previous step's readers of those buffers are done) and
        which the compute stream then waits for (nothing reads them before they land). Elsewhere the
        host buffers are used as they are.
        """
        shipped = self._shipped(top_k)
        if q.is_cuda:
            main = torch.cuda.current_stream(q.device)
            if self.stream is None:  # made once: the copy stream and the events that order it with ``main``
                self.stream = torch.cuda.Stream(q.device)
                self._order = (torch.cuda.Event(), torch.cuda.Event())
            readers_done, landed = self._order
            moved = self._landing_buffers(q.device, top_k)
            readers_done.record(main)
            self.stream.wait_event(readers_done)
            with torch.cuda.stream(self.stream), self.timer.span("host_to_device", self.stream):
                for dst, src in zip(moved, shipped):
                    dst.copy_(src, non_blocking=True)
            landed.record(self.stream)
            main.wait_event(landed)
        else:
            with self.timer.span("host_to_device"):
                moved = tuple(x.to(q.device) for x in shipped)  # the host buffers themselves on a CPU device
        if self.config.retrieved_attention == "cpu":
            out, lse = moved
        else:
            out, lse = scored_attention(moved[0], moved[1], self.scale)  # [G, group, D], [G, group]
        return out.reshape(q.shape), lse.reshape(q.shape[:3])
