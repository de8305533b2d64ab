"""What every ``retrieval-attn`` command shares: the one-line user error, the parser and help format,
checks of common flags (device, thread count, model path, results folder), the loading stage line,
the Ctrl-C exit code, and the retrieval flags (--top-k, --sink, --window).

Private to ``retrieval_attn.cli``: the command modules import from here, never the other way round.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..checks import ConfigError, dtype_named
from ..config import RetrievalConfig
from ..model_files import ModelFile, inspect_model
from .flags import flag_of

if TYPE_CHECKING:
    import torch

INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


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
    ``UserError``; a ``ConfigError`` names the flag that sets its field: ``flags`` (a tool's settings fields
    -> flags), else ``RetrievalConfig``'s flag of that field, else the field's own name as a flag
    (``n_test``: ``--n-test``)."""
    try:
        yield
    except ConfigError as err:
        flag = (flags or {}).get(err.field) or flag_of(err.field) or f"--{err.field.replace('_', '-')}"
        raise UserError(prefix + err.for_flag(flag)) from err
    except (ValueError, FileNotFoundError) as err:
        raise UserError(prefix + str(err)) from err


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


def _read_text(path: Path, flag: str) -> str:
    """The UTF-8 text of the file ``path`` that ``flag`` names; UserError (naming both) for a missing path, a
    folder, a binary or unreadable file, or one with no text."""
    if not path.exists():
        raise UserError(f"{flag}: {path} does not exist")
    if not path.is_file():
        raise UserError(f"{flag}: {path} is a folder, not a file" if path.is_dir() else f"{flag}: {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{flag}: {path} is not UTF-8 text (a binary file?)") from None
    except OSError as err:
        raise UserError(f"{flag}: {path} cannot be read: {err.strerror or err}") from None
    if "\x00" in text:
        raise UserError(f"{flag}: {path} holds NUL bytes: a binary file, not text")
    if not text.strip():
        raise UserError(f"{flag}: {path} is empty")
    return text


def _model(path: str | None) -> ModelFile:
    """The ``--model`` path checked and read (architecture, layers) without loading the model."""
    with _user_errors("--model: "):
        return inspect_model(path)


def _model_name(path: str | None) -> str:
    return path or "the embedded SmolLM2-135M-Instruct"


def _load_model(path: str | None, info: ModelFile, device: torch.device, dtype_name: str) -> tuple:
    """(model, tokenizer) of ``--model`` (checked as ``info``) on ``device`` in ``--dtype``, its loading shown."""
    from ..hf import load_model, quiet_transformers

    quiet_transformers()
    dtype = dtype_named(dtype_name)
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


def _interrupted(results: Path | None = None) -> int:
    """Exit status 130 after Ctrl-C, saying what covers the work that finished: the table, and the files in
    ``results`` where the command keeps them."""
    kept = "the table above covers" if results is None else f"the table above and the files in {results}/ cover"
    print(f"interrupted (Ctrl-C): {kept} what ran", file=sys.stderr)
    return INTERRUPTED

