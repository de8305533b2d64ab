"""The HTTP surface: a FastAPI app of OpenAI's endpoints over a ``Service``.

``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON, or server-sent events with
``stream``: OpenAI's chunks, then ``data: [DONE]``), ``GET /v1/models``, ``GET /v1/stats`` (per kept
conversation: tokens on the device and offloaded, keys scanned, seconds per token, prefill tokens saved
by reuse), ``GET /health``. Every error is OpenAI's JSON error object with a 4xx status for a client's
mistake (malformed JSON, a bad field, an unknown model or path, a missing API key), 503 with the reason
when the server is loaded, and 500 only for a bug. The header ``x-retrieval-attn-reused-tokens`` (and
``usage.prompt_tokens_details.cached_tokens``) says how many prompt tokens a kept cache held.

Model work never runs on the event loop: admission runs in the thread pool, the job on its own thread
(``scheduler``), and its text comes back through an ``asyncio.Queue``. A client that goes away
(mid-stream, or while waiting for a whole answer) cancels its job before the next forward pass.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .protocol import APIError, chunk_body, completion_body, usage_body
from .scheduler import Job
from .service import Service

__all__ = ["create_app"]

SHUTDOWN_SECONDS = 10.0  # how long shutdown waits for cancelled jobs to reach their next forward pass
DISCONNECT_POLL = 0.25  # seconds between checks that a client waiting for a whole answer is still there
MAX_BODY_BYTES = 64 << 20  # a request body beyond this is refused (413) unread: ~16M tokens of text


def _error(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def create_app(service: Service) -> FastAPI:
    """The app serving ``service``; its shutdown cancels every job and waits for them."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.scheduler.cancel_all()
        await run_in_threadpool(service.scheduler.join, SHUTDOWN_SECONDS)

    app = FastAPI(title="retrieval-attn", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    name = service.settings.model_name
    key = service.settings.api_key

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                what = "no API key was given" if not given else "the API key is not this server's"
                return _error(APIError(401, f"{what}: send the header 'Authorization: Bearer <key>' with the key of "
                                       "--api-key", code="invalid_api_key", kind="invalid_request_error"),
                              {"www-authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return _error(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no such path: {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(err.status_code, str(err.detail))
        return _error(APIError(err.status_code, message, code={404: "not_found", 405: "method_not_allowed"}.get(
            err.status_code)), dict(err.headers or {}))

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception) -> JSONResponse:
        return _error(APIError(500, f"internal error ({type(err).__name__}): a bug in retrieval-attn serve",
                               code="internal_error"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return service.health()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(service.started),
                                            "owned_by": "retrieval-attn"}]}

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        return await run_in_threadpool(service.stats)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(service, request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(service, request, "completion")

    return app


async def _generate(service: Service, request: Request, kind: str):
    """Check, admit and run one generation request; its answer as JSON or as a stream of events."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        service.count("requests")
        service.count("refused")
        raise APIError(413, f"the request body has {int(declared)} bytes, more than this server reads "
                       f"({MAX_BODY_BYTES})", code="request_too_large")
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        service.count("requests")
        service.count("refused")
        raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
    parsed = service.parse(kind, body)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(event: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server stopped, nobody is listening
            pass

    job = await run_in_threadpool(service.admit, parsed, lambda text: put(("text", text)), lambda j: put(("end", j)))
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created, model = int(time.time()), parsed.model
    headers = {"x-retrieval-attn-reused-tokens": str(job.reused_tokens),
               "x-retrieval-attn-conversation": job.conversation}
    if parsed.stream:
        return StreamingResponse(_stream(job, events, kind, rid, created, model, parsed.include_usage),
                                 media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})
    try:
        while True:
            try:
                what, _ = await asyncio.wait_for(events.get(), DISCONNECT_POLL)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return JSONResponse({}, status_code=499)  # nobody reads it
                continue
            if what == "end":
                break
    except asyncio.CancelledError:  # this handler was cancelled (the server stops): so is the job
        job.cancelled.set()
        raise
    failure = _failure(job)
    if failure is not None:
        return _error(failure, headers)
    return JSONResponse(completion_body(kind, rid, created, model, job.outcome()), headers=headers)


def _failure(job: Job) -> APIError | None:
    """Why an ended job has no answer: a bug (500) or the server's shutdown (503); None if it has one."""
    if job.error is not None:
        return APIError(500, f"internal error ({type(job.error).__name__}: {job.error}): the request failed "
                        "and its conversation was dropped", code="internal_error")
    if job.finish_reason == "cancelled":
        return APIError(503, "the server is shutting down: the request was stopped", code="server_shutdown")
    return None


async def _stream(job: Job, events: asyncio.Queue, kind: str, rid: str, created: int, model: str,
                  include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of one answer: the role (chat), text as decoded, the finish reason, the usage when
    asked, ``[DONE]``. Closing it early (the client went away) cancels the job."""
    try:
        if kind == "chat":
            yield _sse(chunk_body(kind, rid, created, model, role=True))
        while True:
            what, value = await events.get()
            if what == "text":
                yield _sse(chunk_body(kind, rid, created, model, text=value))
                continue
            failure = _failure(job)
            if failure is not None:
                yield _sse(failure.body())
            else:
                yield _sse(chunk_body(kind, rid, created, model, finish_reason=job.finish_reason))
                if include_usage:
                    yield _sse(chunk_body(kind, rid, created, model, usage=usage_body(job.outcome())))
            yield "data: [DONE]\n\n"
            return
    finally:
        job.cancelled.set()  # a no-op once the job ended
