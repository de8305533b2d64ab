"""The ``retrieval-attn`` command line: ``generate``, ``chat``, ``sweep``, ``bench``, ``eval`` and ``cache``.

The only module of the package that prints. ``generate`` loads a model (the embedded SmolLM2 by
default; a GGUF file is de-quantised once and cached, ``model_files``), encodes the prompt (in the
tokenizer's chat template when it has one, the built-in pass-key document as plain text), prefills it
in chunks with a progress bar, streams greedy or sampled decoding token by token, and ends with a
table of where the tokens are and what each step cost (with ``--telemetry``, also recall@k and
attention mass per layer, and a PNG). ``chat`` reads documents once (the memory plan shown), then
answers turn after turn with the model's chat template, each turn prefilling only its new tokens
(``hf.chat.Chat``); turns come from the terminal or, piped, from stdin. ``sweep`` measures recall
versus cost of every index backend on the model's real queries and keys (``evaluation.sweep``;
``bench/recall_sweep.py`` is the same command). ``bench`` measures decode speed and memory against
transformers' full and offloaded caches (``evaluation.decode_bench``; ``bench/decode.py``). ``eval``
compares full attention, every index backend and the sink + window baseline on needle retrieval and
teacher-forced fidelity (``evaluation.evaluate``; ``bench/fidelity.py``). ``cache`` shows or clears
the cached models.

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
import contextlib
import importlib.metadata
import io
import json
import math
import re
import sys
import threading
import time
import warnings
from importlib import resources
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from . import __version__
from .config import RetrievalConfig
from .index import AUTO, available_indexes, parse_index_param
from .model_files import ModelFile, inspect_model

__all__ = ["main"]

BUILTIN_PROMPT = "passkey.txt"
TELEMETRY_PNG = "results/telemetry.png"
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
    from .engine.checks import check_cpu_threads

    with _user_errors():
        check_cpu_threads(n, "--cpu-threads")


def _model(path: str | None) -> ModelFile:
    """The ``--model`` path checked and read (architecture, layers) without loading the model."""
    with _user_errors("--model: "):
        return inspect_model(path)


def _model_name(path: str | None) -> str:
    return path or "the embedded SmolLM2-135M-Instruct"


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


def _png(path: str, flag: str) -> Path:
    """A PNG file path whose folder exists or can be made."""
    if Path(path).suffix.lower() != ".png":
        raise UserError(f"{flag}: {path} must name a .png file")
    _out_dir(str(Path(path).parent), flag)
    return Path(path)


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


def _read_prompt(args: argparse.Namespace) -> tuple[str, bool]:
    """The prompt text and whether it is the built-in pass-key document; UserError for an empty or
    unreadable one."""
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UserError("--prompt is empty: give the text to answer or continue "
                            "(or leave --prompt out for the built-in pass-key document)")
        return args.prompt, False
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.exists():
            raise UserError(f"--prompt-file: {path} does not exist")
        if not path.is_file():
            raise UserError(f"--prompt-file: {path} is not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"--prompt-file: {path} is not UTF-8 text (a binary file?)") from None
        except OSError as err:
            raise UserError(f"--prompt-file: {path} cannot be read: {err.strerror or err}") from None
        if "\x00" in text:
            raise UserError(f"--prompt-file: {path} holds NUL bytes: a binary file, not text")
        if not text.strip():
            raise UserError(f"--prompt-file: {path} is empty")
        return text, False
    return resources.files("retrieval_attn").joinpath("data", BUILTIN_PROMPT).read_text(), True


def _sampling(args: argparse.Namespace) -> tuple[float, float, int | None]:
    """(temperature, top_p, seed) of ``generate``: temperature 0 is greedy; ``--top-p`` alone samples at
    temperature 1; ``--seed`` needs sampling."""
    temperature, top_p, seed = args.temperature, args.top_p, args.seed
    if temperature is not None and not 0 <= temperature < math.inf:
        raise UserError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {top_p}")
        if temperature == 0:
            raise UserError("--top-p samples from the most likely tokens: it needs --temperature > 0 (0 is greedy)")
    temperature = temperature if temperature is not None else (1.0 if top_p is not None else 0.0)
    if seed is not None:
        if temperature == 0:
            raise UserError("--seed seeds the sampling: it needs --temperature > 0 or --top-p (decoding is greedy)")
        if seed < 0:
            raise UserError(f"--seed must be >= 0, got {seed}")
    return temperature, 1.0 if top_p is None else top_p, seed


def _generate(args: argparse.Namespace) -> int:
    telemetry = args.telemetry or args.telemetry_png is not None  # a plot of the telemetry implies measuring it
    with _user_errors("--index-param: "):
        params = dict(parse_index_param(args.index, p) for p in args.index_param)
    with _user_errors():
        config = RetrievalConfig(
            sink_tokens=args.sink, window_tokens=args.window, top_k=args.top_k, index=args.index,
            index_params=params, cpu_threads=args.cpu_threads, gpu_memory_gib=args.gpu_memory_gib,
            telemetry=telemetry, serve_while_building=not args.wait_for_index,
        )
    _cpu_threads(args.cpu_threads)
    _at_least("--max-new-tokens", args.max_new_tokens, 1)
    _at_least("--prefill-chunk", args.prefill_chunk, 2)
    device = _device(args.device)
    if args.gpu_memory_gib is not None and device.type != "cuda":
        raise UserError(f"--gpu-memory-gib caps a CUDA device's memory; --device is {device}")
    temperature, top_p, seed = _sampling(args)
    prompt, builtin = _read_prompt(args)
    png = _png(args.telemetry_png or TELEMETRY_PNG, "--telemetry-png") if telemetry else None
    info = _model(args.model)

    from .evaluation.report import format_columns
    from .hf import Decoder, RetrievalCache, greedy, load_model, prompt_ids, quiet_transformers, sampler, stop_tokens
    from .planner import MemoryBudgetError

    quiet_transformers()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    with _stage(f"loading {_model_name(args.model)}" + (" (first run: de-quantising, cached for the next ones)"
                                                        if info.gguf and not info.cached else "")):
        with _user_errors("--model: "):
            model, tokenizer = load_model(args.model, device=device, dtype=dtype)
    ids, chat = prompt_ids(tokenizer, prompt, chat=not (builtin or args.no_chat_template))
    n = ids.shape[1]
    try:
        cache = RetrievalCache(model, config, max_context=n + args.max_new_tokens, prefill_chunk=args.prefill_chunk)
    except MemoryBudgetError as err:
        raise UserError(str(err)) from None
    choose = greedy if temperature == 0 else sampler(temperature, top_p, seed)

    decoder = Decoder(model, cache, args.prefill_chunk)  # the last prefill chunk starts every layer's index build
    generated: list[int] = []
    printed = ""
    scanned: list[int] = []
    step_seconds: list[float] = []  # with --wait-for-index the first decode step waits for every layer's index
    prefilled = 0

    def stream(token: int) -> None:
        nonlocal printed
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        print(text[len(printed):], end="", flush=True)
        printed = text

    def record(step: int, seconds: float) -> None:
        scanned.append(sum(s.keys_scanned_last_step for s in cache.stats))
        step_seconds.append(seconds)

    def prefill_progress(tokens: int) -> None:
        nonlocal prefilled
        prefilled += tokens
        bar.update(tokens)

    start = time.perf_counter()
    prefill_s = None
    interrupted = False
    try:
        with tqdm(total=n, desc="prefill", unit="tok", file=sys.stderr) as bar:
            logits = decoder.prefill(ids, progress=prefill_progress)
        prefill_s = time.perf_counter() - start
        decoder.decode(logits, args.max_new_tokens, choose=choose, stop=stop_tokens(model, tokenizer),
                       on_token=stream, on_step=record)
    except KeyboardInterrupt:
        interrupted = True
    print()
    stats = cache.stats
    layers = len(stats)
    later = step_seconds[1:]
    prompt_kind = "built-in pass-key document (plain text)" if builtin else ("chat template" if chat else "plain text")
    print(
        format_columns(None, [
            ("prompt tokens", f"{n} ({prompt_kind})"),
            ("decoding", "greedy" if temperature == 0 else
             f"sampling: temperature {temperature:g}, top-p {top_p:g}, seed {'random' if seed is None else seed}"),
            ("tokens on device / offloaded (per layer)", f"{stats[0].device_tokens} / {stats[0].offloaded_tokens}"),
            ("index", f"{config.index} -> {stats[0].index} (top_k {config.top_k})"),
            ("prefill seconds", f"{prefill_s:.2f}" if prefill_s is not None
             else f"{time.perf_counter() - start:.2f} (interrupted after {prefilled} of {n} tokens)"),
            ("first decode step seconds (builds the indexes)", f"{step_seconds[0]:.2f}" if step_seconds else "-"),
            ("seconds per decoded token (after the first)", f"{sum(later) / len(later):.4f}" if later else "-"),
            ("keys scanned per step (all layers, heads)", f"{sum(scanned) / max(len(scanned), 1):.0f}"),
            ("keys scanned per query head (mean fraction)",
             f"{sum(s.keys_scanned_fraction for s in stats) / layers:.3f}"),
            ("CPU / device MiB (all layers)",
             f"{sum(s.cpu_bytes for s in stats) / 2**20:.1f} / {sum(s.device_bytes for s in stats) / 2**20:.1f}"),
            ("planned device / CPU GiB (weights included)",
             f"{cache.memory_plan.device_total / 2**30:.2f} / {cache.memory_plan.cpu_total / 2**30:.2f}"),
        ])
    )
    if telemetry and step_seconds:
        from .evaluation.report import format_telemetry_table, plot_telemetry

        rows = cache.telemetry_summary()
        print(f"\ntelemetry: recall@{config.top_k} and attention mass held, per layer, over {len(step_seconds)} "
              "decode steps")
        print(format_telemetry_table(rows))
        print(f"plot: {plot_telemetry({config.index: rows}, png, 'generate')}")
    return _interrupted() if interrupted else 0


def _interrupted() -> int:
    print("interrupted (Ctrl-C): the table above covers what ran", file=sys.stderr)
    return INTERRUPTED


BUILTIN_DOCUMENT = "two_facts.txt"


def _chat(args: argparse.Namespace) -> int:
    """Read the documents once, then answer turn after turn (stdin when it is not a terminal)."""
    with _user_errors():
        config = RetrievalConfig(
            sink_tokens=args.sink, window_tokens=args.window, top_k=args.top_k, index=args.index,
            cpu_threads=args.cpu_threads, gpu_memory_gib=args.gpu_memory_gib,
        )
    _cpu_threads(args.cpu_threads)
    _at_least("--max-new-tokens", args.max_new_tokens, 1)
    _at_least("--prefill-chunk", args.prefill_chunk, 2)
    if args.max_context is not None:
        _at_least("--max-context", args.max_context, 2)
    device = _device(args.device)
    if args.gpu_memory_gib is not None and device.type != "cuda":
        raise UserError(f"--gpu-memory-gib caps a CUDA device's memory; --device is {device}")
    paths = [Path(p) for p in args.document or ()]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"--document: {', '.join(missing)} does not exist")
    try:
        texts = [p.read_text().strip() for p in paths] or [
            resources.files("retrieval_attn").joinpath("data", BUILTIN_DOCUMENT).read_text().strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--document: {err}") from None
    names = [p.name for p in paths] or [f"built-in {BUILTIN_DOCUMENT}"]
    documents = texts[0] if len(texts) == 1 else "\n\n".join(f"Document {n}:\n{t}" for n, t in zip(names, texts))
    info = _model(args.model)

    from .evaluation.report import format_columns
    from .hf import Chat, RetrievalCache, chat_opening, load_model, quiet_transformers
    from .planner import MemoryBudgetError

    quiet_transformers()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    with _stage(f"loading {_model_name(args.model)}" + (" (first run: de-quantising, cached for the next ones)"
                                                        if info.gguf and not info.cached else "")):
        with _user_errors("--model: "):
            model, tokenizer = load_model(args.model, device=device, dtype=dtype)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--model: the model's tokenizer has no chat template")
    opening = len(tokenizer(chat_opening(tokenizer, documents), add_special_tokens=False).input_ids)
    max_context = args.max_context or opening + 4096
    if opening >= max_context:
        raise UserError(f"--max-context {max_context} leaves no room after the documents ({opening} tokens)")
    try:
        cache = RetrievalCache(model, config, max_context=max_context, prefill_chunk=args.prefill_chunk,
                               prompt_tokens=opening)
    except MemoryBudgetError as err:
        raise UserError(str(err)) from None
    print(f"memory plan for a conversation of up to {max_context} tokens (--max-context):", file=sys.stderr)
    print(format_columns(None, cache.memory_plan.rows()), file=sys.stderr)
    chat = Chat(model, tokenizer, cache, documents, max_context=max_context, prefill_chunk=args.prefill_chunk,
                max_new_tokens=args.max_new_tokens)

    def read_documents() -> None:
        with tqdm(total=opening, desc=f"reading {', '.join(names)}", unit="tok", file=sys.stderr) as bar:
            chat.start(progress=bar.update)

    try:
        read_documents()
        print(f"{opening} tokens read. Ask away; /stats, /reset, /save FILE; Ctrl-C stops an answer, "
              "Ctrl-D quits.", file=sys.stderr)
        _chat_turns(chat, read_documents, f"{', '.join(names)} ({opening} tokens)", max_context)
    except KeyboardInterrupt:  # only while the documents are read: an answer's Ctrl-C just ends it
        print("interrupted while reading the documents", file=sys.stderr)
        return INTERRUPTED
    return 0


def _chat_turns(chat, read_documents, about: str, max_context: int) -> None:
    """The chat loop: a turn per line (from the terminal, or stdin when piped) until end of input."""
    import signal
    import threading

    from .evaluation.report import format_columns

    interactive = sys.stdin.isatty()
    lines = iter(sys.stdin)
    while True:
        try:
            line = input("> ") if interactive else next(lines)
        except (EOFError, StopIteration):
            return
        except KeyboardInterrupt:  # at the prompt: drop the line
            print()
            continue
        text = line.strip()
        command, _, arg = text.partition(" ")
        if not text:
            continue
        if command == "/stats":
            print(format_columns(None, _chat_stats(chat, max_context)))
        elif command == "/reset":
            chat.reset()
            read_documents()
            print("conversation reset: the documents were read again")
        elif command == "/save":
            turns = "".join(f"> {q}\n{a}\n\n" for q, a in chat.exchanges)
            try:
                Path(arg.strip()).write_text(f"retrieval-attn chat about {about}\n\n{turns}")
                print(f"transcript saved to {arg.strip()}")
            except OSError as err:
                print(f"error: /save FILE: {err}" if arg.strip() else "usage: /save FILE")
        elif text.startswith("/"):
            print(f"unknown command {command}: /stats, /reset, /save FILE (Ctrl-D quits)")
        else:
            if not interactive:
                print(f"> {text}")
            stop = threading.Event()
            in_main = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGINT, lambda *_: stop.set()) if in_main else None
            try:  # Ctrl-C ends the answer before its next token; the session goes on
                chat.ask(text, on_token=lambda s: print(s, end="", flush=True), interrupted=stop.is_set)
            except ValueError as err:
                print(f"error: {err}")
                continue
            finally:
                if in_main:
                    signal.signal(signal.SIGINT, previous)
            print(" [stopped]" if chat.turns[-1].interrupted else "")


def _chat_stats(chat, max_context: int) -> list[tuple[str, str]]:
    """/stats rows: where the conversation's tokens are, and what the last turn cost."""
    stats = chat.cache.stats
    rows = [
        ("conversation tokens / --max-context", f"{len(chat.held)} / {max_context}"),
        ("tokens on device / offloaded (per layer)", f"{stats[0].device_tokens} / {stats[0].offloaded_tokens}"),
        ("index", stats[0].index or "(built at the first answer)"),
    ]
    if chat.turns:
        turn = chat.turns[-1]
        steps = turn.step_seconds[1:] or turn.step_seconds  # the first answer's first step builds the indexes
        rows += [
            ("last turn: tokens prefilled", str(turn.prompt_tokens)),
            ("last turn: seconds to the first token", f"{turn.first_token_seconds:.2f}"),
            ("last turn: answer tokens", str(turn.answer_tokens)),
            ("last turn: seconds per token", f"{sum(steps) / len(steps):.4f}" if steps else "-"),
            ("last turn: keys scanned per step (all layers, heads)",
             f"{sum(turn.keys_scanned) / max(len(turn.keys_scanned), 1):.0f}"),
            ("keys scanned per query head (mean fraction, last step)",
             f"{sum(s.keys_scanned_fraction for s in stats) / len(stats):.3f}"),
        ]
    return rows


def _eval(args: argparse.Namespace) -> int:
    from .evaluation.evaluate import EMBEDDED_NAME, EvalSettings, format_eval_table, run_eval, write_results
    from .evaluation.report import Interrupted

    flags = {"lengths": "--lengths", "depths": "--depths", "samples": "--samples", "methods": "--methods",
             "fidelity_tokens": "--fidelity-tokens", "fidelity_prefix": "--fidelity-prefix",
             "prefill_chunk": "--prefill-chunk", "tasks": "--tasks"}
    with _user_errors(flags=flags):
        retrieval = RetrievalConfig(  # every method sets its index; flat's leaves top_k unbounded here
            sink_tokens=args.sink, window_tokens=args.window, top_k=args.top_k, index="flat",
            telemetry=args.telemetry, cpu_threads=args.cpu_threads,
        )
        settings = EvalSettings(
            methods=tuple(args.methods), tasks=tuple(args.tasks), lengths=tuple(args.lengths),
            depths=tuple(args.depths), samples=args.samples, fidelity_tokens=args.fidelity_tokens,
            fidelity_prefix=args.fidelity_prefix, retrieval=retrieval, seed=args.seed,
            prefill_chunk=args.prefill_chunk,
        )
    _cpu_threads(args.cpu_threads)
    _model(args.model)
    out = _out_dir(args.out)

    from .hf import load_model, quiet_transformers

    quiet_transformers()
    with _stage(f"loading {_model_name(args.model)}"), _user_errors("--model: "):
        model, tokenizer = load_model(args.model)
    try:
        report = run_eval(settings, model=model, tokenizer=tokenizer, model_name=args.model or EMBEDDED_NAME)
    except Interrupted as stop:
        print(format_eval_table(stop.partial))
        return _interrupted()
    paths = write_results(report, out)
    print(format_eval_table(report))
    print(f"results: {out}/ ({', '.join(p.name for p in paths)})")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .evaluation.backends import DEFAULT_BACKENDS, parse_backend_spec
    from .evaluation.report import Interrupted
    from .evaluation.sweep import SweepSettings, format_sweep_table, run_sweep, write_results

    flags = {"lengths": "--lengths", "ks": "--top-k", "n_test": "--n-test", "target_recall": "--target-recall",
             "backends": "--backend", "train_positions": "--train-positions"}
    with _user_errors(flags=flags):
        backends = tuple(parse_backend_spec(s) for s in args.backend) if args.backend else DEFAULT_BACKENDS
        retrieval = RetrievalConfig(sink_tokens=args.sink, window_tokens=args.window, cpu_threads=args.cpu_threads)
        settings = SweepSettings(
            lengths=tuple(args.lengths), layers=tuple(args.layers) if args.layers else None, retrieval=retrieval,
            n_test=args.n_test, ks=tuple(args.top_k), target_recall=args.target_recall,
            train_positions=args.train_positions, backends=backends,
        )
    _cpu_threads(args.cpu_threads)
    info = _model(args.model)
    bad = [layer for layer in args.layers or () if info.num_layers is not None and not 0 <= layer < info.num_layers]
    if bad:
        raise UserError(f"--layers: {', '.join(map(str, bad))} not in the model's layers, 0 to {info.num_layers - 1}")
    out = _out_dir(args.out)

    from .hf import quiet_transformers

    quiet_transformers()
    try:
        report = run_sweep(settings, model_path=args.model, cache_dir=None if args.no_cache else args.cache_dir)
    except Interrupted as stop:
        print(format_sweep_table(stop.partial))
        return _interrupted()
    write_results(report, out)
    print(format_sweep_table(report))
    print(f"results: {out}/ (rows.csv, summary.csv, sweep.json, recall_vs_scanned.png, recall_vs_latency.png)")
    print(json.dumps({"operating_points": report.operating_points, "capture": report.capture}))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import os
    import platform

    from .evaluation.decode_bench import BenchSettings, format_bench_table, ratio_rows, run_decode_bench, write_results
    from .evaluation.report import Interrupted

    device = _device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if args.gpu_memory_gib is not None and not on_gpu:
        raise UserError(f"--gpu-memory-gib caps a CUDA device's memory; --device is {device}")
    flags = {"shape": "--shape", "contexts": "--contexts", "methods": "--methods", "steps": "--steps",
             "warmup": "--warmup", "prefill_chunk": "--prefill-chunk"}
    with _user_errors(flags=flags):
        settings = BenchSettings(
            shape=args.shape or ("llama3-8b" if on_gpu else "small"),
            contexts=tuple(args.contexts or ((32768, 65536, 131072) if on_gpu else (4096, 8192, 16384))),
            methods=tuple(args.methods), steps=args.steps, warmup=args.warmup, prefill_chunk=args.prefill_chunk,
            device=str(device), dtype=args.dtype or ("bfloat16" if on_gpu else "float32"),
            retrieval=RetrievalConfig(sink_tokens=args.sink, window_tokens=args.window, top_k=args.top_k,
                                      cpu_threads=args.cpu_threads, overlap=False if args.no_overlap else None,
                                      retrieved_attention=args.retrieved_attention,
                                      gpu_memory_gib=args.gpu_memory_gib),
        )
    _cpu_threads(args.cpu_threads)
    out = _out_dir(args.out)

    from .hf import quiet_transformers

    quiet_transformers()
    machine = (f"{torch.cuda.get_device_name(device)}, " if on_gpu else "CPU only, ") + (
        f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}")
    print(f"decode benchmark: shape {settings.shape}, {settings.dtype} on {device} ({machine})", file=sys.stderr)
    try:
        results = run_decode_bench(settings, progress=lambda msg: print(msg, file=sys.stderr),
                                   on_result=lambda done: write_results(done, settings, out, machine))
    except Interrupted as stop:
        print(format_bench_table(stop.partial))
        return _interrupted()
    folder = write_results(results, settings, out, machine)
    print(format_bench_table(results))
    print(f"results: {folder}/ (decode.json, decode.csv, layers.csv)")
    print(json.dumps({"ratios": ratio_rows(results)}))
    return 0


def _cache(args: argparse.Namespace) -> int:
    from .model_files import cache_entries, clear_model_cache, model_cache_dir

    entries = cache_entries()
    if args.clear:
        freed = clear_model_cache()
        print(f"removed {len(entries)} cached model(s), {freed / 2**20:.0f} MiB, from {model_cache_dir()}")
        return 0
    print(f"cached models (de-quantised GGUF files): {model_cache_dir()}")
    for folder, size in entries:
        print(f"  {folder.name}  {size / 2**20:.0f} MiB")
    print(f"{len(entries)} model(s), {sum(s for _, s in entries) / 2**20:.0f} MiB; "
          "retrieval-attn cache --clear removes them")
    return 0


def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sweep's options to ``parser`` (``retrieval-attn sweep``, also run by ``bench/recall_sweep.py``)."""
    from .evaluation.backends import DEFAULT_BACKENDS
    from .evaluation.sweep import SweepSettings

    d = SweepSettings()
    parser.add_argument("--model", default=None, metavar="GGUF_OR_FOLDER",
                        help="GGUF file or transformers folder (default: embedded SmolLM2)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(d.lengths), metavar="N",
                        help="context lengths in tokens")
    parser.add_argument("--layers", type=int, nargs="+", default=None, metavar="L",
                        help="decoder layers to sample (default: 5 spread over depth, 3 9 16 22 29 for 30 layers)")
    parser.add_argument("--sink", type=int, default=d.retrieval.sink_tokens, metavar="S",
                        help="first tokens kept static (on the device)")
    parser.add_argument("--window", type=int, default=d.retrieval.window_tokens, metavar="W",
                        help="recent tokens kept static (on the device)")
    parser.add_argument("--n-test", type=int, default=d.n_test, metavar="N",
                        help="decode-like test positions per length")
    parser.add_argument("--top-k", type=int, nargs="+", default=list(d.ks), metavar="K",
                        help="top-k values; the first is primary")
    parser.add_argument("--target-recall", type=float, default=d.target_recall, metavar="R",
                        help="recall of the operating point")
    parser.add_argument("--train-positions", choices=["prefix", "middle"], default=d.train_positions,
                        help="positions whose queries train query-aware indexes")
    parser.add_argument("--backend", action="extend", nargs="+", default=None, metavar="NAME[:PARAM=V1,V2,...]",
                        help=f"backends and parameter values, one or more, repeatable; names: "
                             f"{', '.join(available_indexes())} (default: "
                             + " ".join(str(b) for b in DEFAULT_BACKENDS) + ")")
    parser.add_argument("--cpu-threads", type=int, default=d.retrieval.cpu_threads, metavar="N",
                        help="CPU threads for index build and search (default: torch/numba/faiss defaults)")
    parser.add_argument("--out", default="results/recall_sweep", metavar="DIR",
                        help="folder for CSV, JSON and PNG results")
    parser.add_argument("--cache-dir", default="results/qk_cache", metavar="DIR", help="folder caching captured q/k")
    parser.add_argument("--no-cache", action="store_true", help="capture again and do not cache")


def _add_retrieval_arguments(parser: argparse.ArgumentParser, defaults: RetrievalConfig) -> None:
    """--top-k, --sink and --window: where a command's tokens go."""
    parser.add_argument("--top-k", type=int, default=defaults.top_k, metavar="K",
                        help="keys retrieved per query head per step")
    parser.add_argument("--sink", type=int, default=defaults.sink_tokens, metavar="S",
                        help="first tokens kept on the device")
    parser.add_argument("--window", type=int, default=defaults.window_tokens, metavar="W",
                        help="recent tokens kept on the device")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show a traceback for every error, mistakes included")
    parser = _Parser(prog="retrieval-attn", formatter_class=_Formatter, parents=[common],
                     description="Long-context decoding with the KV cache offloaded to CPU and retrieved by an "
                                 "ANN index.")
    parser.add_argument("--version", action="version", version=_version(), help="show the versions and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = RetrievalConfig()

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=_Formatter, parents=[common])

    gen = command("generate", "long-context generation with the KV cache offloaded and retrieved")
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (default: the built-in pass-key document)")
    src.add_argument("--prompt-file", metavar="FILE", help="UTF-8 text file holding the prompt")
    gen.add_argument("--no-chat-template", action="store_true",
                     help="feed --prompt/--prompt-file as plain text, not in the model's chat template "
                          "(the built-in document is always plain text)")
    gen.add_argument("--model", default=None, metavar="GGUF_OR_FOLDER",
                     help="GGUF file or transformers folder (default: the embedded SmolLM2-135M-Instruct)")
    gen.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate at most")
    gen.add_argument("--temperature", type=float, default=None, metavar="T",
                     help="sampling temperature; 0 is greedy (default: 0, or 1 with --top-p)")
    gen.add_argument("--top-p", type=float, default=None, metavar="P",
                     help="sample from the smallest set of tokens holding probability P (implies sampling)")
    gen.add_argument("--seed", type=int, default=None, metavar="N", help="seed of the sampling draws (default: random)")
    _add_retrieval_arguments(gen, defaults)
    gen.add_argument("--index", default=defaults.index, choices=[AUTO, *available_indexes()],
                     help="index backend (auto: flat for small offloaded sets, roar for large ones)")
    gen.add_argument("--index-param", action="append", default=[], metavar="NAME=VALUE",
                     help="a parameter of the index backend (auto: roar's), repeatable, e.g. ef=300; "
                          "ef follows --top-k when not set (README, Indexes)")
    gen.add_argument("--wait-for-index", action="store_true",
                     help="the first token waits for every layer's index build; by default exact search "
                          "serves a layer until its background build lands (same tokens unless a tie "
                          "differs, not the same retrieval)")
    gen.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                     help="threads for CPU search and attention (default: torch/numba defaults)")
    gen.add_argument("--device", default="cpu", help="torch device of the model: cpu, cuda or cuda:N")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype")
    gen.add_argument("--prefill-chunk", type=int, default=512, metavar="N",
                     help="prompt tokens per prefill forward pass")
    gen.add_argument("--gpu-memory-gib", type=float, default=None, metavar="G",
                     help="CUDA memory budget in GiB: a prompt that would not fit is refused before prefill "
                          "(default: the device's free memory)")
    gen.add_argument("--telemetry", action="store_true",
                     help="measure recall@k and attention mass per layer on the side (slower); print them")
    gen.add_argument("--telemetry-png", default=None, metavar="FILE",
                     help=f"where the telemetry plot goes; implies --telemetry (default: {TELEMETRY_PNG})")
    gen.set_defaults(func=_generate)

    chat = command("chat", "a conversation about long documents, read once (turns from stdin if piped)")
    chat.add_argument("--document", nargs="+", default=None, metavar="FILE",
                      help=f"text files the conversation is about (default: the built-in {BUILTIN_DOCUMENT})")
    chat.add_argument("--model", default=None, metavar="GGUF_OR_FOLDER",
                      help="GGUF file or transformers folder (default: the embedded SmolLM2-135M-Instruct)")
    chat.add_argument("--max-context", type=int, default=None, metavar="N",
                      help="tokens the conversation may reach (documents, turns, answers): memory is planned and "
                           "the CPU store sized for it; a turn beyond it is refused (default: documents + 4096)")
    chat.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="answer tokens at most per turn")
    _add_retrieval_arguments(chat, defaults)
    chat.add_argument("--index", default=defaults.index, choices=[AUTO, *available_indexes()],
                      help="index backend (auto: flat for small offloaded sets, roar for large ones)")
    chat.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                      help="threads for CPU search and attention (default: torch/numba defaults)")
    chat.add_argument("--device", default="cpu", help="torch device of the model: cpu, cuda or cuda:N")
    chat.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype")
    chat.add_argument("--prefill-chunk", type=int, default=512, metavar="N", help="tokens per prefill forward pass")
    chat.add_argument("--gpu-memory-gib", type=float, default=None, metavar="G",
                      help="CUDA memory budget in GiB: a conversation that would not fit is refused before reading")
    chat.set_defaults(func=_chat)

    sweep = command("sweep", "recall versus cost of every index backend on the model's real queries/keys")
    _add_sweep_arguments(sweep)
    sweep.set_defaults(func=_sweep)

    from .evaluation.decode_bench import METHODS

    bench = command("bench", "decode speed and memory against transformers (full and offloaded cache)")
    bench.add_argument("--shape", default=None, metavar="SHAPE",
                        # checked by BenchSettings: listing hf.MODEL_SHAPES loads transformers
                       help="random model shape of retrieval_attn.hf.MODEL_SHAPES: llama3-8b, small or tiny "
                            "(default: llama3-8b on a GPU, small on CPU)")
    bench.add_argument("--contexts", type=int, nargs="+", default=None, metavar="N",
                       help="context lengths (default: 32768 65536 131072 on a GPU, 4096 8192 16384 on CPU)")
    bench.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="what to measure")
    bench.add_argument("--steps", type=int, default=32, metavar="N",
                       help="decode steps measured (median), after the warm-up")
    bench.add_argument("--warmup", type=int, default=4, metavar="N", help="decode steps before measuring")
    bench.add_argument("--prefill-chunk", type=int, default=4096, metavar="N",
                       help="prompt tokens per prefill forward pass")
    bench.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    bench.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="weight dtype (default: bfloat16 on a GPU, float32 on CPU)")
    bench.add_argument("--gpu-memory-gib", type=float, default=None, metavar="G",
                       help="CUDA memory budget of retrieval-attn, enforced, e.g. 24 to emulate a consumer card "
                            "(default: the device's free memory)")
    _add_retrieval_arguments(bench, defaults)
    bench.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                       help="threads for CPU search and attention (default: torch/numba defaults)")
    bench.add_argument("--retrieved-attention", choices=["cpu", "device"], default=defaults.retrieved_attention,
                       help="attend over retrieved keys on the CPU (ship out+lse) or on the device "
                            "(ship scores+values)")
    bench.add_argument("--no-overlap", action="store_true", help="run the CPU part and the device attention in turn")
    bench.add_argument("--out", default="results/decode", metavar="DIR", help="folder for decode.json and decode.csv")
    bench.set_defaults(func=_bench)

    from .evaluation.evaluate import EvalSettings
    from .evaluation.methods import DEFAULT_METHODS
    from .evaluation.needle import TASKS

    d = EvalSettings()
    ev = command("eval", "needle retrieval and teacher-forced fidelity: full attention vs every method")
    ev.add_argument("--model", default=None, metavar="GGUF_OR_FOLDER",
                    help="GGUF file or transformers folder (default: embedded SmolLM2)")
    ev.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                    help="full, sink+window, or an index NAME[:PARAM=V]...")
    ev.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS),
                    help="needle tasks (none: skip the needle grid)")
    ev.add_argument("--lengths", type=int, nargs="+", default=list(d.lengths), metavar="N",
                    help="needle context tokens")
    ev.add_argument("--depths", type=float, nargs="+", default=list(d.depths), metavar="D",
                    help="needle depths in [0, 1]")
    ev.add_argument("--samples", type=int, default=d.samples, metavar="N", help="needle samples (seeds) per grid cell")
    ev.add_argument("--fidelity-tokens", type=int, default=d.fidelity_tokens, metavar="N",
                    help="teacher-forced decode steps compared with full attention (0: skip)")
    ev.add_argument("--fidelity-prefix", type=int, default=d.fidelity_prefix, metavar="N",
                    help="tokens prefilled before them")
    ev.add_argument("--top-k", type=int, default=d.retrieval.top_k, metavar="K",
                    help="keys retrieved per query head per step")
    ev.add_argument("--sink", type=int, default=d.retrieval.sink_tokens, metavar="S",
                    help="first tokens kept on the device")
    ev.add_argument("--window", type=int, default=d.retrieval.window_tokens, metavar="W",
                    help="recent tokens kept on the device")
    ev.add_argument("--telemetry", action="store_true", help="recall@k and attention mass per layer and method")
    ev.add_argument("--seed", type=int, default=d.seed, metavar="N", help="base seed of the needle generators")
    ev.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk, metavar="N",
                    help="tokens per prefill forward pass")
    ev.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                    help="CPU threads of the whole run, 1 is often fastest on a shared machine "
                         "(default: torch/numba defaults)")
    ev.add_argument("--out", default="results/eval", metavar="DIR", help="folder for JSON, CSV and PNG results")
    ev.set_defaults(func=_eval)

    cache = command("cache", "the cached de-quantised models: where, how large; --clear removes them")
    cache.add_argument("--clear", action="store_true", help="remove every cached model")
    cache.set_defaults(func=_cache)
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


if __name__ == "__main__":
    sys.exit(main())
