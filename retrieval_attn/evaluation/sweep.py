"""Recall versus cost of the index backends on real attention queries and keys (issue 3).

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
keys of the first ``n`` tokens do not depend on later tokens. Captures are cached on disk per layer.

This module computes and writes result files; it does not print (progress bars go to stderr).
``bench/recall_sweep.py`` (and the CLI) print its table.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..index import available_indexes, cpu_threads, index_class, make_index
from ..metrics import attention_mass, recall_at_k

__all__ = [
    "BackendSpec",
    "CapturedQK",
    "SweepSettings",
    "SweepReport",
    "DEFAULT_BACKENDS",
    "builtin_text",
    "builtin_token_ids",
    "default_layers",
    "capture_layers",
    "load_or_capture",
    "model_cache_key",
    "operating_point",
    "insertion_drift",
    "parse_backend_spec",
    "evaluate_layer",
    "run_sweep",
    "write_results",
    "format_sweep_table",
    "format_columns",
    "model_and_tokens",
    "add_sweep_arguments",
    "sweep_from_args",
]

GRAPH_EF_GRID = (100, 150, 200, 300, 500, 800)
HNSW_EF_GRID = (100, 200, 400, 800, 1600)
IVF_NPROBE_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CACHED_TOKENS = 131072  # built-in text tokens kept in the capture cache, so re-runs need not load the model


@dataclass(frozen=True)
class BackendSpec:
    """A backend to sweep: its registry name and parameter values.

    ``params`` maps a parameter name to its values. The one search-time parameter of the backend
    (``KeyIndex.search_params``, e.g. ``ef``, ``nprobe``) may take several values: that is the grid,
    searched on one index; every other parameter takes one value and is given at build. Omitted
    parameters keep the backend's defaults, except ivf's ``nlist``, which defaults to 4 * sqrt(keys).
    """

    name: str
    params: Mapping[str, tuple[int | float, ...]] = field(default_factory=dict)

    def __str__(self) -> str:
        return ":".join([self.name, *(f"{k}={','.join(str(v) for v in vs)}" for k, vs in self.params.items())])


DEFAULT_BACKENDS = (
    BackendSpec("flat"),
    BackendSpec("roar", {"ef": GRAPH_EF_GRID}),
    BackendSpec("keygraph", {"ef": GRAPH_EF_GRID}),
    BackendSpec("hnsw", {"ef": HNSW_EF_GRID, "M": (32,)}),
    BackendSpec("ivf", {"nprobe": IVF_NPROBE_GRID}),
)


def parse_backend_spec(text: str) -> BackendSpec:
    """``"name[:param=v1,v2,...]..."`` -> BackendSpec, e.g. ``"hnsw:ef=100,400:M=32"``."""
    name, *parts = text.strip().split(":")
    if not name:
        raise ValueError(f"backend spec {text!r}: empty backend name")
    params: dict[str, tuple[int | float, ...]] = {}
    for part in parts:
        key, eq, values = part.partition("=")
        if not eq or not key or not values:
            raise ValueError(f"backend spec {text!r}: expected param=v1,v2,... after ':', got {part!r}")
        try:
            params[key] = tuple(float(v) if "." in v or "e" in v else int(v) for v in values.split(","))
        except ValueError:
            raise ValueError(f"backend spec {text!r}: values of {key!r} must be numbers, got {values!r}") from None
    return BackendSpec(name, params)


@dataclass(frozen=True)
class SweepSettings:
    """Every knob of a sweep.

    Attributes
    ----------
    lengths : context lengths (tokens) to evaluate; each is a prefix of the captured sequence.
    layers : decoder layers to sample; None: ``default_layers`` of the model (or all captured layers).
    sink, window : static tokens at the start and just before the test block (stay on the device).
    n_test : decode-like test positions at the end of each length, held out from training.
    ks : top-k values; the first is the primary one (table, plots, operating points, mass).
    target_recall : recall@k that every sampled (layer, KV head) must reach at the operating point.
    train_positions : ``"prefix"`` (all positions before the test block) or ``"middle"`` (middle only).
    backends : what to sweep; names that are not registered are skipped with a note.
    threads : CPU threads of torch, numba and faiss while indexes are built and searched (None: their
        defaults). One thread gives steadier timings on a machine shared with other work.
    """

    lengths: tuple[int, ...] = (2048, 8192, 32768)
    layers: tuple[int, ...] | None = None
    sink: int = 128
    window: int = 512
    n_test: int = 64
    ks: tuple[int, ...] = (100,)
    target_recall: float = 0.95
    train_positions: str = "prefix"
    backends: tuple[BackendSpec, ...] = DEFAULT_BACKENDS
    threads: int | None = None

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"lengths must be positive token counts, got {self.lengths}")
        if self.sink < 0 or self.window < 0 or self.n_test < 1:
            raise ValueError(f"need sink >= 0, window >= 0, n_test >= 1; got {self.sink}, {self.window}, {self.n_test}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"ks must be positive, got {self.ks}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if self.train_positions not in ("prefix", "middle"):
            raise ValueError(f"train_positions must be 'prefix' or 'middle', got {self.train_positions!r}")
        need = self.sink + self.window + self.n_test + max(self.ks)
        if min(self.lengths) < need:
            raise ValueError(
                f"length {min(self.lengths)} leaves fewer than max(ks)={max(self.ks)} middle keys: "
                f"lengths must be >= sink + window + n_test + max(ks) = {need}"
            )


# ---------------------------------------------------------------------------------------------------
# capture


@dataclass
class CapturedQK:
    """Post-RoPE queries and keys of some layers for one sequence (batch 1), CPU fp32 NumPy.

    q : layer -> (Hq, n, D); k : layer -> (Hkv, n, D); scale : the attention logit scale.
    """

    q: dict[int, np.ndarray]
    k: dict[int, np.ndarray]
    scale: float

    @property
    def n(self) -> int:
        """Tokens captured (the same for every layer)."""
        return min(a.shape[1] for a in self.k.values())

    @classmethod
    def from_pairs(cls, pairs: Mapping[int, tuple[Any, Any]], scale: float | None = None) -> CapturedQK:
        """From ``{layer: (q, k)}`` of torch or NumPy arrays, (1, H, n, D) as ``hf.capture_qk`` records or (H, n, D).

        ``scale`` defaults to D ** -0.5.
        """
        q, k = {}, {}
        for layer, (qa, ka) in pairs.items():
            qa, ka = (np.ascontiguousarray(_numpy3(x), dtype=np.float32) for x in (qa, ka))
            if qa.shape[0] % ka.shape[0] or qa.shape[1:] != ka.shape[1:]:
                raise ValueError(f"layer {layer}: q {qa.shape} and k {ka.shape} must be (Hq, n, D), (Hkv, n, D), Hkv | Hq")
            q[int(layer)], k[int(layer)] = qa, ka
        if not q:
            raise ValueError("no layers given")
        dim = next(iter(k.values())).shape[2]
        return cls(q, k, float(dim**-0.5 if scale is None else scale))


def _numpy3(x: Any) -> np.ndarray:
    a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError(f"captured arrays must have batch size 1, got shape {a.shape}")
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"captured arrays must be (1, H, n, D) or (H, n, D), got shape {a.shape}")
    return a


def builtin_text() -> str:
    """~465 KB of English prose shipped with CPython: the values of ``pydoc_data.topics.topics``, by key."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


def builtin_token_ids(tokenizer: Any, n: int) -> torch.Tensor:
    """The first ``n`` tokens of ``builtin_text()`` (repeated if it is shorter), (1, n) int64."""
    ids = tokenizer(builtin_text(), return_tensors="pt", verbose=False).input_ids[0]
    if len(ids) < n:
        ids = ids.repeat(math.ceil(n / len(ids)))
    return ids[:n].unsqueeze(0)


def default_layers(num_layers: int, count: int = 5) -> tuple[int, ...]:
    """``count`` layers spread evenly from 10% of the depth to the last (30 layers: 3, 9, 16, 22, 29)."""
    return tuple(sorted({int(round(x)) for x in np.linspace(0.1 * (num_layers - 1), num_layers - 1, count)}))


class _StopForward(Exception):
    """Raised by a forward hook after the deepest sampled layer: the rest of the model is not needed."""


def capture_layers(
    model: torch.nn.Module, token_ids: torch.Tensor, layers: Sequence[int], progress: bool = True
) -> CapturedQK:
    """Run ``model`` on token_ids (1, n) once, up to the deepest of ``layers``, and return their q/k.

    Uses ``hf.capture_qk`` (transformers' sdpa attention, memory-efficient on CPU); the forward stops
    after the deepest sampled decoder layer.
    """
    from ..hf import capture_qk

    decoder = model.get_decoder().layers
    last = max(layers)
    bar = tqdm(total=last + 1, desc=f"capture {token_ids.shape[1]} tok", unit="layer", disable=not progress)

    def step(module: torch.nn.Module, args: Any, output: Any) -> None:
        bar.update(1)
        if module is decoder[last]:
            raise _StopForward

    hooks = [decoder[i].register_forward_hook(step) for i in range(last + 1)]
    try:
        with torch.no_grad(), capture_qk(model, list(layers)) as store:
            try:
                model(token_ids.to(model.device), use_cache=False)
            except _StopForward:
                pass
            pairs = dict(store)
    finally:
        for h in hooks:
            h.remove()
        bar.close()
    scale = next(float(m.scaling) for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "k_proj"))
    return CapturedQK.from_pairs(pairs, scale)


def model_cache_key(path: str | Path) -> str:
    """A file-name-safe key of a model file or folder: its name plus a hash of path, size and mtime."""
    path = Path(path).resolve()
    stat = path.stat()
    digest = hashlib.sha1(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    return f"{path.stem}-{digest}"


def load_or_capture(
    model: torch.nn.Module | Callable[[], torch.nn.Module] | None,
    token_ids: torch.Tensor,
    layers: Sequence[int],
    cache_dir: str | Path | None = None,
    cache_key: str | None = None,
    progress: bool = True,
) -> tuple[CapturedQK, float | None]:
    """q/k of ``layers`` on token_ids (1, n): from ``cache_dir`` where a capture of a longer or equal
    prefix of the same tokens exists, else captured (one forward) and saved there.

    Returns the capture and the seconds the forward took (None: everything came from the cache).
    Files: ``{cache_dir}/{cache_key}/layer{L:03d}.npz`` holding q, k, token ids and scale. No caching
    when ``cache_dir`` or ``cache_key`` is None. ``model`` may be a function returning the model (called
    only if a capture is needed), or None if everything is cached.
    """
    n = token_ids.shape[1]
    folder = Path(cache_dir) / cache_key if cache_dir is not None and cache_key is not None else None
    pairs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    scale = None
    for layer in layers:
        path = folder / f"layer{layer:03d}.npz" if folder else None
        if path is None or not path.is_file():
            continue
        with np.load(path) as f:
            if f["k"].shape[1] >= n and np.array_equal(f["token_ids"][:n], token_ids[0].numpy()):
                pairs[layer] = (f["q"][:, :n], f["k"][:, :n])
                scale = float(f["scale"])
    missing = [layer for layer in layers if layer not in pairs]
    seconds = None
    if missing:
        if model is None:
            raise ValueError(f"layers {missing} are not cached for these tokens and no model was given")
        model = model if isinstance(model, torch.nn.Module) else model()
        start = time.perf_counter()
        fresh = capture_layers(model, token_ids, missing, progress)
        seconds = time.perf_counter() - start
        scale = fresh.scale
        for layer in missing:
            pairs[layer] = (fresh.q[layer], fresh.k[layer])
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = folder / f"layer{layer:03d}.tmp.npz"
                np.savez(tmp, q=fresh.q[layer], k=fresh.k[layer], token_ids=token_ids[0].numpy(), scale=scale)
                tmp.replace(folder / f"layer{layer:03d}.npz")
    return CapturedQK.from_pairs({layer: pairs[layer] for layer in sorted(layers)}, scale), seconds


# ---------------------------------------------------------------------------------------------------
# evaluation helpers


def operating_point(scanned: Sequence[float], min_recall: Sequence[float], target: float) -> int | None:
    """Index of the cheapest grid point (smallest ``scanned``) whose ``min_recall`` reaches ``target``, or None."""
    ok = [i for i, r in enumerate(min_recall) if r >= target]
    return min(ok, key=lambda i: scanned[i]) if ok else None


def insertion_drift(
    q: np.ndarray,
    k: np.ndarray,
    backend: str,
    params: Mapping[str, Any],
    prefill: int,
    steps: int,
    sink: int = 128,
    window: int = 512,
    top_k: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    """Recall of an index that grows by ``add`` during decoding, step by step, against a rebuild.

    Replays decoding of one layer from q (Hq, n, D), k (Hkv, n, D): the index is built on the middle
    keys [sink, prefill - window) (trained on the queries before ``prefill``); at step t the queries of
    position p = prefill + t search it (one call, all heads), then the key leaving the window
    (p - window) is added, as the engine does. Returns per-step mean recall@top_k against exact search
    over the keys indexed at that step, the seconds of each search and add, and the recall of the
    last 64 steps' queries on an index rebuilt from scratch over the final keys.
    """
    hq, n, dim = q.shape
    groups = k.shape[0]
    rep = hq // groups
    if not (sink + top_k <= prefill - window and prefill + steps <= n):
        raise ValueError(f"need sink + top_k <= prefill - window and prefill + steps <= {n}")
    qg = q.reshape(groups, rep, n, dim)  # query head h -> group h // rep

    def build(end: int) -> Any:
        index = make_index(backend, **params)
        train = np.ascontiguousarray(qg[:, :, :end].reshape(groups, -1, dim)) if index.uses_train_queries else None
        index.build(np.ascontiguousarray(k[:, sink : end - window]), train)
        return index

    index = build(prefill)
    recall = np.empty(steps)
    search_s, add_s = np.empty(steps), np.empty(steps)
    for t in tqdm(range(steps), desc=f"{backend} add drift", disable=not progress):
        p = prefill + t
        queries = np.ascontiguousarray(qg[:, :, p])  # [G, rep, D]
        start = time.perf_counter()
        res = index.search(queries, top_k)
        search_s[t] = time.perf_counter() - start
        exact = np.einsum("grd,gnd->grn", queries, k[:, sink : p - window])  # [G, rep, n_indexed]
        recall[t] = recall_at_k(res.ids, exact, top_k).mean()
        start = time.perf_counter()
        index.add(np.ascontiguousarray(k[:, p - window : p - window + 1]))
        add_s[t] = time.perf_counter() - start
    last = min(64, steps)
    rebuilt = build(prefill + steps - last)
    rebuilt_recall = []
    for t in range(steps - last, steps):
        p = prefill + t
        queries = np.ascontiguousarray(qg[:, :, p])
        exact = np.einsum("grd,gnd->grn", queries, k[:, sink : prefill + steps - last - window])
        rebuilt_recall.append(recall_at_k(rebuilt.search(queries, top_k).ids, exact, top_k).mean())
    return {
        "recall": recall,
        "search_s": search_s,
        "add_s": add_s,
        "rebuilt_recall_last": float(np.mean(rebuilt_recall)),
    }


# ---------------------------------------------------------------------------------------------------
# one layer


@dataclass(frozen=True)
class _Plan:
    """A backend resolved against the registry for one number of keys."""

    name: str
    build: dict[str, int | float]
    grid_param: str | None
    grid: tuple[int | float | None, ...]
    label: str  # the backend's name in results: with the build parameters the spec fixed, e.g. "roar(conn=4)"


def _resolve(spec: BackendSpec, n_keys: int, notes: set[str]) -> _Plan:
    """Build parameters and search grid of ``spec`` for an index of ``n_keys`` keys.

    Grid values that cannot apply (ivf ``nprobe`` above ``nlist``) are dropped with a note.
    """
    cls = index_class(spec.name)
    unknown = sorted(set(spec.params) - set(cls.params))
    if unknown:
        raise ValueError(f"backend {spec.name!r}: unknown parameter(s) {unknown}; allowed: {sorted(cls.params)}")
    grid_names = [p for p in spec.params if p in cls.search_params]
    multi = [p for p, vs in spec.params.items() if len(vs) > 1 and p not in cls.search_params]
    if multi or len(grid_names) > 1:
        raise ValueError(
            f"backend {spec.name!r}: only one search-time parameter {list(cls.search_params)} may take several "
            f"values, got {spec.params}"
        )
    build = {p: vs[0] for p, vs in spec.params.items() if p not in grid_names}
    label = f"{spec.name}({' '.join(f'{p}={v}' for p, v in build.items())})" if build else spec.name
    if spec.name == "ivf" and "nlist" not in build:
        build["nlist"] = int(max(1, min(n_keys, round(4 * math.sqrt(n_keys)))))
    cls.validate_params(build)
    if not grid_names:
        return _Plan(spec.name, build, None, (None,), label)
    name = grid_names[0]
    grid = []
    for v in spec.params[name]:
        cls.validate_params({name: v}, only=(name,))
        if name == "nprobe" and "nlist" in build and v > build["nlist"]:
            notes.add(f"{spec.name}: nprobe={v} skipped at {n_keys} keys (nlist={build['nlist']})")
        else:
            grid.append(v)
    return _Plan(spec.name, build, name, tuple(grid), label)


def _warm_up(plans: Iterable[_Plan], dim: int) -> None:
    """Build and search each backend once on small random data (top-10, default parameters), so JIT
    compilation is not timed."""
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((1, 512, dim), dtype=np.float32)
    train = rng.standard_normal((1, 256, dim), dtype=np.float32)
    for plan in plans:
        build = {**plan.build, "nlist": 16, "nprobe": 1} if plan.name == "ivf" else plan.build
        index = make_index(plan.name, **build)
        index.build(keys, train if index.uses_train_queries else None)
        index.search(train[:, :4], 10)


@dataclass
class _LayerProblem:
    """The retrieval problem of one layer at one length (see the module docstring for the positions)."""

    n: int
    keys_mid: np.ndarray  # [G, n_mid, D] what the index holds
    train: np.ndarray  # [G, rep * P, D] training queries of each group
    steps: np.ndarray  # [T, G, rep, D] test queries, one search call per decode step
    mid_scores: np.ndarray  # [G, T * rep, n_mid] exact q . key, queries in (T, rep) order
    lse_static: np.ndarray  # [G, T * rep] float64 lse of the static keys' scaled logits (-inf: none)


def _layer_problem(q: np.ndarray, k: np.ndarray, settings: SweepSettings, scale: float) -> _LayerProblem:
    hq, n, dim = q.shape
    groups, t, s, w = k.shape[0], settings.n_test, settings.sink, settings.window
    rep = hq // groups
    mid0, mid1 = s, n - t - w  # middle keys [mid0, mid1)
    if mid1 - mid0 < max(settings.ks):
        raise ValueError(f"{n} tokens leave {mid1 - mid0} middle keys, fewer than k={max(settings.ks)}")
    keys_mid = np.ascontiguousarray(k[:, mid0:mid1])
    keys_static = np.concatenate([k[:, :s], k[:, mid1 : n - t]], axis=1)  # [G, s + w, D]
    test = q[:, n - t :].reshape(groups, rep, t, dim)  # [G, rep, T, D]: query head h is in group h // rep
    flat_q = torch.from_numpy(np.ascontiguousarray(test.transpose(0, 2, 1, 3).reshape(groups, t * rep, dim)))
    p0, p1 = (0, n - t) if settings.train_positions == "prefix" else (mid0, mid1)
    return _LayerProblem(
        n=n,
        keys_mid=keys_mid,
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
    labels the rows. Backends not registered are skipped, and graph ``ef`` values below k, with a
    note added to ``notes``; ``bar`` advances by one per backend.
    """
    notes = set() if notes is None else notes
    prob = _layer_problem(q, k, settings, scale)
    hq, groups, n_mid = q.shape[0], k.shape[0], prob.keys_mid.shape[1]
    exact_mass = {}  # k -> [G]
    for kk in settings.ks:
        exact_ids = torch.topk(torch.from_numpy(prob.mid_scores), kk, dim=-1).indices.numpy()  # [G, M, kk]
        exact_mass[kk] = attention_mass(exact_ids, prob.mid_scores, scale, prob.lse_static).mean(-1)
    registered = set(available_indexes())
    rows: list[dict[str, Any]] = []
    for spec in settings.backends:
        if bar is not None:
            bar.set_postfix_str(f"n={prob.n} layer={layer} {spec.name}")
        if spec.name not in registered:
            notes.add(f"{spec.name}: not registered (available: {', '.join(sorted(registered))}); skipped")
        elif (plan := _resolve(spec, n_mid, notes)).grid:
            first = {} if plan.grid_param is None else {plan.grid_param: plan.grid[0]}  # checked against build params
            index = make_index(plan.name, **plan.build, **first)
            index.build(prob.keys_mid, prob.train if index.uses_train_queries else None)
            for kk in settings.ks:
                for value in plan.grid:
                    if plan.grid_param == "ef" and value < kk:
                        notes.add(f"{plan.name}: ef={value} skipped for k={kk} (ef must be >= k)")
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


# ---------------------------------------------------------------------------------------------------
# the sweep


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
        settings = asdict(self.settings)
        settings["backends"] = [str(b) for b in self.settings.backends]
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


def model_and_tokens(
    model_path: str | Path | None, cache_dir: str | Path | None, need: int
) -> tuple[Path, str, Callable[[], torch.nn.Module] | torch.nn.Module, int, torch.Tensor]:
    """For a model file or folder (None: the embedded one): its path, cache key, the model or a loader of
    it, its layer count, and the built-in text's first ``need`` token ids (1, need).

    When ``cache_dir`` holds the layer count and enough tokens of this model (``builtin_tokens.npz``),
    the model is not loaded here: ``load_or_capture`` loads it only if a layer is not cached.
    """
    from ..hf import embedded_model_path, load_model

    path = embedded_model_path() if model_path is None else Path(model_path)
    key = model_cache_key(path)
    meta = Path(cache_dir) / key / "builtin_tokens.npz" if cache_dir is not None else None
    if meta is not None and meta.is_file():
        with np.load(meta) as f:
            if len(f["token_ids"]) >= need:
                ids = torch.from_numpy(f["token_ids"][:need]).unsqueeze(0)
                return path, key, lambda: load_model(path)[0], int(f["num_layers"]), ids
    model, tokenizer = load_model(path)
    n_layers = model.config.get_text_config().num_hidden_layers
    ids = builtin_token_ids(tokenizer, max(need, CACHED_TOKENS))
    if meta is not None:
        meta.parent.mkdir(parents=True, exist_ok=True)
        np.savez(meta, token_ids=ids[0].numpy(), num_layers=n_layers)
    return path, key, model, n_layers, ids[:, :need]


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
    registered = set(available_indexes())
    dim = next(iter(captured.k.values())).shape[2]
    rows: list[dict[str, Any]] = []
    total = len(settings.lengths) * len(layers) * len(settings.backends)
    with cpu_threads(settings.threads), tqdm(total=total, desc="sweep", unit="index", disable=not progress) as bar:
        _warm_up([_resolve(b, 512, set()) for b in settings.backends if b.name in registered], dim)
        for n in sorted(settings.lengths):
            for layer in layers:
                q, k = captured.q[layer][:, :n], captured.k[layer][:, :n]
                rows += evaluate_layer(q, k, settings, captured.scale, layer=layer, notes=notes, bar=bar)
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


# ---------------------------------------------------------------------------------------------------
# output


def write_results(report: SweepReport, folder: str | Path) -> list[Path]:
    """Write rows.csv (per layer and KV head), summary.csv, sweep.json and two PNG plots into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "rows.csv", folder / "summary.csv", folder / "sweep.json"]
    for path, records in ((paths[0], report.rows), (paths[1], report.summary)):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]) if records else ["length"])
            writer.writeheader()
            writer.writerows(records)
    paths[2].write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return paths + _plot(report, folder)


def _plot(report: SweepReport, folder: Path) -> list[Path]:
    """recall_vs_scanned.png and recall_vs_latency.png: one panel per length, one curve per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = report.settings.ks[0]
    lengths = sorted({s["length"] for s in report.summary})
    backends = list(dict.fromkeys(s["backend"] for s in report.summary))
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(backends)}
    out = []
    for xkey, xlabel, fname in (
        ("scanned_median", "fraction of keys scored (median over heads)", "recall_vs_scanned.png"),
        ("us_per_query", "microseconds per query (all heads of a layer per call)", "recall_vs_latency.png"),
    ):
        fig, axes = plt.subplots(1, max(len(lengths), 1), figsize=(5.2 * max(len(lengths), 1), 4.2), squeeze=False)
        for ax, n in zip(axes[0], lengths):
            for b in backends:
                pts = [s for s in report.summary if s["length"] == n and s["backend"] == b and s["k"] == k]  # grid order
                if not pts:
                    continue
                xs = [max(p[xkey], 1e-9) for p in pts]
                ax.plot(xs, [p["recall_median"] for p in pts], "o-", color=colors[b], label=b)
                ax.plot(xs, [p["recall_min"] for p in pts], "v--", color=colors[b], alpha=0.5)
            ax.axhline(report.settings.target_recall, color="grey", lw=0.8, ls=":")
            ax.set_xscale("log")
            ax.set_title(f"{n} tokens ({pts[0]['n_keys'] if pts else '?'} keys indexed)")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"recall@{k} over heads: median (-), min (--)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="lower right")
        fig.suptitle(f"{Path(report.model).name}, layers {list(report.layers)}")
        fig.tight_layout()
        fig.savefig(folder / fname, dpi=110)
        plt.close(fig)
        out.append(folder / fname)
    return out


def format_columns(header: list[str], rows: list[list]) -> str:
    """Aligned columns: first column left-aligned, others right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(row: list) -> str:
        return "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


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
    parts = [
        f"model: {report.model}; layers {list(report.layers)}; {capture}",
        f"sink {report.settings.sink}, window {report.settings.window}, {report.settings.n_test} test positions, "
        f"{report.settings.threads or 'default'} threads; recall over (layer, KV head) groups; "
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


# ---------------------------------------------------------------------------------------------------
# command line


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sweep's options to ``parser`` (used by ``bench/recall_sweep.py`` and ``retrieval-attn sweep``)."""
    d = SweepSettings()
    parser.add_argument("--model", default=None, help="GGUF file or transformers folder (default: embedded SmolLM2)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(d.lengths), help="context lengths in tokens")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="decoder layers to sample (default: 5 spread over depth, 3 9 16 22 29 for 30 layers)")
    parser.add_argument("--sink", type=int, default=d.sink, help="first tokens kept static (on the device)")
    parser.add_argument("--window", type=int, default=d.window, help="recent tokens kept static (on the device)")
    parser.add_argument("--n-test", type=int, default=d.n_test, help="decode-like test positions per length")
    parser.add_argument("--k", type=int, nargs="+", default=list(d.ks), help="top-k values; the first is primary")
    parser.add_argument("--target-recall", type=float, default=d.target_recall, help="recall of the operating point")
    parser.add_argument("--train-positions", choices=["prefix", "middle"], default=d.train_positions,
                        help="positions whose queries train query-aware indexes")
    parser.add_argument("--backend", action="append", default=None, metavar="NAME[:PARAM=V1,V2,...]...",
                        help="backend and parameter values, repeatable (default: " +
                             " ".join(str(b) for b in DEFAULT_BACKENDS) + ")")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for index build and search (default: torch/numba/faiss defaults)")
    parser.add_argument("--out", default="results/recall_sweep", help="folder for CSV, JSON and PNG results")
    parser.add_argument("--cache-dir", default="results/qk_cache", help="folder caching captured q/k")
    parser.add_argument("--no-cache", action="store_true", help="capture again and do not cache")


def sweep_from_args(args: argparse.Namespace) -> SweepReport:
    """Run the sweep described by parsed ``add_sweep_arguments`` options and write its files to ``args.out``."""
    try:
        backends = tuple(parse_backend_spec(s) for s in args.backend) if args.backend else DEFAULT_BACKENDS
        settings = SweepSettings(
            lengths=tuple(args.lengths), layers=tuple(args.layers) if args.layers else None, sink=args.sink,
            window=args.window, n_test=args.n_test, ks=tuple(args.k), target_recall=args.target_recall,
            train_positions=args.train_positions, backends=backends, threads=args.threads,
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    report = run_sweep(settings, model_path=args.model, cache_dir=None if args.no_cache else args.cache_dir)
    write_results(report, args.out)
    return report
