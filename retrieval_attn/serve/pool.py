"""The kept conversations: caches keyed by the tokens they hold, reused by the requests that extend them.

A ``Conversation`` is one ``RetrievalCache`` (its middle offloaded to the CPU store and indexed), the
token ids it holds, and the text they were cut from. ``ConversationPool.find`` picks, among the idle
conversations, the one holding the longest prefix of a request: the request's text starts with the
conversation's text (the client sent back the answer it got; only the rest is tokenized), or its token
ids start with the conversation's ids. Only the new tokens are then prefilled: the multi-turn path.

``open`` makes a new conversation's cache; its memory plan (``RetrievalCache(max_context=...)``) is
checked against the host's available memory plus the room every kept conversation may still grow
into, and least-recently-used idle conversations are dropped until it fits. ``PoolFull`` says why
nothing more could be dropped. At most ``max_kept`` conversations are kept idle.

Knows nothing about HTTP or the model's forward: caches come from a factory.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..checks import check_int
from ..planner import MemoryBudgetError, available_cpu_bytes

__all__ = ["Conversation", "ConversationPool", "PoolFull", "conversation_bytes"]


class PoolFull(Exception):
    """A new conversation does not fit in memory, and no idle conversation is left to drop."""

    def __init__(self, message: str, busy: int):
        super().__init__(message)
        self.busy = busy  # conversations in use by requests in flight (their memory comes back when they end)


def conversation_bytes(plan: Any) -> int:
    """Host bytes one conversation's cache holds at its planned size: every item of its plan that is not
    transient and not the (shared) weights; on a CPU device, the device side is host memory too."""
    if plan is None:
        return 0
    items = {**plan.cpu, **(plan.device if plan.device_kind == "cpu" else {})}
    return sum(v for k, v in items.items() if k != "weights" and not k.endswith("(transient)"))


def held_bytes(cache: Any) -> int:
    """Bytes a cache holds now, on the host (and the device, counted when it is the CPU)."""
    return sum(s.cpu_bytes + s.device_bytes for s in getattr(cache, "stats", ()))


@dataclass(eq=False)
class Conversation:
    """One kept cache, the token ids it holds, the text they were cut from (None: ids given by the client)."""

    id: str
    kind: str  # "chat" or "completion": texts of the two kinds are not comparable
    cache: Any
    planned_bytes: int
    tokens: list[int] = field(default_factory=list)
    text: str | None = ""
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)
    requests: int = 0
    reused_tokens: int = 0  # prompt tokens that requests found in this cache, summed
    last: dict[str, Any] = field(default_factory=dict)  # what its last request cost


class ConversationPool:
    """Kept conversations, dropped least-recently-used for memory or beyond ``max_kept`` idle ones.

    Parameters
    ----------
    new_cache : prompt tokens -> a new empty cache planned for them (``RetrievalCache`` with
        ``max_context``; raises ``MemoryBudgetError`` when its plan does not fit).
    max_kept : idle conversations kept at most (>= 0).
    available : bytes the host can still give (``planner.available_cpu_bytes``).
    """

    def __init__(self, new_cache: Callable[[int], Any], max_kept: int,
                 available: Callable[[], int] = available_cpu_bytes):
        check_int("", "max_kept", max_kept, 0)
        self.new_cache, self.max_kept, self.available = new_cache, max_kept, available
        self.lock = threading.RLock()  # held by the caller around find, open and give_back
        self.conversations: list[Conversation] = []
        self.dropped = 0  # conversations dropped (memory, max_kept, failed requests)
        self._ids = itertools.count(1)

    @property
    def busy(self) -> int:
        return sum(c.busy for c in self.conversations)

    def find(self, kind: str, text: str | None, ids: list[int],
             tokenize: Callable[[str], list[int]]) -> tuple[Conversation | None, list[int]]:
        """The idle conversation holding the longest prefix of a request (text ``text``, token ids ``ids``)
        and the request's tokens it lacks; (None, ids) when none does. Marks nothing."""
        best: tuple[Conversation | None, list[int]] = (None, ids)
        for c in self.conversations:
            if c.busy or c.kind != kind or (best[0] is not None and len(c.tokens) <= len(best[0].tokens)):
                continue
            if text is not None and c.text is not None and len(text) > len(c.text) and text.startswith(c.text):
                best = (c, tokenize(text[len(c.text):]))
            elif len(ids) > len(c.tokens) and ids[: len(c.tokens)] == c.tokens:
                best = (c, ids[len(c.tokens):])
        return best

    def open(self, kind: str, prompt_tokens: int) -> Conversation:
        """A new conversation for a first prompt of ``prompt_tokens`` tokens, dropping idle ones (least
        recently used first) until its plan fits; ``PoolFull`` when it cannot."""
        self._drop_beyond(self.max_kept - 1)
        while True:
            try:
                cache = self.new_cache(prompt_tokens)
                planned = conversation_bytes(getattr(cache, "memory_plan", None))
                growth = sum(max(0, c.planned_bytes - held_bytes(c.cache)) for c in self.conversations)
                if planned + growth <= self.available():
                    break
                why = (f"a new conversation plans {planned / 2**30:.2f} GiB and the {len(self.conversations)} kept "
                       f"ones may still grow by {growth / 2**30:.2f} GiB, beyond the "
                       f"{self.available() / 2**30:.2f} GiB available")
                del cache
            except MemoryBudgetError as err:
                why = str(err)
            victim = self._least_recent()
            if victim is None:
                raise PoolFull(why, self.busy)
            self._drop(victim)
        conversation = Conversation(f"conv-{next(self._ids)}", kind, cache, planned, busy=True)
        self.conversations.append(conversation)
        return conversation

    def give_back(self, conversation: Conversation, keep: bool) -> None:
        """A request ended with ``conversation``: keep it idle (its tokens and text updated by the caller) or
        drop it; then drop the least recently used beyond ``max_kept``."""
        conversation.busy = False
        conversation.last_used = time.monotonic()
        if not keep and conversation in self.conversations:
            self._drop(conversation)
        self._drop_beyond(self.max_kept)

    def _least_recent(self) -> Conversation | None:
        idle = [c for c in self.conversations if not c.busy]
        return min(idle, key=lambda c: c.last_used) if idle else None

    def _drop_beyond(self, kept: int) -> None:
        while sum(not c.busy for c in self.conversations) > max(kept, 0):
            self._drop(self._least_recent())

    def _drop(self, conversation: Conversation) -> None:
        """Forget a conversation and free its cache now (its CPU store and index)."""
        self.conversations.remove(conversation)
        if conversation.cache is not None and hasattr(conversation.cache, "reset"):
            conversation.cache.reset()
        conversation.cache = None
        self.dropped += 1
