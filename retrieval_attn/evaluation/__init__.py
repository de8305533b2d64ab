"""The tools: recall sweep, needle and fidelity eval, decode benchmark, and their report writers.

Runtime code (``engine``, ``hf``, ``index``, ...) never imports this package; it builds on them. It
runs models only through ``retrieval_attn.hf`` (``hf.Decoder``, the one decode driver) and never
imports transformers itself; its modules import ``hf`` inside the functions that load or run a model,
so the CLI reads their defaults without loading transformers. Nothing here prints: ``cli`` and the
``bench/`` scripts do.

::

    texts.py         the texts models run on (CPython's prose, the shipped book) and their token ids
    capture.py       post-RoPE q/k of a model on a long text, captured once and cached on disk
    backends.py      index backends as tools name them (name:param=v1,v2) and resolve them per size
    sweep.py         recall versus cost of every backend on captured q/k: settings, runs, results files
    drift.py         recall of an index while decoding adds keys, against a rebuild
    methods.py       eval's methods (full, index backends, sink+window) and one sequence run through each
    settings.py      the eval run's settings, checked whole, and the needle tasks they name
    needle.py        needle prompts (passkey, number, multikey) and the needle grid
    fidelity.py      teacher-forced KL, top-1 agreement and perplexity against full attention
    evaluate.py      the eval run: its report, results files, table
    decode_bench.py  decode speed and memory against transformers' full and offloaded caches
    report.py        the one table writer, CSV and JSON writers, the telemetry table and plot

Each of ``sweep``, ``evaluate`` and ``decode_bench`` has its own ``write_results``; import it from
that module. Recall@k and attention mass come from ``retrieval_attn.metrics``.
"""

from .backends import DEFAULT_BACKENDS, BackendSpec, parse_backend_spec
from .capture import CapturedQK, capture_layers, default_layers, load_or_capture, model_and_tokens
from .decode_bench import METHODS, BenchSettings, MethodResult, format_bench_table, run_decode_bench
from .drift import insertion_drift, turn_drift
from .evaluate import EvalReport, format_eval_table, run_eval
from .methods import DEFAULT_METHODS, FULL, SINK_WINDOW
from .needle import NeedleSample, make_needle
from .report import format_columns, write_csv, write_json
from .settings import TASKS, EvalSettings
from .sweep import SweepReport, SweepSettings, format_sweep_table, run_sweep
from .texts import book_text, builtin_text, builtin_token_ids

__all__ = [
    "DEFAULT_BACKENDS",
    "DEFAULT_METHODS",
    "FULL",
    "METHODS",
    "SINK_WINDOW",
    "TASKS",
    "BackendSpec",
    "BenchSettings",
    "CapturedQK",
    "EvalReport",
    "EvalSettings",
    "MethodResult",
    "NeedleSample",
    "SweepReport",
    "SweepSettings",
    "book_text",
    "builtin_text",
    "builtin_token_ids",
    "capture_layers",
    "default_layers",
    "format_bench_table",
    "format_columns",
    "format_eval_table",
    "format_sweep_table",
    "insertion_drift",
    "load_or_capture",
    "make_needle",
    "model_and_tokens",
    "parse_backend_spec",
    "run_decode_bench",
    "run_eval",
    "run_sweep",
    "turn_drift",
    "write_csv",
    "write_json",
]
