"""The methods an eval compares, and how one sequence runs through each of them.

- ``full``: the model with transformers' own ``DynamicCache`` (``hf.dynamic_cache``, sdpa): the reference;
- an index backend name (``roar``, ``flat``, ``hnsw``, ``ivf``, ``keygraph``, ``auto``), optionally
  with parameters (``roar:ef=200``): a ``RetrievalCache`` with that index;
- ``sink+window``: a ``RetrievalCache`` with ``retrieve=False`` (StreamingLLM-style: decode attends
  over the sink and the recent window only). If it matches ``full``, the task does not depend on what
  lies outside the window and says nothing about retrieval.
- either with ``+TAIL`` after the name (``roar+mean``, ``flat+sample:top_k=400``, ``sink+window+mean``):
  the same with ``estimate_tail=True``, ``TAIL`` one of ``TAIL_METHODS`` (``tail``: the run's
  ``tail_method``), the estimate of the unretrieved attention (``retrieval_attn.engine.tail``);
- the parameters ``CONFIG_PARAMS`` (``top_k=N``, ``tail_block=N``, ``tail_stride=N``, ``tail_seed=N``)
  of any retrieval method set that method's ``RetrievalConfig`` field instead of the run's
  (``flat:top_k=400``, ``flat+mean:tail_block=16``), so one run compares several.

``method_config`` derives each method's ``RetrievalConfig`` from the one config of the run with
``dataclasses.replace`` (its index and parameters, or ``retrieve=False``). ``Methods`` runs one
sequence at a time for every method, each through its own ``hf.Decoder``: ``full`` prefills its own
cache; all retrieval methods fork one exact ``RetrievalCache`` prefill (``RetrievalCache.fork``). It
times every method (a shared prefill split evenly) and keeps their telemetry across sequences.

This module knows nothing of the tasks (needle, fidelity) or of results files; it imports
``retrieval_attn.hf`` only where it runs the model.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import torch

from ..checks import ConfigError, missing_library_message
from ..config import TAIL_METHODS, RetrievalConfig
from ..index import AUTO, available_indexes, missing_library, params_class
from ..engine.telemetry import LayerTelemetry, summarise
from .backends import parse_backend_spec

__all__ = ["FULL", "SINK_WINDOW", "DEFAULT_METHODS", "CONFIG_PARAMS", "method_config", "Methods"]

CONFIG_PARAMS = ("top_k", "tail_block", "tail_stride", "tail_seed")  # method parameters that are config fields

FULL, SINK_WINDOW = "full", "sink+window"
# the reference, the query-aware index, the exact top-k (what any index can reach at best) and the
# floor (no retrieval); hnsw, ivf and the tail estimates (``roar+tail``) are one ``--methods`` away
DEFAULT_METHODS = (FULL, "roar", "flat", SINK_WINDOW)


def _tail(method: str, name: str, retrieval: RetrievalConfig) -> dict[str, Any]:
    """The ``RetrievalConfig`` fields a method name's ``+TAIL`` suffix sets (none without one)."""
    _, plus, tail = name.partition("+")
    if not plus:
        return {}
    if tail != "tail" and tail not in TAIL_METHODS:
        raise ValueError(f"method {method!r}: the estimate after '+' must be one of {['tail', *TAIL_METHODS]}, "
                         f"got {tail!r}")
    return {"estimate_tail": True, "tail_method": retrieval.tail_method if tail == "tail" else tail}


def method_config(method: str, retrieval: RetrievalConfig) -> RetrievalConfig | None:
    """The ``RetrievalConfig`` of a method (None for ``full``): ``retrieval`` with the method's index and
    parameters (``retrieve=False`` for ``sink+window``), its ``top_k`` and tail estimate; ValueError for
    an unknown method."""
    if method == FULL:
        return None
    if method.split(":")[0].startswith(SINK_WINDOW) and not method.startswith(SINK_WINDOW + ":"):
        # no index is built; flat has no ef bound on top_k
        tail = _tail(method, method.removeprefix(SINK_WINDOW).replace("+", "x+", 1), retrieval)
        return dataclasses.replace(retrieval, retrieve=False, index="flat", index_params={}, **tail)
    spec = parse_backend_spec(method)
    base = spec.name.partition("+")[0]
    names = [FULL, SINK_WINDOW, AUTO, *available_indexes()]
    if base not in names:
        lacking = missing_library(base)
        raise ConfigError("", "methods", f"one or more of {', '.join(names)} (an index with optional +TAIL and "
                          ":param=value)", method, hint=f" (it {missing_library_message(lacking)})" if lacking else "")
    tail = _tail(method, spec.name, retrieval)
    multi = [p for p, vs in spec.params.items() if len(vs) != 1]
    if multi:
        raise ValueError(f"method {method!r}: give one value per parameter, got several for {multi}")
    params = {p: vs[0] for p, vs in spec.params.items() if p not in CONFIG_PARAMS}
    fields = {p: vs[0] for p, vs in spec.params.items() if p in CONFIG_PARAMS}
    # an evaluation measures the index: the first token waits for its build instead of exact search
    return dataclasses.replace(retrieval, index=base, index_params=params, serve_while_building=False,
                               **{**tail, **fields})


def _source_config(configs: list[RetrievalConfig]) -> RetrievalConfig | None:
    """The config of the one exact prefill that every retrieval method forks (None: there is none).

    It keeps the methods' layout (sink, window) and threads. Its index is that of the first method
    whose index trains on prefill queries, so the prefill keeps them for the forks that need them, else
    flat. It never decodes: ``retrieve=False`` also means its last prefill chunk starts no index build,
    which ``fork`` would refuse.
    """
    if not configs:
        return None
    trainer = next((c.index for c in configs if c.retrieve and params_class(c.index).uses_train_queries), "flat")
    return dataclasses.replace(configs[0], top_k=1, index=trainer, index_params={}, telemetry=False, retrieve=False,
                               estimate_tail=False)


class Methods:
    """Every method's ``Decoder`` for one sequence at a time, with per-method seconds and telemetry
    collected across sequences.

    Parameters
    ----------
    model : a transformers causal LM that ``RetrievalCache`` supports.
    configs : method -> its ``RetrievalConfig`` (None: ``full``), in the run's order (see ``method_config``).
    prefill_chunk : tokens per prefill forward pass.
    """

    def __init__(self, model: torch.nn.Module, configs: Mapping[str, RetrievalConfig | None], prefill_chunk: int):
        self.model, self.configs, self.prefill_chunk = model, dict(configs), prefill_chunk
        self.seconds = {m: 0.0 for m in self.configs}
        self.decode_seconds = {m: 0.0 for m in self.configs}  # decode steps only (no prefill)
        self.steps = {m: 0 for m in self.configs}  # decode steps run
        self.telemetry: dict[str, list[list[LayerTelemetry]]] = {m: [] for m in self.configs}
        self.source_config = _source_config([c for c in self.configs.values() if c is not None])

    def start(self, ids: torch.Tensor, full: bool = True) -> dict[str, Any]:
        """Prefill ids (1, n) for every method (``full`` only if asked): {method: its ``hf.Decoder``}."""
        from ..hf import Decoder, RetrievalCache, dynamic_cache

        decoders = {}
        if full and FULL in self.configs:
            start = time.perf_counter()
            decoders[FULL] = Decoder(self.model, dynamic_cache(), self.prefill_chunk)
            decoders[FULL].prefill(ids)
            self.seconds[FULL] += time.perf_counter() - start
        if self.source_config is not None:
            start = time.perf_counter()
            source = RetrievalCache(self.model, self.source_config)
            Decoder(self.model, source, self.prefill_chunk).prefill(ids)
            forks = {m: c for m, c in self.configs.items() if c is not None}
            shared = (time.perf_counter() - start) / len(forks)
            for m, config in forks.items():
                decoders[m] = Decoder(self.model, source.fork(config), self.prefill_chunk)
                self.seconds[m] += shared
        return decoders

    def step(self, method: str, decoder: Any, token: int) -> torch.Tensor:
        """Feed ``token`` to ``method``'s decoder: logits (vocab,) of the next token, fp32 on the CPU."""
        start = time.perf_counter()
        logits = decoder.step(token)[0].float().cpu()
        seconds = time.perf_counter() - start
        self.seconds[method] += seconds
        self.decode_seconds[method] += seconds
        self.steps[method] += 1
        return logits

    def greedy(
        self, method: str, decoder: Any, logits: torch.Tensor, max_new_tokens: int, stop: tuple[int, ...]
    ) -> list[int]:
        """Greedy decoding of ``method`` from logits (vocab,) (``Decoder.decode``): the tokens chosen."""

        def count(step: int, seconds: float) -> None:
            self.seconds[method] += seconds
            self.decode_seconds[method] += seconds
            self.steps[method] += 1

        return decoder.decode(logits, max_new_tokens, stop=stop, on_step=count)

    def finish(self, decoders: Mapping[str, Any]) -> None:
        """Keep the telemetry of this sequence's retrieval caches."""
        for m, decoder in decoders.items():
            config = self.configs[m]
            if config is not None and config.telemetry:
                self.telemetry[m].append([layer.engine.telemetry for layer in decoder.cache.layers])

    def seconds_per_step(self) -> dict[str, float]:
        """Per method that ran decode steps, the mean wall seconds of one (``full`` runs none in a fidelity-only
        run: its logits there come from chunked forwards)."""
        return {m: self.decode_seconds[m] / n for m, n in self.steps.items() if n}

    def telemetry_rows(self) -> list[dict[str, Any]]:
        """Per method and layer, ``telemetry.summarise`` over every sequence of the run."""
        rows = []
        for m, runs in self.telemetry.items():
            for layer, parts in enumerate(zip(*runs)):
                rows.append({"method": m, "layer": layer, **summarise(*parts)})
        return rows
