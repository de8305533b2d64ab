"""The host side of a decode step's retrieval: preallocated host buffers (pinned on CUDA), the copy of q
to the host, the CPU worker that searches the index, and the return of the retrieved part to the
device on a copy stream.

Where the retrieved rows are attended is a *placement* (``RetrievalConfig.retrieved_attention``):
``CpuPlacement`` attends on the CPU worker and ships out and lse of each query head;
``DevicePlacement`` gathers the rows' values there and ships them with their scores, for the device
to attend over. A placement owns the host buffers it ships and says how the landed copies become
(out, lse); ``HostRetrieval`` does the rest the same way for both. The worker returns a ``Searched``
result (counts and seconds) that the decoding thread records; it writes only the placement's host
buffers and the search's result arrays, which the decoding thread reads after waiting for it.

Owns the CPU worker thread (``_CPU_WORKER``), one layer's host buffers, the device buffers the
retrieved part lands in, its copy stream and the counts of the last search. Everything a step uses is
made at the first step that needs it and reused after (the search's result arrays while ``top_k``
stays): a step's work is copies and kernels. It reads the index and the store it is handed; it knows
nothing about how the index is built, the device window, or transformers.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import torch

from ..attention import scored_attention
from ..config import RetrievalConfig
from ..index import SearchResult, ThreadChooser, cpu_threads
from ..offload import KVStore, attend_rows, gather_rows
from ..rows import kernel_array
from .stats import StepTimer

__all__ = ["HostRetrieval", "CpuPlacement", "DevicePlacement", "Searched"]

# Runs the CPU part of decode steps (overlap); each step waits for its own future, so engines used from
# several threads stay independent.
_CPU_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval-attn-cpu")


class Searched(NamedTuple):
    """What the CPU worker's search of one step returns to the decoding thread."""

    scanned: int  # keys scored, summed over the query heads of the batch
    scanned_fraction: float  # their mean per query head over the keys indexed
    retrieved: int  # ids returned, summed over the query heads
    search_seconds: float
    attention_seconds: float  # the placement's CPU work: attention over the rows, or their gather
    done: float  # perf_counter when the worker finished
    threads: int  # the CPU threads it ran with


class CpuPlacement:
    """The retrieved rows are attended on the CPU worker; out [G, group, D] and lse [G, group] (fp32) ship."""

    def __init__(self, groups: int, group: int, head_dim: int, top_k: int, dtype: torch.dtype, pin_memory: bool,
                 scale: float):
        self.scale = scale
        self.out = torch.empty((groups, group, head_dim), dtype=torch.float32, pin_memory=pin_memory)
        self.lse = torch.empty((groups, group), dtype=torch.float32, pin_memory=pin_memory)

    def attend(self, res: SearchResult, store: KVStore, top_k: int) -> None:
        """On the worker: attention over the rows ``res`` found into the host buffers."""
        attend_rows(res.scores, res.ids, store.kernel_values(), self.scale, self.out.numpy(), self.lse.numpy())

    def full(self) -> tuple[torch.Tensor, ...]:
        """Every host buffer that ships, at its full size (the device buffers are made like them)."""
        return self.out, self.lse

    def shipped(self, buffers: tuple[torch.Tensor, ...], top_k: int) -> tuple[torch.Tensor, ...]:
        """The part of ``buffers`` (the host ones, or their device copies) a step of ``top_k`` rows uses."""
        return buffers

    def finish(self, moved: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The landed buffers as out [G, group, D], lse [G, group] fp32."""
        return moved


class DevicePlacement:
    """The worker gathers the retrieved rows' values; scores [G, group, top_k] fp32 and values [G, group,
    top_k, D] (the store's dtype) ship, and the device attends over them."""

    def __init__(self, groups: int, group: int, head_dim: int, top_k: int, dtype: torch.dtype, pin_memory: bool,
                 scale: float):
        self.scale = scale
        self.scores = torch.empty((groups, group, top_k), dtype=torch.float32, pin_memory=pin_memory)
        self.values = torch.empty((groups, group, top_k, head_dim), dtype=dtype, pin_memory=pin_memory)

    def attend(self, res: SearchResult, store: KVStore, top_k: int) -> None:
        scores, values = self.shipped(self.full(), top_k)
        scores.numpy()[:] = res.scores
        gather_rows(res.ids, store.kernel_values(), kernel_array(values))

    def full(self) -> tuple[torch.Tensor, ...]:
        return self.scores, self.values

    def shipped(self, buffers: tuple[torch.Tensor, ...], top_k: int) -> tuple[torch.Tensor, ...]:
        """Contiguous views of scores, values sized for ``config.top_k`` holding ``top_k`` rows."""
        scores, values = buffers
        g, m, _, d = values.shape
        return (scores.view(-1)[: g * m * top_k].view(g, m, top_k),
                values.view(-1)[: g * m * top_k * d].view(g, m, top_k, d))

    def finish(self, moved: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        return scored_attention(moved[0], moved[1], self.scale)  # [G, group, D], [G, group]


PLACEMENTS = {"cpu": CpuPlacement, "device": DevicePlacement}


class HostRetrieval:
    """The retrieved part of one layer's decode steps: q to the host, search (and the placement's CPU work),
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
        self.config, self.timer, self.threads = config, timer, threads
        # q: [B * Hkv, group, D] (row j of group g is query head g % Hkv * group + j)
        self.q = torch.empty((groups, group, head_dim), dtype=torch.float32, pin_memory=pin_memory)
        self.finite = torch.empty((), dtype=torch.bool, pin_memory=pin_memory)  # the step's q, k, v had no NaN/Inf
        self.placement = PLACEMENTS[config.retrieved_attention](groups, group, head_dim, config.top_k, dtype,
                                                                pin_memory, scale)
        self.stream: torch.cuda.Stream | None = None  # host -> device copies, made at the first fetch on CUDA
        self._order: tuple[torch.cuda.Event, torch.cuda.Event] | None = None  # (readers done, copies landed)
        self._landing: tuple[torch.Tensor, ...] | None = None  # device copies of the placement's host buffers
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

    def _threads(self) -> int:
        """The thread count of the next search (picked on the decoding thread)."""
        return self.threads.pick() if isinstance(self.threads, ThreadChooser) else self.threads

    def start(self, index, store: KVStore, top_k: int) -> Future:
        """``search`` on the CPU worker thread; the caller attends on the device meanwhile, then ``wait``s."""
        return _CPU_WORKER.submit(self.search, index, store, top_k, self._threads())

    def wait(self, cpu_part: Future, cuda: bool) -> None:
        """Wait for the worker's ``search`` (re-raising its error) and record it; on a CPU-only machine, time
        the wait as the device side's idle time and the worker's lead as the CPU side's."""
        t0 = time.perf_counter()
        searched = cpu_part.result()
        if not cuda:
            self.timer.seconds["device_idle"] += time.perf_counter() - t0
            self.timer.seconds["cpu_idle"] += max(0.0, t0 - searched.done)
        self.record(searched)

    def run(self, index, store: KVStore, top_k: int) -> None:
        """``search`` on this thread, recorded."""
        self.record(self.search(index, store, top_k, self._threads()))

    def search(self, index, store: KVStore, top_k: int, threads: int) -> Searched:
        """Search all heads of the layer for the query in the host buffer, then the placement's CPU work over
        what was found (into its host buffers), on ``threads`` CPU threads."""
        with cpu_threads(threads):
            t0 = time.perf_counter()
            if self._result is None or self._result.ids.shape[2] != top_k:
                self._result = SearchResult.empty(*self.q.shape[:2], top_k)
                self._result_ids = torch.from_numpy(self._result.ids)
            res = index.search(self.q.numpy(), top_k, out=self._result)  # ids, scores: [B * Hkv, group, top_k]
            t1 = time.perf_counter()
            self.placement.attend(res, store, top_k)
            t2 = time.perf_counter()
        return Searched(int(res.scored.sum()), res.scored_fraction(len(index)), int(res.ids.size), t1 - t0, t2 - t1,
                        t2, threads)

    def record(self, searched: Searched) -> None:
        """Take in a finished search's counts and times (on the decoding thread)."""
        self.timer.seconds["cpu_search"] = searched.search_seconds
        self.timer.seconds["cpu_attention"] = searched.attention_seconds
        if isinstance(self.threads, ThreadChooser):
            self.threads.record(searched.threads, searched.search_seconds + searched.attention_seconds)
        self.scanned, self.scanned_fraction, self.retrieved = searched[:3]
        self.ids = self._result_ids

    def _landing_buffers(self, device: torch.device, top_k: int) -> tuple[torch.Tensor, ...]:
        """Device buffers the shipped host buffers are copied into, made at the first fetch and reused."""
        if self._landing is None:
            self._landing = tuple(torch.empty_like(x, device=device) for x in self.placement.full())
        return self.placement.shipped(self._landing, top_k)

    def fetch(self, q: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The retrieved part of the step, after ``search``, on q's device: out (B, Hq, 1, D), lse (B, Hq, 1),
        fp32.

        On CUDA the host buffers are copied into this layer's device buffers on its copy stream, which
        first waits for the compute stream (the previous step's readers of those buffers are done) and
        which the compute stream then waits for (nothing reads them before they land). Elsewhere the
        host buffers are used as they are.
        """
        shipped = self.placement.shipped(self.placement.full(), top_k)
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
        out, lse = self.placement.finish(moved)
        return out.reshape(q.shape), lse.reshape(q.shape[:3])
