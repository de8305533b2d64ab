"""The ``retrieval-attn`` command line: ``generate``, ``chat``, ``sweep``, ``bench`` and ``eval``.

The only module of the package that prints. ``generate`` loads a model (the embedded SmolLM2 by
default), prefills the prompt in chunks with a progress bar, streams greedy decoding token by token,
and ends with a table of where the tokens are and what each step cost (with ``--telemetry``, also
recall@k and attention mass per layer, and a PNG). ``chat`` reads documents once (the memory plan
shown), then answers turn after turn with the model's chat template, each turn prefilling only its
new tokens (``hf.chat.Chat``); turns come from the terminal or, piped, from stdin. ``sweep`` measures recall versus cost of every
index backend on the model's real queries and keys (``evaluation.sweep``) and prints its table;
``bench/recall_sweep.py`` is the same command. ``bench`` measures decode speed and memory against
transformers' full and offloaded caches (``evaluation.decode_bench``); ``bench/decode.py`` is the
same command. ``eval`` compares full attention, every index backend and the sink + window baseline
on needle retrieval and teacher-forced fidelity (``evaluation.evaluate``); ``bench/fidelity.py``
is the same command.

Every subcommand builds its settings (a ``RetrievalConfig``, embedded in the tools' settings) from
its flags, and imports the model and tool modules only when it runs (the parser reads the tools'
defaults, which load no transformers), so ``retrieval-attn --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

from .config import RetrievalConfig
from .index import AUTO, available_indexes

__all__ = ["main"]

BUILTIN_PROMPT = "passkey.txt"


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise SystemExit(f"--prompt-file: {path} does not exist")
        return path.read_text()
    return resources.files("retrieval_attn").joinpath("data", BUILTIN_PROMPT).read_text()


def _generate(args: argparse.Namespace) -> int:
    from .evaluation.report import format_columns
    from .hf import Decoder, RetrievalCache, load_model
    from .planner import MemoryBudgetError

    try:
        config = RetrievalConfig(
            sink_tokens=args.sink, window_tokens=args.window, top_k=args.top_k, index=args.index,
            cpu_threads=args.cpu_threads, gpu_memory_gib=args.gpu_memory_gib, telemetry=args.telemetry,
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if args.max_new_tokens < 1:
        raise SystemExit(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.prefill_chunk < 2:
        raise SystemExit(f"--prefill-chunk must be >= 2, got {args.prefill_chunk}")
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    prompt = _read_prompt(args)
    print(f"loading {args.model or 'the embedded SmolLM2-135M-Instruct'} ...", file=sys.stderr)
    model, tokenizer = load_model(args.model, device=device, dtype=dtype)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)  # [1, n]
    n = ids.shape[1]
    try:
        cache = RetrievalCache(model, config, max_context=n + args.max_new_tokens, prefill_chunk=args.prefill_chunk)
    except MemoryBudgetError as err:
        raise SystemExit(f"error: {err}") from None

    decoder = Decoder(model, cache, args.prefill_chunk)  # the last prefill chunk starts every layer's index build
    start = time.perf_counter()
    with tqdm(total=n, desc="prefill", unit="tok", file=sys.stderr) as bar:
        logits = decoder.prefill(ids, progress=bar.update)
    prefill_s = time.perf_counter() - start

    generated: list[int] = []
    printed = ""
    scanned: list[int] = []
    step_seconds: list[float] = []  # the first decode step also builds every layer's index

    def stream(token: int) -> None:
        nonlocal printed
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        print(text[len(printed):], end="", flush=True)
        printed = text

    def record(step: int, seconds: float) -> None:
        scanned.append(sum(s.keys_scanned_last_step for s in cache.stats))
        step_seconds.append(seconds)

    decoder.decode(logits, args.max_new_tokens, stop=(tokenizer.eos_token_id,), on_token=stream, on_step=record)
    print()
    stats = cache.stats
    layers = len(stats)
    later = step_seconds[1:]
    print(
        format_columns(None, [
            ("prompt tokens", n),
            ("tokens on device / offloaded (per layer)", f"{stats[0].device_tokens} / {stats[0].offloaded_tokens}"),
            ("index", f"{config.index} -> {stats[0].index} (top_k {config.top_k})"),
            ("prefill seconds", f"{prefill_s:.2f}"),
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
    if args.telemetry:
        from .evaluation.report import format_telemetry_table, plot_telemetry

        rows = cache.telemetry_summary()
        print(f"\ntelemetry: recall@{config.top_k} and attention mass held, per layer, over {len(later) + 1} decode steps")
        print(format_telemetry_table(rows))
        print(f"plot: {plot_telemetry({config.index: rows}, args.telemetry_png, 'generate')}")
    return 0


BUILTIN_DOCUMENT = "two_facts.txt"


def _chat(args: argparse.Namespace) -> int:
    """Read the documents once, then answer turn after turn (stdin when it is not a terminal)."""
    from .evaluation.report import format_columns
    from .hf import Chat, RetrievalCache, chat_opening, load_model
    from .planner import MemoryBudgetError

    try:
        config = RetrievalConfig(
            sink_tokens=args.sink, window_tokens=args.window, top_k=args.top_k, index=args.index,
            cpu_threads=args.cpu_threads, gpu_memory_gib=args.gpu_memory_gib,
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 1), ("--prefill-chunk", args.prefill_chunk, 2),
                             ("--max-context", args.max_context, 2)):
        if value is not None and value < low:
            raise SystemExit(f"{flag} must be >= {low}, got {value}")
    paths = [Path(p) for p in args.document or ()]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"--document: {', '.join(missing)} does not exist")
    texts = [p.read_text().strip() for p in paths] or [
        resources.files("retrieval_attn").joinpath("data", BUILTIN_DOCUMENT).read_text().strip()]
    names = [p.name for p in paths] or [f"built-in {BUILTIN_DOCUMENT}"]
    documents = texts[0] if len(texts) == 1 else "\n\n".join(f"Document {n}:\n{t}" for n, t in zip(names, texts))
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    print(f"loading {args.model or 'the embedded SmolLM2-135M-Instruct'} ...", file=sys.stderr)
    model, tokenizer = load_model(args.model, device=device, dtype=dtype)
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit("error: the model's tokenizer has no chat template")
    opening = len(tokenizer(chat_opening(tokenizer, documents), add_special_tokens=False).input_ids)
    max_context = args.max_context or opening + 4096
    if opening >= max_context:
        raise SystemExit(f"--max-context {max_context} leaves no room after the documents ({opening} tokens)")
    try:
        cache = RetrievalCache(model, config, max_context=max_context, prefill_chunk=args.prefill_chunk,
                               prompt_tokens=opening)
    except MemoryBudgetError as err:
        raise SystemExit(f"error: {err}") from None
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
        raise SystemExit("interrupted while reading the documents") from None
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
    from .evaluation.evaluate import EvalSettings, format_eval_table, run_eval, write_results

    try:
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
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"loading {args.model or 'the embedded SmolLM2-135M-Instruct'} ...", file=sys.stderr)
    report = run_eval(settings, model_path=args.model)
    paths = write_results(report, args.out)
    print(format_eval_table(report))
    print(f"results: {args.out}/ ({', '.join(p.name for p in paths)})")
    return 0


def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sweep's options to ``parser`` (``retrieval-attn sweep``, also run by ``bench/recall_sweep.py``)."""
    from .evaluation.backends import DEFAULT_BACKENDS
    from .evaluation.sweep import SweepSettings

    d = SweepSettings()
    parser.add_argument("--model", default=None, help="GGUF file or transformers folder (default: embedded SmolLM2)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(d.lengths), help="context lengths in tokens")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="decoder layers to sample (default: 5 spread over depth, 3 9 16 22 29 for 30 layers)")
    parser.add_argument("--sink", type=int, default=d.retrieval.sink_tokens,
                        help="first tokens kept static (on the device)")
    parser.add_argument("--window", type=int, default=d.retrieval.window_tokens,
                        help="recent tokens kept static (on the device)")
    parser.add_argument("--n-test", type=int, default=d.n_test, help="decode-like test positions per length")
    parser.add_argument("--k", type=int, nargs="+", default=list(d.ks), help="top-k values; the first is primary")
    parser.add_argument("--target-recall", type=float, default=d.target_recall, help="recall of the operating point")
    parser.add_argument("--train-positions", choices=["prefix", "middle"], default=d.train_positions,
                        help="positions whose queries train query-aware indexes")
    parser.add_argument("--backend", action="append", default=None, metavar="NAME[:PARAM=V1,V2,...]...",
                        help="backend and parameter values, repeatable (default: " +
                             " ".join(str(b) for b in DEFAULT_BACKENDS) + ")")
    parser.add_argument("--threads", type=int, default=d.retrieval.cpu_threads,
                        help="CPU threads for index build and search (default: torch/numba/faiss defaults)")
    parser.add_argument("--out", default="results/recall_sweep", help="folder for CSV, JSON and PNG results")
    parser.add_argument("--cache-dir", default="results/qk_cache", help="folder caching captured q/k")
    parser.add_argument("--no-cache", action="store_true", help="capture again and do not cache")


def _sweep(args: argparse.Namespace) -> int:
    from .evaluation.backends import DEFAULT_BACKENDS, parse_backend_spec
    from .evaluation.sweep import SweepSettings, format_sweep_table, run_sweep, write_results

    try:
        backends = tuple(parse_backend_spec(s) for s in args.backend) if args.backend else DEFAULT_BACKENDS
        retrieval = RetrievalConfig(sink_tokens=args.sink, window_tokens=args.window, cpu_threads=args.threads)
        settings = SweepSettings(
            lengths=tuple(args.lengths), layers=tuple(args.layers) if args.layers else None, retrieval=retrieval,
            n_test=args.n_test, ks=tuple(args.k), target_recall=args.target_recall,
            train_positions=args.train_positions, backends=backends,
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    report = run_sweep(settings, model_path=args.model, cache_dir=None if args.no_cache else args.cache_dir)
    write_results(report, args.out)
    print(format_sweep_table(report))
    print(f"results: {args.out}/ (rows.csv, summary.csv, sweep.json, recall_vs_scanned.png, recall_vs_latency.png)")
    print(json.dumps({"operating_points": report.operating_points, "capture": report.capture}))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import os
    import platform

    from .evaluation.decode_bench import BenchSettings, format_bench_table, ratio_rows, run_decode_bench, write_results

    cuda = torch.cuda.is_available()
    device = args.device or ("cuda" if cuda else "cpu")
    on_gpu = device.startswith("cuda")
    try:
        settings = BenchSettings(
            shape=args.shape or ("llama3-8b" if on_gpu else "small"),
            contexts=tuple(args.contexts or ((32768, 65536, 131072) if on_gpu else (4096, 8192, 16384))),
            methods=tuple(args.methods), steps=args.steps, warmup=args.warmup, prefill_chunk=args.prefill_chunk,
            device=device, dtype=args.dtype or ("bfloat16" if on_gpu else "float32"),
            retrieval=RetrievalConfig(sink_tokens=args.sink, window_tokens=args.window, top_k=args.top_k,
                                      cpu_threads=args.cpu_threads, overlap=not args.no_overlap,
                                      retrieved_attention=args.retrieved_attention,
                                      gpu_memory_gib=args.gpu_memory_gib),
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    machine = (f"{torch.cuda.get_device_name(device)}, " if on_gpu else "CPU only, ") + (
        f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}")
    print(f"decode benchmark: shape {settings.shape}, {settings.dtype} on {device} ({machine})", file=sys.stderr)
    results = run_decode_bench(settings, progress=lambda msg: print(msg, file=sys.stderr))
    folder = write_results(results, settings, args.out, machine)
    print(format_bench_table(results))
    print(f"results: {folder}/ (decode.json, decode.csv)")
    print(json.dumps({"ratios": ratio_rows(results)}))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retrieval-attn", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="long-context greedy generation with the KV cache offloaded and retrieved")
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (default: the built-in pass-key document)")
    src.add_argument("--prompt-file", help="file holding the prompt")
    gen.add_argument("--model", default=None, help="GGUF file or transformers folder (default: embedded SmolLM2)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    defaults = RetrievalConfig()
    gen.add_argument("--top-k", type=int, default=defaults.top_k, help="keys retrieved per query head per step")
    gen.add_argument("--sink", type=int, default=defaults.sink_tokens, help="first tokens kept on the device")
    gen.add_argument("--window", type=int, default=defaults.window_tokens, help="recent tokens kept on the device")
    gen.add_argument("--index", default=defaults.index, choices=[AUTO, *available_indexes()],
                     help="index backend (auto: flat for small offloaded sets, roar for large ones)")
    gen.add_argument("--cpu-threads", type=int, default=None, help="threads for CPU search and attention")
    gen.add_argument("--device", default="cpu", help="torch device of the model, e.g. cpu or cuda:0")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill forward pass")
    gen.add_argument("--gpu-memory-gib", type=float, default=None,
                     help="device memory budget in GiB: a prompt that would not fit is refused before prefill")
    gen.add_argument("--telemetry", action="store_true",
                     help="measure recall@k and attention mass per layer on the side (slower); print them")
    gen.add_argument("--telemetry-png", default="results/telemetry.png", help="where --telemetry writes its plot")
    gen.set_defaults(func=_generate)

    chat = sub.add_parser("chat", help="a conversation about long documents, read once (turns from stdin if piped)")
    chat.add_argument("--document", nargs="+", default=None, metavar="FILE",
                      help=f"text files the conversation is about (default: the built-in {BUILTIN_DOCUMENT})")
    chat.add_argument("--model", default=None, help="GGUF file or transformers folder (default: embedded SmolLM2)")
    chat.add_argument("--max-context", type=int, default=None,
                      help="tokens the conversation may reach (documents, turns, answers): memory is planned and "
                           "the CPU store sized for it; a turn beyond it is refused (default: documents + 4096)")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="answer tokens at most per turn")
    chat.add_argument("--top-k", type=int, default=defaults.top_k, help="keys retrieved per query head per step")
    chat.add_argument("--sink", type=int, default=defaults.sink_tokens, help="first tokens kept on the device")
    chat.add_argument("--window", type=int, default=defaults.window_tokens, help="recent tokens kept on the device")
    chat.add_argument("--index", default=defaults.index, choices=[AUTO, *available_indexes()], help="index backend")
    chat.add_argument("--cpu-threads", type=int, default=None, help="threads for CPU search and attention")
    chat.add_argument("--device", default="cpu", help="torch device of the model, e.g. cpu or cuda:0")
    chat.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    chat.add_argument("--prefill-chunk", type=int, default=512, help="tokens per prefill forward pass")
    chat.add_argument("--gpu-memory-gib", type=float, default=None,
                      help="device memory budget in GiB: a conversation that would not fit is refused before reading")
    chat.set_defaults(func=_chat)

    sweep = sub.add_parser("sweep", help="recall versus cost of every index backend on the model's real queries/keys")
    _add_sweep_arguments(sweep)
    sweep.set_defaults(func=_sweep)

    from .evaluation.decode_bench import METHODS

    bench = sub.add_parser("bench", help="decode speed and memory against transformers (full and offloaded cache)")
    bench.add_argument("--shape", default=None,  # checked by BenchSettings: listing hf.MODEL_SHAPES loads transformers
                       help="random model shape of retrieval_attn.hf.MODEL_SHAPES, e.g. llama3-8b, small, tiny "
                            "(default: llama3-8b on a GPU, small on CPU)")
    bench.add_argument("--contexts", type=int, nargs="+", default=None,
                       help="context lengths (default: 32768 65536 131072 on a GPU, 4096 8192 16384 on CPU)")
    bench.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    bench.add_argument("--steps", type=int, default=32, help="decode steps measured (median), after the warm-up")
    bench.add_argument("--warmup", type=int, default=4, help="decode steps before measuring")
    bench.add_argument("--prefill-chunk", type=int, default=4096, help="prompt tokens per prefill forward pass")
    bench.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    bench.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="default: bfloat16 on a GPU, float32 on CPU")
    bench.add_argument("--gpu-memory-gib", type=float, default=None,
                       help="device memory budget of retrieval-attn, enforced (e.g. 24 to emulate a consumer card)")
    bench.add_argument("--top-k", type=int, default=defaults.top_k)
    bench.add_argument("--sink", type=int, default=defaults.sink_tokens)
    bench.add_argument("--window", type=int, default=defaults.window_tokens)
    bench.add_argument("--cpu-threads", type=int, default=None)
    bench.add_argument("--retrieved-attention", choices=["cpu", "device"], default=defaults.retrieved_attention,
                       help="attend over retrieved keys on the CPU (ship out+lse) or on the device (ship scores+values)")
    bench.add_argument("--no-overlap", action="store_true", help="run the CPU part and the device attention in turn")
    bench.add_argument("--out", default="results/decode", help="folder for decode.json and decode.csv")
    bench.set_defaults(func=_bench)

    from .evaluation.evaluate import EvalSettings
    from .evaluation.methods import DEFAULT_METHODS
    from .evaluation.needle import TASKS

    d = EvalSettings()
    ev = sub.add_parser("eval", help="needle retrieval and teacher-forced fidelity: full attention vs every method")
    ev.add_argument("--model", default=None, help="GGUF file or transformers folder (default: embedded SmolLM2)")
    ev.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                    help="full, sink+window, or an index NAME[:PARAM=V]... (default: %(default)s)")
    ev.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS),
                    help="needle tasks (none: skip the needle grid)")
    ev.add_argument("--lengths", type=int, nargs="+", default=list(d.lengths), help="needle context tokens")
    ev.add_argument("--depths", type=float, nargs="+", default=list(d.depths), help="needle depths in [0, 1]")
    ev.add_argument("--samples", type=int, default=d.samples, help="needle samples (seeds) per grid cell")
    ev.add_argument("--fidelity-tokens", type=int, default=d.fidelity_tokens,
                    help="teacher-forced decode steps compared with full attention (0: skip)")
    ev.add_argument("--fidelity-prefix", type=int, default=d.fidelity_prefix, help="tokens prefilled before them")
    ev.add_argument("--top-k", type=int, default=d.retrieval.top_k, help="keys retrieved per query head per step")
    ev.add_argument("--sink", type=int, default=d.retrieval.sink_tokens, help="first tokens kept on the device")
    ev.add_argument("--window", type=int, default=d.retrieval.window_tokens, help="recent tokens kept on the device")
    ev.add_argument("--telemetry", action="store_true", help="recall@k and attention mass per layer and method")
    ev.add_argument("--seed", type=int, default=d.seed, help="base seed of the needle generators")
    ev.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk, help="tokens per prefill forward pass")
    ev.add_argument("--cpu-threads", type=int, default=None,
                    help="CPU threads of the whole run (1 is often fastest on a shared machine)")
    ev.add_argument("--out", default="results/eval", help="folder for JSON, CSV and PNG results")
    ev.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``retrieval-attn`` console script."""
    args = _parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
