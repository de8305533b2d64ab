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
device part alone holds.

With ``RetrievalConfig(estimate_tail=True)`` as well (``retrieval_attn.engine.tail``),
``step_tail_error`` measures the estimate of the unretrieved rows against the exact attention, per
query head: ``tail_exact``, the exact softmax mass of the rows the estimate stands for (the offloaded
rows not retrieved); ``tail_added``, the mass the estimate takes in the merged softmax;
``tail_mass_ratio``, the merged softmax's total (device + retrieved + estimate) over the exact total
(1: the estimate's mass is right); ``out_err`` and ``out_err_top_k``, the relative L2 error of the
merged output against exact attention, with the estimate and without it. Without telemetry the engine
still keeps, per step, the mean and the worst head of ``tail_added`` (``TailMassRecord``). ``LayerTelemetry`` keeps the values of every step; ``summarise`` reduces a
layer's steps to one row (mean, worst head, worst step); the evaluation tools turn such rows into
tables and plots. This module knows nothing about indexes, caches or models: plain tensors in.
"""

from __future__ import annotations

import torch

from ..metrics import attention_mass, recall_at_k
from ..rows import grown_capacity

__all__ = ["LayerTelemetry", "TAIL_FIELDS", "TailMassRecord", "record_step", "step_recall_and_mass", "step_tail_error",
           "summarise"]

TAIL_FIELDS = ("tail_exact", "tail_added", "tail_mass_ratio", "out_err", "out_err_top_k")


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


def step_tail_error(
    qg: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ids: torch.Tensor | None, scale: float,
    device_part: tuple[torch.Tensor, torch.Tensor], top_k_part: tuple[torch.Tensor, torch.Tensor],
    lse_tail: torch.Tensor, out: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The estimate of the unretrieved rows against exact attention, per query head, for one step of one layer.

    Parameters
    ----------
    qg : (G, group, D) fp32, the step's queries (as ``step_recall_and_mass``).
    keys, values : (G, n, D), every offloaded row, any float dtype.
    ids : (G, group, k) int64 rows retrieved (-1: none), or None.
    scale : logit scale of q . k.
    device_part : out (G, group, D) and lse (G, group) of the device part (sink + window + new token).
    top_k_part : out and lse of the device part merged with the retrieved part (the step without estimate).
    lse_tail : (G, group), the estimate's lse.
    out : (G, group, D), the step's merged output, estimate included.

    Returns
    -------
    ``TAIL_FIELDS`` -> (G, group) float64 (module docstring).
    """
    logits = torch.bmm(qg.double(), keys.double().transpose(1, 2)) * scale  # [G, group, n]
    o_dev, lse_dev = (x.double() for x in device_part)
    lse_off = torch.logsumexp(logits, dim=-1)
    lse_exact = torch.logaddexp(lse_dev, lse_off)
    p = torch.exp(logits - lse_exact[..., None])  # every offloaded row's share of the exact softmax
    exact = torch.exp(lse_dev - lse_exact)[..., None] * o_dev + torch.bmm(p, values.double())  # [G, group, D]
    unretrieved = torch.ones_like(p)
    if ids is not None:
        unretrieved = unretrieved - _retrieved_mask(ids, logits.shape[-1])
    lse_total = torch.logaddexp(top_k_part[1].double(), lse_tail.double())
    norm = torch.linalg.vector_norm(exact, dim=-1).clamp(min=1e-30)

    def err(o: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(o.double() - exact, dim=-1) / norm

    return {"tail_exact": (p * unretrieved).sum(-1), "tail_added": torch.exp(lse_tail.double() - lse_total),
            "tail_mass_ratio": torch.exp(lse_total - lse_exact), "out_err": err(out), "out_err_top_k": err(top_k_part[0])}


def record_step(
    telemetry: LayerTelemetry, qg: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ids: torch.Tensor | None,
    scale: float, k: int, device_part: tuple[torch.Tensor, torch.Tensor],
    tail: tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """One decode step of one layer measured into ``telemetry``: ``step_recall_and_mass`` and, with a tail
    estimate, ``step_tail_error``.

    qg, keys, values, ids, scale, k : as ``step_recall_and_mass``; qg's G = batch * kv_heads.
    device_part : out (B, Hq, 1, D) and lse (B, Hq, 1) of the device part, on the layer's device.
    tail : the step's top-k part (out, lse), the estimate's lse and the merged out, shaped as
        ``device_part``; None without an estimate.
    """
    g, group, d = qg.shape

    def host(x: torch.Tensor, *shape: int) -> torch.Tensor:  # [G, group, ...] fp32 on the CPU
        return x.reshape(g, group, *shape).float().cpu()

    telemetry.record(*step_recall_and_mass(qg, keys, ids, host(device_part[1]), scale, k))
    if tail is not None:
        (o_top, lse_top), lse_tail, out = tail
        telemetry.record_tail(step_tail_error(
            qg, keys, values, ids, scale, (host(device_part[0], d), host(device_part[1])),
            (host(o_top, d), host(lse_top)), host(lse_tail), host(out, d)))


def _retrieved_mask(ids: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n) float64 0/1: the rows ``ids`` (..., k) pick (-1 and repeats ignored)."""
    keep = torch.zeros((*ids.shape[:-1], n + 1), dtype=torch.float64)
    ids = ids.long()
    keep.scatter_(-1, torch.where((ids < 0) | (ids >= n), n, ids), 1.0)
    return keep[..., :n]


class TailMassRecord:
    """Per decode step, the mean and the worst (largest) query head of the mass the estimate adds, kept
    on the device it is computed on (no device sync per step) in a (capacity, 2) fp32 tensor grown by a
    quarter when full."""

    def __init__(self) -> None:
        self._values: torch.Tensor | None = None  # [capacity, mean | max]
        self.steps = 0

    def record(self, added: torch.Tensor) -> None:
        """Keep one step's mass added (any shape: one value per query head)."""
        if self._values is None or self.steps == self._values.shape[0]:
            grown = torch.zeros(grown_capacity(self.steps), 2, device=added.device)
            if self._values is not None:
                grown[: self.steps] = self._values[: self.steps]
            self._values = grown
        self._values[self.steps, 0] = added.mean()
        self._values[self.steps, 1] = added.max()
        self.steps += 1

    def tensor(self) -> torch.Tensor:
        """(steps, 2) fp32 on the CPU: per step the mean and the largest mass added over query heads."""
        return torch.zeros(0, 2) if self._values is None else self._values[: self.steps].cpu()


class LayerTelemetry:
    """Recall and mass (and, with the tail estimate, ``TAIL_FIELDS``) of every decode step of one layer,
    one value per query head and step.

    Kept in fp32 arrays (fields, steps, heads) grown by a quarter when full: a few bytes per step and
    head, no object per step."""

    def __init__(self) -> None:
        self._values = torch.zeros(2, 0, 0)  # [recall | mass, capacity, heads]
        self._tail = torch.zeros(len(TAIL_FIELDS), 0, 0)  # [TAIL_FIELDS, capacity, heads]; steps with an estimate
        self._steps = 0
        self._tail_steps = 0

    @staticmethod
    def _grown(values: torch.Tensor, steps: int, heads: int) -> torch.Tensor:
        if steps and heads != values.shape[2]:
            raise ValueError(f"LayerTelemetry.record: {heads} heads, earlier steps had {values.shape[2]}")
        if steps < values.shape[1]:
            return values
        grown = torch.zeros(values.shape[0], grown_capacity(steps), heads)
        if steps:
            grown[:, :steps] = values[:, :steps]
        return grown

    def record(self, recall: torch.Tensor, mass: torch.Tensor) -> None:
        """Keep one step's ``step_recall_and_mass`` results, recall and mass (G, group) each."""
        self._values = self._grown(self._values, self._steps, recall.numel())
        self._values[0, self._steps] = recall.flatten()
        self._values[1, self._steps] = mass.flatten()
        self._steps += 1

    def record_tail(self, fields: dict[str, torch.Tensor]) -> None:
        """Keep one step's ``step_tail_error`` results (G, group) each."""
        self._tail = self._grown(self._tail, self._tail_steps, fields[TAIL_FIELDS[0]].numel())
        for i, name in enumerate(TAIL_FIELDS):
            self._tail[i, self._tail_steps] = fields[name].flatten()
        self._tail_steps += 1

    def tail_tensors(self) -> dict[str, torch.Tensor]:
        """``TAIL_FIELDS`` -> (steps with an estimate, batch * num_heads) fp32."""
        return {name: self._tail[i, : self._tail_steps] for i, name in enumerate(TAIL_FIELDS)}

    @classmethod
    def side_by_side(cls, parts: list[LayerTelemetry]) -> LayerTelemetry:
        """The telemetry of one layer served by several engines over the same steps (the sequences of a
        padded batch): each step holds the heads of ``parts[0]``, then of ``parts[1]``, ..."""
        if len(parts) == 1:
            return parts[0]
        if len({p.steps for p in parts}) != 1:
            raise ValueError(f"side_by_side: parts must have recorded the same steps, got {[p.steps for p in parts]}")
        if len({p._tail_steps for p in parts}) != 1:
            raise ValueError("side_by_side: parts must have recorded the same steps with a tail estimate")
        merged = cls()
        merged._values = torch.cat([p._values[:, : p.steps] for p in parts], dim=2)
        merged._tail = torch.cat([p._tail[:, : p._tail_steps] for p in parts], dim=2)
        merged._steps, merged._tail_steps = parts[0].steps, parts[0]._tail_steps
        return merged

    @property
    def steps(self) -> int:
        """Decode steps recorded."""
        return self._steps

    @property
    def nbytes(self) -> int:
        """Bytes the recorded values hold (their grown capacity)."""
        return self._values.nbytes + self._tail.nbytes

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """recall and mass, each (steps, batch * num_heads) fp32 (empty when no step was recorded)."""
        return self._values[0, : self._steps], self._values[1, : self._steps]


def summarise(*parts: LayerTelemetry) -> dict[str, float | int]:
    """One row for a layer, over the steps of one or more runs of it (``parts``, same number of heads):
    steps, and for recall and mass the mean over steps and heads, the worst head's mean over steps
    (``*_worst_head``) and the worst single (step, head) value (``*_min``). Where the runs estimated the
    tail, also per ``TAIL_FIELDS`` name the mean, the worst head's mean and the worst (step, head)
    (``*_worst_head``, ``*_worst``: the largest for errors and masses, the farthest from 1 for
    ``tail_mass_ratio``)."""
    pairs = [p.tensors() for p in parts if p.steps]
    recall = torch.cat([r for r, _ in pairs]) if pairs else torch.zeros(0, 0)  # [steps, heads]
    mass = torch.cat([m for _, m in pairs]) if pairs else torch.zeros(0, 0)
    row: dict[str, float | int] = {"steps": recall.shape[0]}
    for name, x in (("recall", recall), ("mass", mass)):
        empty = x.numel() == 0
        row[f"{name}_mean"] = float("nan") if empty else float(x.mean())
        row[f"{name}_worst_head"] = float("nan") if empty else float(x.mean(0).min())
        row[f"{name}_min"] = float("nan") if empty else float(x.min())
    tails = [p.tail_tensors() for p in parts if p._tail_steps]
    for name in TAIL_FIELDS if tails else ():
        x = torch.cat([t[name] for t in tails])  # [steps, heads]
        off = (x - 1).abs() if name == "tail_mass_ratio" else x  # how bad a value is
        head = x.mean(0)
        row[f"{name}_mean"] = float(x.mean())
        row[f"{name}_worst_head"] = float(head[((head - 1).abs() if name == "tail_mass_ratio" else head).argmax()])
        row[f"{name}_worst"] = float(x.flatten()[off.flatten().argmax()])
    return row
