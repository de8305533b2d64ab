"""Recall versus cost of every index backend on real attention queries and keys (issue 3).

What it measures: for each context length, each sampled layer and KV head, and each backend and
search parameter (``ef`` of the graphs, ``nprobe`` of ivf), how many of the exact top-k keys of
decode-like queries the index returns (recall@k), how much softmax mass the static keys plus the
retrieved ones hold (against the exact top-k), the fraction of keys it scored, and the microseconds
per query with all heads of a layer searched in one call, as in decode. Why: the index must reach
high recall while scoring a few percent of the keys, on queries that are out-of-distribution for
the keys; this shows where each backend gets there (its operating point) and at what latency.

The queries and keys are the model's own (post-RoPE), captured once on a long built-in text and cached
under ``--cache-dir``. Prints a table and one final JSON line (the operating points); writes
rows.csv, summary.csv, sweep.json, recall_vs_scanned.png and recall_vs_latency.png into ``--out``.

    python bench/recall_sweep.py --lengths 2048 8192 32768
    python bench/recall_sweep.py --lengths 8192 --layers 16 --backend roar:ef=100,200 --backend flat
"""

from __future__ import annotations

import sys

from retrieval_attn.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
