"""Model work off the event loop: one thread per request, one forward pass at a time, taken in turns.

``Turns`` lets one request at a time run a forward pass of the model. With ``interleave`` (the default
schedule) a request hands the model on after every forward pass (a prefill chunk or a decode step)
to the next request waiting, round-robin, so a short question is answered while another client's long
document is read; ``fifo`` keeps it until the request ends. Each ``Job`` (one request) runs the one
decode driver, ``hf.Decoder``: its prefill in chunks, then its decode steps, with streamed text
(stop strings held back until they cannot begin), cancellation between forward passes (a client
that went away), and what it cost. ``Scheduler`` starts the jobs' threads and cancels them all on
shutdown.

Decode steps of different requests are not batched into one forward pass: each conversation has its
own ``RetrievalCache`` (batch-1 engines), so they run one after the other.

Knows nothing about HTTP or the pool: a job reports through callbacks.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable

import torch

from .protocol import Outcome

__all__ = ["Job", "Scheduler", "Turns"]

SCHEDULES = ("interleave", "fifo")
_STOP = -1  # what the token chooser returns to end an answer (never a token id)


class Cancelled(Exception):
    """The request was cancelled (its client went away, or the server stops) between two forward passes."""


class Turns:
    """One holder of the model at a time; waiters are served in arrival order."""

    def __init__(self, schedule: str = "interleave"):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
        self.interleave = schedule == "interleave"
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()
        self._holder: object | None = None

    def acquire(self, who: object) -> None:
        """Wait for the model, behind every request already waiting."""
        with self._cond:
            self._waiting.append(who)
            self._cond.wait_for(lambda: self._holder is None and self._waiting[0] is who)
            self._waiting.popleft()
            self._holder = who

    def release(self, who: object) -> None:
        with self._cond:
            if self._holder is who:
                self._holder = None
                self._cond.notify_all()

    def pass_on(self, who: object) -> None:
        """Between two forward passes: with ``interleave``, let every waiting request run one first."""
        if not self.interleave:
            return
        with self._cond:
            if not self._waiting:
                return
        self.release(who)
        self.acquire(who)


class Job:
    """One request's model work: prefill ``ids`` through ``decoder`` (its conversation's cache), then decode.

    Parameters
    ----------
    decoder : ``hf.Decoder`` over the conversation's cache.
    ids : the new tokens to prefill, (1, n), n >= 1.
    max_tokens : answer tokens at most.
    choose : token chooser over logits (vocab,) (``hf.greedy`` or ``hf.sampler``).
    stop_tokens : tokens that end the answer (not fed to the cache).
    stop : strings that end the answer (the answer is cut before them).
    decode_text : token ids -> text, as the client sees it.
    on_text : receives each piece of new text (streaming); called in the job's thread.
    on_end : called once in the job's thread when the job ends, however it ends.
    reused_tokens : prompt tokens the cache already held (reported in the usage).
    conversation : the id of the conversation whose cache the decoder runs on (reported).
    """

    def __init__(self, decoder: Any, ids: torch.Tensor, max_tokens: int, choose: Callable[[torch.Tensor], int],
                 stop_tokens: tuple[int, ...], stop: tuple[str, ...], decode_text: Callable[[list[int]], str],
                 on_text: Callable[[str], None], on_end: Callable[[Job], None], reused_tokens: int = 0,
                 conversation: str = ""):
        self.decoder, self.ids, self.max_tokens, self.choose = decoder, ids, max_tokens, choose
        self.stop_tokens, self.stop, self.decode_text = stop_tokens, stop, decode_text
        self.on_text, self.on_end, self.reused_tokens = on_text, on_end, reused_tokens
        self.conversation = conversation  # the id of the kept conversation whose cache it runs on
        self.cancelled = threading.Event()
        self.tokens: list[int] = []  # answer tokens, all fed to the cache
        self.text = ""  # the answer so far as the client sees it (cut before a stop string)
        self.prefilled = 0  # new tokens prefilled so far
        self.step_seconds: list[float] = []
        self.admitted = time.perf_counter()
        self.first_token_seconds: float | None = None  # from admission (waiting for the model included)
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self._decoded = (0, 0)  # TGI-style incremental decoding: (prefix offset, read offset) into tokens
        self._full = ""  # every answer token's text
        self._sent = 0  # characters of _full sent

    @property
    def complete(self) -> bool:
        """Whether the whole prompt was prefilled (the cache holds the prompt and every answer token)."""
        return self.prefilled == self.ids.shape[1]

    def outcome(self) -> Outcome:
        return Outcome(self.text, self.finish_reason or "stop", self.reused_tokens + self.ids.shape[1],
                       len(self.tokens), self.reused_tokens)

    def run(self, turns: Turns) -> None:
        """The job's thread: wait for the model, prefill, decode; ``on_end`` however it ends."""
        try:
            turns.acquire(self)
            try:
                self._work(turns)
            finally:
                turns.release(self)
        except Cancelled:
            self.finish_reason = "cancelled"
        except Exception as err:  # a bug, or a fault of the model or the machine: the request fails alone
            self.error = err
        finally:
            self.on_end(self)

    def _work(self, turns: Turns) -> None:
        if self.cancelled.is_set():
            raise Cancelled

        def after_prefill_pass(tokens: int) -> None:
            self.prefilled += tokens
            if self.cancelled.is_set():
                raise Cancelled
            turns.pass_on(self)

        def after_step(i: int, seconds: float) -> None:
            self.step_seconds.append(seconds)
            turns.pass_on(self)

        logits = self.decoder.prefill(self.ids, progress=after_prefill_pass)
        self.decoder.decode(logits, self.max_tokens, choose=self._choose, stop=(*self.stop_tokens, _STOP),
                            on_token=self._token, on_step=after_step)
        if self.finish_reason is not None:  # a stop string ended it: the text was cut before it
            return
        self.finish_reason = "cancelled" if self.cancelled.is_set() else (
            "length" if len(self.tokens) == self.max_tokens else "stop")
        if self.finish_reason != "cancelled":  # what was held back: an unfinished character, a stop string's start
            prefix, read = self._decoded
            self._full += self.decode_text(self.tokens[prefix:])[len(self.decode_text(self.tokens[prefix:read])):]
            self._send(len(self._full))

    def _choose(self, logits: torch.Tensor) -> int:
        if self.cancelled.is_set() or self.finish_reason is not None:
            return _STOP
        return self.choose(logits)

    def _token(self, token: int) -> None:
        """A chosen answer token (about to be fed): its text, sent unless it may begin a stop string."""
        if self.first_token_seconds is None:
            self.first_token_seconds = time.perf_counter() - self.admitted
        self.tokens.append(token)
        prefix, read = self._decoded
        before = self.decode_text(self.tokens[prefix:read])
        after = self.decode_text(self.tokens[prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):  # an incomplete character: wait for more
            return
        self._full += after[len(before):]
        self._decoded = (read, len(self.tokens))
        found = [i for i in (self._full.find(s, max(0, self._sent - len(s))) for s in self.stop) if i >= 0]
        if found:
            self.finish_reason = "stop"
            self._send(min(found))
            return
        self._send(self._cut())

    def _cut(self) -> int:
        """How much of the text can be sent: all but a tail that may be the beginning of a stop string."""
        end = len(self._full)
        for s in self.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if self._full.endswith(s[:k]):
                    end = min(end, len(self._full) - k)
                    break
        return end

    def _send(self, end: int) -> None:
        if end > self._sent:
            piece = self._full[self._sent:end]
            self._sent = end
            self.text += piece
            self.on_text(piece)


class Scheduler:
    """Starts each job on its own thread, all taking ``Turns`` at the model; cancels them on shutdown."""

    def __init__(self, schedule: str = "interleave"):
        self.turns = Turns(schedule)
        self.schedule = schedule
        self._lock = threading.Lock()
        self._threads: dict[Job, threading.Thread] = {}

    @property
    def active(self) -> int:
        """Jobs started and not ended."""
        with self._lock:
            return len(self._threads)

    def start(self, job: Job) -> None:
        thread = threading.Thread(target=self._run, args=(job,), name="retrieval-attn-serve-job", daemon=True)
        with self._lock:
            self._threads[job] = thread
        thread.start()

    def _run(self, job: Job) -> None:
        try:
            job.run(self.turns)
        finally:
            with self._lock:
                self._threads.pop(job, None)

    def cancel_all(self) -> None:
        """Cancel every job: each stops before its next forward pass."""
        with self._lock:
            jobs = list(self._threads)
        for job in jobs:
            job.cancelled.set()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every job's thread; whether all ended."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return self.active == 0
