"""What every ``retrieval-attn`` command shares: the one-line user error, the parser and help format,
checks of common flags (device, thread count, model path, results folder), the loading stage line,
the Ctrl-C exit code, and the retrieval flags (--top-k, --sink, --window).

Private to ``retrieval_attn.cli``: the command modules import from here, never the other way round.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..config import RetrievalConfig
from ..model_files import ModelFile, inspect_model

if TYPE_CHECKING:
    import torch

INTERRUPTED = 130  # the shell's code for a process ended by SIGINT
RETRIEVAL_FLAGS = {  # RetrievalConfig fields -> the flags that set them, for error messages
    "sink_tokens": "--sink", "window_tokens": "--window", "top_k": "--top-k", "index": "--index",
    "index_params": "--index-param", "cpu_threads": "--cpu-threads", "gpu_memory_gib": "--gpu-memory-gib",
    "retrieved_attention": "--retrieved-attention", "serve_while_building": "--wait-for-index",
}


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line and exit code 2, never a traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported on one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.HelpFormatter):
    """Help that shows every option's default (unless it is None, False or already in the text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "(default:" in text or default is None or default is False or default == []
                or default == argparse.SUPPRESS or not action.option_strings):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


@contextlib.contextmanager
def _user_errors(prefix: str = "", flags: dict[str, str] | None = None) -> Iterator[None]:
    """Within the block, a ValueError or FileNotFoundError (the library's checks of what the user gave) is a
    ``UserError``; ``RetrievalConfig.<field>`` in its message reads as the flag that sets the field."""
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        message = str(err)
        for field, flag in {**RETRIEVAL_FLAGS, **(flags or {})}.items():
            message = re.sub(rf"\bRetrievalConfig\.{field}\b|^{field}(?= must\b)", flag, message)
        message = message.replace("index_params['ef']", "--index-param ef=...")
        raise UserError(prefix + message) from err


def _at_least(flag: str, value: int, low: int) -> None:
    if value < low:
        raise UserError(f"{flag} must be >= {low}, got {value}")


def _device(text: str, flag: str = "--device") -> torch.device:
    """``text`` as a torch device that exists on this machine, else ``UserError``."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise UserError(f"{flag}: {text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise UserError(f"{flag} {text}: CUDA is not available on this machine ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"{flag} {text}: this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}")
        return device
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is None or accelerator.type != device.type:
        raise UserError(f"{flag} {text}: no {device.type} device on this machine; use cpu"
                        + (" or cuda" if torch.cuda.is_available() else ""))
    return device


def _cpu_threads(n: int | None) -> None:
    from ..engine.checks import check_cpu_threads

    with _user_errors():
        check_cpu_threads(n, "--cpu-threads")


def _model(path: str | None) -> ModelFile:
    """The ``--model`` path checked and read (architecture, layers) without loading the model."""
    with _user_errors("--model: "):
        return inspect_model(path)


def _model_name(path: str | None) -> str:
    return path or "the embedded SmolLM2-135M-Instruct"


def _load_model(path: str | None, info: ModelFile, device: torch.device, dtype_name: str) -> tuple:
    """(model, tokenizer) of ``--model`` (checked as ``info``) on ``device`` in ``--dtype``, its loading shown."""
    import torch

    from ..hf import load_model, quiet_transformers

    quiet_transformers()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    with _stage(f"loading {_model_name(path)}" + (" (first run: de-quantising, cached for the next ones)"
                                                  if info.gguf and not info.cached else "")):
        with _user_errors("--model: "):
            return load_model(path, device=device, dtype=dtype)


def _out_dir(path: str, flag: str = "--out") -> Path:
    """A results folder that exists or can be made."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag}: {path} is a file; give a folder for the results")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{flag}: cannot create the folder {path}: {err.strerror or err}") from None
    return folder


@contextlib.contextmanager
def _stage(text: str) -> Iterator[None]:
    """Show ``text`` with the seconds elapsed while the block runs (ticking on a terminal); other
    libraries' own progress bars are hidden meanwhile, and their warnings shown after, one line each."""
    err, start, done = sys.stderr, time.perf_counter(), threading.Event()
    tty = err.isatty()

    def tick() -> None:
        while not done.wait(0.5):
            err.write(f"\r{text} ... {time.perf_counter() - start:.0f} s")
            err.flush()

    err.write(f"{text} ...")
    err.flush()
    if tty:
        threading.Thread(target=tick, daemon=True).start()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("default")
            yield
    finally:
        done.set()
        seconds = time.perf_counter() - start
        err.write(f"\r{text} ... {seconds:.1f} s\n" if tty else f" {seconds:.1f} s\n")
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)


def _interrupted() -> int:
    print("interrupted (Ctrl-C): the table above covers what ran", file=sys.stderr)
    return INTERRUPTED


def _add_retrieval_arguments(parser: argparse.ArgumentParser, defaults: RetrievalConfig) -> None:
    """--top-k, --sink and --window: where a command's tokens go."""
    parser.add_argument("--top-k", type=int, default=defaults.top_k, metavar="K",
                        help="keys retrieved per query head per step")
    parser.add_argument("--sink", type=int, default=defaults.sink_tokens, metavar="S",
                        help="first tokens kept on the device")
    parser.add_argument("--window", type=int, default=defaults.window_tokens, metavar="W",
                        help="recent tokens kept on the device")
