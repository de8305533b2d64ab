"""Teacher-forced fidelity against full attention on a shipped book.

The text is ``EvalSettings.text``: ``data/alice.txt`` (Lewis Carroll, *Alice's Adventures in
Wonderland*, 1865, public domain, the Millennium Fulcrum Edition 2.9 text) by default, or
``data/frankenstein.txt`` (Mary Shelley, 1831 edition, public domain; ``texts.BOOKS``). ``fidelity_prefix`` tokens are prefilled, then
``fidelity_tokens`` more are fed one decode step each, where retrieval acts; at every step each
method's next-token distribution is compared with full attention's (exact forwards over the text
through a ``DynamicCache``, ``FIDELITY_BLOCK`` positions per forward in lockstep with the decode steps,
so the run holds a few [block, vocab] fp32 arrays at a time, whatever the prefix): KL(full || method) in
nats, top-1 agreement, and each method's own negative log-likelihood of the true next token
(perplexity). Each disagreement is also counted apart where full attention itself hardly decided (a
*near tie*: its top token less than ``NEAR_TIE`` times as likely as its second), so a missed top-1
target can be read as near ties flipped or decided tokens changed. ``fidelity_tables`` reduces them
over all positions and over ``FIDELITY_BINS`` position bins; ``plot_fidelity`` draws the bins.

This module knows tokenizers and the ``Methods`` runner, not how a method attends.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..checks import ConfigError
from .methods import FULL, Methods
from .report import Interrupted, pyplot
from .settings import EvalSettings
from .texts import book_text, token_ids

__all__ = ["FIDELITY_BINS", "FIDELITY_BLOCK", "NEAR_TIE", "fidelity_ids", "run_fidelity", "fidelity_tables",
           "plot_fidelity"]

FIDELITY_BINS = 8
FIDELITY_BLOCK = 128  # positions compared per reference forward (~25 MB of fp32 logits each at a 49K vocab)
NEAR_TIE = 2.0  # full attention's top token under this many times as likely as its second: a near tie


def fidelity_ids(tokenizer: Any, settings: EvalSettings) -> torch.Tensor:
    """The token ids (1, prefix + tokens + 1) of the fidelity task's text, checked to be long enough: the
    check of the settings that needs the tokenizer, made before any work."""
    ids = torch.tensor([token_ids(tokenizer, book_text(settings.text))])
    p, n = settings.fidelity_prefix, settings.fidelity_tokens
    if ids.shape[1] < p + n + 1:
        raise ConfigError("EvalSettings", "fidelity_tokens", f"an int in [1, {ids.shape[1] - 1 - p}] (what "
                          f"{settings.text}'s {ids.shape[1]} tokens hold after fidelity_prefix = {p})", n)
    return ids[:, : p + n + 1]


def run_fidelity(
    methods: Methods, ids: torch.Tensor, settings: EvalSettings, progress: bool
) -> dict[str, dict[str, torch.Tensor]]:
    """Per method, per position arrays (tokens,): ``kl`` (nats) and ``agree`` against full attention, ``nll``,
    and ``near_tie`` (1 where full attention's top two tokens are within a factor ``NEAR_TIE``; one array,
    the same object in every method's results).

    Full attention's logits come from exact forwards over the text (a DynamicCache, sdpa), computed
    ``FIDELITY_BLOCK`` positions at a time in lockstep with the methods' decode steps; ``full`` itself gets
    its nll.
    Ctrl-C raises ``report.Interrupted`` holding the arrays of the positions compared so far.
    """
    from ..hf import Decoder, dynamic_cache

    p, n = settings.fidelity_prefix, settings.fidelity_tokens  # ids: (1, p + n + 1), from ``fidelity_ids``
    decoders = methods.start(ids[:, :p], full=False)  # full attention is the reference below
    reference = Decoder(methods.model, dynamic_cache(), settings.prefill_chunk)
    reference.prefill(ids[:, :p])
    block = min(FIDELITY_BLOCK, settings.prefill_chunk)  # one forward each, its logits all kept
    targets = ids[0, p + 1 :]  # the token each step predicts, (n,)
    names = [FULL, *decoders] if FULL in methods.configs else list(decoders)
    near_tie = torch.empty(n)  # a property of full attention: one array, shared by every method's results
    res = {m: {"kl": torch.empty(n), "agree": torch.empty(n), "nll": torch.empty(n), "near_tie": near_tie}
           for m in names}
    done = 0  # positions compared
    try:
        with tqdm(total=n, desc="fidelity", unit="tok", disable=not progress) as bar:
            for t0 in range(0, n, block):
                t1 = min(n, t0 + block)
                start = time.perf_counter()
                ref = reference.prefill(ids[:, p + t0 : p + t1], all_logits=True)[0].float().cpu()
                ref_logp = torch.log_softmax(ref, dim=-1)  # [block, vocab]: full attention, predicting targets[t0:t1]
                tgt = targets[t0:t1]
                top2 = ref_logp.topk(2, dim=-1).values  # [block, 2]
                near_tie[t0:t1] = (top2[:, 0] - top2[:, 1] < math.log(NEAR_TIE)).float()
                if FULL in res:
                    methods.seconds[FULL] += time.perf_counter() - start
                    res[FULL]["kl"][t0:t1] = 0.0
                    res[FULL]["agree"][t0:t1] = 1.0
                    res[FULL]["nll"][t0:t1] = -ref_logp.gather(1, tgt[:, None])[:, 0]
                for m, decoder in decoders.items():
                    logp = torch.log_softmax(
                        torch.stack([methods.step(m, decoder, int(ids[0, p + t])) for t in range(t0, t1)]), dim=-1
                    )  # [block, vocab]
                    res[m]["kl"][t0:t1] = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0.0)
                    res[m]["agree"][t0:t1] = (logp.argmax(-1) == ref_logp.argmax(-1)).float()
                    res[m]["nll"][t0:t1] = -logp.gather(1, tgt[:, None])[:, 0]
                done = t1
                bar.update(t1 - t0)
    except KeyboardInterrupt:
        raise Interrupted({m: {k: v[:done] for k, v in r.items()} for m, r in res.items()} if done else {}) from None
    methods.finish(decoders)
    return res


def fidelity_tables(
    res: dict[str, dict[str, torch.Tensor]], prefix: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``run_fidelity``'s arrays reduced: one row per method over all positions (mean, p99 and max KL,
    top-1 agreement, its disagreements and how many of them are near ties of full attention, the agreement
    where full attention decided, perplexity), and one per method and position bin (``FIDELITY_BINS``
    equal bins)."""
    overall, bins = [], []
    for m, r in res.items():
        n = r["kl"].shape[0]
        decided = r["near_tie"] == 0
        missed = r["agree"] == 0
        overall.append({"method": m, "tokens": n, "kl_mean": float(r["kl"].mean()), "kl_max": float(r["kl"].max()),
                        "kl_p99": float(r["kl"].quantile(0.99)), "top1_agreement": float(r["agree"].mean()),
                        "disagreements": int(missed.sum()), "near_tie_disagreements": int((missed & ~decided).sum()),
                        "top1_agreement_decided": float(r["agree"][decided].mean()) if decided.any() else 1.0,
                        "ppl": math.exp(float(r["nll"].mean()))})
        edges = torch.linspace(0, n, FIDELITY_BINS + 1).round().long().tolist()
        for a, b in zip(edges[:-1], edges[1:]):
            if b > a:
                bins.append({"method": m, "position_start": prefix + a, "position_end": prefix + b,
                             "kl_mean": float(r["kl"][a:b].mean()), "top1_agreement": float(r["agree"][a:b].mean()),
                             "ppl": math.exp(float(r["nll"][a:b].mean()))})
    return overall, bins


def plot_fidelity(bins: list[dict[str, Any]], model: str, path: Path) -> Path:
    """PNG of KL, top-1 agreement and perplexity by position bin, one curve per method."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    styles = ("o-", "s--", "^-.", "D:", "v-", "P--", "X-.", "*:")  # methods that agree stay visible on top of each other
    methods = list(dict.fromkeys(b["method"] for b in bins))
    for i, m in enumerate(methods):
        rows = [b for b in bins if b["method"] == m]
        x = [(b["position_start"] + b["position_end"]) / 2 for b in rows]
        color = plt.get_cmap("tab10")(i % 10)
        for ax, key in zip(axes, ("kl_mean", "top1_agreement", "ppl")):
            if m != FULL or key != "kl_mean":  # full's KL against itself is 0: no point on a log axis
                ax.plot(x, [max(b[key], 1e-7) if key == "kl_mean" else b[key] for b in rows], styles[i % len(styles)],
                        color=color, label=m, ms=4 + 2 * (len(methods) - i) / len(methods), alpha=0.85,
                        mfc="none" if i % 2 else color)
    axes[0].set_yscale("log")
    if FULL in methods:
        axes[0].set_title("full: KL 0 (it is the reference), not drawn on the log axis", fontsize=8, color="grey")
    for ax, label in zip(axes, ("KL(full || method), nats (mean per bin)", "top-1 agreement with full",
                                "perplexity")):
        ax.set_xlabel("token position")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"teacher-forced fidelity, {model}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
