"""The estimate of the attention a decode step's retrieval leaves out: the third partial state of a step.

Opt-in with ``RetrievalConfig(estimate_tail=True)``. After the step's search, ``TailEstimate.estimate``
computes, for every query head of the layer, a partial attention ``(out, lse)`` over exactly the
offloaded rows that head did not retrieve (with ``retrieve=False``: over every offloaded row), on the
CPU, with one numba call over all heads (``retrieval_attn.offload.summaries``):

- ``tail_method="mean"``: from ``BlockSummaries`` of ``tail_block`` consecutive
  offloaded positions, kept beside the store and folded in as rows spill (the rows the store gained
  since the last step, at the start of each step's estimate);
- ``tail_method="sample"``: from one row drawn per ``tail_stride`` positions, the draws from a
  ``numpy`` generator seeded with ``tail_seed`` (the same seed gives the same steps).

``fetch`` hands the result to the device, where the engine merges it by log-sum-exp with the device
part and the retrieved part (``attention.merge_state``); the estimate never counts a retrieved row
again, and where nothing is left (every row retrieved, an empty store) it is the empty state (lse
``-inf``), which the merge leaves out. ``record`` keeps, per step, the mass the estimate adds to the
merged softmax (``telemetry.TailMassRecord``); ``seconds`` is the last estimate's cost.

Owns the summaries, the draws, the scratch and result buffers (made at the first step, grown with the
store). It reads the store it is handed and the retrieved ids; it knows nothing about the index, the
device window or transformers.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..config import RetrievalConfig
from ..offload import BlockSummaries, KVStore, estimate_blocks, estimate_sample
from ..rows import grown_capacity
from .telemetry import TailMassRecord

__all__ = ["TailEstimate"]


class TailEstimate:
    """The unretrieved part of one layer's decode steps, estimated on the CPU.

    Parameters
    ----------
    config : ``tail_method``, ``tail_block``, ``tail_stride``, ``tail_seed``.
    groups : B * Hkv, the key sets of the store.
    group : query heads per KV head.
    head_dim : D.
    scale : logit scale.
    pin_memory : pin the result buffers (the layer's tensors are on a GPU).
    """

    def __init__(self, config: RetrievalConfig, groups: int, group: int, head_dim: int, scale: float,
                 pin_memory: bool):
        self.method, self.stride, self.scale = config.tail_method, config.tail_stride, scale
        self.summaries = None if self.method == "sample" else BlockSummaries(groups, head_dim, config.tail_block)
        self.rng = np.random.default_rng(config.tail_seed)
        # out: [B * Hkv, group, D], lse: [B * Hkv, group], as HostRetrieval's (row j of group g: query head g % Hkv * group + j)
        self.out = torch.empty((groups, group, head_dim), dtype=torch.float32, pin_memory=pin_memory)
        self.lse = torch.empty((groups, group), dtype=torch.float32, pin_memory=pin_memory)
        # per query head and block (or stratum): fp64 work rows, two for "mean", one for "sample"
        self._scratch = np.empty((1 if self.summaries is None else 2, groups, group, 0))
        self._draws = np.empty(0)  # flat [G * strata] uniform draws of "sample"
        self._no_ids = np.empty((groups, group, 0), np.int64)  # the ids of a step that retrieved nothing
        self.seconds = 0.0  # the last estimate's wall time
        self.added = TailMassRecord()

    def reserve(self, rows: int) -> None:
        """Size the summaries for ``rows`` offloaded rows per group (the store's ``reserve``)."""
        if self.summaries is not None:
            self.summaries.reserve(rows)

    @property
    def nbytes(self) -> int:
        """Host bytes held: summaries, scratch, draws and result buffers."""
        own = self._scratch.nbytes + self._draws.nbytes + self.out.nbytes + self.lse.nbytes
        return own + (self.summaries.nbytes if self.summaries is not None else 0)

    def _work(self, width: int) -> np.ndarray:
        """Scratch (1 or 2, G, group, >= width) fp64, made once and grown by a quarter."""
        if self._scratch.shape[3] < width:
            self._scratch = np.empty((*self._scratch.shape[:3], grown_capacity(width)))
        return self._scratch

    def _uniform(self, groups: int, strata: int) -> np.ndarray:
        """This step's draws (groups, strata) in [0, 1) from the seeded generator, into a buffer made once."""
        if self._draws.size < groups * strata:
            self._draws = np.empty(grown_capacity(groups * strata))
        u = self._draws[: groups * strata]
        self.rng.random(out=u)
        return u.reshape(groups, strata)

    def estimate(self, q: torch.Tensor, ids: torch.Tensor | None, store: KVStore) -> None:
        """The estimate of this step into ``out``, ``lse``.

        q : (G, group, D) fp32 on the host, the step's queries (``HostRetrieval.q``).
        ids : (G, group, k) int64 rows each query head retrieved, or None (nothing retrieved).
        store : the layer's offloaded rows (n >= 0).
        """
        t0 = time.perf_counter()
        store.synchronize()
        keys, values, n = store.key_source.kernel_rows(), store.kernel_values(), store.n
        qn, rows = q.numpy(), self._no_ids if ids is None else ids.numpy()
        out, lse = self.out.numpy(), self.lse.numpy()
        if self.summaries is not None:
            s = self.summaries
            s.update(keys, values, n)
            work = self._work(s.blocks)
            estimate_blocks(qn, rows, keys, values, n, s.block, s.sum_k, s.sum_v, s.count, self.scale,
                            work[0], work[1], out, lse)
        else:
            strata = -(-n // self.stride)
            work = self._work(strata)
            estimate_sample(qn, rows, keys, values, n, self.stride, self._uniform(q.shape[0], strata), self.scale,
                            work[0], out, lse)
        self.seconds = time.perf_counter() - t0

    def fetch(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The estimate on q's (B, Hq, 1, D) device: out (B, Hq, 1, D), lse (B, Hq, 1), fp32."""
        out = self.out.to(q.device, non_blocking=True).reshape(q.shape)
        return out, self.lse.to(q.device, non_blocking=True).reshape(q.shape[:3])

    def record(self, lse_tail: torch.Tensor, lse_total: torch.Tensor) -> None:
        """Keep the mass the estimate adds this step: exp(lse_tail - lse_total), (B, Hq, 1) each, on the device."""
        self.added.record(torch.exp(lse_tail - lse_total))
