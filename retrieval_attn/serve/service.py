"""What the server does with a request, between the HTTP layer and the model: the model's tokens and
the pool of kept conversations.

``Service.admit`` (called off the event loop) decides everything a request can be refused for before
any model work: the model's name, the requests in flight (``--max-concurrent``: 503), the chat
template, the context (``--max-context``: 400 ``context_length_exceeded``), the memory plan (503
while requests in flight hold the memory, 400 when the request alone does not fit). It then picks the
kept conversation holding the longest prefix of the request, or opens a new one, and starts a
``Job`` that prefills only the tokens the conversation lacks. When the job ends its conversation goes
back to the pool with what it now holds (prompt and every answer token fed), or is dropped when the
prefill did not finish or the job failed (its cache may be out of step).

``ServeSettings`` holds the server's own settings (the retrieval settings are a ``RetrievalConfig``).
Knows nothing about HTTP: the app turns ``APIError`` and the job's callbacks into responses.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..checks import ConfigError, check_choice, check_int
from ..config import RetrievalConfig
from ..planner import resident_bytes
from .pool import ConversationPool, PoolFull, held_bytes
from .protocol import APIError, GenerationRequest, parse_chat, parse_completion
from .scheduler import SCHEDULES, Job, Scheduler

__all__ = ["ServeSettings", "Service"]


@dataclass(frozen=True)
class ServeSettings:
    """The server's settings, checked at construction.

    model_name : the model id clients name (``/v1/models``).
    max_context : tokens one conversation may reach (its cache is planned and reserved for it).
    max_new_tokens : answer tokens of a request that sets no ``max_tokens`` (within the context).
    prefill_chunk : tokens per prefill forward pass, the unit of interleaving with other requests.
    max_conversations : idle conversations kept for reuse.
    max_concurrent : requests in flight; more are refused with 503.
    schedule : ``interleave`` (one forward pass per request in turn) or ``fifo`` (one request at a time).
    api_key : the bearer token every ``/v1`` request must carry (None: none).
    """

    model_name: str
    max_context: int = 8192
    max_new_tokens: int = 256
    prefill_chunk: int = 512
    max_conversations: int = 8
    max_concurrent: int = 16
    schedule: str = "interleave"
    api_key: str | None = None

    def __post_init__(self) -> None:
        own = type(self).__name__
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ConfigError(own, "model_name", "a non-empty string", self.model_name)
        check_int(own, "max_context", self.max_context, 2)
        check_int(own, "max_new_tokens", self.max_new_tokens, 1, self.max_context - 1)
        check_int(own, "prefill_chunk", self.prefill_chunk, 2)
        check_int(own, "max_conversations", self.max_conversations, 0)
        check_int(own, "max_concurrent", self.max_concurrent, 1)
        check_choice(own, "schedule", self.schedule, SCHEDULES)
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ConfigError(own, "api_key", "a non-empty string", "(blank)", none_allowed=True)


class Service:
    """The model, its tokenizer and the pool of conversations, behind ``admit``, ``stats`` and ``health``.

    Parameters
    ----------
    model, tokenizer : a transformers causal LM (loaded, supported by ``RetrievalCache``) and its tokenizer.
    config : the retrieval settings of every conversation's cache.
    settings : the server's settings.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: RetrievalConfig, settings: ServeSettings):
        from ..hf import Decoder, RetrievalCache, greedy, sampler, stop_tokens

        self.model, self.tokenizer, self.config, self.settings = model, tokenizer, config, settings
        self._decoder, self._greedy, self._sampler = Decoder, greedy, sampler

        def new_cache(prompt_tokens: int) -> Any:
            return RetrievalCache(model, config, max_context=settings.max_context, prefill_chunk=settings.prefill_chunk,
                                  prompt_tokens=prompt_tokens)

        self.pool = ConversationPool(new_cache, settings.max_conversations)
        self.scheduler = Scheduler(settings.schedule)
        self.stop_tokens = stop_tokens(model, tokenizer)
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        self.started = time.time()
        self._counts_lock = threading.Lock()
        self.counts = dict.fromkeys(("requests", "refused", "completed", "cancelled", "failed"), 0)

    def count(self, what: str) -> None:
        with self._counts_lock:
            self.counts[what] += 1

    def parse(self, kind: str, body: Any) -> GenerationRequest:
        """A request body checked (``APIError`` 400/404 naming the field); the model's name included."""
        self.count("requests")
        try:
            request = (parse_chat(body, self.settings.max_context) if kind == "chat"
                       else parse_completion(body, self.settings.max_context, self.vocab_size))
            if request.model != self.settings.model_name:
                raise APIError(404, f"model {request.model!r} does not exist: this server serves "
                               f"{self.settings.model_name!r} (GET /v1/models)", param="model", code="model_not_found")
        except APIError:
            self.count("refused")
            raise
        return request

    def _encode(self, request: GenerationRequest) -> tuple[str | None, list[int]]:
        """The request as text (None for token ids) and its token ids, as ``generate`` encodes a prompt."""
        if request.kind == "completion":
            if isinstance(request.prompt, tuple):
                return None, list(request.prompt)
            return request.prompt, self.tokenizer(request.prompt).input_ids
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions", param="messages")
        messages = [dict(m) for m in request.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                     return_dict=True)["input_ids"]
        except Exception as err:  # the template's own checks (jinja raises what the template says)
            raise APIError(400, f"the model's chat template refused these messages: {err}", param="messages") from None
        return text, list(ids)

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def decode_text(self, tokens: list[int]) -> str:
        """Answer tokens as the client sees them (special tokens left out)."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def admit(self, request: GenerationRequest, on_text: Callable[[str], None],
              on_end: Callable[[Job], None]) -> Job:
        """Refuse (``APIError``) or start ``request``; ``on_text`` gets the answer's pieces, ``on_end`` the
        ended job (both in the job's thread)."""
        try:
            return self._admit(request, on_text, on_end)
        except APIError:
            self.count("refused")
            raise

    def _admit(self, request: GenerationRequest, on_text: Callable[[str], None],
               on_end: Callable[[Job], None]) -> Job:
        text, ids = self._encode(request)
        limit = self.settings.max_context
        with self.pool.lock:
            active = self.scheduler.active
            if active >= self.settings.max_concurrent:
                raise APIError(503, f"{active} requests are in progress, the most this server runs at once "
                               f"(--max-concurrent {self.settings.max_concurrent}); retry later", code="server_busy")
            conversation, new = self.pool.find(request.kind, text, ids, self._tokenize)
            held = len(conversation.tokens) if conversation is not None else 0
            room = limit - held - len(new)
            max_tokens = request.max_tokens if request.max_tokens is not None else min(self.settings.max_new_tokens,
                                                                                       room)
            if room < 1 or max_tokens > room:
                raise APIError(400, f"this request holds {held + len(new)} prompt tokens and asks for {max_tokens} "
                               f"answer tokens: {held + len(new) + max_tokens} in all, beyond this server's context of "
                               f"{limit} tokens (--max-context); shorten it or lower max_tokens",
                               param="messages" if request.kind == "chat" else "prompt", code="context_length_exceeded")
            if conversation is None:
                try:
                    conversation = self.pool.open(request.kind, len(new))
                except PoolFull as err:
                    if err.busy:
                        raise APIError(503, f"not enough memory for a new conversation while {err.busy} others are "
                                       f"in use; retry later ({err})", code="server_overloaded") from None
                    raise APIError(400, f"this request does not fit this machine's memory: {err}",
                                   code="context_length_exceeded") from None
            else:
                conversation.busy = True
            choose = self._greedy if request.temperature == 0 else self._sampler(request.temperature, request.top_p,
                                                                                 request.seed)

            def ended(job: Job) -> None:
                self._ended(job, conversation, text)
                on_end(job)

            job = Job(self._decoder(self.model, conversation.cache, self.settings.prefill_chunk),
                      torch.tensor([new], dtype=torch.long), max_tokens, choose, self.stop_tokens, request.stop,
                      self.decode_text, on_text, ended, reused_tokens=held, conversation=conversation.id)
            self.scheduler.start(job)
        return job

    def _ended(self, job: Job, conversation: Any, text: str | None) -> None:
        """Give the conversation back with what its cache now holds, or drop it (prefill cut, or a failure)."""
        self.count("failed" if job.error is not None else "cancelled" if job.finish_reason == "cancelled"
                   else "completed")
        with self.pool.lock:
            keep = job.error is None and job.complete
            if keep:
                raw = self.tokenizer.decode(job.tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                conversation.tokens = conversation.tokens + job.ids[0].tolist() + job.tokens
                conversation.text = None if text is None else text + raw
                conversation.requests += 1
                conversation.reused_tokens += job.reused_tokens
                steps = job.step_seconds[1:] or job.step_seconds  # the first step may build the indexes
                conversation.last = {
                    "prompt_tokens_prefilled": job.ids.shape[1], "reused_tokens": job.reused_tokens,
                    "answer_tokens": len(job.tokens), "finish_reason": job.finish_reason,
                    "first_token_seconds": job.first_token_seconds,
                    "seconds_per_token": sum(steps) / len(steps) if steps else None,
                    "keys_scanned_last_step": sum(s.keys_scanned_last_step for s in conversation.cache.stats),
                }
            self.pool.give_back(conversation, keep)

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.settings.model_name, "active_requests": self.scheduler.active,
                "conversations": len(self.pool.conversations)}

    def stats(self) -> dict[str, Any]:
        """The server's counters and, per kept conversation, where its tokens are and what its last request cost."""
        with self.pool.lock:
            conversations = []
            for c in self.pool.conversations:
                layers = c.cache.stats
                conversations.append({
                    "id": c.id, "kind": c.kind, "busy": c.busy, "tokens": len(c.tokens), "requests": c.requests,
                    "prefill_tokens_saved": c.reused_tokens, "idle_seconds": round(time.monotonic() - c.last_used, 3),
                    "device_tokens": layers[0].device_tokens, "offloaded_tokens": layers[0].offloaded_tokens,
                    "index": layers[0].index, "planned_bytes": c.planned_bytes, "held_bytes": held_bytes(c.cache),
                    "last_request": c.last,
                })
            dropped = self.pool.dropped
        with self._counts_lock:
            counts = dict(self.counts)
        return {"model": self.settings.model_name, "schedule": self.settings.schedule,
                "max_context": self.settings.max_context, "uptime_seconds": round(time.time() - self.started, 3),
                "active_requests": self.scheduler.active, "requests": counts, "conversations_dropped": dropped,
                "planned_bytes": sum(c["planned_bytes"] for c in conversations), "rss_bytes": resident_bytes(),
                "conversations": conversations}
