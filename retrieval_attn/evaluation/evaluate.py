"""Long-context evaluation against full attention: needle retrieval and teacher-forced fidelity (issue 5).

Every task compares, in one run and on one model, *methods*:

- ``full``: the model with a plain transformers ``DynamicCache`` (sdpa): the reference;
- an index backend name (``roar``, ``flat``, ``hnsw``, ``ivf``, ``keygraph``, ``auto``), optionally
  with parameters (``roar:ef=200``): a ``RetrievalCache`` with that index;
- ``sink+window``: a ``RetrievalCache`` with ``retrieve=False`` (StreamingLLM-style: decode attends
  over the sink and the recent window only). If it matches ``full``, the task does not depend on what
  lies outside the window and says nothing about retrieval.

Where the approximation acts. retrieval-attn is exact during prefill (sdpa over every token); only
decode steps retrieve. So a task that prefilled its question would let the first answer token see
the whole context exactly. Here the context (haystack) is prefilled once, and then the question is fed
**one token per decode step** (teacher-forced through the cache), followed by greedy decoding of the
answer: every token that reads the needle reads it through retrieval. All retrieval methods share one
exact prefill (``RetrievalCache.fork``); ``full`` prefills its own ``DynamicCache``.

Tasks:

- *needle* (RULER-style, generated on the fly, deterministic under a seed): ``passkey`` (a 5-digit key
  in repeated noise sentences), ``number`` (a 5-digit "special magic number" for a word, in sentences
  of the shipped book), ``multikey`` (the same needle plus ``MULTIKEY_DISTRACTORS`` needles with other
  words and numbers at random depths, in noise; the question asks for one). The context of each cell
  is ``length`` tokens (header, haystack, needles; the question comes after), the asked needle starts
  at ``depth`` of it. A sample is correct if the answer's digits appear in the greedy output.
  Accuracy per (task, length, depth, method).
- *fidelity*: the shipped public-domain text (``data/alice.txt``: Lewis Carroll, *Alice's Adventures
  in Wonderland*, 1865, the Millennium Fulcrum Edition 2.9 text). ``prefix`` tokens are prefilled,
  then ``tokens`` more are fed one decode step each; at every step the method's next-token
  distribution is compared with full attention's (one exact forward over the whole text, computed
  chunk by chunk in lockstep): KL(full || method) in nats, top-1 agreement, and each method's own
  negative log-likelihood of the true next token (perplexity), as functions of position.

``RetrievalConfig(telemetry=True)`` (``EvalSettings.telemetry``) adds per-layer recall@k and attention
mass of every retrieval method, over all its decode steps (``retrieval_attn.telemetry``).

This module computes and writes result files (JSON, CSV, PNG); it does not print (progress bars go to
stderr). ``retrieval-attn eval`` and ``bench/fidelity.py`` print its table.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import random
import re
import time
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import RetrievalConfig
from ..index import AUTO, available_indexes, cpu_threads, params_class
from ..telemetry import LayerTelemetry, summarise
from .report import format_telemetry_table, plot_telemetry
from .sweep import format_columns, parse_backend_spec

__all__ = [
    "FULL",
    "SINK_WINDOW",
    "TASKS",
    "DEFAULT_METHODS",
    "NeedleSample",
    "EvalSettings",
    "EvalReport",
    "book_text",
    "make_needle",
    "method_config",
    "run_eval",
    "write_results",
    "format_eval_table",
]

FULL, SINK_WINDOW = "full", "sink+window"
TASKS = ("passkey", "number", "multikey")
DEFAULT_METHODS = (FULL, "roar", "flat", "hnsw", "ivf", SINK_WINDOW)
BOOK = "alice.txt"
MULTIKEY_DISTRACTORS = 3
HEADER = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
WORDS = (
    "apple", "river", "candle", "forest", "violin", "harbor", "pepper", "marble", "falcon", "lantern",
    "meadow", "copper", "saddle", "thunder", "orchid", "compass", "glacier", "walnut", "ribbon", "anchor",
)


# ---------------------------------------------------------------------------------------------------
# generators


@dataclass(frozen=True)
class NeedleSample:
    """One needle-in-a-haystack prompt, as token ids.

    context_ids : the ``length``-or-fewer context tokens (header, haystack, needles), prefilled.
    question_ids : the question, fed one decode step per token after the context.
    answer : the digits the greedy output must contain.
    needle_start : index in ``context_ids`` of the first token of the asked needle.
    """

    task: str
    length: int
    depth: float
    seed: int
    context_ids: tuple[int, ...]
    question_ids: tuple[int, ...]
    answer: str
    needle_start: int


def book_text() -> str:
    """The shipped public-domain text (Alice's Adventures in Wonderland, ~143 KB, ~37K SmolLM2 tokens)."""
    return resources.files("retrieval_attn").joinpath("data", BOOK).read_text()


def _book_sentences() -> list[str]:
    return [s for s in re.split(r"(?<=[.!?'])\s+", book_text().replace("\n", " ")) if s.strip()]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def make_needle(tokenizer: Any, task: str, length: int, depth: float, seed: int) -> NeedleSample:
    """A deterministic needle prompt of at most ``length`` context tokens with its needle at ``depth``.

    Parameters
    ----------
    tokenizer : a transformers tokenizer; pieces (sentences) are tokenized one by one and their ids
        concatenated, so the length and the needle's position are exact in tokens.
    task : one of ``TASKS``.
    length : context tokens (the question comes after), >= 64.
    depth : where the asked needle starts, as a fraction of the haystack, in [0, 1].
    seed : the same seed gives the same sample; the key, the words, the distractors' depths and the
        book offset are drawn from ``random.Random`` seeded with (seed, task, length, depth).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 64:
        raise ValueError(f"length must be an int >= 64, got {length!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    rng = random.Random(f"{seed}:{task}:{length}:{depth}")
    answer = str(rng.randint(10000, 99999))
    if task == "passkey":
        needle = f"The pass key is {answer}. Remember it. {answer} is the pass key."
        question = "What is the pass key? The pass key is"
        distractors: list[str] = []
    else:
        word, *others = rng.sample(WORDS, 1 + MULTIKEY_DISTRACTORS)
        needle = f"One of the special magic numbers for {word} is: {answer}."
        question = f"What is the special magic number for {word} mentioned in the provided text? " \
                   f"The special magic number for {word} mentioned in the provided text is"
        distractors = [
            f"One of the special magic numbers for {w} is: {rng.randint(10000, 99999)}." for w in others
        ] if task == "multikey" else []
    header = _ids(tokenizer, HEADER)
    needle_ids = _ids(tokenizer, " " + needle)
    extra = [(_ids(tokenizer, " " + d), rng.random()) for d in distractors]  # (ids, depth)
    budget = length - len(header) - len(needle_ids) - sum(len(d) for d, _ in extra)
    if budget < 1:
        raise ValueError(f"length {length} is too short for task {task!r}: the needles alone take {length - budget}")
    if task == "number":
        sentences = _book_sentences()
        source = itertools.islice(itertools.cycle(sentences), rng.randrange(len(sentences)), None)
    else:
        source = itertools.cycle(NOISE)
    filler: list[list[int]] = []  # one id list per sentence
    used = 0
    for sentence in source:
        piece = _ids(tokenizer, " " + sentence)
        if used + len(piece) > budget:
            break
        filler.append(piece)
        used += len(piece)
    ends = [0]  # token offset after each sentence: where a needle may go
    for piece in filler:
        ends.append(ends[-1] + len(piece))
    slots = [(min(range(len(ends)), key=lambda i: abs(ends[i] - d * used)), ids) for ids, d in extra]
    target = min(range(len(ends)), key=lambda i: abs(ends[i] - depth * used))
    slots.append((target, needle_ids))
    inserted: dict[int, list[list[int]]] = {}
    for slot, ids in slots:
        inserted.setdefault(slot, []).append(ids)
    context = list(header)
    needle_start = -1
    for i in range(len(filler) + 1):
        for ids in inserted.get(i, []):
            if ids is needle_ids:
                needle_start = len(context)
            context += ids
        if i < len(filler):
            context += filler[i]
    return NeedleSample(task, length, depth, seed, tuple(context), tuple(_ids(tokenizer, " " + question)), answer,
                        needle_start)


# ---------------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class EvalSettings:
    """Every knob of an evaluation run.

    Attributes
    ----------
    methods : ``full``, ``sink+window``, or index specs ``name[:param=value]...`` (one value each).
    tasks : needle tasks (subset of ``TASKS``); empty: no needle grid.
    lengths, depths : the needle grid: context tokens, and needle depth fractions in [0, 1].
    samples : needle samples per grid cell (seeds ``seed .. seed + samples - 1``).
    fidelity_tokens : decode steps of the teacher-forced fidelity task (0: skip it).
    fidelity_prefix : tokens of the text prefilled before them.
    sink, window, top_k : the ``RetrievalConfig`` of every retrieval method (defaults: the library's).
    telemetry : per-layer recall@k and attention mass of every retrieval method.
    seed : base seed of the needle generators.
    prefill_chunk : tokens per prefill forward pass (bounds memory), and per reference-logits chunk.
    cpu_threads : CPU threads of the whole run (the model's forwards too) and ``RetrievalConfig.cpu_threads``;
        None leaves torch/numba/faiss defaults. On a machine shared with other work, 1 is often fastest.
    """

    methods: tuple[str, ...] = DEFAULT_METHODS
    tasks: tuple[str, ...] = TASKS
    lengths: tuple[int, ...] = (1024, 2048)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    samples: int = 1
    fidelity_tokens: int = 1000
    fidelity_prefix: int = 1024
    sink: int = RetrievalConfig.sink_tokens
    window: int = RetrievalConfig.window_tokens
    top_k: int = RetrievalConfig.top_k
    telemetry: bool = False
    seed: int = 0
    prefill_chunk: int = 1024
    cpu_threads: int | None = None
    method_configs: dict[str, RetrievalConfig | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be distinct and not empty, got {list(self.methods)}")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"tasks must be among {list(TASKS)}, got {bad}")
        if self.tasks and (not self.lengths or not self.depths):
            raise ValueError("lengths and depths must not be empty when tasks are given")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 64 for n in self.lengths):
            raise ValueError(f"lengths must be ints >= 64, got {list(self.lengths)}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be in [0, 1], got {list(self.depths)}")
        for name, low in (("samples", 1), ("fidelity_tokens", 0), ("prefill_chunk", 2)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not self.tasks and self.fidelity_tokens == 0:
            raise ValueError("nothing to run: give tasks or fidelity_tokens > 0")
        device = self.sink + self.window
        if self.tasks and min(self.lengths) <= device:
            raise ValueError(
                f"lengths must exceed sink + window = {device} (else nothing is offloaded), got {min(self.lengths)}"
            )
        if self.fidelity_tokens and self.fidelity_prefix <= device:
            raise ValueError(f"fidelity_prefix must exceed sink + window = {device}, got {self.fidelity_prefix}")
        configs = {m: method_config(m, self) for m in self.methods}
        builds = ([min(self.lengths)] if self.tasks else []) + ([self.fidelity_prefix] if self.fidelity_tokens else [])
        offloaded = min(builds) - device  # keys the first decode indexes, at the least
        for m, c in configs.items():
            nlist = dict(c.index_params).get("nlist", 256) if c is not None and c.index == "ivf" else 0
            if nlist > offloaded:
                raise ValueError(
                    f"method {m!r}: ivf's nlist ({nlist}) must be <= the keys offloaded at the first decode "
                    f"({offloaded}): lengthen the shortest context or pass ivf:nlist=..."
                )
        object.__setattr__(self, "method_configs", configs)


def method_config(method: str, settings: EvalSettings) -> RetrievalConfig | None:
    """The ``RetrievalConfig`` of a method (None for ``full``); ValueError for an unknown method."""
    if method == FULL:
        return None
    common = dict(sink_tokens=settings.sink, window_tokens=settings.window, top_k=settings.top_k,
                  telemetry=settings.telemetry, cpu_threads=settings.cpu_threads)
    if method == SINK_WINDOW:
        return RetrievalConfig(retrieve=False, index="flat", **common)  # no index is built; flat has no ef bound
    spec = parse_backend_spec(method)
    names = [FULL, SINK_WINDOW, AUTO, *available_indexes()]
    if spec.name not in names:
        raise ValueError(f"method must be one of {names} (with optional :param=value), got {method!r}")
    multi = [p for p, vs in spec.params.items() if len(vs) != 1]
    if multi:
        raise ValueError(f"method {method!r}: give one value per parameter, got several for {multi}")
    return RetrievalConfig(index=spec.name, index_params={p: vs[0] for p, vs in spec.params.items()}, **common)


# ---------------------------------------------------------------------------------------------------
# running a model


def _prefill(model: Any, cache: Any, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Feed ids (1, n) through ``cache`` in forwards of ``chunk`` tokens; the logits of the last forward's
    positions (c, vocab), fp32 CPU (the earlier forwards compute only their last position's).

    Chunk boundaries are ``hf.prefill_spans``'.
    """
    from ..hf import prefill_spans

    n = ids.shape[1]
    for i, j in prefill_spans(n, chunk):
        keep = 0 if j == n else 1  # 0: every position
        logits = model(ids[:, i:j], past_key_values=cache, use_cache=True, logits_to_keep=keep).logits
    return logits[0].float().cpu()


def _step(model: Any, cache: Any, token: int, device: torch.device) -> torch.Tensor:
    """One decode step: logits (vocab,) fp32 CPU of the next token after ``token``."""
    return model(torch.tensor([[token]], device=device), past_key_values=cache, use_cache=True).logits[0, -1].float().cpu()


class _Methods:
    """The caches of every method for one sequence: ``full``'s DynamicCache and forks of one RetrievalCache
    prefill, plus per-method seconds and telemetry collected across sequences."""

    def __init__(self, model: Any, settings: EvalSettings):
        self.model, self.settings = model, settings
        self.device = next(model.parameters()).device
        self.seconds = {m: 0.0 for m in settings.methods}
        self.telemetry: dict[str, list[list[LayerTelemetry]]] = {m: [] for m in settings.methods}
        retrieval = [c for c in settings.method_configs.values() if c is not None]
        trains = any(params_class(c.index).uses_train_queries for c in retrieval if c.retrieve)
        # the shared prefill's config: the layout of every method; roar keeps the prefill queries a fork may train on
        self.source_config = RetrievalConfig(
            sink_tokens=settings.sink, window_tokens=settings.window, top_k=1,
            index="roar" if trains else "flat", cpu_threads=settings.cpu_threads,
        ) if retrieval else None

    @torch.no_grad()
    def start(self, ids: torch.Tensor, full: bool = True) -> dict[str, Any]:
        """Prefill ids (1, n) for every method (``full`` only if asked): {method: its cache}."""
        from transformers import DynamicCache

        from ..hf import RetrievalCache

        caches = {}
        ids = ids.to(self.device)
        if full and FULL in self.settings.methods:
            start = time.perf_counter()
            caches[FULL] = DynamicCache()
            _prefill(self.model, caches[FULL], ids, self.settings.prefill_chunk)
            self.seconds[FULL] += time.perf_counter() - start
        if self.source_config is not None:
            start = time.perf_counter()
            source = RetrievalCache(self.model, self.source_config)
            _prefill(self.model, source, ids, self.settings.prefill_chunk)
            forks = {m: c for m, c in self.settings.method_configs.items() if c is not None}
            shared = (time.perf_counter() - start) / len(forks)
            for m, config in forks.items():
                caches[m] = source.fork(config)
                self.seconds[m] += shared
        return caches

    @torch.no_grad()
    def step(self, method: str, cache: Any, token: int) -> torch.Tensor:
        """One decode step of ``method``: logits (vocab,)."""
        start = time.perf_counter()
        logits = _step(self.model, cache, token, self.device)
        self.seconds[method] += time.perf_counter() - start
        return logits

    def finish(self, caches: dict[str, Any]) -> None:
        """Keep the telemetry of this sequence's retrieval caches."""
        for m, cache in caches.items():
            if m != FULL and self.settings.telemetry:
                self.telemetry[m].append([layer.engine.telemetry for layer in cache.layers])

    def telemetry_rows(self) -> list[dict[str, Any]]:
        """Per method and layer, ``telemetry.summarise`` over every sequence of the run."""
        rows = []
        for m, runs in self.telemetry.items():
            for layer, parts in enumerate(zip(*runs)):
                rows.append({"method": m, "layer": layer, **summarise(*parts)})
        return rows


def _run_needle(methods: _Methods, tokenizer: Any, settings: EvalSettings, progress: bool) -> list[dict[str, Any]]:
    """One row per (task, length, depth, sample, method): the greedy output and whether it holds the answer."""
    rows = []
    cells = [(t, n, d, s) for t in settings.tasks for n in settings.lengths for d in settings.depths
             for s in range(settings.samples)]
    for task, length, depth, s in tqdm(cells, desc="needle", unit="cell", disable=not progress):
        sample = make_needle(tokenizer, task, length, depth, settings.seed + s)
        answer_tokens = len(_ids(tokenizer, " " + sample.answer)) + 2
        caches = methods.start(torch.tensor([sample.context_ids]))
        for m, cache in caches.items():
            for token in sample.question_ids:  # the question through the cache, one decode step per token
                out = methods.step(m, cache, token)
            generated = []
            for _ in range(answer_tokens):
                token = int(out.argmax())
                if token == tokenizer.eos_token_id:
                    break
                generated.append(token)
                out = methods.step(m, cache, token)
            text = tokenizer.decode(generated, skip_special_tokens=True)
            rows.append({"task": task, "length": len(sample.context_ids), "target_length": length, "depth": depth,
                         "sample": s, "method": m, "answer": sample.answer, "output": text.strip(),
                         "correct": int(sample.answer in text)})
        methods.finish(caches)
    return rows


def _run_fidelity(
    methods: _Methods, tokenizer: Any, settings: EvalSettings, progress: bool
) -> dict[str, dict[str, torch.Tensor]]:
    """Per method, per position arrays (tokens,): ``kl`` (nats) and ``agree`` against full attention, ``nll``.

    Full attention's logits come from exact chunked forwards over the text (a DynamicCache, sdpa),
    computed chunk by chunk in lockstep with the methods' decode steps; ``full`` itself gets its nll.
    """
    from transformers import DynamicCache

    p, n = settings.fidelity_prefix, settings.fidelity_tokens
    ids = torch.tensor([_ids(tokenizer, book_text())])
    if ids.shape[1] < p + n + 1:
        raise ValueError(f"fidelity_prefix + fidelity_tokens must be < {ids.shape[1]} (the text's tokens), got {p + n}")
    ids = ids[:, : p + n + 1]
    caches = methods.start(ids[:, :p], full=False)  # full attention is the reference below
    reference = DynamicCache()
    with torch.no_grad():
        _prefill(methods.model, reference, ids[:, :p].to(methods.device), settings.prefill_chunk)
    targets = ids[0, p + 1 :]  # the token each step predicts, (n,)
    names = [FULL, *caches] if FULL in settings.methods else list(caches)
    res = {m: {"kl": torch.empty(n), "agree": torch.empty(n), "nll": torch.empty(n)} for m in names}
    chunk = settings.prefill_chunk
    bar = tqdm(total=n, desc="fidelity", unit="tok", disable=not progress)
    for t0 in range(0, n, chunk):
        t1 = min(n, t0 + chunk)
        start = time.perf_counter()
        with torch.no_grad():
            ref = _prefill(methods.model, reference, ids[:, p + t0 : p + t1].to(methods.device), chunk)
        ref_logp = torch.log_softmax(ref, dim=-1)  # [c, vocab]: full attention, predicting targets[t0:t1]
        tgt = targets[t0:t1]
        if FULL in res:
            methods.seconds[FULL] += time.perf_counter() - start
            res[FULL]["kl"][t0:t1] = 0.0
            res[FULL]["agree"][t0:t1] = 1.0
            res[FULL]["nll"][t0:t1] = -ref_logp.gather(1, tgt[:, None])[:, 0]
        for m, cache in caches.items():
            logp = torch.log_softmax(
                torch.stack([methods.step(m, cache, int(ids[0, p + t])) for t in range(t0, t1)]), dim=-1
            )  # [c, vocab]
            res[m]["kl"][t0:t1] = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0.0)
            res[m]["agree"][t0:t1] = (logp.argmax(-1) == ref_logp.argmax(-1)).float()
            res[m]["nll"][t0:t1] = -logp.gather(1, tgt[:, None])[:, 0]
        bar.update(t1 - t0)
    bar.close()
    methods.finish(caches)
    return res


# ---------------------------------------------------------------------------------------------------
# the run


@dataclass
class EvalReport:
    """Everything an evaluation measured.

    needle : one row per (task, length, depth, sample, method).
    needle_cells : accuracy per (task, length, depth, method), over samples.
    fidelity : one row per method: mean and max KL, top-1 agreement, perplexity, over all positions.
    fidelity_bins : the same per position bin (``FIDELITY_BINS`` equal bins of the decoded positions).
    telemetry : per (method, layer) recall@k and attention mass (empty without ``settings.telemetry``).
    seconds : wall seconds per method (shared prefills split evenly), and ``total``.
    """

    settings: EvalSettings
    model: str
    needle: list[dict[str, Any]]
    needle_cells: list[dict[str, Any]]
    fidelity: list[dict[str, Any]]
    fidelity_bins: list[dict[str, Any]]
    telemetry: list[dict[str, Any]]
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the whole report."""
        settings = {f.name: getattr(self.settings, f.name) for f in fields(self.settings) if f.init}
        return {"model": self.model, "settings": settings, "seconds": self.seconds, "needle_cells": self.needle_cells,
                "fidelity": self.fidelity, "fidelity_bins": self.fidelity_bins, "telemetry": self.telemetry,
                "needle": self.needle}


FIDELITY_BINS = 8


def _needle_cells(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cells: dict[tuple, list[int]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["target_length"], r["depth"], r["method"]), []).append(r["correct"])
    return [{"task": t, "length": n, "depth": d, "method": m, "samples": len(v), "accuracy": sum(v) / len(v)}
            for (t, n, d, m), v in cells.items()]


def _fidelity_tables(
    res: dict[str, dict[str, torch.Tensor]], prefix: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    overall, bins = [], []
    for m, r in res.items():
        n = r["kl"].shape[0]
        overall.append({"method": m, "tokens": n, "kl_mean": float(r["kl"].mean()), "kl_max": float(r["kl"].max()),
                        "kl_p99": float(r["kl"].quantile(0.99)), "top1_agreement": float(r["agree"].mean()),
                        "ppl": math.exp(float(r["nll"].mean()))})
        edges = torch.linspace(0, n, FIDELITY_BINS + 1).round().long().tolist()
        for a, b in zip(edges[:-1], edges[1:]):
            if b > a:
                bins.append({"method": m, "position_start": prefix + a, "position_end": prefix + b,
                             "kl_mean": float(r["kl"][a:b].mean()), "top1_agreement": float(r["agree"][a:b].mean()),
                             "ppl": math.exp(float(r["nll"][a:b].mean()))})
    return overall, bins


def run_eval(
    settings: EvalSettings | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    model_path: str | Path | None = None,
    progress: bool = True,
) -> EvalReport:
    """Run the needle grid and the fidelity task for every method of ``settings``.

    Give ``model`` and ``tokenizer`` (a transformers causal LM that ``RetrievalCache`` supports), or
    neither: ``hf.load_model(model_path)`` (None: the embedded SmolLM2).
    """
    from ..hf import load_model

    settings = EvalSettings() if settings is None else settings
    start = time.perf_counter()
    name = type(model).__name__ if model is not None else str(model_path or "embedded SmolLM2-135M-Instruct")
    if model is None:
        model, tokenizer = load_model(model_path)
    elif tokenizer is None:
        raise ValueError("give a tokenizer with the model")
    methods = _Methods(model, settings)
    with cpu_threads(settings.cpu_threads):
        needle = _run_needle(methods, tokenizer, settings, progress) if settings.tasks else []
        fidelity, bins = (
            _fidelity_tables(_run_fidelity(methods, tokenizer, settings, progress), settings.fidelity_prefix)
            if settings.fidelity_tokens else ([], [])
        )
    seconds = {**methods.seconds, "total": time.perf_counter() - start}
    return EvalReport(settings, name, needle, _needle_cells(needle), fidelity, bins, methods.telemetry_rows(), seconds)


# ---------------------------------------------------------------------------------------------------
# output


def _file_name(method: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", method)


def write_results(report: EvalReport, folder: str | Path) -> list[Path]:
    """eval.json, needle.csv, needle_cells.csv, fidelity.csv, fidelity_bins.csv, telemetry.csv and PNGs
    (needle_<method>.png heatmaps, fidelity.png, telemetry.png) into ``folder``; the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "eval.json"]
    paths[0].write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    for name, records in (("needle", report.needle), ("needle_cells", report.needle_cells),
                          ("fidelity", report.fidelity), ("fidelity_bins", report.fidelity_bins),
                          ("telemetry", report.telemetry)):
        if records:
            path = folder / f"{name}.csv"
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(records[0]))
                writer.writeheader()
                writer.writerows(records)
            paths.append(path)
    return paths + _plot(report, folder)


def _plot(report: EvalReport, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    s = report.settings
    for m in s.methods if report.needle_cells else ():
        fig, axes = plt.subplots(1, len(s.tasks), figsize=(1.2 + 1.1 * len(s.lengths) * len(s.tasks), 0.9 + 0.5 * len(s.depths)),
                                 squeeze=False)
        for ax, task in zip(axes[0], s.tasks):
            acc = {(c["length"], c["depth"]): c["accuracy"] for c in report.needle_cells
                   if c["method"] == m and c["task"] == task}
            grid = [[acc[(n, d)] for n in s.lengths] for d in s.depths]  # rows: depth, columns: length
            ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(s.lengths)), [str(n) for n in s.lengths])
            ax.set_yticks(range(len(s.depths)), [f"{d:.0%}" for d in s.depths])
            ax.set_xlabel("context tokens")
            ax.set_title(task)
        axes[0][0].set_ylabel("needle depth")
        fig.suptitle(f"needle accuracy: {m}")
        fig.tight_layout()
        path = folder / f"needle_{_file_name(m)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    if report.fidelity_bins:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for i, m in enumerate(dict.fromkeys(b["method"] for b in report.fidelity_bins)):
            bins = [b for b in report.fidelity_bins if b["method"] == m]
            x = [(b["position_start"] + b["position_end"]) / 2 for b in bins]
            color = plt.get_cmap("tab10")(i % 10)
            for ax, key in zip(axes, ("kl_mean", "top1_agreement", "ppl")):
                if m != FULL or key == "ppl":
                    ax.plot(x, [max(b[key], 1e-7) if key == "kl_mean" else b[key] for b in bins], "o-", color=color,
                            label=m, ms=3)
        axes[0].set_yscale("log")
        for ax, label in zip(axes, ("KL(full || method), nats (mean per bin)", "top-1 agreement with full",
                                    "perplexity")):
            ax.set_xlabel("token position")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
        axes[2].legend(fontsize=8)
        fig.suptitle(f"teacher-forced fidelity, {report.model}")
        fig.tight_layout()
        fig.savefig(folder / "fidelity.png", dpi=110)
        plt.close(fig)
        out.append(folder / "fidelity.png")
    if report.telemetry:
        series: dict[str, list[dict[str, Any]]] = {}
        for r in report.telemetry:
            series.setdefault(r["method"], []).append(r)
        out.append(plot_telemetry(series, folder / "telemetry.png", f"retrieval telemetry, {report.model}"))
    return out


def format_eval_table(report: EvalReport) -> str:
    """The terminal report: needle accuracy per method (overall and per length), fidelity per method,
    the telemetry per layer of each method, seconds per method."""
    s = report.settings
    parts = [f"model: {report.model}; sink {s.sink}, window {s.window}, top_k {s.top_k}"]
    if report.needle_cells:
        header = ["method", "all", *(f"{t}" for t in s.tasks), *(f"{n} tok" for n in s.lengths)]
        def acc(cells: list[dict[str, Any]]) -> str:
            return f"{sum(c['accuracy'] for c in cells) / len(cells):.2f}"

        rows = []
        for m in s.methods:
            cells = [c for c in report.needle_cells if c["method"] == m]
            rows.append([m, acc(cells), *(acc([c for c in cells if c["task"] == t]) for t in s.tasks),
                         *(acc([c for c in cells if c["length"] == n]) for n in s.lengths)])
        parts += [f"\nneedle accuracy ({len(s.depths)} depths x {s.samples} sample(s) per cell; question and "
                  "answer decoded through the cache)", format_columns(header, rows)]
    if report.fidelity:
        parts += [f"\nteacher-forced fidelity: {s.fidelity_tokens} decode steps after a {s.fidelity_prefix}-token "
                  f"prefix of {BOOK}",
                  format_columns(["method", "KL mean", "KL p99", "KL max", "top-1 agree", "ppl"],
                                 [[r["method"], f"{r['kl_mean']:.5f}", f"{r['kl_p99']:.4f}", f"{r['kl_max']:.3f}",
                                   f"{100 * r['top1_agreement']:.2f}%", f"{r['ppl']:.3f}"] for r in report.fidelity])]
    for m in dict.fromkeys(r["method"] for r in report.telemetry):
        parts += [f"\ntelemetry: {m}", format_telemetry_table([r for r in report.telemetry if r["method"] == m])]
    parts += ["\nseconds: " + ", ".join(f"{m} {v:.1f}" for m, v in report.seconds.items())]
    return "\n".join(parts)
