"""Telemetry of retrieval: what each decode step's retrieved set misses, measured exactly on the side.

Opt-in with ``RetrievalConfig(telemetry=True)``. At every decode step of a layer the engine hands
``step_recall_and_mass`` its queries, the offloaded keys, the ids the index returned and two
log-sum-exps, which scans every offloaded key once more (exact, fp32, CPU), and ``LayerTelemetry``
keeps, per query head and step:

- ``recall``: recall@k of the retrieved ids against the exact top-k offloaded keys (intersection,
  tolerant to ties at the k-th score), k = the number of keys the step retrieved;
- ``mass``: the softmax mass of all visible keys held by sink + window + retrieved keys,
  ``exp(lse_merged - lse_exact)`` with ``lse_exact = logaddexp(lse_device, lse of all offloaded keys)``.
  1.0 means the step equals full attention.

With retrieval switched off (``retrieve=False``, sink + window only) recall is 0 and mass is what the
device part alone holds. ``summarise`` reduces a layer's steps to one row (mean, worst head, worst
step); ``format_telemetry_table`` and ``plot_telemetry`` turn rows of many layers into a table and a
PNG. This module knows nothing about indexes, caches or models: plain tensors in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

__all__ = ["LayerTelemetry", "step_recall_and_mass", "summarise", "format_telemetry_table", "plot_telemetry"]

RECALL_RTOL = 1e-5  # a retrieved key within this (relative) of the exact k-th best score counts as a hit


def step_recall_and_mass(
    qg: torch.Tensor,
    keys: torch.Tensor,
    ids: torch.Tensor | None,
    lse_device: torch.Tensor,
    lse_merged: torch.Tensor,
    scale: float,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recall@k and attention mass held, per query head, for one decode step of one layer.

    Parameters
    ----------
    qg : (G, group, D) fp32, the step's queries; G = batch * kv_heads, row j of group g is query head
        ``g % kv_heads * group + j`` of batch element ``g // kv_heads``.
    keys : (G, n, D) fp32, every offloaded key (n >= k).
    ids : (G, group, k) int64 rows of ``keys`` the index returned (-1: none), or None when nothing
        was retrieved.
    lse_device : (G, group) natural-log lse of the device part (sink + window + new token).
    lse_merged : (G, group) lse of what the step attended to (device part merged with the retrieved keys).
    scale : logit scale of q . k.
    k : size of the exact top-k set recall is measured against (>= 1).

    Returns
    -------
    recall : (G, group) fp32 in [0, 1]; 0 where ``ids`` is None.
    mass : (G, group) fp32, the fraction of the full softmax mass the step attended to.
    """
    if not 1 <= k <= keys.shape[1]:
        raise ValueError(f"k must be in [1, {keys.shape[1]}] (the offloaded keys), got {k}")
    scores = torch.bmm(qg.float(), keys.float().transpose(1, 2))  # [G, group, n]
    kth = scores.topk(k, dim=-1).values[..., -1:]  # [G, group, 1]
    in_top = scores >= kth - RECALL_RTOL * kth.abs().clamp(min=1.0)  # [G, group, n], ties at the k-th included
    if ids is None or ids.shape[-1] == 0:
        recall = torch.zeros(qg.shape[:2])
    else:
        picked = torch.zeros_like(in_top)  # [G, group, n]: the retrieved keys, each once
        picked.scatter_(-1, ids.clamp(min=0), ids >= 0)
        recall = (picked & in_top).sum(-1).float() / k
    lse_offloaded = torch.logsumexp(scores * scale, dim=-1)  # [G, group]
    lse_exact = torch.logaddexp(lse_device.float(), lse_offloaded)
    return recall, torch.exp(lse_merged.float() - lse_exact)


class LayerTelemetry:
    """Recall and mass of every decode step of one layer, one value per query head and step."""

    def __init__(self) -> None:
        self._recall: list[torch.Tensor] = []  # per step: (batch * num_heads,)
        self._mass: list[torch.Tensor] = []

    def record(self, recall: torch.Tensor, mass: torch.Tensor) -> None:
        """Keep one step's ``step_recall_and_mass`` results, recall and mass (G, group) each."""
        self._recall.append(recall.flatten())
        self._mass.append(mass.flatten())

    @property
    def steps(self) -> int:
        """Decode steps recorded."""
        return len(self._recall)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """recall and mass, each (steps, batch * num_heads) fp32 (empty when no step was recorded)."""
        if not self._recall:
            return torch.zeros(0, 0), torch.zeros(0, 0)
        return torch.stack(self._recall), torch.stack(self._mass)


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


def format_telemetry_table(rows: Sequence[Mapping[str, float | int]], label: str = "layer") -> str:
    """Aligned table of ``summarise`` rows, each carrying a ``label`` column (e.g. the layer index)."""
    header = [label, "steps", "recall mean", "recall worst head", "recall min", "mass mean", "mass worst head",
              "mass min"]
    body = [
        [str(r[label]), str(r["steps"])]
        + [f"{r[f]:.4f}" for f in ("recall_mean", "recall_worst_head", "recall_min", "mass_mean", "mass_worst_head",
                                     "mass_min")]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = [header, ["-" * w for w in widths], *body]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in lines)


def plot_telemetry(series: Mapping[str, Sequence[Mapping[str, float | int]]], path: str | Path, title: str) -> Path:
    """PNG of recall and mass per layer (mean: solid, worst head: dashed), one curve per series.

    series : name (e.g. a method) -> ``summarise`` rows with a ``layer`` field.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, rows) in enumerate(series.items()):
        color = plt.get_cmap("tab10")(i % 10)
        layers = [r["layer"] for r in rows]
        for ax, metric in zip(axes, ("recall", "mass")):
            ax.plot(layers, [r[f"{metric}_mean"] for r in rows], "o-", color=color, label=name, ms=3)
            ax.plot(layers, [r[f"{metric}_worst_head"] for r in rows], "--", color=color, alpha=0.6)
    axes[0].set_ylabel("recall@k of the retrieved keys")
    axes[1].set_ylabel("attention mass held (sink + window + retrieved)")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{title}: mean over steps and heads (-), worst head (--)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
