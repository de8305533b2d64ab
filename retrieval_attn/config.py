"""``RetrievalConfig``: every knob of retrieval-attn in one frozen, validated dataclass.

A bad value raises ``ValueError`` at construction, naming the field and its allowed range. The index
name and its parameters are checked against the backends' declared parameters through the lazy
registry (``retrieval_attn.index.registry``), the only thing this module depends on: naming a backend
imports that backend's module alone, so the default config loads no faiss or hnswlib.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .checks import ConfigError, check_bool, check_choice, check_int, check_number, missing_library_message
from .index.registry import AUTO, available_indexes, index_params_for, missing_library, params_class

__all__ = ["RetrievalConfig", "RETRIEVED_ATTENTION", "TAIL_METHODS", "ConfigError"]

RETRIEVED_ATTENTION = ("cpu", "device")
TAIL_METHODS = ("mean", "sample")


@dataclass(frozen=True)
class RetrievalConfig:
    """What stays on the device, what is retrieved from the CPU, and how.

    Attributes
    ----------
    sink_tokens : first tokens of each sequence kept on the device for good (>= 0).
    window_tokens : most recent tokens kept on the device (>= 1); older ones spill to the CPU.
    top_k : keys retrieved from the CPU per query head per decode step (>= 1).
    index : ``"auto"`` (flat for small offloaded sets, roar for large ones) or the name of a registered
        backend (see ``retrieval_attn.index.available_indexes()``).
    index_params : parameters of that backend (roar's for ``"auto"``), checked against its ranges.
        Graph backends search with a queue ``ef`` that must hold ``top_k``: left unset, ``ef`` follows
        ``top_k`` (the backend's default, or ``top_k`` where that is larger); set, it must be >= ``top_k``.
    cpu_threads : threads of retrieval-attn's own CPU work: each decode step's search and attention over the
        retrieved rows, and the index builds (numba's, OpenMP's and torch's counts in the thread doing
        that work; the model's own torch threads are left alone). None (default): each layer's search
        runs with 1 thread or with ``index.thread_budget`` (every usable core, less one on a GPU) and
        keeps whichever it measures faster (``index.ThreadChooser``); builds use all cores. On a CPU
        device the step's attention over sink + window and the merge run with one torch thread.
    prefill_block : queries per block in prefill attention, and of a turn after decoding queries and
        offloaded rows per tile, bounding their memory (>= 1).
    overlap : run a decode step's CPU search and attention on a worker thread while the device attends
        over sink + window (True), or one after the other (False); the results are identical. None
        (default): True on a GPU, False when the layer runs on the CPU, where both would compete for
        the same cores.
    retrieved_attention : where the retrieved keys are attended: ``"cpu"`` (only out and lse of each
        query head cross to the device) or ``"device"`` (their scores and values are shipped and
        attended there).
    gpu_memory_gib : device memory budget in GiB (> 0), or None for what the device has. A request that
        would need more is refused before prefill (``retrieval_attn.planner``); on CUDA the budget is
        also enforced as the process's memory fraction.
    rebuild_growth : once decoding (or a turn's prefill after decoding) has grown the index by this
        fraction of the keys it was built over (> 0), a new index over all offloaded keys is built on a
        background thread, trained on the recent decode (and turn) queries, and replaces the old one
        when ready (searches never wait for it, and it keeps the replaced graph's beam); None (default)
        never rebuilds. Opt-in: decode's one key per step stays found by the widening beam (the graphs'
        ``ef_growth``); rebuilds pay off for a long turn's keys (bench/README.md).
    rebuild_queries : decode steps (or turn positions) whose queries train a rebuild (the most recent
        ones, >= 1).
    serve_while_building : True (default): a layer whose index is still being built in the background
        when decoding starts (``RetrievalCache.last_prefill_chunk``, ``start_index_build``) is served
        by exact search over its offloaded keys (``flat``) until the build lands, so the first token
        never waits for an index; False waits for it, so every step's retrieval is the index's
        (reproducible outputs, whatever the build's timing).
    retrieve : True (default) retrieves the top-k offloaded keys at every decode step; False is the
        StreamingLLM-style baseline: decode attends over sink + window only, offloaded tokens are
        kept in the CPU store but never attended to again, and no index is built.
    telemetry : True records, at every decode step and for every query head, the recall@k of the
        retrieved keys against the exact top-k offloaded keys and the softmax mass held by sink +
        window + retrieved keys, both computed exactly on the side (an extra scan of every offloaded
        key: for measuring and tuning ``top_k`` and ``ef``, not for production). See
        ``retrieval_attn.engine.telemetry``.
    estimate_tail : True adds, at every decode step, an estimate of the attention over the offloaded
        keys the step did not retrieve, as a third partial attention merged by log-sum-exp with the
        device part and the retrieved one (``retrieval_attn.engine.tail``); False (default) renormalises
        over what was retrieved, as if the rest had zero weight.
    tail_method : how the estimate is made: ``"sample"`` (default, measured the better of the two in
        bench/README.md, "tail.py and eval": one row drawn per ``tail_stride`` offloaded positions,
        the retrieved ones skipped, weighted by unretrieved rows over rows drawn) or ``"mean"`` (per
        block of ``tail_block`` consecutive offloaded positions: count, mean key, mean value, the
        retrieved rows taken out exactly).
    tail_block : offloaded positions per block summary of ``"mean"`` (>= 1): host memory about
        2/tail_block of the bf16 K+V; 1 summarises every row exactly.
    tail_stride : offloaded positions per sampled row of ``"sample"`` (>= 1); 1 samples every row (exact).
    tail_seed : seed of ``"sample"``'s draws (>= 0): the same seed gives the same steps.
    """

    sink_tokens: int = 128
    window_tokens: int = 512
    top_k: int = 100
    index: str = AUTO
    index_params: Mapping[str, Any] = field(default_factory=dict)
    cpu_threads: int | None = None
    prefill_block: int = 1024
    overlap: bool | None = None
    retrieved_attention: str = "cpu"
    gpu_memory_gib: float | None = None
    retrieve: bool = True
    telemetry: bool = False
    rebuild_growth: float | None = None
    rebuild_queries: int = 1024
    serve_while_building: bool = True
    estimate_tail: bool = False
    tail_method: str = "sample"
    tail_block: int = 64
    tail_stride: int = 16
    tail_seed: int = 0

    def __post_init__(self) -> None:
        own = type(self).__name__
        check_int(own, "sink_tokens", self.sink_tokens, 0)
        check_int(own, "window_tokens", self.window_tokens, 1)
        check_int(own, "top_k", self.top_k, 1)
        check_int(own, "prefill_block", self.prefill_block, 1)
        for name in ("retrieve", "telemetry", "serve_while_building", "estimate_tail"):
            check_bool(own, name, getattr(self, name))
        check_bool(own, "overlap", self.overlap, none_allowed=True, none_means="auto")
        check_int(own, "cpu_threads", self.cpu_threads, 1, none_allowed=True)
        check_choice(own, "retrieved_attention", self.retrieved_attention, RETRIEVED_ATTENTION)
        check_choice(own, "tail_method", self.tail_method, TAIL_METHODS)
        check_int(own, "tail_block", self.tail_block, 1)
        check_int(own, "tail_stride", self.tail_stride, 1)
        check_int(own, "tail_seed", self.tail_seed, 0, 2**63 - 1)
        check_number(own, "rebuild_growth", self.rebuild_growth, 0, low_open=True, none_allowed=True)
        check_int(own, "rebuild_queries", self.rebuild_queries, 1)
        check_number(own, "gpu_memory_gib", self.gpu_memory_gib, 0, low_open=True, none_allowed=True, unit="GiB")
        lacking = missing_library(self.index) if isinstance(self.index, str) else None
        check_choice(own, "index", self.index, [AUTO, *available_indexes()],
                     f" (it {missing_library_message(lacking)})" if lacking else "")
        if not isinstance(self.index_params, Mapping):
            raise ConfigError(own, "index_params", "a mapping of parameter names to values",
                              type(self.index_params).__name__)
        cls = params_class(self.index)
        try:
            ef = cls.resolved_params(index_params_for(self.index, self.index_params, self.top_k)).get("ef")
        except ValueError as err:
            raise ConfigError.about(own, "index_params", str(err)) from None
        if ef is not None and self.top_k > ef:
            raise ConfigError(own, "top_k", f"<= the search queue ef ({ef}) of index {cls.name!r}", self.top_k,
                              hint=": raise the index's ef or lower top_k")
        candidates = cls.resolved_params(index_params_for(self.index, self.index_params, self.top_k)).get("candidates")
        if candidates is not None and self.top_k > candidates:  # sketch: its second stage ranks the candidates
            raise ConfigError(own, "top_k", f"<= the candidates ({candidates}) of index {cls.name!r}", self.top_k,
                              hint=": raise the index's candidates or lower top_k")
        object.__setattr__(self, "index_params", MappingProxyType(dict(self.index_params)))
