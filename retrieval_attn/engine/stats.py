"""What one engine reports: ``EngineStats`` (where the tokens are, what the last decode step cost) and
``StepTimer``, the split of a decode step into ``STEP_PARTS``.

Owns the step-seconds dict and the CUDA events that time the device side of a step (made at the first
decode, then re-recorded at every step). The other parts of the engine time their own work through
``StepTimer.span``; this module knows nothing about the window, the index, the store or the
retrieval, nor about transformers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

__all__ = ["EngineStats", "STEP_PARTS", "StepTimer"]

# Parts of one layer's decode step timed in ``EngineStats.step_seconds`` (see ``StepTimer``).
STEP_PARTS = (
    "q_wait", "device_to_host", "cpu_search", "cpu_attention", "host_to_device", "device_attention",
    "device_idle", "cpu_idle",
)


@dataclass(frozen=True)
class EngineStats:
    """Where the tokens of one layer are, and what the last decode step cost.

    ``index`` is the backend in use ("" before the first decode builds it; ``auto`` resolved;
    "flat (index building)" while exact search serves until a background build lands).
    ``keys_scanned_last_step`` sums, over all query heads of the batch, the offloaded keys whose score
    the index computed in the last decode step; ``keys_scanned_fraction`` is its mean per query head
    divided by the keys indexed at that moment. ``index_build_seconds`` is the last build's (or
    rebuild's) time; ``index_rebuilds`` counts the background rebuilds swapped in. ``step_seconds``
    splits the last decode step into ``STEP_PARTS`` (``StepTimer`` says what each part is). With
    ``overlap`` the device attention and the two CPU parts run at the same time.
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


class StepTimer:
    """Seconds of each of ``STEP_PARTS`` in the last decode step of one layer.

    - ``q_wait``: the host blocked until q was on the host, beyond the copy itself: the device was
      still computing what comes before this layer's attention (CUDA; 0 elsewhere).
    - ``device_to_host``: the copy of q (and of the step's finiteness flag) to the host.
    - ``cpu_search``, ``cpu_attention``: the index search and the attention over the retrieved rows,
      on the CPU worker.
    - ``host_to_device``: the copy of the retrieved part (out and lse, or scores and values) to the device.
    - ``device_attention``: attention over sink + window on the device.
    - ``device_idle``: the device side waiting for the CPU side: on CUDA from the end of the device
      attention until the retrieved part's copy starts; elsewhere the decoding thread's wait for the worker.
    - ``cpu_idle``: the CPU side waiting for the device side: on CUDA the host's wait for q (q_wait and
      the copy); elsewhere the worker's time between finishing and the device attention finishing.

    Device-side parts are timed between CUDA events on a GPU (read by ``measured``, so the step never
    waits for them), by the wall clock elsewhere. The events are made at the first step that uses
    them and re-recorded at every step after.
    """

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STEP_PARTS, 0.0)  # written by the decoding thread and the CPU worker
        self._events: dict[str, tuple[torch.cuda.Event, torch.cuda.Event]] = {}  # part -> (start, end)
        self._recorded: set[str] = set()  # parts whose events this step recorded

    def start_step(self) -> None:
        """Zero every part: a decode step begins."""
        for part in STEP_PARTS:
            self.seconds[part] = 0.0
        self._recorded.clear()

    @contextmanager
    def span(self, part: str, stream: torch.cuda.Stream | None = None) -> Iterator[None]:
        """Time the block as ``part``: the work it enqueues on the CUDA ``stream`` between events, or (no
        stream) the host's wall-clock time, added to the part."""
        if stream is None:
            t0 = time.perf_counter()
            yield
            self.seconds[part] += time.perf_counter() - t0
            return
        events = self._events.get(part)
        if events is None:  # once per part: the events are reused by every later step
            events = self._events[part] = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        events[0].record(stream)
        yield
        events[1].record(stream)
        self._recorded.add(part)

    def measured(self) -> dict[str, float]:
        """The last decode step's ``STEP_PARTS``, the device-side parts read from their CUDA events (this
        waits for the step's device work)."""
        seconds = dict(self.seconds)
        for part in self._recorded:
            start, end = self._events[part]
            end.synchronize()
            seconds[part] = start.elapsed_time(end) / 1000
        if {"device_attention", "host_to_device"} <= self._recorded:
            gap = self._events["device_attention"][1].elapsed_time(self._events["host_to_device"][0]) / 1000
            seconds["device_idle"] = max(0.0, gap)
        if "device_to_host" in self._recorded:
            seconds["q_wait"] = max(0.0, seconds["cpu_idle"] - seconds["device_to_host"])
        return seconds
