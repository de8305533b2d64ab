"""Host memory as a user sees it (RSS, nothing trimmed), against the model-dtype K+V floor and the planner.

What it measures: for each backend, dtype, context length N and reserve choice, a fresh child process
builds random q, k, v of one attention layer shaped like Llama-3-8B's (8 KV heads, head dim 128;
``--query-heads`` 32 as in the model, or fewer to keep the CPU prefill affordable: the host bytes
depend on the KV heads and head dim). It runs a warm-up layer first (kernels compiled, pools grown
once per process), records its resident memory (RSS), then runs ``--layers`` more layers as a decoder
does: the N tokens prefilled in 4,096-token chunks, layer by layer within each chunk; every layer's
index build started after the last chunk; decode steps in every layer until every index is built.
The RSS growth is reported as the process holds it (what a user sees: nothing trimmed) and after
``gc.collect()`` + ``malloc_trim(0)``, beside

- the floor: the offloaded tokens' K and V in the model's dtype, for all 8 KV heads;
- the planner's figure for the same tokens (``plan_memory(...).steady_host``: what it says a
  decoding process holds, transient build and prefill memory left out), planned for what the run
  held: the prompt, then the decode steps until the last build landed, whose keys the indexes added.

The growth includes the layers' device windows: the device is the CPU here.

Why: a 128K context of Llama-3-8B is 16 GiB of bf16 K+V; the host should hold little more (target
<= 1.25x with roar and flat), and the planner must say what a run will hold before it runs.

Prints a table and a final JSON line; writes memory.json and memory.csv into ``--out``.

    python bench/memory.py                                       # flat and roar, bf16, 16K, 4 layers
    python bench/memory.py --layers 1 --reserve yes --backends roar --contexts 16384 32768
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import time

import torch

from retrieval_attn import RetrievalAttention, RetrievalConfig
from retrieval_attn.evaluation.report import format_columns, write_csv, write_json
from retrieval_attn.planner import ModelShape, plan_memory, resident_bytes

KV_HEADS, HEAD_DIM = 8, 128  # one Llama-3-8B attention layer (32 query heads in the model)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHUNK = 4096  # prefill tokens per call


def _trimmed() -> int:
    """RSS after freeing what can be freed (Python garbage, glibc's free lists): what a user does not see."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return resident_bytes()


def _decode_layers(engines: list[RetrievalAttention], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Prefill every layer with all but the last token of q, k, v (1, H, n, D) in chunks of ``CHUNK``, layer by
    layer within each chunk as a decoder does, start every layer's index build after the last chunk
    (``RetrievalCache.last_prefill_chunk`` on a CPU), then decode the last token in every layer until every
    index is built."""
    n = q.shape[2] - 1
    for i in range(0, n, CHUNK):
        j = min(n, i + CHUNK)
        for engine in engines:
            engine.prefill(q[:, :, i:j], k[:, :, i:j], v[:, :, i:j])
    for engine in engines:
        engine.start_index_build()
    while True:
        for engine in engines:
            engine.decode(q[:, :, n:], k[:, :, n:], v[:, :, n:])
        if not any(e.stats.index.endswith("(index building)") for e in engines):
            return
        time.sleep(0.05)  # a decoder's other work between steps (the model's layers)


def measure(backend: str, dtype: str, context: int, heads: int, layers: int, reserve: bool) -> dict:
    """One measurement, in this process (the child): RSS growth over ``layers`` layers after a warm-up layer."""
    dt = DTYPES[dtype]
    config = RetrievalConfig(index=backend, prefill_block=256,
                             **({"index_params": {"nlist": 64}} if backend == "ivf" else {}))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, context, HEAD_DIM, generator=g).to(dt) for h in (heads, KV_HEADS, KV_HEADS))

    def engine() -> RetrievalAttention:
        e = RetrievalAttention(config, heads, KV_HEADS, HEAD_DIM)
        if reserve:  # what RetrievalCache(max_context=...) and the decode driver do
            e.reserve(context)
        return e

    first = [engine()]  # the model's first layer (kernels compiled, pools grown once per process): stays alive
    _decode_layers(first, q, k, v)
    gc.collect()
    before = resident_bytes()
    engines = [engine() for _ in range(layers)]
    _decode_layers(engines, q, k, v)
    gc.collect()
    grown = resident_bytes() - before  # what the user sees: nothing trimmed
    grown_trimmed = _trimmed() - before
    offloaded = sum(e.stats.offloaded_tokens for e in engines)
    floor = offloaded * KV_HEADS * 2 * HEAD_DIM * dt.itemsize
    shape = ModelShape(num_layers=layers, hidden_size=4096, num_heads=heads, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                       intermediate_size=14336, vocab_size=128256, weight_bytes=0)
    held = max(e.seen for e in engines)  # the prompt (context - 1 tokens) and the decode steps
    plan = plan_memory(shape, held, config, dtype=dt, device="cpu", prefill_chunk=CHUNK, check_available=False,
                       prompt_tokens=context - 1)
    return {
        "backend": backend, "dtype": dtype, "context": context, "query_heads": heads, "layers": layers,
        "reserved": reserve, "offloaded": offloaded, "held_tokens": held, "index": engines[0].stats.index,
        "rss_growth_bytes": grown, "rss_growth_trimmed_bytes": grown_trimmed, "floor_bytes": floor,
        "planned_bytes": plan.steady_host,
        "engine_bytes": sum(e.stats.cpu_bytes + e.stats.device_bytes for e in engines),
        "measured_over_floor": grown / floor, "trimmed_over_floor": grown_trimmed / floor,
        "planned_over_floor": plan.steady_host / floor, "planned_over_measured": plan.steady_host / grown,
        "bytes_per_token_measured": grown / offloaded, "bytes_per_token_floor": floor / offloaded,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["flat", "roar"])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bfloat16"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[16384])
    parser.add_argument("--layers", type=int, default=4, help="layers measured after the warm-up layer")
    parser.add_argument("--reserve", nargs="+", choices=["yes", "no"], default=["yes", "no"],
                        help="size each store for the context first (as RetrievalCache(max_context=...) and the "
                             "decode driver do), or let it grow")
    parser.add_argument("--query-heads", type=int, default=8,
                        help="query heads of the layer (32 in Llama-3-8B; 8 keeps the CPU prefill affordable)")
    parser.add_argument("--out", default="results/memory")
    parser.add_argument("--child", nargs=6, metavar=("BACKEND", "DTYPE", "CONTEXT", "HEADS", "LAYERS", "RESERVE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        b, d, c, h, n, r = args.child
        print(json.dumps(measure(b, d, int(c), int(h), int(n), r == "yes")))
        return 0
    bad = [c for c in args.contexts if c <= 640 + CHUNK]
    if bad:
        raise SystemExit(f"--contexts must exceed sink + window + one prefill chunk ({640 + CHUNK}), got {bad}")
    if args.query_heads < KV_HEADS or args.query_heads % KV_HEADS:
        raise SystemExit(f"--query-heads must be a multiple of the {KV_HEADS} KV heads, got {args.query_heads}")
    if args.layers < 1:
        raise SystemExit(f"--layers must be >= 1, got {args.layers}")
    rows = []
    for context in args.contexts:
        for dtype in args.dtypes:
            for backend in args.backends:
                for reserve in args.reserve:
                    print(f"measuring {backend} {dtype} {context} reserve={reserve} ...", file=sys.stderr, flush=True)
                    done = subprocess.run([sys.executable, __file__, "--child", backend, dtype, str(context),
                                           str(args.query_heads), str(args.layers), reserve],
                                          capture_output=True, text=True)
                    if done.returncode:
                        raise SystemExit(f"{backend} {dtype} {context} failed:\n{done.stderr[-2000:]}")
                    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(f"  measured/floor {rows[-1]['measured_over_floor']:.3f}, trimmed/floor "
                          f"{rows[-1]['trimmed_over_floor']:.3f}", file=sys.stderr, flush=True)
    print(f"{args.layers} Llama-3-8B-shaped layers ({args.query_heads} query heads, {KV_HEADS} KV heads, head dim "
          f"{HEAD_DIM}), sink 128 + window 512 on the device (the CPU), random q/k/v, prefilled in {CHUNK}-token "
          "chunks and decoded until every index is built; RSS growth after a warm-up layer, as the process "
          "holds it (measured) and after gc + malloc_trim (trimmed)")
    print(format_columns(
        ["context", "dtype", "backend", "reserved", "offloaded", "floor MiB", "measured MiB", "trimmed MiB",
         "planned MiB", "measured/floor", "trimmed/floor", "planned/measured"],
        [[r["context"], r["dtype"], r["backend"], "yes" if r["reserved"] else "no", r["offloaded"],
          f"{r['floor_bytes'] / 2**20:.1f}", f"{r['rss_growth_bytes'] / 2**20:.1f}",
          f"{r['rss_growth_trimmed_bytes'] / 2**20:.1f}", f"{r['planned_bytes'] / 2**20:.1f}",
          f"{r['measured_over_floor']:.3f}", f"{r['trimmed_over_floor']:.3f}", f"{r['planned_over_measured']:.3f}"]
         for r in rows],
    ))
    write_json(f"{args.out}/memory.json", {"rows": rows})
    write_csv(f"{args.out}/memory.csv", rows)
    print(f"results: {args.out}/ (memory.json, memory.csv)")
    print(json.dumps([{k: r[k] for k in ("backend", "dtype", "context", "layers", "reserved", "measured_over_floor",
                                         "trimmed_over_floor", "planned_over_measured")} for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
