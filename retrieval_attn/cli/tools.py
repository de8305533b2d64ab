"""The tool commands: ``sweep`` (recall versus cost of every index backend on the model's real queries
and keys, ``evaluation.sweep``; ``bench/recall_sweep.py``), ``bench`` (decode speed and memory against
transformers' full and offloaded caches, ``evaluation.decode_bench``; ``bench/decode.py``), ``eval``
(full attention, every index backend and the sink + window baseline on needle retrieval and
teacher-forced fidelity, ``evaluation.evaluate``; ``bench/fidelity.py``) and ``cache`` (the cached
de-quantised models). Each has its flags and its run here; the tools themselves live in ``evaluation``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

from ..checks import DTYPE_NAMES
from ..index.registry import available_indexes
from .common import (
    UserError, _cpu_threads, _device, _interrupted, _model, _model_name, _out_dir,
    _stage, _user_errors,
)
from .flags import add_retrieval_flags, retrieval_config


def sweep_command(args: argparse.Namespace) -> int:
    from ..evaluation.backends import DEFAULT_BACKENDS, parse_backend_spec
    from ..evaluation.report import Interrupted
    from ..evaluation.sweep import SweepSettings, format_sweep_table, run_sweep, write_results

    with _user_errors("--backend: "):
        backends = tuple(parse_backend_spec(s) for s in args.backend) if args.backend else DEFAULT_BACKENDS
    with _user_errors(flags={"ks": "--top-k", "backends": "--backend"}):
        settings = SweepSettings(
            lengths=tuple(args.lengths), layers=tuple(args.layers) if args.layers else None,
            retrieval=retrieval_config(args), n_test=args.n_test, ks=tuple(args.ks),
            target_recall=args.target_recall, train_positions=args.train_positions, backends=backends,
            rows_dtype=args.rows_dtype,
        )
    _cpu_threads(args.cpu_threads)
    info = _model(args.model)
    bad = [layer for layer in args.layers or () if info.num_layers is not None and not 0 <= layer < info.num_layers]
    if bad:
        raise UserError(f"--layers: {', '.join(map(str, bad))} not in the model's layers, 0 to {info.num_layers - 1}")
    out = _out_dir(args.out)

    from ..hf import quiet_transformers

    quiet_transformers()
    try:
        report = run_sweep(settings, model_path=args.model, cache_dir=None if args.no_cache else args.cache_dir)
    except Interrupted as stop:  # what finished is kept: its files and its table
        write_results(stop.partial, out)
        print(format_sweep_table(stop.partial))
        return _interrupted(out)
    write_results(report, out)
    print(format_sweep_table(report))
    print(f"results: {out}/ (rows.csv, summary.csv, sweep.json, recall_vs_scanned.png, recall_vs_latency.png)")
    print(json.dumps({"operating_points": report.operating_points, "capture": report.capture}))
    return 0


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sweep's options to ``parser`` (``retrieval-attn sweep``, also run by ``bench/recall_sweep.py``)."""
    from ..evaluation.backends import DEFAULT_BACKENDS
    from ..evaluation.sweep import SweepSettings

    d = SweepSettings()
    parser.add_argument("--model", default=None, metavar="GGUF_OR_FOLDER",
                        help="GGUF file or transformers folder (default: embedded SmolLM2)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(d.lengths), metavar="N",
                        help="context lengths in tokens")
    parser.add_argument("--layers", type=int, nargs="+", default=None, metavar="L",
                        help="decoder layers to sample (default: 5 spread over depth, 3 9 16 22 29 for 30 layers)")
    add_retrieval_flags(parser, ("sink_tokens", "window_tokens"), d.retrieval)
    parser.add_argument("--n-test", type=int, default=d.n_test, metavar="N",
                        help="decode-like test positions per length")
    parser.add_argument("--top-k", dest="ks", type=int, nargs="+", default=list(d.ks), metavar="K",
                        help="top-k values; the first is primary")
    parser.add_argument("--target-recall", type=float, default=d.target_recall, metavar="R",
                        help="recall of the operating point")
    parser.add_argument("--train-positions", choices=["prefix", "middle"], default=d.train_positions,
                        help="positions whose queries train query-aware indexes")
    parser.add_argument("--rows-dtype", choices=DTYPE_NAMES, default=d.rows_dtype,
                        help="dtype the indexes read the keys in: float32 (each index its own copy) or the "
                             "model's half dtype, held once in a CPU store and read in place, as in decoding")
    parser.add_argument("--backend", action="extend", nargs="+", default=None, metavar="NAME[:PARAM=V1,V2,...]",
                        help=f"backends and parameter values, one or more, repeatable; names: "
                             f"{', '.join(available_indexes())} (default: "
                             + " ".join(str(b) for b in DEFAULT_BACKENDS) + ")")
    add_retrieval_flags(parser, ("cpu_threads",), d.retrieval)
    parser.add_argument("--out", default="results/recall_sweep", metavar="DIR",
                        help="folder for CSV, JSON and PNG results")
    parser.add_argument("--cache-dir", default="results/qk_cache", metavar="DIR", help="folder caching captured q/k")
    parser.add_argument("--no-cache", action="store_true", help="capture again and do not cache")


def bench_command(args: argparse.Namespace) -> int:
    import torch

    from ..evaluation.decode_bench import BenchSettings, format_bench_table, ratio_rows, run_decode_bench, write_results
    from ..evaluation.report import Interrupted

    device = _device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if args.gpu_memory_gib is not None and not on_gpu:
        raise UserError(f"--gpu-memory-gib caps a CUDA device's memory; --device is {device}")
    with _user_errors():
        settings = BenchSettings(
            shape=args.shape or ("llama3-8b" if on_gpu else "small"),
            contexts=tuple(args.contexts or ((32768, 65536, 131072) if on_gpu else (4096, 8192, 16384))),
            methods=tuple(args.methods), steps=args.steps, warmup=args.warmup, prefill_chunk=args.prefill_chunk,
            device=str(device), dtype=args.dtype or ("bfloat16" if on_gpu else "float32"),
            retrieval=retrieval_config(args),
        )
    _cpu_threads(args.cpu_threads)
    out = _out_dir(args.out)

    from ..hf import quiet_transformers

    quiet_transformers()
    machine = (f"{torch.cuda.get_device_name(device)}, " if on_gpu else "CPU only, ") + (
        f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}")
    print(f"decode benchmark: shape {settings.shape}, {settings.dtype} on {device} ({machine})", file=sys.stderr)
    try:
        results = run_decode_bench(settings, progress=lambda msg: print(msg, file=sys.stderr),
                                   on_result=lambda done: write_results(done, settings, out, machine))
    except Interrupted as stop:  # on_result wrote every finished measurement
        print(format_bench_table(stop.partial))
        return _interrupted(out)
    folder = write_results(results, settings, out, machine)
    print(format_bench_table(results))
    print(f"results: {folder}/ (decode.json, decode.csv, layers.csv)")
    print(json.dumps({"ratios": ratio_rows(results)}))
    return 0


def add_bench_arguments(bench: argparse.ArgumentParser) -> None:
    """The options of ``bench``."""
    from ..evaluation.decode_bench import METHODS

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
    bench.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                       help="weight dtype (default: bfloat16 on a GPU, float32 on CPU)")
    add_retrieval_flags(bench, ("gpu_memory_gib",), extra={"gpu_memory_gib": "; e.g. 24 to emulate a consumer "
                                                            "card (the baselines run uncapped)"})
    add_retrieval_flags(bench, ("sink_tokens", "window_tokens", "top_k", "cpu_threads", "retrieved_attention",
                                "overlap"))
    bench.add_argument("--out", default="results/decode", metavar="DIR", help="folder for decode.json and decode.csv")


def eval_command(args: argparse.Namespace) -> int:
    from ..evaluation.evaluate import EMBEDDED_NAME, format_eval_table, run_eval, write_results
    from ..evaluation.report import Interrupted
    from ..evaluation.settings import EvalSettings

    with _user_errors():
        settings = EvalSettings(
            methods=tuple(args.methods), tasks=tuple(args.tasks), lengths=tuple(args.lengths),
            depths=tuple(args.depths), samples=args.samples, fidelity_tokens=args.fidelity_tokens,
            fidelity_prefix=args.fidelity_prefix, text=args.text, retrieval=retrieval_config(args, index="flat"),
            seed=args.seed,
            prefill_chunk=args.prefill_chunk,
        )  # every method sets its index; flat's leaves top_k unbounded here
    _cpu_threads(args.cpu_threads)
    _model(args.model)
    out = _out_dir(args.out)

    from ..hf import load_model, quiet_transformers

    quiet_transformers()
    with _stage(f"loading {_model_name(args.model)}"), _user_errors("--model: "):
        model, tokenizer = load_model(args.model)
    try:
        report = run_eval(settings, model=model, tokenizer=tokenizer, model_name=args.model or EMBEDDED_NAME)
    except Interrupted as stop:  # what finished is kept: its files (telemetry too) and its table
        write_results(stop.partial, out)
        print(format_eval_table(stop.partial))
        return _interrupted(out)
    paths = write_results(report, out)
    print(format_eval_table(report))
    print(f"results: {out}/ ({', '.join(p.name for p in paths)})")
    return 0


def add_eval_arguments(ev: argparse.ArgumentParser) -> None:
    """The options of ``eval``."""
    from ..evaluation.methods import DEFAULT_METHODS
    from ..evaluation.settings import TASKS, EvalSettings
    from ..evaluation.texts import BOOKS

    d = EvalSettings()
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
    ev.add_argument("--text", default=d.text, choices=list(BOOKS), help="the fidelity task's book")
    add_retrieval_flags(ev, ("top_k", "sink_tokens", "window_tokens", "telemetry"), d.retrieval)
    ev.add_argument("--seed", type=int, default=d.seed, metavar="N", help="base seed of the needle generators")
    ev.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk, metavar="N",
                    help="tokens per prefill forward pass")
    add_retrieval_flags(ev, ("cpu_threads",), d.retrieval,
                        extra={"cpu_threads": "; eval: also the threads of the whole run (1 is often fastest on "
                                              "a shared machine)"})
    ev.add_argument("--out", default="results/eval", metavar="DIR", help="folder for JSON, CSV and PNG results")


def cache_command(args: argparse.Namespace) -> int:
    from ..model_files import cache_entries, clear_model_cache, model_cache_dir

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


def add_cache_arguments(cache: argparse.ArgumentParser) -> None:
    """The options of ``cache``."""
    cache.add_argument("--clear", action="store_true", help="remove every cached model")
