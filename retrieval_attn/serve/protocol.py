"""The OpenAI wire format: request bodies checked field by field, errors as OpenAI's JSON, response bodies.

``parse_chat`` and ``parse_completion`` turn a decoded JSON body into a ``GenerationRequest`` or raise
``APIError`` (status 4xx, OpenAI's ``{"error": {"message", "type", "param", "code"}}``) naming the field
and what it allows, before any model work. ``completion_body``, ``chunk_body`` and ``usage_body`` build
what the server answers, for ``/v1/chat/completions`` and ``/v1/completions`` alike.

Knows nothing about models, tokenizers or HTTP: plain dicts in, dataclasses and dicts out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["APIError", "GenerationRequest", "Outcome", "chunk_body", "completion_body", "parse_chat",
           "parse_completion", "usage_body"]

MAX_STOP = 4  # stop sequences at most, as OpenAI allows
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# fields a client may send that change what OpenAI would answer, and the value this server supports
UNSUPPORTED = {"n": 1, "best_of": 1, "logprobs": None, "top_logprobs": None, "echo": False, "suffix": None,
               "tools": None, "functions": None, "response_format": None}


class APIError(Exception):
    """A request the server refuses: HTTP ``status`` and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _invalid(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


@dataclass(frozen=True)
class GenerationRequest:
    """What a request asks for, checked. ``messages`` (chat) or ``prompt`` (completion: text or token ids)."""

    kind: str  # "chat" or "completion"
    model: str
    messages: tuple[dict[str, str], ...] = ()
    prompt: str | tuple[int, ...] = ""
    max_tokens: int | None = None  # None: the server's default, within the context
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


@dataclass(frozen=True)
class Outcome:
    """How a generation ended: its text, why it stopped (``stop`` or ``length``), and its token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _invalid(name, f"must be a number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        left = "(" if low_open else "["
        raise _invalid(name, f"must be in {left}{low:g}, {high:g}], got {value!r}")
    return float(value)


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(name, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise _invalid(name, f"must be in [{low}, {high}], got {value}")
    return value


def _common(body: Any, kind: str, max_context: int) -> dict[str, Any]:
    """The fields chat and completion requests share, checked."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model", f"must be a non-empty string (the id /v1/models lists), got {model!r}")
    for name, supported in UNSUPPORTED.items():
        if body.get(name) not in (supported, None):
            raise APIError(400, f"{name}: only {supported!r} is supported by this server, got {body[name]!r}",
                           param=name, code="unsupported_value")
    limits = [_integer(body, name, 1, max_context - 1) for name in ("max_tokens", "max_completion_tokens")]
    if None not in limits and limits[0] != limits[1]:
        raise _invalid("max_completion_tokens", f"differs from max_tokens ({limits[1]} vs {limits[0]}); give one")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP
                             or not all(isinstance(s, str) and s for s in stop)):
        raise _invalid("stop", f"must be a non-empty string or a list of at most {MAX_STOP} of them, got {stop!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _invalid("stream", f"must be true or false, got {stream!r}")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict)
                                or not isinstance(options.get("include_usage", False), bool)):
        raise _invalid("stream_options", f"must be an object with a boolean include_usage, got {options!r}")
    return dict(
        kind=kind, model=model, max_tokens=next((x for x in limits if x is not None), None),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0), top_p=_number(body, "top_p", 1.0, 0.0, 1.0, True),
        seed=_integer(body, "seed", 0, 2**63 - 1), stop=tuple(stop or ()), stream=bool(stream),
        include_usage=bool((options or {}).get("include_usage", False)),
    )


def _content(i: int, content: Any) -> str:
    """A message's text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise _invalid(f"messages[{i}].content", "must be a string or a list of {\"type\": \"text\", \"text\": ...} "
                   f"parts (only text is supported), got {content!r}")


def parse_chat(body: Any, max_context: int) -> GenerationRequest:
    """A ``/v1/chat/completions`` body checked; ``APIError`` (400) naming the first bad field."""
    fields = _common(body, "chat", max_context)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", f"must be a non-empty list of messages, got {messages!r}")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _invalid(f"messages[{i}]", f"must be an object with role and content, got {m!r}")
        if m.get("role") not in ROLES:
            raise _invalid(f"messages[{i}].role", f"must be one of {sorted(ROLES)}, got {m.get('role')!r}")
        checked.append({"role": ROLES[m["role"]], "content": _content(i, m.get("content"))})
    return GenerationRequest(messages=tuple(checked), **fields)


def parse_completion(body: Any, max_context: int, vocab_size: int) -> GenerationRequest:
    """A ``/v1/completions`` body checked: ``prompt`` is a non-empty string, a list of one, or token ids."""
    fields = _common(body, "completion", max_context)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise _invalid("prompt", "is empty")
        return GenerationRequest(prompt=prompt, **fields)
    if (isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise _invalid("prompt", f"token ids must be in [0, {vocab_size - 1}], got {bad[:5]}")
        return GenerationRequest(prompt=tuple(prompt), **fields)
    raise _invalid("prompt", f"must be a non-empty string, a list of one string, or a list of token ids, "
                   f"got {prompt!r}")


def usage_body(outcome: Outcome) -> dict[str, Any]:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens``: the prompt tokens a kept cache held."""
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": outcome.reused_tokens}}


def completion_body(kind: str, rid: str, created: int, model: str, outcome: Outcome) -> dict[str, Any]:
    """The whole answer of a request that did not stream."""
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": outcome.text}, "logprobs": None,
                  "finish_reason": outcome.finish_reason}
    else:
        choice = {"index": 0, "text": outcome.text, "logprobs": None, "finish_reason": outcome.finish_reason}
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
            "model": model, "choices": [choice], "usage": usage_body(outcome), "system_fingerprint": None}


def chunk_body(kind: str, rid: str, created: int, model: str, text: str | None = None, finish_reason: str | None = None,
               role: bool = False, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """One server-sent event of a stream: new text, the opening role (chat), the finish reason, or the usage
    (``choices`` empty, as OpenAI sends it with ``stream_options.include_usage``)."""
    if usage is not None:
        choices = []
    elif kind == "chat":
        delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    body = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion", "created": created,
            "model": model, "choices": choices, "system_fingerprint": None}
    if usage is not None:
        body["usage"] = usage
    return body
