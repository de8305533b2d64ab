"""Recall versus cost of the index backends on real attention queries and keys.

A *sweep* captures post-RoPE queries and keys of a few layers of a model on a long text, then, for
each context length ``n``, each sampled layer and each backend and search parameter, replays the
decode-time retrieval problem of that layer and measures what the index returns against exact search.

The setting of one (length ``n``, layer), token positions left to right::

    [0, sink)            sink: static, stays on the device
    [sink, n-T-window)   middle: offloaded; the index holds these keys (one group per KV head)
    [n-T-window, n-T)    window: static, stays on the device
    [n-T, n)             T = n_test decode-like test queries, held out from training

Test queries are grouped per KV head (query head h belongs to KV head h // (Hq / Hkv)) and see the
keys strictly before the test block (static + middle; not the test block itself, a simplification).
``roar`` trains on the prefill queries of every query head of the group at the positions before the
test block (``train_positions="prefix"``, what the engine samples at prefill) or only at the middle
positions (``"middle"``); the backend subsamples them (its ``train_queries`` parameter).

Measured per (length, layer, KV head, backend, parameter value, k):

- ``recall``: recall@k against exact top-k over the middle keys, by intersection, tie-tolerant
  (a returned key counts if its exact score reaches the k-th best within ``RECALL_RTOL``);
- ``mass``: softmax mass over all visible keys held by the static keys plus the returned ones, and
  ``mass_exact``, the same with the exact top-k (the best any top-k retrieval can do);
- ``scanned``: fraction of the middle keys whose score the search computed (``SearchResult.scored``);
- ``us_per_query``: one ``search`` call per decode step with all query heads of the layer, as in
  decode; median call time over the ``n_test`` steps (after one warm-up call) divided by Hq
  (``us_per_query_best``: the fastest call, less sensitive to other work on the machine);
- ``build_s`` and ``index_bytes`` of the layer's index (all KV heads).

One forward pass at the longest length serves every length: attention is causal, so the queries and
keys of the first ``n`` tokens do not depend on later tokens. The q/k come from ``capture`` (cached on
disk per layer); backends are named and resolved as in ``backends``; sink, window and CPU threads are
those of the settings' ``RetrievalConfig``.

This module computes and writes result files; it does not print (progress bars go to stderr).
``bench/recall_sweep.py`` (and the CLI) print its table. It runs no model itself (``capture`` does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..checks import DTYPE_NAMES, ConfigError, dtype_named, check_choice, check_int, check_ints, check_number, missing_library_message
from ..config import RetrievalConfig
from ..index import available_indexes, cpu_threads, index_class, make_index, missing_library
from ..offload import KVStore
from ..metrics import attention_mass, recall_at_k
from .backends import DEFAULT_BACKENDS, BackendSpec, plan_backend, warm_up
from .capture import CapturedQK, default_layers, load_or_capture, model_and_tokens
from .report import Interrupted, format_columns, pyplot, settings_dict, write_csv, write_json
from .texts import builtin_token_ids

__all__ = [
    "SweepSettings",
    "SweepReport",
    "operating_point",
    "evaluate_layer",
    "run_sweep",
    "write_results",
    "format_sweep_table",
]


@dataclass(frozen=True)
class SweepSettings:
    """Every knob of a sweep.

    Attributes
    ----------
    lengths : context lengths (tokens) to evaluate; each is a prefix of the captured sequence.
    layers : decoder layers to sample; None: ``default_layers`` of the model (or all captured layers).
    retrieval : ``sink_tokens`` and ``window_tokens``: static tokens at the start and just before the test
        block (stay on the device); ``cpu_threads``: threads of torch, numba and faiss while indexes are
        built and searched (None: their defaults; one thread gives steadier timings on a machine shared
        with other work). The sweep's top-k values are ``ks``; the other fields do not apply.
    n_test : decode-like test positions at the end of each length, held out from training.
    ks : top-k values; the first is the primary one (table, plots, operating points, mass).
    target_recall : recall@k that every sampled (layer, KV head) must reach at the operating point.
    train_positions : ``"prefix"`` (all positions before the test block) or ``"middle"`` (middle only).
    backends : what to sweep; a name that is not a registered backend, or a parameter it does not
        declare, is refused.
    rows_dtype : the dtype the indexes read the middle keys in: ``"float32"`` (each index keeps its own
        fp32 copy) or ``"bfloat16"``/``"float16"`` (the keys are rounded to it and held once in a
        ``KVStore`` that every index reads in place, as in the engine; exact scores use the rounded keys).
    """

    lengths: tuple[int, ...] = (2048, 8192, 32768)
    layers: tuple[int, ...] | None = None
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    n_test: int = 64
    ks: tuple[int, ...] = (100,)
    target_recall: float = 0.95
    train_positions: str = "prefix"
    backends: tuple[BackendSpec, ...] = DEFAULT_BACKENDS
    rows_dtype: str = "float32"

    def __post_init__(self) -> None:
        own = type(self).__name__
        check_choice(own, "rows_dtype", self.rows_dtype, DTYPE_NAMES)
        check_int(own, "n_test", self.n_test, 1)
        check_ints(own, "ks", self.ks, 1)
        check_number(own, "target_recall", self.target_recall, 0, 1, low_open=True)
        check_choice(own, "train_positions", self.train_positions, ("prefix", "middle"))
        names = available_indexes()
        for spec in self.backends:
            lacking = missing_library(spec.name)
            check_choice(own, "backends", spec.name, names, f" (it {missing_library_message(lacking)})" if lacking else "")
            unknown = sorted(set(spec.params) - set(index_class(spec.name).params))
            if unknown:
                raise ValueError(f"backend {spec.name!r}: unknown parameter(s) {unknown}; allowed: "
                                 f"{sorted(index_class(spec.name).params) or 'none'}")
        need = self.retrieval.sink_tokens + self.retrieval.window_tokens + self.n_test + max(self.ks)
        check_ints(own, "lengths", self.lengths, need, why="sink + window + n_test + the largest top-k: the keys a "
                   "test position can retrieve")


def operating_point(scanned: Sequence[float], min_recall: Sequence[float], target: float) -> int | None:
    """Index of the cheapest grid point (smallest ``scanned``) whose ``min_recall`` reaches ``target``, or None."""
    ok = [i for i, r in enumerate(min_recall) if r >= target]
    return min(ok, key=lambda i: scanned[i]) if ok else None


@dataclass
class _LayerProblem:
    """The retrieval problem of one layer at one length (see the module docstring for the positions)."""

    n: int
    keys_mid: np.ndarray | Any  # [G, n_mid, D] fp32 keys the index copies, or a store's key source (rows_dtype)
    train: np.ndarray  # [G, rep * P, D] training queries of each group
    steps: np.ndarray  # [T, G, rep, D] test queries, one search call per decode step
    mid_scores: np.ndarray  # [G, T * rep, n_mid] exact q . key, queries in (T, rep) order
    lse_static: np.ndarray  # [G, T * rep] float64 lse of the static keys' scaled logits (-inf: none)


def _layer_problem(q: np.ndarray, k: np.ndarray, settings: SweepSettings, scale: float) -> _LayerProblem:
    hq, n, dim = q.shape
    groups, t = k.shape[0], settings.n_test
    s, w = settings.retrieval.sink_tokens, settings.retrieval.window_tokens
    rep = hq // groups
    mid0, mid1 = s, n - t - w  # middle keys [mid0, mid1)
    if mid1 - mid0 < max(settings.ks):
        raise ValueError(f"{n} tokens leave {mid1 - mid0} middle keys, fewer than k={max(settings.ks)}")
    rows = torch.from_numpy(np.ascontiguousarray(k[:, mid0:mid1])).to(dtype_named(settings.rows_dtype))
    keys_mid = rows.float().numpy()  # [G, n_mid, D]: the keys the index reads, in fp32 for the exact scores
    source: Any = keys_mid
    if settings.rows_dtype != "float32":
        store = KVStore(groups, dim, dtype=rows.dtype, capacity=rows.shape[1])
        store.append(rows, rows)
        source = store.key_source
    keys_static = np.concatenate([k[:, :s], k[:, mid1 : n - t]], axis=1)  # [G, s + w, D]
    test = q[:, n - t :].reshape(groups, rep, t, dim)  # [G, rep, T, D]: query head h is in group h // rep
    flat_q = torch.from_numpy(np.ascontiguousarray(test.transpose(0, 2, 1, 3).reshape(groups, t * rep, dim)))
    p0, p1 = (0, n - t) if settings.train_positions == "prefix" else (mid0, mid1)
    return _LayerProblem(
        n=n,
        keys_mid=source,
        train=np.ascontiguousarray(q[:, p0:p1].reshape(groups, rep * (p1 - p0), dim)),
        steps=np.ascontiguousarray(test.transpose(2, 0, 1, 3)),
        mid_scores=torch.bmm(flat_q, torch.from_numpy(keys_mid).transpose(1, 2)).numpy(),
        lse_static=torch.logsumexp(
            torch.bmm(flat_q, torch.from_numpy(keys_static).transpose(1, 2)).double() * scale, dim=-1).numpy(),
    )


def _search_steps(
    index: Any, steps: np.ndarray, k: int, params: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """One warm-up call, then one ``search`` per decode step of steps [T, G, rep, D].

    Returns ids [G, T * rep, k] (queries in (T, rep) order), scored [G, T * rep], and the median and
    the fastest seconds per call.
    """
    t, groups, rep, _ = steps.shape
    index.search(steps[0], k, **params)
    ids = np.empty((t, groups, rep, k), np.int64)
    scored = np.empty((t, groups, rep), np.int64)
    seconds = np.empty(t)
    for i in range(t):
        start = time.perf_counter()
        res = index.search(steps[i], k, **params)
        seconds[i] = time.perf_counter() - start
        ids[i], scored[i] = res.ids, res.scored
    ids = ids.transpose(1, 0, 2, 3).reshape(groups, t * rep, k)
    return ids, scored.transpose(1, 0, 2).reshape(groups, t * rep), float(np.median(seconds)), float(seconds.min())


def evaluate_layer(
    q: np.ndarray,
    k: np.ndarray,
    settings: SweepSettings,
    scale: float,
    layer: int | None = None,
    notes: set[str] | None = None,
    bar: tqdm | None = None,
) -> list[dict[str, Any]]:
    """Rows of measurements for one layer at one length: one per (backend, value, k, KV head).

    q : (Hq, n, D) and k : (Hkv, n, D) post-RoPE, the first n tokens of a sequence; ``layer`` only
    labels the rows. Graph ``ef`` values below k are skipped with a note added to ``notes``; ``bar``
    advances by one per backend.
    """
    notes = set() if notes is None else notes
    prob = _layer_problem(q, k, settings, scale)
    hq, groups, n_mid = q.shape[0], k.shape[0], prob.mid_scores.shape[2]
    exact_mass = {}  # k -> [G]
    for kk in settings.ks:
        exact_ids = torch.topk(torch.from_numpy(prob.mid_scores), kk, dim=-1).indices.numpy()  # [G, M, kk]
        exact_mass[kk] = attention_mass(exact_ids, prob.mid_scores, scale, prob.lse_static).mean(-1)
    rows: list[dict[str, Any]] = []
    for spec in settings.backends:
        if bar is not None:
            bar.set_postfix_str(f"n={prob.n} layer={layer} {spec.name}")
        if (plan := plan_backend(spec, n_mid, notes)).grid:
            first = {} if plan.grid_param is None else {plan.grid_param: plan.grid[0]}  # checked against build params
            index = make_index(plan.name, **plan.build, **first)
            index.build(prob.keys_mid, prob.train if index.uses_train_queries else None)
            for kk in settings.ks:
                for value in plan.grid:
                    if plan.grid_param in ("ef", "candidates") and value < kk:
                        notes.add(f"{plan.name}: {plan.grid_param}={value} skipped for k={kk} "
                                  f"({plan.grid_param} must be >= k)")
                        continue
                    params = {} if value is None else {plan.grid_param: value}
                    ids, scored, call_s, best_s = _search_steps(index, prob.steps, kk, params)
                    recall = recall_at_k(ids, prob.mid_scores, kk).mean(-1)  # [G]
                    mass = attention_mass(ids, prob.mid_scores, scale, prob.lse_static).mean(-1)  # [G]
                    frac = scored.mean(-1) / n_mid  # [G]
                    for g in range(groups):
                        rows.append({
                            "length": prob.n,
                            "layer": layer,
                            "kv_head": g,
                            "backend": plan.label,
                            "param": plan.grid_param or "",
                            "value": "" if value is None else value,
                            "build_params": " ".join(f"{p}={v}" for p, v in plan.build.items()),
                            "k": kk,
                            "recall": float(recall[g]),
                            "mass": float(mass[g]),
                            "mass_exact": float(exact_mass[kk][g]),
                            "scanned": float(frac[g]),
                            "us_per_query": call_s / hq * 1e6,
                            "ms_per_call": call_s * 1e3,
                            "us_per_query_best": best_s / hq * 1e6,
                            "build_s": index.build_seconds,
                            "index_bytes": int(index.nbytes),
                            "n_keys": n_mid,
                        })
        if bar is not None:
            bar.update(1)
    return rows


@dataclass
class SweepReport:
    """Everything a sweep measured.

    rows : one dict per (length, layer, KV head, backend, value, k) (see ``evaluate_layer``).
    summary : one dict per (length, backend, value, k), aggregated over layers and KV heads.
    operating_points : one dict per (length, backend, k): the cheapest grid point whose recall@k
        reaches ``target_recall`` on every sampled (layer, KV head), or ``reached=False``.
    capture : tokens captured, seconds of the forward (None if from cache), where cached.
    """

    settings: SweepSettings
    model: str
    layers: tuple[int, ...]
    capture: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    operating_points: list[dict[str, Any]]
    notes: list[str]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the whole report."""
        settings = {**settings_dict(self.settings), "backends": [str(b) for b in self.settings.backends]}
        return {
            "model": self.model,
            "layers": list(self.layers),
            "settings": settings,
            "capture": self.capture,
            "seconds": self.seconds,
            "notes": self.notes,
            "operating_points": self.operating_points,
            "summary": self.summary,
            "rows": self.rows,
        }


def _summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["length"], r["backend"], r["param"], r["value"], r["k"]), []).append(r)
    out = []
    for (length, backend, param, value, k), rs in groups.items():
        per_layer = {r["layer"]: r for r in rs}.values()  # layer-level fields, one row per layer
        recall = np.array([r["recall"] for r in rs])
        out.append({
            "length": length,
            "backend": backend,
            "param": param,
            "value": value,
            "build_params": rs[0]["build_params"],
            "k": k,
            "recall_median": float(np.median(recall)),
            "recall_min": float(recall.min()),
            "recall_mean": float(recall.mean()),
            "mass": float(np.mean([r["mass"] for r in rs])),
            "mass_exact": float(np.mean([r["mass_exact"] for r in rs])),
            "scanned_median": float(np.median([r["scanned"] for r in rs])),
            "scanned_mean": float(np.mean([r["scanned"] for r in rs])),
            "us_per_query": float(np.median([r["us_per_query"] for r in per_layer])),
            "ms_per_call": float(np.median([r["ms_per_call"] for r in per_layer])),
            "us_per_query_best": float(np.median([r["us_per_query_best"] for r in per_layer])),
            "build_s": float(np.mean([r["build_s"] for r in per_layer])),
            "index_mib": float(np.mean([r["index_bytes"] for r in per_layer])) / 2**20,
            "n_keys": rs[0]["n_keys"],
            "heads": len(rs),
        })
    return out


def _operating_points(summary: list[dict[str, Any]], target: float) -> list[dict[str, Any]]:
    curves: dict[tuple, list[dict[str, Any]]] = {}
    for s in summary:
        curves.setdefault((s["length"], s["backend"], s["k"]), []).append(s)
    out = []
    for (length, backend, k), pts in curves.items():
        i = operating_point([p["scanned_median"] for p in pts], [p["recall_min"] for p in pts], target)
        best = max(pts, key=lambda p: p["recall_min"])
        point = pts[i] if i is not None else best
        out.append({
            "length": length,
            "backend": backend,
            "k": k,
            "target_recall": target,
            "reached": i is not None,
            "param": point["param"],
            "value": point["value"],
            "scanned_median": point["scanned_median"],
            "us_per_query": point["us_per_query"],
            "recall_min": point["recall_min"],
        })
    return out


def run_sweep(
    settings: SweepSettings | None = None,
    *,
    qk: CapturedQK | Mapping[int, tuple[Any, Any]] | None = None,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    token_ids: torch.Tensor | None = None,
    model_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> SweepReport:
    """Capture (or take) q/k and evaluate every backend at every length and sampled layer.

    Ctrl-C while evaluating raises ``report.Interrupted`` holding the report of the (length, layer)
    pairs finished.

    Give one source of q/k:
    - ``qk``: a ``CapturedQK`` or ``{layer: (q, k)}`` (see ``CapturedQK.from_pairs``); no model needed;
    - ``model`` (a transformers causal LM) with ``token_ids`` (1, N) or a ``tokenizer`` (then the
      built-in text is used);
    - neither: ``hf.load_model(model_path)`` (None: the embedded SmolLM2) on the built-in text.
    ``cache_dir`` caches captures on disk when the model comes from ``model_path`` (or the embedded one).
    """
    settings = SweepSettings() if settings is None else settings
    start = time.perf_counter()
    need = max(settings.lengths)
    if qk is not None:
        captured = qk if isinstance(qk, CapturedQK) else CapturedQK.from_pairs(qk)
        layers = tuple(settings.layers) if settings.layers is not None else tuple(sorted(captured.k))
        missing = [layer for layer in layers if layer not in captured.k]
        if missing:
            raise ValueError(f"layers {missing} are not in the given q/k (layers {sorted(captured.k)})")
        capture = {"tokens": captured.n, "seconds": None, "source": "given"}
        name = "given q/k"
    else:
        cache_key = None
        if model is None:
            path, cache_key, model, n_layers, token_ids = model_and_tokens(model_path, cache_dir, need)
            name = str(path)
        else:
            name = type(model).__name__
            n_layers = model.config.get_text_config().num_hidden_layers
            if token_ids is None:
                if tokenizer is None:
                    raise ValueError("give token_ids or a tokenizer with a model")
                token_ids = builtin_token_ids(tokenizer, need)
        layers = tuple(settings.layers) if settings.layers is not None else default_layers(n_layers)
        if token_ids.shape[1] < need:
            raise ValueError(f"token_ids has {token_ids.shape[1]} tokens, fewer than the longest length {need}")
        token_ids = token_ids[:, :need].cpu()
        captured, seconds = load_or_capture(
            model, token_ids, layers, cache_dir if cache_key else None, cache_key, progress
        )
        capture = {
            "tokens": need,
            "seconds": seconds,
            "source": "cache" if seconds is None else "forward",
            "cache": str(Path(cache_dir) / cache_key) if cache_dir and cache_key else None,
        }
    if captured.n < need:
        raise ValueError(f"q/k hold {captured.n} tokens, fewer than the longest length {need}")

    notes: set[str] = set()
    dim = next(iter(captured.k.values())).shape[2]
    rows: list[dict[str, Any]] = []
    total = len(settings.lengths) * len(layers) * len(settings.backends)
    bar = tqdm(total=total, desc="sweep", unit="index", disable=not progress)
    def report() -> SweepReport:
        summary = _summarise(rows)
        return SweepReport(
            settings=settings,
            model=name,
            layers=layers,
            capture=capture,
            rows=rows,
            summary=summary,
            operating_points=_operating_points(summary, settings.target_recall),
            notes=sorted(notes),
            seconds=time.perf_counter() - start,
        )

    with cpu_threads(settings.retrieval.cpu_threads), bar:
        warm_up([plan_backend(b, 512, set()) for b in settings.backends], dim)
        try:
            for n in sorted(settings.lengths):
                for layer in layers:
                    q, k = captured.q[layer][:, :n], captured.k[layer][:, :n]
                    rows += evaluate_layer(q, k, settings, captured.scale, layer=layer, notes=notes, bar=bar)
        except KeyboardInterrupt:
            raise Interrupted(report()) from None
    return report()


def write_results(report: SweepReport, folder: str | Path) -> list[Path]:
    """Write rows.csv (per layer and KV head), summary.csv, sweep.json and two PNG plots into ``folder``."""
    folder = Path(folder)
    paths = [write_csv(folder / "rows.csv", report.rows), write_csv(folder / "summary.csv", report.summary),
             write_json(folder / "sweep.json", report.to_dict())]
    return paths + _plot(report, folder)


def _plot(report: SweepReport, folder: Path) -> list[Path]:
    """recall_vs_scanned.png and recall_vs_latency.png: one panel per length, one curve per backend, one
    legend below the panels; log x axes labelled with plain numbers at 1-2-5 steps (never minor-tick
    labels, which overlap when a panel spans less than a decade)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plt = pyplot()
    k = report.settings.ks[0]
    lengths = sorted({s["length"] for s in report.summary})
    backends = list(dict.fromkeys(s["backend"] for s in report.summary))
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(backends)}
    model = Path(report.model).name if Path(report.model).exists() else report.model
    out = []
    for xkey, xlabel, fmt, fname in (
        ("scanned_median", "keys scored (median over heads)", "{:.3g}%", "recall_vs_scanned.png"),
        ("us_per_query", "microseconds per query (all heads of a layer per call)", "{:g}", "recall_vs_latency.png"),
    ):
        scale = 100.0 if xkey == "scanned_median" else 1.0
        panels = max(len(lengths), 1)
        fig, axes = plt.subplots(1, panels, figsize=(max(5.6 * panels, 9.0), 4.8), squeeze=False)
        for ax, n in zip(axes[0], lengths):
            n_keys = "?"
            for b in backends:
                pts = [s for s in report.summary if s["length"] == n and s["backend"] == b and s["k"] == k]  # grid order
                if not pts:
                    continue
                n_keys = pts[0]["n_keys"]
                xs = [max(p[xkey] * scale, 1e-9) for p in pts]
                ax.plot(xs, [p["recall_median"] for p in pts], "o-", color=colors[b], label=b)
                ax.plot(xs, [p["recall_min"] for p in pts], "v--", color=colors[b], alpha=0.5)
            ax.axhline(report.settings.target_recall, color="grey", lw=0.8, ls=":")
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _, fmt=fmt: fmt.format(x)))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(axis="x", labelrotation=30)
            ax.set_title(f"{n} tokens ({n_keys} keys indexed)")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"recall@{k} over heads")
            ax.grid(True, which="both", alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6) or 1, frameon=False)
        fig.suptitle(f"{model}, layers {list(report.layers)}: recall@{k} against cost\n(solid: median over heads, "
                     f"dashed: worst head, dotted: target {report.settings.target_recall})", fontsize=10)
        fig.tight_layout(rect=(0, 0.08, 1, 1))  # the two-line title and the legend below stay inside the figure
        fig.savefig(folder / fname, dpi=110)
        plt.close(fig)
        out.append(folder / fname)
    return out


def format_sweep_table(report: SweepReport) -> str:
    """The terminal report: one row per (length, backend, value, k), the operating points, the notes."""
    multi_k = len(report.settings.ks) > 1
    header = ["tokens", "backend", "param"] + (["k"] if multi_k else [])
    kk = "k" if multi_k else str(report.settings.ks[0])
    header += [f"R@{kk} med", f"R@{kk} min", "mass", "mass exact", "scanned", "us/query", "us/q best", "ms/call",
               "build s", "MiB"]
    rows = []
    for s in report.summary:
        rows.append(
            [s["length"], s["backend"], f"{s['param']}={s['value']}" if s["param"] else "-"]
            + ([s["k"]] if multi_k else [])
            + [f"{s['recall_median']:.3f}", f"{s['recall_min']:.3f}", f"{s['mass']:.3f}", f"{s['mass_exact']:.3f}",
               f"{100 * s['scanned_median']:.2f}%", f"{s['us_per_query']:.1f}", f"{s['us_per_query_best']:.1f}",
               f"{s['ms_per_call']:.2f}",
               f"{s['build_s']:.2f}", f"{s['index_mib']:.1f}"]
        )
    cap = report.capture
    capture = (
        f"capture: {cap['tokens']} tokens, "
        + (f"{cap['seconds']:.1f} s forward" if cap.get("seconds") is not None else f"from {cap['source']}")
    )
    retrieval = report.settings.retrieval
    parts = [
        f"model: {report.model}; layers {list(report.layers)}; {capture}",
        f"sink {retrieval.sink_tokens}, window {retrieval.window_tokens}, {report.settings.n_test} test positions, "
        f"{retrieval.cpu_threads or 'default'} threads; recall over (layer, KV head) groups; "
        f"mass = softmax mass of static + retrieved keys; us/query median (best) over decode steps",
        format_columns(header, rows),
        "",
        f"operating points: cheapest setting with recall@k >= {report.settings.target_recall} on every sampled head",
        format_columns(
            ["tokens", "backend", "k", "setting", "scanned", "us/query", "R min"],
            [
                [o["length"], o["backend"], o["k"],
                 (f"{o['param']}={o['value']}" if o["param"] else "-") + ("" if o["reached"] else " (not reached; best)"),
                 f"{100 * o['scanned_median']:.2f}%", f"{o['us_per_query']:.1f}", f"{o['recall_min']:.3f}"]
                for o in report.operating_points
            ],
        ),
    ]
    if report.notes:
        parts += ["", "notes:", *(f"  {note}" for note in report.notes)]
    parts.append(f"\nsweep seconds: {report.seconds:.1f}")
    return "\n".join(parts)
