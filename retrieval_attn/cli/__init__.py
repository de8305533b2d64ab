"""The ``retrieval-attn`` command line: ``generate``, ``chat``, ``sweep``, ``bench``, ``eval`` and ``cache``.

The only package of ``retrieval_attn`` that prints. This module holds the entry point (``main``) and
the parser that names every command; each command's flags and run live in its own module:
``generate`` (long-context generation with the KV cache offloaded and retrieved), ``chat`` (a
conversation about documents read once), ``tools`` (``sweep``, ``bench``, ``eval`` and ``cache``),
and ``common`` what they share (the user error, checks of common flags, the loading stage line).

A user's mistake is one line on stderr (``retrieval-attn <command>: error: ...``, naming the flag and
what it allows) and exit code 2, checked before the model loads wherever it can be: values and
ranges, paths and file types, the device's availability, thread counts, layer indices against the
model's config (read from its header). Ctrl-C prints what finished (the partial table) and one line,
and exits with 130. Tracebacks are for bugs, and for ``--debug``.

Every subcommand builds its settings (a ``RetrievalConfig``, embedded in the tools' settings) from its
flags, and imports the model and tool modules only when it runs, so ``retrieval-attn --help`` stays fast.
"""

from __future__ import annotations

import os

# torch and numba compute on libgomp threads, which by default spin while they wait for work: on a CPU
# shared with other processes the spinning threads steal the cores from each other (the README's main
# command prefilled 5-10x slower on 2 busy cores). Sleeping waiters cost a wake-up of microseconds per
# parallel region instead. Set before torch and numba load libgomp, which reads it once; a user's own
# OMP_WAIT_POLICY is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402 (after the OpenMP setting)
import importlib.metadata
import sys
from typing import Callable

import torch

from .. import __version__
from ..config import RetrievalConfig
from .chat import add_chat_arguments, chat_command
from .common import INTERRUPTED, UserError, _Formatter, _Parser
from .generate import add_generate_arguments, generate_command
from .serve import add_serve_arguments, serve_command
from .tools import (
    add_bench_arguments, add_cache_arguments, add_eval_arguments, add_sweep_arguments, bench_command, cache_command,
    eval_command, sweep_command,
)

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show a traceback for every error, mistakes included")
    parser = _Parser(prog="retrieval-attn", formatter_class=_Formatter, parents=[common],
                     description="Long-context decoding with the KV cache offloaded to CPU and retrieved by an "
                                 "ANN index.")
    parser.add_argument("--version", action="version", version=_version(), help="show the versions and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = RetrievalConfig()

    def command(name: str, text: str, run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        command_parser = sub.add_parser(name, help=text, description=text, formatter_class=_Formatter,
                                        parents=[common])
        command_parser.set_defaults(func=run)
        return command_parser

    add_generate_arguments(command("generate", "long-context generation with the KV cache offloaded and retrieved",
                                   generate_command), defaults)
    add_chat_arguments(command("chat", "a conversation about long documents, read once (turns from stdin if piped)",
                               chat_command), defaults)
    add_serve_arguments(command("serve", "an OpenAI-compatible server whose conversations keep their KV offloaded "
                                "and reused", serve_command), defaults)
    add_sweep_arguments(command("sweep", "recall versus cost of every index backend on the model's real "
                                "queries/keys", sweep_command))
    add_bench_arguments(command("bench", "decode speed and memory against transformers (full and offloaded cache)",
                                bench_command), defaults)
    add_eval_arguments(command("eval", "needle retrieval and teacher-forced fidelity: full attention vs every "
                               "method", eval_command))
    add_cache_arguments(command("cache", "the cached de-quantised models: where, how large; --clear removes them",
                                cache_command))
    return parser


def _version() -> str:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return f"retrieval-attn {__version__} (torch {torch.__version__}, transformers {version('transformers')})"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``retrieval-attn`` console script (and ``python -m retrieval_attn``)."""
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"retrieval-attn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"retrieval-attn {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED
