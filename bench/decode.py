"""Decode speed and memory of retrieval-attn against transformers, side by side in one run (issue 4).

What it measures: a randomly initialised Llama (default: the Llama-3-8B shape in bf16 on a GPU; a
small shape in fp32 on a CPU-only machine, so CI exercises the same code) prefilled to each context
length, then decoded greedily. For transformers with the full KV cache on the device, transformers'
offloaded cache (``DynamicCache(offloading=True)``, CUDA only), and retrieval-attn with the ``flat``
and ``roar`` indexes: time to first token, seconds per token (median of ``--steps`` after
``--warmup``), peak device memory, resident CPU memory, and for retrieval-attn the breakdown of a step
(``engine.STEP_PARTS``: the host's wait for q, the copies each way, CPU search, CPU attention,
device attention, the idle time of each side; summed over layers, and per layer with the side that
bounds it), and the rest of the model. Why: the product's
promise is interactive decoding at 128K on a 24 GiB card; ``--gpu-memory-gib 24`` enforces that cap
on retrieval-attn (baselines run uncapped, "where it fits").

Prints a table, the ratios to each baseline, the per-layer means, and a final JSON line; writes
decode.json, decode.csv and layers.csv into ``--out``.

    python bench/decode.py                                   # GPU: 32K 64K 128K, Llama-3-8B shape
    python bench/decode.py --gpu-memory-gib 24 --contexts 131072 524288 --methods roar
    python bench/decode.py --device cpu                      # CPU: small shape, 4K 8K 16K
"""

from __future__ import annotations

import sys

from retrieval_attn.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
