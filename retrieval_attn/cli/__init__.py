"""The ``retrieval-attn`` command line: ``generate``, ``chat``, ``serve``, ``sweep``, ``bench``, ``eval``, ``cache``.

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
import importlib
import importlib.metadata
import signal
import sys
import threading
from typing import NamedTuple

from .. import __version__
from .common import INTERRUPTED, UserError, _Formatter, _Parser

__all__ = ["main"]


class _Command(NamedTuple):
    """A subcommand: its help line, the module of this package whose ``add_<name>_arguments`` adds its
    flags and whose ``<name>_command`` runs it, and what its ``--help`` adds to the help line (its cost)."""

    text: str
    module: str
    note: str = ""


COMMANDS = {
    "generate": _Command("long-context generation with the KV cache offloaded and retrieved", "generate"),
    "chat": _Command("a conversation about long documents, read once (turns from stdin if piped)", "chat"),
    "serve": _Command("an OpenAI-compatible server whose conversations keep their KV offloaded and reused", "serve"),
    "sweep": _Command("recall versus cost of every index backend on the model's real queries/keys", "tools",
                      "The first run at a length captures q/k (cached); on a 2-core CPU a sweep at 8,192 tokens "
                      "takes minutes, at 32K tens of minutes."),
    "bench": _Command("decode speed and memory against transformers (full and offloaded cache)", "tools"),
    "eval": _Command("needle retrieval and teacher-forced fidelity: full attention vs every method", "tools",
                     "At its defaults about 10 minutes and 2.6 GiB of memory on a 2-core CPU with the embedded "
                     "model; every method, length, depth and fidelity token adds to the time in proportion "
                     "(a decode step costs 0.1-0.4 s per method there)."),
    "cache": _Command("the cached de-quantised models: where, how large; --clear removes them", "tools"),
}


class _VersionAction(argparse.Action):
    """``--version``: the versions of retrieval-attn, torch and transformers, read only when asked for."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser of every command; only the command named in ``argv`` gets its flags (which import the
    modules that declare their defaults): ``retrieval-attn --help`` loads none of them."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show a traceback for every error, mistakes included")
    parser = _Parser(prog="retrieval-attn", formatter_class=_Formatter, parents=[common],
                     description="Long-context decoding with the KV cache offloaded to CPU and retrieved by an "
                                 "ANN index.")
    parser.add_argument("--version", action=_VersionAction, help="show the versions and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    named = next((a for a in argv if not a.startswith("-")), None)
    for name, command in COMMANDS.items():
        command_parser = sub.add_parser(name, help=command.text, description=" ".join(
                                            filter(None, (command.text[0].upper() + command.text[1:] + ".",
                                                          command.note))),
                                        formatter_class=_Formatter, parents=[common])
        if name == named:
            module = importlib.import_module(f".{command.module}", __name__)
            getattr(module, f"add_{name}_arguments")(command_parser)
            command_parser.set_defaults(func=getattr(module, f"{name}_command"))
    return parser


def _version() -> str:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return f"retrieval-attn {__version__} (torch {version('torch')}, transformers {version('transformers')})"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``retrieval-attn`` console script (and ``python -m retrieval_attn``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C is ours however the process was started: a shell runs a background job (``cmd &`` in a
        # script, ``nohup``) with SIGINT ignored, which a child inherits; Python then never raises
        # KeyboardInterrupt and a generation could not be stopped
        signal.signal(signal.SIGINT, signal.default_int_handler)
    args = _parser(argv).parse_args(argv)
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

