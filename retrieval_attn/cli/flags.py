"""The retrieval flags of every command, made once from ``RetrievalConfig``'s fields, and their conversion
back into a ``RetrievalConfig``.

Each flag names a field (``FLAGS``, with its help in the CLI's words) and shows the field's default
(or a tool's own default config), so every command that takes ``--top-k`` takes the same flag, with
the same help, and one conversion turns them into a ``RetrievalConfig``. ``add_retrieval_flags``
adds the flags of the fields a command exposes; ``retrieval_config`` builds the config from them;
``flag_of`` names the flag of a field for error messages (a ``ConfigError`` carries its field).

Private to ``retrieval_attn.cli``.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Iterable, NamedTuple

from ..config import RetrievalConfig


class Flag(NamedTuple):
    """How a ``RetrievalConfig`` field is spelled on the command line.

    name : the flag. help : its help, in the CLI's words (the field's docstring is the library's).
    metavar : its value's name (None: a switch). kind : the value's type, or ``"set"`` (a switch that
    sets the field to ``value``), ``"params"`` (repeatable NAME=VALUE), ``"choice"`` (one of a list).
    """

    name: str
    help: str
    metavar: str | None = None
    kind: Any = int
    value: Any = None


FLAGS: dict[str, Flag] = {
    "sink_tokens": Flag("--sink", "first tokens of the sequence kept on the device for good", "S"),
    "window_tokens": Flag("--window", "most recent tokens kept on the device; older ones are offloaded to the CPU",
                          "W"),
    "top_k": Flag("--top-k", "offloaded keys retrieved per query head per decode step", "K"),
    "index": Flag("--index", "index backend over the offloaded keys (auto: flat below 16,384 offloaded keys per "
                  "head, roar above)", None, "choice"),
    "index_params": Flag("--index-param", "a parameter of the index backend (auto: roar's), repeatable, e.g. "
                         "ef=300; ef follows --top-k when not set", "NAME=VALUE", "params"),
    "cpu_threads": Flag("--cpu-threads", "threads of retrieval-attn's own CPU work (search and attention over the "
                        "retrieved rows, index builds); the model's torch threads are left alone (default: each "
                        "layer measures 1 thread against every core and keeps the faster; builds use all cores)",
                        "N"),
    "prefill_block": Flag("--prefill-block", "queries (and offloaded rows) per block of prefill attention", "N"),
    "overlap": Flag("--no-overlap", "run a step's CPU part and its device attention one after the other, not "
                    "overlapped (default: overlapped on a GPU)", None, "set", False),
    "retrieved_attention": Flag("--retrieved-attention", "where the retrieved keys are attended: on the cpu (only "
                                "out and lse cross to the device) or on the device (their scores and values do)",
                                None, "choice"),
    "gpu_memory_gib": Flag("--gpu-memory-gib", "CUDA memory budget in GiB, enforced: a request that would not fit "
                           "is refused before any work (default: the device's free memory)", "G", float),
    "telemetry": Flag("--telemetry", "measure, exactly and on the side, each step's recall@k and the attention mass "
                      "held, per layer (slower: for tuning --top-k and ef)", None, "set", True),
    "rebuild_growth": Flag("--rebuild-growth", "rebuild a layer's index in the background once decoding has grown "
                           "it by this fraction (default: never)", "F", float),
    "rebuild_queries": Flag("--rebuild-queries", "recent decode steps whose queries train a rebuild", "N"),
    "serve_while_building": Flag("--wait-for-index", "the first token waits for every layer's index build (default: "
                                 "exact search serves a layer until its background build lands: the same tokens "
                                 "unless a tie differs, not the same retrieval)", None, "set", False),
}
# the fields of the commands that decode a real model (generate, chat)
DECODING = ("sink_tokens", "window_tokens", "top_k", "index", "index_params", "serve_while_building", "cpu_threads",
            "gpu_memory_gib", "telemetry")


def _choices(field: str) -> list[str]:
    if field == "index":
        from ..index.registry import AUTO, available_indexes

        return [AUTO, *available_indexes()]
    from ..config import RETRIEVED_ATTENTION

    return list(RETRIEVED_ATTENTION)


def add_retrieval_flags(parser: argparse.ArgumentParser, fields: Iterable[str],
                        defaults: RetrievalConfig | None = None, extra: dict[str, str] | None = None) -> None:
    """Add the flags of ``fields`` (names of ``RetrievalConfig``), with ``defaults`` (a tool's own config; the
    field defaults when None) shown in the help, and ``extra`` help a command adds to a field's."""
    given = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
             for f in dataclasses.fields(RetrievalConfig)}
    if defaults is not None:
        given.update({f.name: getattr(defaults, f.name) for f in dataclasses.fields(RetrievalConfig)})
    for field in fields:
        flag = FLAGS[field]
        text = flag.help + (extra or {}).get(field, "")
        if flag.kind == "set":
            parser.add_argument(flag.name, dest=field, action="store_const", const=flag.value, default=given[field],
                                help=text)
        elif flag.kind == "params":
            parser.add_argument(flag.name, dest=field, action="append", default=[], metavar=flag.metavar, help=text)
        elif flag.kind == "choice":
            parser.add_argument(flag.name, dest=field, default=given[field], choices=_choices(field), help=text)
        else:
            parser.add_argument(flag.name, dest=field, type=flag.kind, default=given[field], metavar=flag.metavar,
                                help=text)


def retrieval_config(args: argparse.Namespace, **fixed: Any) -> RetrievalConfig:
    """The ``RetrievalConfig`` of a command's retrieval flags (those it added), plus ``fixed`` fields; a
    mistake raises ``ConfigError`` (``--index-param``'s: ValueError), which the CLI names by flag."""
    from ..index.registry import parse_index_param

    values = {f: getattr(args, f) for f in FLAGS if hasattr(args, f)}
    if "index_params" in values:
        index = fixed.get("index", values.get("index", RetrievalConfig.index))
        try:
            values["index_params"] = dict(parse_index_param(index, p) for p in values["index_params"])
        except ValueError as err:
            raise ValueError(f"--index-param: {err}") from None
    return RetrievalConfig(**{**values, **fixed})


def flag_of(field: str) -> str | None:
    """The flag that sets ``RetrievalConfig`` field ``field``, or None."""
    flag = FLAGS.get(field)
    return flag.name if flag is not None else None
