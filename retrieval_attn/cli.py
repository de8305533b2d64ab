"""The ``retrieval-attn`` command line: ``generate``, ``sweep``, ``bench`` and ``eval``.

The only module of the package that prints. ``generate`` loads a model (the embedded SmolLM2 by
default), prefills the prompt in chunks with a progress bar, streams greedy decoding token by token,
and ends with a table of where the tokens are and what each step cost (with ``--telemetry``, also
recall@k and attention mass per layer, and a PNG). ``sweep`` measures recall versus cost of every
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
                                      cpu_threads=args.cpu_threads, overlap=False if args.no_overlap else None,
                                      retrieved_attention=args.retrieved_attention,
                                      gpu_memory_gib=args.gpu_memory_gib),
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    machine = (f"{torch.cuda.get_device_name(device)}, " if on_gpu else "CPU only, ") + (
        f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}")
    print(f"decode benchmark: shape {settings.shape}, {settings.dtype} on {device} ({machine})", file=sys.stderr)
    results = run_decode_bench(settings, progress=lambda msg: print(msg, file=sys.stderr),
                               on_result=lambda done: write_results(done, settings, args.out, machine))
    folder = write_results(results, settings, args.out, machine)
    print(format_bench_table(results))
    print(f"results: {folder}/ (decode.json, decode.csv, layers.csv)")
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
