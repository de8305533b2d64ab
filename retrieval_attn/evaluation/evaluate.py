"""Long-context evaluation against full attention: needle retrieval and teacher-forced fidelity .

Every task compares, in one run and on one model, *methods* (``methods``: ``full``, index backends,
``sink+window``), each fed its prompts through ``hf.Decoder``: the context is prefilled (exactly, and
once for all retrieval methods, which fork it), then every token that should read it through
retrieval goes through the cache as a decode step. Tasks: the needle grid (``needle``) and
teacher-forced fidelity on the shipped book (``fidelity``). ``RetrievalConfig(telemetry=True)`` in
``EvalSettings.retrieval`` adds per-layer recall@k and attention mass of every retrieval method, over
all its decode steps (``retrieval_attn.engine.telemetry``).

This module owns the run's settings, its report and its results files (JSON, CSV, PNG); it does not
print (progress bars go to stderr). ``retrieval-attn eval`` and ``bench/fidelity.py`` print its table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..index import cpu_threads
from .fidelity import NEAR_TIE, fidelity_ids, fidelity_tables, plot_fidelity, run_fidelity
from .methods import Methods
from .needle import needle_cells, plot_needle, run_needle
from .report import (
    Interrupted,
    format_columns,
    format_telemetry_table,
    plot_telemetry,
    settings_dict,
    write_csv,
    write_json,
)
from .settings import EvalSettings

__all__ = ["EvalReport", "run_eval", "write_results", "format_eval_table"]

EMBEDDED_NAME = "embedded SmolLM2-135M-Instruct"


@dataclass
class EvalReport:
    """Everything an evaluation measured.

    needle : one row per (task, length, depth, sample, method).
    needle_cells : accuracy per (task, length, depth, method), over samples.
    fidelity : one row per method: mean and max KL, top-1 agreement (its disagreements, how many are near
        ties of full attention, the agreement where full attention decided), perplexity, over all positions.
    fidelity_bins : the same per position bin (``FIDELITY_BINS`` equal bins of the decoded positions).
    telemetry : per (method, layer) recall@k and attention mass (empty without ``settings.telemetry``).
    seconds : wall seconds per method (shared prefills split evenly), and ``total``.
    seconds_per_step : mean wall seconds of one decode step per method that ran any.
    """

    settings: EvalSettings
    model: str
    needle: list[dict[str, Any]]
    needle_cells: list[dict[str, Any]]
    fidelity: list[dict[str, Any]]
    fidelity_bins: list[dict[str, Any]]
    telemetry: list[dict[str, Any]]
    seconds: dict[str, float]
    seconds_per_step: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the whole report."""
        return {"model": self.model, "settings": settings_dict(self.settings), "seconds": self.seconds,
                "seconds_per_step": self.seconds_per_step,
                "needle_cells": self.needle_cells, "fidelity": self.fidelity, "fidelity_bins": self.fidelity_bins, "telemetry": self.telemetry,
                "needle": self.needle}


def run_eval(
    settings: EvalSettings | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    model_path: str | Path | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> EvalReport:
    """Run the needle grid and the fidelity task for every method of ``settings``.

    Give ``model`` and ``tokenizer`` (a transformers causal LM that ``RetrievalCache`` supports), or
    neither: ``hf.load_model(model_path)`` (None: the embedded SmolLM2). ``model_name`` names the model
    in the report (default: the path, or the model's class). Ctrl-C while running the
    tasks raises ``report.Interrupted`` holding the report of what finished.
    """
    from ..hf import load_model

    settings = EvalSettings() if settings is None else settings
    start = time.perf_counter()
    name = model_name or (type(model).__name__ if model is not None else str(model_path or EMBEDDED_NAME))
    if model is None:
        model, tokenizer = load_model(model_path)
    elif tokenizer is None:
        raise ValueError("give a tokenizer with the model")
    text_ids = fidelity_ids(tokenizer, settings) if settings.fidelity_tokens else None
    methods = Methods(model, settings.method_configs, settings.prefill_chunk)
    needle, res, stopped = [], {}, False
    with cpu_threads(settings.retrieval.cpu_threads):
        try:
            needle = run_needle(methods, tokenizer, settings, progress) if settings.tasks else []
            res = run_fidelity(methods, text_ids, settings, progress) if settings.fidelity_tokens else {}
        except Interrupted as stop:  # from the needle grid (rows) or the fidelity task (arrays)
            stopped = True
            if isinstance(stop.partial, list):
                needle = stop.partial
            else:
                res = stop.partial
    fidelity, bins = fidelity_tables(res, settings.fidelity_prefix) if res else ([], [])
    seconds = {**methods.seconds, "total": time.perf_counter() - start}
    report = EvalReport(settings, name, needle, needle_cells(needle), fidelity, bins, methods.telemetry_rows(), seconds,
                        methods.seconds_per_step())
    if stopped:
        raise Interrupted(report)
    return report


def write_results(report: EvalReport, folder: str | Path) -> list[Path]:
    """eval.json, needle.csv, needle_cells.csv, fidelity.csv, fidelity_bins.csv, telemetry.csv and PNGs
    (needle_<method>.png heatmaps, fidelity.png, telemetry.png) into ``folder``; the paths written."""
    folder = Path(folder)
    paths = [write_json(folder / "eval.json", report.to_dict())]
    for name, records in (("needle", report.needle), ("needle_cells", report.needle_cells),
                          ("fidelity", report.fidelity), ("fidelity_bins", report.fidelity_bins),
                          ("telemetry", report.telemetry)):
        if records:  # every record's columns (telemetry: methods with a tail estimate have more)
            paths.append(write_csv(folder / f"{name}.csv", records, list(dict.fromkeys(k for r in records for k in r))))
    if report.needle_cells:
        paths += plot_needle(report.needle_cells, report.settings, folder)
    if report.fidelity_bins:
        paths.append(plot_fidelity(report.fidelity_bins, report.model, folder / "fidelity.png"))
    if report.telemetry:
        series: dict[str, list[dict[str, Any]]] = {}
        for r in report.telemetry:
            series.setdefault(r["method"], []).append(r)
        paths.append(plot_telemetry(series, folder / "telemetry.png", f"retrieval telemetry, {report.model}",
                                    report.settings.retrieval.top_k))
    return paths


def tail_rows(telemetry: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method with a tail estimate, its telemetry rows reduced over layers: the mass sink + window +
    retrieved hold (mean, worst (layer, head)), the exact mass of the unretrieved rows, the mass the
    estimate adds, the merged total over the exact total (mean, worst (layer, head): farthest from 1),
    and the merged output's relative error with and without the estimate (``engine.telemetry``)."""
    out = []
    for m in dict.fromkeys(r["method"] for r in telemetry if "tail_exact_mean" in r):
        rows = [r for r in telemetry if r["method"] == m]

        def mean(f: str) -> float:
            return sum(r[f] for r in rows) / len(rows)

        out.append({"method": m, "mass_mean": mean("mass_mean"), "mass_worst_head": min(r["mass_worst_head"] for r in rows),
                    "tail_exact_mean": mean("tail_exact_mean"), "tail_added_mean": mean("tail_added_mean"),
                    "tail_mass_ratio_mean": mean("tail_mass_ratio_mean"),
                    "tail_mass_ratio_worst_head": max((r["tail_mass_ratio_worst_head"] for r in rows),
                                                      key=lambda x: abs(x - 1)),
                    "out_err_mean": mean("out_err_mean"), "out_err_top_k_mean": mean("out_err_top_k_mean")})
    return out


def format_eval_table(report: EvalReport) -> str:
    """The terminal report: needle accuracy per method (overall and per length), fidelity per method,
    the telemetry per layer of each method, seconds per method."""
    s = report.settings
    config = s.retrieval
    parts = [f"model: {report.model}; sink {config.sink_tokens}, window {config.window_tokens}, top_k {config.top_k}"]
    if report.needle_cells:
        header = ["method", "all", *(f"{t}" for t in s.tasks), *(f"{n} tok" for n in s.lengths)]

        def acc(cells: list[dict[str, Any]]) -> str:  # "-": no cell finished (an interrupted run)
            return f"{sum(c['accuracy'] for c in cells) / len(cells):.2f}" if cells else "-"

        rows = []
        for m in s.methods:
            cells = [c for c in report.needle_cells if c["method"] == m]
            rows.append([m, acc(cells), *(acc([c for c in cells if c["task"] == t]) for t in s.tasks),
                         *(acc([c for c in cells if c["length"] == n]) for n in s.lengths)])
        parts += [f"\nneedle accuracy ({len(s.depths)} depths x {s.samples} sample(s) per cell; question and "
                  "answer decoded through the cache)", format_columns(header, rows)]
    if report.fidelity:
        parts += [f"\nteacher-forced fidelity: {s.fidelity_tokens} decode steps after a {s.fidelity_prefix}-token "
                  f"prefix of {s.text}",
                  format_columns(["method", "KL mean", "KL p99", "KL max", "top-1 agree", "misses (near ties)",
                                  "agree where full decided", "ppl"],
                                 [[r["method"], f"{r['kl_mean']:.5f}", f"{r['kl_p99']:.4f}", f"{r['kl_max']:.3f}",
                                   f"{100 * r['top1_agreement']:.2f}%",
                                   f"{r['disagreements']} ({r['near_tie_disagreements']})",
                                   f"{100 * r['top1_agreement_decided']:.2f}%", f"{r['ppl']:.3f}"]
                                  for r in report.fidelity]),
                  f"(near tie: full attention's top token under {NEAR_TIE:g}x as likely as its second)"]
    for m in dict.fromkeys(r["method"] for r in report.telemetry):
        parts += [f"\ntelemetry: {m}", format_telemetry_table([r for r in report.telemetry if r["method"] == m])]
    tails = tail_rows(report.telemetry)
    if tails:
        parts += ["\ntail estimate against exact attention (over layers and steps; worst: the worst (layer, head)'s mean "
                  "over steps)",
                  format_columns(["method", "held (dev+top-k)", "held worst", "tail exact", "tail added",
                                  "total/exact", "total/exact worst", "out err", "out err w/o"],
                                 [[r["method"], *(f"{r[f]:.4f}" for f in list(r)[1:])] for r in tails])]
    parts += ["\nseconds: " + ", ".join(f"{m} {v:.1f}" for m, v in report.seconds.items())]
    if report.seconds_per_step:
        parts += ["seconds per decode step: " + ", ".join(f"{m} {v:.4f}" for m, v in report.seconds_per_step.items())]
    return "\n".join(parts)
