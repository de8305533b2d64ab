"""``retrieval-attn chat``: its flags, and the run that reads documents once (the memory plan shown),
then answers turn after turn with the model's chat template, each turn prefilling only its new tokens
(``hf.chat.Chat``); turns come from the terminal or, piped, from stdin.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from tqdm import tqdm

from ..checks import DTYPE_NAMES
from .common import (
    INTERRUPTED, UserError, _at_least, _cpu_threads, _device, _load_model, _model,
    _read_text, _user_errors,
)

from .flags import DECODING, add_retrieval_flags, retrieval_config

BUILTIN_DOCUMENT = "two_facts.txt"


def chat_command(args: argparse.Namespace) -> int:
    """Read the documents once, then answer turn after turn (stdin when it is not a terminal)."""
    with _user_errors():
        config = retrieval_config(args)
    _cpu_threads(args.cpu_threads)
    _at_least("--max-new-tokens", args.max_new_tokens, 1)
    _at_least("--prefill-chunk", args.prefill_chunk, 2)
    if args.max_context is not None:
        _at_least("--max-context", args.max_context, 2)
    device = _device(args.device)
    if args.gpu_memory_gib is not None and device.type != "cuda":
        raise UserError(f"--gpu-memory-gib caps a CUDA device's memory; --device is {device}")
    paths = [Path(p) for p in args.document or ()]
    texts = [_read_text(p, "--document").strip() for p in paths] or [
        resources.files("retrieval_attn").joinpath("data", BUILTIN_DOCUMENT).read_text().strip()]
    names = [p.name for p in paths] or [f"built-in {BUILTIN_DOCUMENT}"]
    documents = texts[0] if len(texts) == 1 else "\n\n".join(f"Document {n}:\n{t}" for n, t in zip(names, texts))
    info = _model(args.model)

    from ..evaluation.report import format_columns
    from ..hf import Chat, RetrievalCache, chat_opening, trained_positions
    from ..planner import MemoryBudgetError

    model, tokenizer = _load_model(args.model, info, device, args.dtype)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--model: the model's tokenizer has no chat template")
    opening = len(tokenizer(chat_opening(tokenizer, documents), add_special_tokens=False).input_ids)
    positions = trained_positions(model)
    trained = f"the model's trained context of {positions} positions (max_position_embeddings)"
    if positions is not None and opening >= positions:
        raise UserError(f"--document: the documents take {opening} tokens, {trained} leaves no room for a turn")
    if positions is not None and args.max_context is not None and args.max_context > positions:
        raise UserError(f"--max-context {args.max_context} exceeds {trained}")
    max_context = args.max_context or min(opening + 4096, positions or opening + 4096)
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

    from ..evaluation.report import format_columns

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
            if chat.cache.retrieval_config.telemetry and chat.turns:
                from ..evaluation.report import format_telemetry_table

                print("telemetry: recall@k and attention mass held, per layer, over the conversation's decode steps")
                print(format_telemetry_table(chat.cache.telemetry_summary()))
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


def add_chat_arguments(chat: argparse.ArgumentParser) -> None:
    """The options of ``chat``."""
    chat.add_argument("--document", action="extend", nargs="+", default=None, metavar="FILE",
                      help="text files the conversation is about, read in the order given; repeatable "
                           f"(default: the built-in {BUILTIN_DOCUMENT})")
    chat.add_argument("--model", default=None, metavar="GGUF_OR_FOLDER",
                      help="GGUF file or transformers folder (default: the embedded SmolLM2-135M-Instruct)")
    chat.add_argument("--max-context", type=int, default=None, metavar="N",
                      help="tokens the conversation may reach (documents, turns, answers): memory is planned and "
                           "the CPU store sized for it; a turn beyond it is refused (default: documents + 4096, at most the "
                           "model's trained context)")
    chat.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="answer tokens at most per turn")
    chat.add_argument("--device", default="cpu", help="torch device of the model: cpu, cuda or cuda:N")
    chat.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="weight dtype")
    chat.add_argument("--prefill-chunk", type=int, default=512, metavar="N", help="tokens per prefill forward pass")
    add_retrieval_flags(chat, DECODING)
