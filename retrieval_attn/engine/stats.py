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
    "device_idle", "cpu_idle", "device_scoring", "cpu_gather", "device_exact",
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
    - ``device_scoring``, ``cpu_gather``, ``device_exact``: a device-selecting index's (``sketch``,
      ``engine.selection``) first stage over every key's code on the device; the gather of its
      candidates' rows on the CPU and their exact scores, top-k and attention on the device
      (``retrieved_attention="device"``). Zero for the other indexes.

    Device-side parts are timed between CUDA events on a GPU (read by ``measured``, so the step never
    waits for them), by the wall clock elsewhere. Two sets of seconds and events take turns, one step
    each: ``cancel_step`` puts back the last step's after a step refused before it did anything. The
    events are made at the first steps that use them and re-recorded at every step after.
    """

    def __init__(self) -> None:
        self._seconds = (dict.fromkeys(STEP_PARTS, 0.0), dict.fromkeys(STEP_PARTS, 0.0))
        # per set: part -> CUDA (start, end) events, and the parts whose events its step recorded
        self._events: tuple[dict[str, tuple[torch.cuda.Event, torch.cuda.Event]], ...] = ({}, {})
        self._recorded: tuple[set[str], set[str]] = (set(), set())
        self._turn = 0  # the set of the step in progress (or, between steps, of the last one)

    @property
    def seconds(self) -> dict[str, float]:
        """The parts of the current step, written by the decoding thread and the CPU worker."""
        return self._seconds[self._turn]

    def start_step(self) -> None:
        """A decode step begins: the other set, zeroed, takes its parts."""
        self._turn ^= 1
        for part in STEP_PARTS:
            self._seconds[self._turn][part] = 0.0
        self._recorded[self._turn].clear()

    def cancel_step(self) -> None:
        """The step just begun was refused: the last step's parts are the ones reported again."""
        self._turn ^= 1

    @contextmanager
    def span(self, part: str, stream: torch.cuda.Stream | None = None) -> Iterator[None]:
        """Time the block as ``part``: the work it enqueues on the CUDA ``stream`` between events, or (no
        stream) the host's wall-clock time, added to the part."""
        if stream is None:
            t0 = time.perf_counter()
            yield
            self.seconds[part] += time.perf_counter() - t0
            return
        events = self._events[self._turn].get(part)
        if events is None:  # once per part and set: the events are reused by every later step
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[self._turn][part] = events
        events[0].record(stream)
        yield
        events[1].record(stream)
        self._recorded[self._turn].add(part)

    def measured(self) -> dict[str, float]:
        """The last decode step's ``STEP_PARTS``, the device-side parts read from their CUDA events (this
        waits for the step's device work)."""
        seconds = dict(self.seconds)
        events, recorded = self._events[self._turn], self._recorded[self._turn]
        for part in recorded:
            start, end = events[part]
            end.synchronize()
            seconds[part] = start.elapsed_time(end) / 1000
        if {"device_attention", "host_to_device"} <= recorded:
            gap = events["device_attention"][1].elapsed_time(events["host_to_device"][0]) / 1000
            seconds["device_idle"] = max(0.0, gap)
        if "device_to_host" in recorded:
            seconds["q_wait"] = max(0.0, seconds["cpu_idle"] - seconds["device_to_host"])
        return seconds
