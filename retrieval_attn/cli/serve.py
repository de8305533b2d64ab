"""``retrieval-attn serve``: its flags, and the run that loads a model, checks that one conversation of
``--max-context`` tokens fits the memory plan, and serves the OpenAI-compatible API (``retrieval_attn.serve``)
with uvicorn on 127.0.0.1 unless told otherwise, until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from ..checks import DTYPE_NAMES
from .common import INTERRUPTED, UserError, _at_least, _cpu_threads, _device, _load_model, _model, _user_errors
from .flags import add_retrieval_flags, retrieval_config

API_KEY_ENV = "RETRIEVAL_ATTN_API_KEY"
# the RetrievalConfig fields serve takes as flags
SERVING = ("sink_tokens", "window_tokens", "top_k", "index", "index_params", "serve_while_building", "cpu_threads",
           "gpu_memory_gib")
GRACEFUL_SECONDS = 15  # how long a stop waits for open connections once every job is cancelled


def _check_address(host: str, port: int) -> None:
    """The address can be bound now (UserError naming --host or --port if not)."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be in [1, 65535], got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UserError(f"--host {host}: not an address of this machine ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from None


def serve_command(args: argparse.Namespace) -> int:
    """Load the model, check the plan of one conversation, serve until a signal."""
    with _user_errors():
        config = retrieval_config(args)
    _cpu_threads(args.cpu_threads)
    for flag, value, low in (("--max-context", args.max_context, 2), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--prefill-chunk", args.prefill_chunk, 2), ("--max-concurrent", args.max_concurrent, 1),
                             ("--max-conversations", args.max_conversations, 0)):
        _at_least(flag, value, low)
    if args.max_new_tokens >= args.max_context:
        raise UserError(f"--max-new-tokens must be < --max-context ({args.max_context}), got {args.max_new_tokens}")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if api_key is not None and not api_key.strip():
        raise UserError(f"--api-key (or ${API_KEY_ENV}) is empty")
    device = _device(args.device)
    if args.gpu_memory_gib is not None and device.type != "cuda":
        raise UserError(f"--gpu-memory-gib caps a CUDA device's memory; --device is {device}")
    _check_address(args.host, args.port)
    info = _model(args.model)
    name = args.model_name or (info.path.stem if args.model else "SmolLM2-135M-Instruct")

    import uvicorn

    from ..hf import RetrievalCache
    from ..planner import MemoryBudgetError
    from ..serve import ServeSettings, Service, create_app

    model, tokenizer = _load_model(args.model, info, device, args.dtype)
    try:
        RetrievalCache(model, config, max_context=args.max_context, prefill_chunk=args.prefill_chunk)
    except MemoryBudgetError as err:
        raise UserError(f"--max-context {args.max_context}: one conversation does not fit: {err}") from None
    except ValueError as err:
        raise UserError(f"--model: {err}") from None
    settings = ServeSettings(
        model_name=name, max_context=args.max_context, max_new_tokens=args.max_new_tokens,
        prefill_chunk=args.prefill_chunk, max_conversations=args.max_conversations,
        max_concurrent=args.max_concurrent, schedule=args.schedule, api_key=api_key,
    )
    service = Service(model, tokenizer, config, settings)

    class Server(uvicorn.Server):
        """uvicorn's server; a stop signal cancels every job first, and the command returns afterwards
        (Ctrl-C: 130, SIGTERM: 0) instead of uvicorn raising the signal again."""

        stopped_by: int | None = None

        def handle_exit(self, sig: int, frame) -> None:
            service.scheduler.cancel_all()
            self.stopped_by = sig
            super().handle_exit(sig, frame)
            getattr(self, "_captured_signals", []).clear()

    server = Server(uvicorn.Config(create_app(service), host=args.host, port=args.port, log_level="warning",
                                   access_log=args.log_requests, timeout_graceful_shutdown=GRACEFUL_SECONDS))
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {name} on http://{shown}:{args.port}/v1 (OpenAI API; context {args.max_context} tokens per "
          f"conversation, {args.schedule} schedule{', API key required' if api_key else ''}); Ctrl-C stops",
          file=sys.stderr, flush=True)
    server.run()
    how = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}.get(server.stopped_by, "shutdown")
    print(f"retrieval-attn serve: stopped ({how})", file=sys.stderr)
    return INTERRUPTED if server.stopped_by == signal.SIGINT else 0


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """The options of ``serve``."""
    from ..serve.scheduler import SCHEDULES

    serve.add_argument("--model", default=None, metavar="GGUF_OR_FOLDER",
                       help="GGUF file or transformers folder (default: the embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--model-name", default=None, metavar="NAME",
                       help="the model id clients send and /v1/models lists (default: the model file's name, or "
                            "SmolLM2-135M-Instruct)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    serve.add_argument("--api-key", default=None, metavar="KEY",
                       help=f"bearer token every /v1 request must carry (default: ${API_KEY_ENV}, else none)")
    serve.add_argument("--max-context", type=int, default=8192, metavar="N",
                       help="tokens one conversation may reach (prompts and answers): each conversation's memory is "
                            "planned for it; a longer request gets 400 context_length_exceeded")
    serve.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                       help="answer tokens of a request that sets no max_tokens")
    serve.add_argument("--max-conversations", type=int, default=8, metavar="N",
                       help="idle conversations kept for reuse (fewer when the memory plan says so)")
    serve.add_argument("--max-concurrent", type=int, default=16, metavar="N",
                       help="requests in progress at once; more get 503")
    serve.add_argument("--schedule", default="interleave", choices=list(SCHEDULES),
                       help="interleave: requests take turns at every forward pass (prefill chunk or decode step); "
                            "fifo: one request at a time")
    serve.add_argument("--device", default="cpu", help="torch device of the model: cpu, cuda or cuda:N")
    serve.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="weight dtype")
    serve.add_argument("--prefill-chunk", type=int, default=512, metavar="N",
                       help="tokens per prefill forward pass (the unit other requests' steps interleave with)")
    add_retrieval_flags(serve, SERVING, extra={"gpu_memory_gib": " (of every conversation's plan)"})
    serve.add_argument("--log-requests", action="store_true", help="print uvicorn's access log line per request")
