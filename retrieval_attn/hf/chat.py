"""``Chat``: a conversation about long documents through one cache, the documents read once.

The documents open the first user message of the conversation. ``Chat.start`` prefills them, with the
chat template's beginning (``chat_opening``), before the first question; each ``ask`` then renders the
whole conversation with the tokenizer's chat template and prefills only what the cache has not seen
(the end of the last answer's message, the question, the assistant's header), as ``generate`` does
with the ids so far plus a new turn, then decodes the answer through ``Decoder``. The text the cache
holds must be a prefix of the new rendering: a template that rewrites earlier turns (trimming
answers, dropping them) is refused with a clear error, never mixed with what the cache holds.

A ``RetrievalCache`` keeps the documents offloaded and retrieved (each turn's prefill is exact over
them); any transformers cache works (``DynamicCache``: the reference). Prints nothing: the CLI's
``chat`` reads the turns, streams the answers and shows ``TurnStats``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..checks import check_int
from .generate import Decoder, greedy

__all__ = ["Chat", "TurnStats", "chat_opening"]

_MARK = "\x00question\x00"  # where the first question goes in the rendered opening
_INTERRUPTED = -1  # what the token chooser returns to end an interrupted answer (never a token id)


def _first_message(documents: str, question: str) -> str:
    """The first user message: the documents, then the question."""
    return f"{documents}\n\n{question}" if documents else question


def chat_opening(tokenizer: Any, documents: str) -> str:
    """The conversation rendered by ``tokenizer``'s chat template up to where the first question goes:
    the template's beginning (system prompt, the user's header) and the documents."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _first_message(documents, _MARK)}], tokenize=False, add_generation_prompt=False
    )
    if _MARK not in text:
        raise ValueError("the tokenizer's chat template does not render the user's message verbatim")
    return text[: text.index(_MARK)]


@dataclass
class TurnStats:
    """What one turn cost: tokens prefilled (the turn's new tokens), seconds to the first answer token
    (that prefill), and per decode step its seconds and the keys scanned (all layers and heads)."""

    prompt_tokens: int
    first_token_seconds: float
    step_seconds: list[float] = field(default_factory=list)
    keys_scanned: list[int] = field(default_factory=list)
    interrupted: bool = False

    @property
    def answer_tokens(self) -> int:
        return len(self.step_seconds)


class Chat:
    """A conversation with ``model`` about ``documents`` through ``cache``.

    Parameters
    ----------
    model, tokenizer : a transformers causal LM and its tokenizer, which has a chat template.
    cache : the cache of every forward pass (``RetrievalCache``, ``DynamicCache``, ...); empty.
    documents : text opening the first user message ("" for none).
    max_context : tokens the conversation may reach (the cache's plan); a turn beyond it is refused
        and answers stop there. None: unbounded.
    prefill_chunk : tokens per prefill forward pass (>= 2).
    max_new_tokens : answer tokens at most per turn (>= 1).
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, cache: Any, documents: str = "", *,
        max_context: int | None = None, prefill_chunk: int = 512, max_new_tokens: int = 256,
    ):
        check_int("", "max_new_tokens", max_new_tokens, 1)
        check_int("", "max_context", max_context, 2, none_allowed=True)
        self.tokenizer, self.cache, self.documents = tokenizer, cache, documents
        self.max_context, self.max_new_tokens = max_context, max_new_tokens
        self.decoder = Decoder(model, cache, prefill_chunk)
        self.opening = chat_opening(tokenizer, documents)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.stop = tuple(dict.fromkeys(eos))  # tokens that end an answer (not fed to the cache)
        self._clear()

    def _clear(self) -> None:
        """No conversation: nothing held, no turn."""
        self.messages: list[dict[str, str]] = []
        self.exchanges: list[tuple[str, str]] = []  # (question, answer) of each turn
        self.turns: list[TurnStats] = []
        self.held: list[int] = []  # token ids the cache holds, in order
        self._text = ""  # the rendering of the conversation they were cut from
        self._logits: torch.Tensor | None = None  # of the last position held

    def reset(self) -> None:
        """Forget the conversation and the documents (the cache too); ``start`` reads them again."""
        self.cache.reset()
        self._clear()

    def start(self, progress: Callable[[int], None] | None = None) -> int:
        """Prefill the opening (the template's beginning and the documents); returns its tokens.
        ``progress(tokens)`` after each forward pass."""
        if self.held:
            raise ValueError("the conversation has started; reset() before start()")
        return self._feed(self.opening, progress)

    def _feed(self, text: str, progress: Callable[[int], None] | None = None) -> int:
        """Prefill the tokens of ``text`` (the conversation rendered so far) that the cache has not seen;
        returns how many."""
        if not text.startswith(self._text):
            raise ValueError(
                "the chat template renders the earlier turns differently from what the cache holds "
                "(it rewrites past messages); such a template cannot continue a conversation"
            )
        ids = self.tokenizer(text[len(self._text) :], add_special_tokens=False, return_tensors="pt").input_ids  # [1, n]
        n = ids.shape[1]
        if self.max_context is not None and len(self.held) + n >= self.max_context:
            raise ValueError(
                f"this turn would bring the conversation to {len(self.held) + n} tokens, beyond max_context="
                f"{self.max_context} (room for one answer token included); reset, or plan a larger context"
            )
        if n:
            self._logits = self.decoder.prefill(ids, progress=progress)
        self.held += ids[0].tolist()
        self._text = text
        return n

    def ask(
        self, question: str, on_token: Callable[[str], None] | None = None,
        interrupted: Callable[[], bool] = lambda: False,
    ) -> str:
        """Prefill the turn's new tokens and decode the answer greedily; returns it.

        ``on_token(text)`` receives the answer's new text as it is decoded (streaming). When
        ``interrupted()`` turns true, the answer ends before its next token and the session goes on:
        the cache holds the tokens decoded so far, which the next turn continues.
        """
        if not self.held:
            self.start()
        content = question if self.messages else _first_message(self.documents, question)
        self.messages.append({"role": "user", "content": content})
        start = time.perf_counter()
        try:
            rendered = self.tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)
            n = self._feed(rendered)
        except ValueError:
            self.messages.pop()
            raise
        self.decoder.synchronize()
        turn = TurnStats(prompt_tokens=n, first_token_seconds=time.perf_counter() - start)
        tokens: list[int] = []
        shown = ""

        def choose(logits: torch.Tensor) -> int:
            turn.interrupted = turn.interrupted or interrupted()
            return _INTERRUPTED if turn.interrupted else greedy(logits)

        def token(t: int) -> None:
            nonlocal shown
            tokens.append(t)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if on_token is not None and len(text) > len(shown):
                on_token(text[len(shown) :])
            shown = text

        def step(i: int, seconds: float) -> None:
            turn.step_seconds.append(seconds)
            stats = getattr(self.cache, "stats", ())  # RetrievalCache: per-layer EngineStats
            turn.keys_scanned.append(sum(s.keys_scanned_last_step for s in stats))

        room = self.max_new_tokens if self.max_context is None else self.max_context - len(self.held)
        self.decoder.decode(self._logits, min(self.max_new_tokens, room), choose=choose,
                            stop=(*self.stop, _INTERRUPTED), on_token=token, on_step=step)
        raw = self.tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        self.held += tokens
        self._text += raw  # what the cache holds; the template renders the message verbatim after it
        self.messages.append({"role": "assistant", "content": raw})
        self.exchanges.append((question, shown))
        self.turns.append(turn)
        return shown
