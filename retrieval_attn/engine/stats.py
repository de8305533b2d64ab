"""What one engine reports: ``EngineStats`` (where the tokens are, what the last decode step cost) and
``StepTimer``, the split of a decode step into ``STEP_PARTS``.

Owns the step-seconds dict and the CUDA events that time the device attention. The other parts of the
engine write their own seconds into ``StepTimer.seconds``; this module knows nothing about the window,
the index, the store or the retrieval, nor about transformers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

__all__ = ["EngineStats", "STEP_PARTS", "StepTimer"]

# Parts of a decode step timed in ``EngineStats.step_seconds``.
STEP_PARTS = ("device_attention", "cpu_search", "cpu_attention", "transfer")


@dataclass(frozen=True)
class EngineStats:
    """Where the tokens of one layer are, and what the last decode step cost.

    ``index`` is the backend in use ("" before the first decode builds it; ``auto`` resolved;
    "flat (index building)" while exact search serves until a background build lands).
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


class StepTimer:
    """Seconds of each of ``STEP_PARTS`` in the last decode step."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STEP_PARTS, 0.0)  # written by the decoding thread and the CPU worker
        # CUDA (start, end) events of the last device attention
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None

    def start_step(self) -> None:
        """Zero every part: a decode step begins."""
        self.seconds = dict.fromkeys(STEP_PARTS, 0.0)

    @contextmanager
    def device_attention(self, cuda: bool) -> Iterator[None]:
        """Time the block as the step's device attention: between CUDA events on a GPU (read by
        ``measured``, so the step does not wait for them), by the wall clock elsewhere."""
        if cuda:
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            events[0].record()
        t0 = time.perf_counter()
        yield
        if cuda:
            events[1].record()
            self._events = events
        else:
            self.seconds["device_attention"] = time.perf_counter() - t0

    def measured(self) -> dict[str, float]:
        """The last decode step's ``STEP_PARTS``, the device attention read from its CUDA events if any."""
        seconds = dict(self.seconds)
        if self._events is not None:
            self._events[1].synchronize()
            seconds["device_attention"] = self._events[0].elapsed_time(self._events[1]) / 1000
        return seconds
