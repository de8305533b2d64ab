"""Fidelity against full attention, and where retrieval misses: needle retrieval and teacher-forced decoding (issue 5).

What it measures, in one run on one model (the embedded SmolLM2 by default): for full attention
(the reference, a plain DynamicCache), retrieval-attn with each index backend, and the sink + window
baseline (no retrieval), (1) needle accuracy over a grid of context lengths x needle depths, for a
pass key in noise, a number in natural text and a multi-key variant with distractors; (2) the
per-token KL divergence and top-1 agreement of next-token distributions against full attention, and
perplexity, over a long public-domain text decoded one token per step. The question of a needle and
every fidelity token go through the cache as decode steps, where retrieval acts. Why: the
approximation must cost nothing measurable; sink + window shows that the tasks need what lies
outside the window. ``--telemetry`` adds recall@k and attention mass per layer (how to tune top_k, ef).

Prints tables; writes eval.json, CSV files and PNGs (needle heatmaps per method, fidelity versus
position, telemetry per layer) into ``--out``.

    python bench/fidelity.py --lengths 1024 2048 4096 8192 --fidelity-tokens 4000 --cpu-threads 1
    python bench/fidelity.py --methods full roar sink+window --tasks passkey --lengths 4096 --telemetry
"""

from __future__ import annotations

import sys

from retrieval_attn.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
