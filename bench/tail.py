"""What the tail estimate costs in a decode step, side by side from one prefill (issue 22).

What it measures: one attention layer (``RetrievalAttention``, the embedded SmolLM2's shape by default:
9 query heads, 3 KV heads, head dim 64), prefilled once with ``--context`` random tokens (fp32 or
bf16 rows), then forked once per method: top-k without an estimate, top-k with ``tail_method="mean"``
and with ``"sample"``, and ``--wide-k`` without one (the other way to buy fidelity). The methods take
turns, ``--steps`` decode steps each per round for ``--rounds`` rounds, after ``--warmup`` untimed
steps, so a change in the machine's load hits them alike. Reported per method: the layer's decode step
(median over rounds of each round's median), the estimate's own seconds (``TailEstimate.seconds``)
and its share of the step, and the step against top-k alone. Why: the estimate must cost at most 15% of
a decode step at 8K on a CPU (the model's other work per step comes on top, so the share of the whole
model's step is smaller still; eval's seconds per decode step give that one).

Prints a table and a final JSON line; writes tail.json into ``--out``.

    python bench/tail.py                         # 8K context, top_k 100 against 400, 2 threads
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch

from retrieval_attn import RetrievalAttention, RetrievalConfig
from retrieval_attn.evaluation.report import format_columns, write_json


def measure(args: argparse.Namespace) -> list[dict]:
    """Prefill one layer once, fork it per method, time the methods' decode steps round by round."""
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    dtype = getattr(torch, args.dtype)
    total = args.context + args.warmup + args.rounds * args.steps + 1
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, hq, total, d, generator=gen).to(dtype)  # (batch, heads, tokens, head_dim)
    k = torch.randn(1, hkv, total, d, generator=gen).to(dtype)
    v = torch.randn(1, hkv, total, d, generator=gen).to(dtype)
    base = RetrievalConfig(index="flat", top_k=args.top_k, cpu_threads=args.cpu_threads)
    source = RetrievalAttention(base, hq, hkv, d)
    source.reserve(total)
    c = args.context
    source.prefill(q[:, :, :c], k[:, :, :c], v[:, :, :c])
    configs = {f"top_k {args.top_k}": base,
               f"top_k {args.top_k} + mean": dataclasses.replace(base, estimate_tail=True),
               f"top_k {args.top_k} + sample": dataclasses.replace(base, estimate_tail=True, tail_method="sample"),
               f"top_k {args.wide_k}": dataclasses.replace(base, top_k=args.wide_k)}
    engines = {m: source.fork(cfg) for m, cfg in configs.items()}
    pos = {m: c for m in engines}
    step_s = {m: [] for m in engines}
    tail_s = {m: [] for m in engines}

    def run(m: str, n: int, keep: bool) -> None:
        e, times, tails = engines[m], [], []
        for _ in range(n):
            t = pos[m]
            start = time.perf_counter()
            e.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
            times.append(time.perf_counter() - start)
            tails.append(e.tail.seconds if e.tail is not None else 0.0)
            pos[m] += 1
        if keep:
            step_s[m].append(statistics.median(times))
            tail_s[m].append(statistics.median(tails))

    for m in engines:
        run(m, args.warmup, keep=False)
    for _ in range(args.rounds):
        for m in engines:
            run(m, args.steps, keep=True)
    first = next(iter(engines))
    ref = statistics.median(step_s[first])
    rows = []
    for m in engines:
        step, tail = statistics.median(step_s[m]), statistics.median(tail_s[m])
        rows.append({"method": m, "context": c, "offloaded": engines[m].store.n, "step_ms": 1e3 * step,
                     "tail_ms": 1e3 * tail, "tail_share": tail / step, "vs_top_k": step / ref,
                     "cpu_bytes": engines[m].stats.cpu_bytes})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=8192, help="tokens prefilled")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--wide-k", type=int, default=400)
    p.add_argument("--cpu-threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="results/tail")
    args = p.parse_args(argv)
    rows = measure(args)
    print(format_columns(["method", "context", "offloaded", "step ms", "tail ms", "tail share", "vs top-k", "cpu MiB"],
                         [[r["method"], r["context"], r["offloaded"], f"{r['step_ms']:.3f}", f"{r['tail_ms']:.3f}",
                           f"{100 * r['tail_share']:.1f}%", f"{r['vs_top_k']:.3f}x", f"{r['cpu_bytes'] / 2**20:.2f}"]
                          for r in rows]))
    write_json(f"{args.out}/tail.json", {"settings": vars(args), "rows": rows})
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
