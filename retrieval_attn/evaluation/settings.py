"""The settings of an evaluation run (``EvalSettings``), checked whole before any work, and the needle
tasks it may name (``TASKS``).

Imported by the tasks (``needle``, ``fidelity``) and by ``evaluate``, which runs them; imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..checks import ConfigError, check_choice, check_int, check_ints, check_numbers
from ..config import RetrievalConfig
from ..index import backend_for, index_class
from .methods import DEFAULT_METHODS, method_config
from .texts import BOOK, BOOKS

__all__ = ["EvalSettings", "TASKS"]

TASKS = ("passkey", "number", "multikey")


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
    text : the fidelity task's book, one of ``texts.BOOKS``.
    retrieval : what every retrieval method shares (``sink_tokens``, ``window_tokens``, ``top_k``,
        ``telemetry``: per-layer recall@k and attention mass, ...); each method replaces its ``index`` and
        ``index_params`` (``methods.method_config``). Its ``cpu_threads`` also bounds the threads of the
        whole run (the model's forwards too); None leaves torch/numba/faiss defaults. On a machine
        shared with other work, 1 is often fastest.
    seed : base seed of the needle generators.
    prefill_chunk : tokens per prefill forward pass (bounds memory).
    method_configs : (derived) method -> its ``RetrievalConfig`` (None: ``full``).
    """

    methods: tuple[str, ...] = DEFAULT_METHODS
    tasks: tuple[str, ...] = TASKS
    lengths: tuple[int, ...] = (2048,)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    samples: int = 1
    fidelity_tokens: int = 300
    fidelity_prefix: int = 2048
    text: str = BOOK
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    seed: int = 0
    prefill_chunk: int = 1024
    method_configs: dict[str, RetrievalConfig | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        own = type(self).__name__
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ConfigError(own, "methods", "one or more distinct methods", self.methods)
        for task in self.tasks:
            check_choice(own, "tasks", task, TASKS)
        if self.text not in BOOKS:
            raise ConfigError(own, "text", f"one of {', '.join(BOOKS)}", self.text)
        device = self.retrieval.sink_tokens + self.retrieval.window_tokens
        if self.tasks:  # a needle context must offload something
            check_ints(own, "lengths", self.lengths, max(64, device + 1), why=f"longer than sink + window = {device}, "
                       "so that something is offloaded")
            check_numbers(own, "depths", self.depths, 0.0, 1.0)
        check_int(own, "samples", self.samples, 1)
        check_int(own, "fidelity_tokens", self.fidelity_tokens, 0)
        check_int(own, "prefill_chunk", self.prefill_chunk, 2)
        if not self.tasks and self.fidelity_tokens == 0:
            raise ConfigError(own, "fidelity_tokens", "> 0 when no needle task is given (nothing to run)", 0)
        if self.fidelity_tokens:
            check_int(own, "fidelity_prefix", self.fidelity_prefix, device + 1)
        configs = {m: method_config(m, self.retrieval) for m in self.methods}
        builds = ([min(self.lengths)] if self.tasks else []) + ([self.fidelity_prefix] if self.fidelity_tokens else [])
        offloaded = min(builds) - device  # keys the first decode indexes, at the least
        for m, c in configs.items():
            if c is None:
                continue
            backend, params = backend_for(c.index, c.index_params, offloaded, c.top_k)
            nlist = index_class(backend).resolved_params(params).get("nlist", 0)
            if nlist > offloaded:
                raise ValueError(
                    f"method {m!r}: {backend}'s nlist ({nlist}) must be <= the keys offloaded at the first decode "
                    f"({offloaded}): lengthen the shortest context or pass ivf:nlist=..."
                )
        object.__setattr__(self, "method_configs", configs)
