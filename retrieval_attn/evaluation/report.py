"""Report writers of the tools: aligned text tables, CSV and JSON files, and the telemetry table and plot.

``Interrupted`` is how a tool stopped by Ctrl-C hands back what it finished: a ``KeyboardInterrupt``
carrying the partial report, so a caller that does not look at it sees Ctrl-C as usual.

One table writer (``format_columns``) serves every terminal report of the CLI and the benchmarks; one
CSV writer and one JSON writer every results folder (``settings_dict`` puts a tool's settings, with
the ``RetrievalConfig`` they embed, into its JSON). Plots use matplotlib's Agg backend, imported
only when a plot is drawn. This module computes nothing: rows in, text and files out.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = [
    "Interrupted",
    "format_columns",
    "write_csv",
    "write_json",
    "settings_dict",
    "format_telemetry_table",
    "plot_telemetry",
    "pyplot",
]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a tool's run; ``partial`` holds the report (or rows) of what had finished."""

    def __init__(self, partial: Any):
        super().__init__("interrupted")
        self.partial = partial


def format_columns(header: Sequence[str] | None, rows: Sequence[Sequence[Any]]) -> str:
    """Aligned columns: the first left-aligned, the others right-aligned; ``header`` None: no header lines."""
    lines = [list(map(str, r)) for r in rows]
    table = ([list(header)] if header is not None else []) + lines
    widths = [max(len(x) for x in col) for col in zip(*table)] if table else []

    def line(row: list[str]) -> str:
        return "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(row, widths)))

    out = [line(r) for r in lines]
    if header is not None:
        out = [line(list(header)), "  ".join("-" * w for w in widths), *out]
    return "\n".join(out)


def write_csv(path: str | Path, records: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """One row per record, columns ``columns`` (default: the first record's keys; missing values are empty)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(columns) if columns is not None else (list(records[0]) if records else [])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    return path


def write_json(path: str | Path, payload: Any, indent: int | None = 1) -> Path:
    """``payload`` as JSON (one trailing newline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=indent) + "\n")
    return path


def settings_dict(settings: Any) -> dict[str, Any]:
    """The constructor fields of a settings dataclass as a JSON-ready dict; a nested dataclass (the
    embedded ``RetrievalConfig``) becomes a dict too, and a mapping (``index_params``) a plain dict."""
    out = {}
    for f in dataclasses.fields(settings):
        if f.init:
            value = getattr(settings, f.name)
            if dataclasses.is_dataclass(value):
                value = settings_dict(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
    return out


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_TELEMETRY_FIELDS = ("recall_mean", "recall_worst_head", "recall_min", "mass_mean", "mass_worst_head", "mass_min")


def format_telemetry_table(rows: Sequence[Mapping[str, float | int]], label: str = "layer") -> str:
    """Aligned table of ``telemetry.summarise`` rows, each carrying a ``label`` column (e.g. the layer index)."""
    header = [label, "steps", "recall mean", "recall worst head", "recall min", "mass mean", "mass worst head",
              "mass min"]
    return format_columns(header, [[r[label], r["steps"], *(f"{r[f]:.4f}" for f in _TELEMETRY_FIELDS)] for r in rows])


def plot_telemetry(series: Mapping[str, Sequence[Mapping[str, float | int]]], path: str | Path, title: str,
                   top_k: int) -> Path:
    """PNG of recall and mass per layer (mean: solid, worst head: dashed), one curve per series.

    series : name (e.g. a method) -> ``telemetry.summarise`` rows with a ``layer`` field.
    top_k : the k of the recall (the keys retrieved per query head and step).
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, rows) in enumerate(series.items()):
        color = plt.get_cmap("tab10")(i % 10)
        layers = [r["layer"] for r in rows]
        for ax, metric in zip(axes, ("recall", "mass")):
            ax.plot(layers, [r[f"{metric}_mean"] for r in rows], "o-", color=color, label=name, ms=3)
            ax.plot(layers, [r[f"{metric}_worst_head"] for r in rows], "--", color=color, alpha=0.6)
    axes[0].set_ylabel(f"recall@{top_k} of the retrieved keys")
    axes[1].set_ylabel("mass held: sink + window + retrieved")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{title}: mean over steps and heads (-), worst head (--)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
