"""Telemetry of retrieval: what each decode step's retrieved set misses, measured exactly on the side.

Opt-in with ``RetrievalConfig(telemetry=True)``. At every decode step of a layer the engine hands
``step_recall_and_mass`` its queries, the offloaded keys, the ids the index returned and the
log-sum-exp of the device part; it scans every offloaded key once more (exact, CPU) and measures,
with ``retrieval_attn.metrics``, per query head:

- ``recall``: recall@k of the retrieved ids against the exact top-k offloaded keys (intersection,
  tolerant to ties at the k-th score), k = the number of keys the step retrieved;
- ``mass``: the softmax mass of all visible keys held by sink + window + retrieved keys; 1.0 means
  the step equals full attention.

With retrieval switched off (``retrieve=False``, sink + window only) recall is 0 and mass is what the
device part alone holds. ``LayerTelemetry`` keeps the values of every step; ``summarise`` reduces a
layer's steps to one row (mean, worst head, worst step); the evaluation tools turn such rows into
tables and plots. This module knows nothing about indexes, caches or models: plain tensors in.
"""

from __future__ import annotations

import torch

from ..metrics import attention_mass, recall_at_k
from ..rows import grown_capacity

__all__ = ["LayerTelemetry", "step_recall_and_mass", "summarise"]


def step_recall_and_mass(
    qg: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor | None, lse_device: torch.Tensor, scale: float, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recall@k and attention mass held, per query head, for one decode step of one layer.

    Parameters
    ----------
    qg : (G, group, D) fp32, the step's queries; G = batch * kv_heads, row j of group g is query head
        ``g % kv_heads * group + j`` of batch element ``g // kv_heads``.
    keys : (G, n, D), every offloaded key (n >= k), any float dtype.
    ids : (G, group, k) int64 rows of ``keys`` the index returned (-1: none), or None when nothing
        was retrieved.
    lse_device : (G, group) natural-log lse of the device part (sink + window + new token).
    scale : logit scale of q . k.
    k : size of the exact top-k set recall is measured against (>= 1).

    Returns
    -------
    recall : (G, group) float64 in [0, 1]; 0 where ``ids`` is None.
    mass : (G, group) float64, the fraction of the full softmax mass the device part and the
        retrieved keys hold (``metrics.attention_mass``).
    """
    if not 1 <= k <= keys.shape[1]:
        raise ValueError(f"k must be in [1, {keys.shape[1]}] (the offloaded keys), got {k}")
    scores = torch.bmm(qg.float(), keys.float().transpose(1, 2))  # [G, group, n]
    recall = torch.zeros(qg.shape[:2], dtype=torch.float64) if ids is None else recall_at_k(ids, scores, k)
    return recall, attention_mass(ids, scores, scale, lse_device)


class LayerTelemetry:
    """Recall and mass of every decode step of one layer, one value per query head and step.

    Kept in two fp32 arrays (steps, heads) grown by a quarter when full: a few bytes per step and head,
    no object per step."""

    def __init__(self) -> None:
        self._values = torch.zeros(2, 0, 0)  # [recall | mass, capacity, heads]
        self._steps = 0

    def record(self, recall: torch.Tensor, mass: torch.Tensor) -> None:
        """Keep one step's ``step_recall_and_mass`` results, recall and mass (G, group) each."""
        heads = recall.numel()
        if self._steps and heads != self._values.shape[2]:
            raise ValueError(f"LayerTelemetry.record: {heads} heads, earlier steps had {self._values.shape[2]}")
        if self._steps == self._values.shape[1]:
            grown = torch.zeros(2, grown_capacity(self._steps), heads)
            if self._steps:
                grown[:, : self._steps] = self._values[:, : self._steps]
            self._values = grown
        self._values[0, self._steps] = recall.flatten()
        self._values[1, self._steps] = mass.flatten()
        self._steps += 1

    @classmethod
    def side_by_side(cls, parts: list[LayerTelemetry]) -> LayerTelemetry:
        """The telemetry of one layer served by several engines over the same steps (the sequences of a
        padded batch): each step holds the heads of ``parts[0]``, then of ``parts[1]``, ..."""
        if len(parts) == 1:
            return parts[0]
        if len({p.steps for p in parts}) != 1:
            raise ValueError(f"side_by_side: parts must have recorded the same steps, got {[p.steps for p in parts]}")
        merged = cls()
        merged._values = torch.cat([p._values[:, : p.steps] for p in parts], dim=2)
        merged._steps = parts[0].steps
        return merged

    @property
    def steps(self) -> int:
        """Decode steps recorded."""
        return self._steps

    @property
    def nbytes(self) -> int:
        """Bytes the recorded values hold (their grown capacity)."""
        return self._values.nbytes

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """recall and mass, each (steps, batch * num_heads) fp32 (empty when no step was recorded)."""
        return self._values[0, : self._steps], self._values[1, : self._steps]


def summarise(*parts: LayerTelemetry) -> dict[str, float | int]:
    """One row for a layer, over the steps of one or more runs of it (``parts``, same number of heads):
    steps, and for recall and mass the mean over steps and heads, the worst head's mean over steps
    (``*_worst_head``) and the worst single (step, head) value (``*_min``)."""
    pairs = [p.tensors() for p in parts if p.steps]
    recall = torch.cat([r for r, _ in pairs]) if pairs else torch.zeros(0, 0)  # [steps, heads]
    mass = torch.cat([m for _, m in pairs]) if pairs else torch.zeros(0, 0)
    row: dict[str, float | int] = {"steps": recall.shape[0]}
    for name, x in (("recall", recall), ("mass", mass)):
        empty = x.numel() == 0
        row[f"{name}_mean"] = float("nan") if empty else float(x.mean())
        row[f"{name}_worst_head"] = float("nan") if empty else float(x.mean(0).min())
        row[f"{name}_min"] = float("nan") if empty else float(x.min())
    return row
