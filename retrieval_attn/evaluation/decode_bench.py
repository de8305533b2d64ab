"""The decode-speed benchmark behind ``retrieval-attn bench`` and ``bench/decode.py``.

For a randomly initialised Llama of a given shape and each context length, it measures side by side
in one run: transformers with the full KV cache on the device (``full``), transformers' offloaded
cache (``offloaded``, CUDA only), and retrieval-attn with the ``flat`` and ``roar`` indexes and
``sketch`` (the first stage over compact key codes on the device; its exact second stage on the CPU from
the pinned rows, ``sketch``, or over the candidates' rows gathered to the device, ``sketch-gather``:
``retrieved_attention`` "cpu" and "device", the two placements the first GPU run chooses between). For each:
time to first token (chunked prefill + the first decode step, which does not wait for the index
builds: exact search serves a layer until its build lands), when every layer's index is ready
(``index_ready_s``, from the start of prefill: the bench waits for the builds after the first
token, so the timed steps measure the index, not its stand-in), seconds per decoded token (median over ``steps`` steps after ``warmup``, the device synchronised
around each step), peak device memory, the process's resident CPU memory, and for retrieval-attn the
breakdown of a step (``engine.STEP_PARTS``: the host's wait for q, the copies each way, the CPU
search and attention, the device attention, the idle time of each side, and sketch's scoring of the
codes on the device, its gather of the candidates' rows and their exact part on the device), summed over layers and
per layer, with the rest of the model. A layer is bound by the side the other one waits for: by
the CPU when the device idles longer than the CPU does. A method whose request does not fit is
reported as such, with the reason (the memory planner's message for retrieval-attn), not skipped
silently.

Prefill feeds ``prefill_chunk`` tokens per forward pass with only the last position's logits; for
retrieval-attn the last chunk runs inside ``RetrievalCache.last_prefill_chunk`` so each layer's index
builds on CPU threads while later layers prefill. Random weights cost what real ones cost, so
latency and memory are meaningful; recall is not (see the recall sweep for that).

Every method runs through ``hf.Decoder`` (the one decode driver); the shapes are
``hf.MODEL_SHAPES``. Results: tables (``format_bench_table``), ``decode.json`` (every measurement,
per-layer breakdowns included, plus ratios), ``decode.csv`` and ``layers.csv`` (one row per layer
of each retrieval-attn measurement) in ``out``. This module does not print; ``cli`` does. It imports
``retrieval_attn.hf`` only where it builds or runs a model.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..checks import DTYPE_NAMES, ConfigError, check_choice, check_int, check_ints, dtype_named
from ..config import RetrievalConfig
from ..engine import STEP_PARTS
from ..planner import GIB, MemoryBudgetError, resident_bytes
from .report import Interrupted, format_columns, settings_dict, write_csv, write_json

__all__ = [
    "METHODS",
    "BenchSettings",
    "MethodResult",
    "run_decode_bench",
    "ratio_rows",
    "write_results",
    "format_bench_table",
]

METHODS = ("full", "offloaded", "flat", "roar", "sketch", "sketch-gather")
# retrieval-attn methods: name -> (index, retrieved_attention; None: the settings' own)
RETRIEVAL_METHODS = {"flat": ("flat", None), "roar": ("roar", None), "sketch": ("sketch", "cpu"),
                     "sketch-gather": ("sketch", "device")}


@dataclass(frozen=True)
class BenchSettings:
    """What to run: model shape, contexts, methods, and how to measure.

    Attributes
    ----------
    shape : a random model shape of ``hf.MODEL_SHAPES``.
    contexts : prompt tokens of each measurement.
    methods : subset of ``METHODS``.
    steps, warmup : decode steps measured (median), after ``warmup`` unmeasured ones.
    prefill_chunk : prompt tokens per prefill forward pass.
    device, dtype : where the model runs, and its weights' dtype (a name of ``torch``).
    retrieval : the config of the retrieval-attn methods (each sets its own ``index``); its
        ``gpu_memory_gib`` caps them (the baselines run uncapped).
    """

    shape: str = "llama3-8b"
    contexts: tuple[int, ...] = (32768, 65536, 131072)
    methods: tuple[str, ...] = METHODS
    steps: int = 32
    warmup: int = 4
    prefill_chunk: int = 4096
    device: str = "cuda"
    dtype: str = "bfloat16"
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)

    def __post_init__(self) -> None:
        from ..hf import MODEL_SHAPES

        own = type(self).__name__
        check_choice(own, "shape", self.shape, MODEL_SHAPES)
        if not self.methods:
            raise ConfigError(own, "methods", f"one or more of {', '.join(METHODS)}", self.methods)
        for method in self.methods:
            check_choice(own, "methods", method, METHODS)
        check_int(own, "steps", self.steps, 1)
        check_int(own, "warmup", self.warmup, 0)
        check_int(own, "prefill_chunk", self.prefill_chunk, 2)
        device = self.retrieval.sink_tokens + self.retrieval.window_tokens  # a context must offload something
        check_ints(own, "contexts", self.contexts, device + 1, why=f"longer than sink + window = {device}, so that "
                   "something is offloaded")
        check_choice(own, "dtype", self.dtype, DTYPE_NAMES)




@dataclass
class MethodResult:
    """One (context, method) measurement; ``status`` is "ok" or why it did not run."""

    context: int
    method: str
    status: str = "ok"
    ttft_s: float | None = None
    prefill_s: float | None = None
    s_per_token: float | None = None
    step_p90_s: float | None = None
    step_max_s: float | None = None
    peak_device_gib: float | None = None
    cpu_rss_gib: float | None = None
    breakdown_s: dict[str, float] = field(default_factory=dict)
    layers_s: list[dict[str, float]] = field(default_factory=list)
    keys_scanned_fraction: float | None = None
    index_ready_s: float | None = None


def _measure(
    decoder: Any, ids: torch.Tensor, settings: BenchSettings, result: MethodResult
) -> list[list[dict[str, float]]]:
    """Prefill ``ids`` (1, n) through ``decoder``, then decode greedily; fill the timings of ``result``.

    Returns the per-step, per-layer ``step_seconds`` of a RetrievalCache (empty lists otherwise).
    """
    decoder.synchronize()
    start = time.perf_counter()
    logits = decoder.prefill(ids)
    decoder.synchronize()
    result.prefill_s = time.perf_counter() - start
    steps: list[float] = []
    parts: list[list[dict[str, float]]] = []

    def measure(step: int, seconds: float) -> None:
        if step == 0:
            result.ttft_s = time.perf_counter() - start
            if hasattr(decoder.cache, "wait_for_index"):
                decoder.cache.wait_for_index()
                result.index_ready_s = time.perf_counter() - start
        elif step > settings.warmup:
            steps.append(seconds)
            if hasattr(decoder.cache, "stats"):
                parts.append([dict(st.step_seconds) for st in decoder.cache.stats])

    decoder.decode(logits, 1 + settings.warmup + settings.steps, on_step=measure)
    result.s_per_token = statistics.median(steps)
    ordered = sorted(steps)
    result.step_p90_s = ordered[int(0.9 * (len(ordered) - 1))]
    result.step_max_s = ordered[-1]
    return parts


def _critical(layer: dict[str, float]) -> float:
    """A layer's critical path: the host waits for q, then the longer of the device attention and the CPU
    search + attention (they overlap), then the copy back; for sketch the first stage (scoring the codes)
    before, the gather of the candidates' rows with the CPU side, and their exact part on the device after."""
    cpu_side = layer["cpu_search"] + layer["cpu_attention"] + layer["cpu_gather"]
    return (layer["q_wait"] + layer["device_to_host"] + layer["host_to_device"] + layer["device_scoring"]
            + max(layer["device_attention"], cpu_side) + layer["device_exact"])


def _breakdown(parts: list[list[dict[str, float]]], s_per_token: float) -> dict[str, float]:
    """Median over steps of each part summed over layers, and the rest of the model: what the step took
    beyond the layers' critical paths (``_critical``)."""
    out = {p: statistics.median(sum(layer[p] for layer in step) for step in parts) for p in STEP_PARTS}
    critical = statistics.median(sum(_critical(layer) for layer in step) for step in parts)
    out["rest_of_model"] = max(0.0, s_per_token - critical)
    return out


def _per_layer(parts: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Per layer, the median over steps of each part."""
    return [{p: statistics.median(step[i][p] for step in parts) for p in STEP_PARTS} for i in range(len(parts[0]))]


def bound_by(layer: dict[str, float]) -> str:
    """The side that bounds a layer's step: "CPU" when the device waits for it longer than it waits for
    the device, else "device"."""
    return "CPU" if layer["device_idle"] > layer["cpu_idle"] else "device"


def run_decode_bench(
    settings: BenchSettings,
    progress: Callable[[str], None] = lambda msg: None,
    on_result: Callable[[list[MethodResult]], None] = lambda results: None,
) -> list[MethodResult]:
    """Measure every (context, method) of ``settings``; see the module docstring. ``on_result`` gets the
    results so far after each measurement (to write them as they come). Ctrl-C raises
    ``report.Interrupted`` holding the results of the (context, method) pairs measured."""
    from ..hf import random_model

    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch has no CUDA device here; use --device cpu")
    model = random_model(settings.shape, device=device, dtype=dtype_named(settings.dtype))
    vocab = model.config.vocab_size
    short = min(min(settings.contexts), settings.retrieval.sink_tokens + settings.retrieval.window_tokens + 512)
    warm = torch.randint(0, vocab, (1, short), generator=torch.Generator().manual_seed(0)).to(device)
    for method in settings.methods:  # compile numba kernels and warm allocators; not recorded
        progress(f"warm-up ({short} tokens): {method}")
        _run_method(model, warm, method, dataclasses.replace(settings, steps=1, warmup=0))
    results = []
    try:
        for context in settings.contexts:
            ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(context)).to(device)
            for method in settings.methods:
                progress(f"context {context}: {method}")
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                results.append(_run_method(model, ids, method, settings))
                on_result(results)
    except KeyboardInterrupt:
        raise Interrupted(results) from None
    return results


def _run_method(model: torch.nn.Module, ids: torch.Tensor, method: str, settings: BenchSettings) -> MethodResult:
    """One (context, method) measurement; the method's cache is freed when this returns."""
    from ..hf import Decoder, RetrievalCache, dynamic_cache

    device = ids.device
    result = MethodResult(ids.shape[1], method)
    if method == "offloaded" and device.type != "cuda":
        result.status = "needs CUDA (transformers' offloaded cache)"
        return result
    try:
        if method in ("full", "offloaded"):
            if device.type == "cuda":  # baselines run uncapped: a --gpu-memory-gib cap is retrieval-attn's
                torch.cuda.set_per_process_memory_fraction(1.0, device)
            model.set_attn_implementation("sdpa")
            cache = dynamic_cache(offloading=method == "offloaded")
        else:
            index, placement = RETRIEVAL_METHODS[method]
            config = dataclasses.replace(settings.retrieval, index=index,
                                         retrieved_attention=placement or settings.retrieval.retrieved_attention)
            total = ids.shape[1] + 1 + settings.warmup + settings.steps
            cache = RetrievalCache(model, config, max_context=total, prefill_chunk=settings.prefill_chunk)
        parts = _measure(Decoder(model, cache, settings.prefill_chunk), ids, settings, result)
    except MemoryBudgetError as err:
        result.status = f"refused by the planner: {err}"
        return result
    except torch.OutOfMemoryError:
        result.status = "out of device memory"
        return result
    if parts:
        result.breakdown_s = _breakdown(parts, result.s_per_token)
        result.layers_s = _per_layer(parts)
        result.keys_scanned_fraction = statistics.mean(s.keys_scanned_fraction for s in cache.stats)
    if device.type == "cuda":
        result.peak_device_gib = torch.cuda.max_memory_allocated(device) / GIB
    result.cpu_rss_gib = resident_bytes() / GIB
    return result


def ratio_rows(results: list[MethodResult]) -> list[dict[str, Any]]:
    """Per context and retrieval-attn method: speed-up over each baseline, and TTFT over full attention's."""
    rows = []
    by = {(r.context, r.method): r for r in results if r.status == "ok"}
    for (context, method), r in sorted(by.items()):
        if method not in RETRIEVAL_METHODS:
            continue
        row: dict[str, Any] = {"context": context, "method": method}
        for base in ("full", "offloaded"):
            b = by.get((context, base))
            row[f"speedup_vs_{base}"] = b.s_per_token / r.s_per_token if b else None
        full = by.get((context, "full"))
        row["ttft_over_full"] = r.ttft_s / full.ttft_s if full else None
        rows.append(row)
    return rows


def write_results(results: list[MethodResult], settings: BenchSettings, out: str | Path, machine: str) -> Path:
    """Write decode.json (settings, machine, results, ratios), decode.csv and layers.csv into ``out``; return
    the folder."""
    folder = Path(out)
    payload = {
        "settings": settings_dict(settings),
        "machine": machine,
        "results": [asdict(r) for r in results],
        "ratios": ratio_rows(results),
    }
    write_json(folder / "decode.json", payload, indent=2)
    nested = ("breakdown_s", "layers_s")
    columns = [f for f in MethodResult.__dataclass_fields__ if f not in nested] + [*STEP_PARTS, "rest_of_model"]
    rows = [{**{k: v for k, v in asdict(r).items() if k not in nested}, **r.breakdown_s} for r in results]
    write_csv(folder / "decode.csv", rows, columns)
    layers = [{"context": r.context, "method": r.method, "layer": i, **layer, "bound_by": bound_by(layer)}
              for r in results for i, layer in enumerate(r.layers_s)]
    write_csv(folder / "layers.csv", layers, ["context", "method", "layer", *STEP_PARTS, "bound_by"])
    return folder


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


_SHORT = {"q_wait": "q wait", "device_to_host": "D2H", "cpu_search": "search", "cpu_attention": "CPU attn",
          "host_to_device": "H2D", "device_attention": "dev attn", "device_idle": "dev idle", "cpu_idle": "CPU idle",
          "device_scoring": "code score", "cpu_gather": "gather", "device_exact": "dev exact"}


def format_bench_table(results: list[MethodResult]) -> str:
    """The terminal report: one row per (context, method) with the step's parts summed over layers (ms),
    then the ratios of ``ratio_rows``, then what bounds a layer (mean over layers, ms, and how many
    layers each side bounds)."""
    table = format_columns(
        ["context", "method", "s/token", "TTFT s", "index ready s", "prefill s", "peak dev GiB", "CPU RSS GiB",
         *(f"{_SHORT[p]} ms" for p in STEP_PARTS), "rest ms", "status"],
        [[r.context, r.method, _num(r.s_per_token, 4), _num(r.ttft_s, 2), _num(r.index_ready_s, 2), _num(r.prefill_s, 2),
          _num(r.peak_device_gib, 2), _num(r.cpu_rss_gib, 2),
          *(_num(r.breakdown_s[p] * 1e3, 2) if r.breakdown_s else "-" for p in (*STEP_PARTS, "rest_of_model")),
          r.status if r.status == "ok" else r.status[:60]] for r in results],
    )
    ratios = ratio_rows(results)
    if ratios:
        table += "\n\n" + format_columns(
            ["context", "method", "x faster than full", "x faster than offloaded", "TTFT / full TTFT"],
            [[r["context"], r["method"], _num(r["speedup_vs_full"], 2), _num(r["speedup_vs_offloaded"], 2),
              _num(r["ttft_over_full"], 2)] for r in ratios],
        )
    layered = [r for r in results if r.layers_s]
    if layered:
        rows = []
        for r in layered:
            mean = {p: statistics.mean(layer[p] for layer in r.layers_s) for p in STEP_PARTS}
            bounds = [bound_by(layer) for layer in r.layers_s]
            rows.append([r.context, r.method, *(_num(mean[p] * 1e3, 3) for p in STEP_PARTS),
                         f"CPU {bounds.count('CPU')} / device {bounds.count('device')}"])
        table += "\n\nper layer (mean over layers, ms; layers.csv has each one)\n" + format_columns(
            ["context", "method", *(_SHORT[p] for p in STEP_PARTS), "layers bound by"], rows)
    return table
