"""Host bytes per offloaded token, measured, against the model-dtype K+V floor and the planner (issue 11).

What it measures: for each backend, dtype and context length N, a fresh child process builds random
q, k, v of one attention layer shaped like Llama-3-8B's (8 KV heads, head dim 128; ``--query-heads``
32 as in the model, or fewer to make the CPU prefill of long contexts affordable: the host bytes per
token depend on the KV heads and head dim) in that dtype. It runs one such layer first, as the
first layer of a model would (kernels compiled, allocator pools grown once per process: ~7 MiB
that a second layer does not add), records its resident memory (RSS), then prefills the N tokens
into a second ``RetrievalAttention`` (sink 128, window 512, reserved for N + 1 tokens, the engine's
defaults otherwise) and decodes one step, which builds the index, and records RSS again. The growth
is what one more layer holds on the host (the CPU store, the index, the device window: the device is
the CPU here, the engine's buffers). It is reported per offloaded token beside

- the floor: that token's K and V in the model's dtype, for all 8 KV heads;
- the planner's figure for the same one-layer request (``plan_memory(...).steady_host``: what it
  says a decoding process holds, transient build and prefill memory left out).

Why: a 128K context of Llama-3-8B is 16 GiB of bf16 K+V; the host should hold little more (target
<= 1.25x with roar and flat), and the planner must say what a run will hold before it runs.

Prints a table and a final JSON line; writes memory.json and memory.csv into ``--out``.

    python bench/memory.py                                       # bf16 and fp32, every backend, 8K and 16K
    python bench/memory.py --backends roar flat --dtypes bfloat16 --contexts 8192 16384 32768
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys

import torch

from retrieval_attn import RetrievalAttention, RetrievalConfig
from retrieval_attn.evaluation.report import format_columns, write_csv, write_json
from retrieval_attn.planner import ModelShape, plan_memory, resident_bytes

KV_HEADS, HEAD_DIM = 8, 128  # one Llama-3-8B attention layer (32 query heads in the model)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHUNK = 4096  # prefill tokens per call


def _settle() -> int:
    """RSS after freeing what can be freed (Python garbage, glibc's free lists)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return resident_bytes()


def _run(engine: RetrievalAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Prefill all but the last token of q, k, v (1, H, n, D) in chunks, then decode the last one."""
    n = q.shape[2] - 1
    for i in range(0, n, CHUNK):
        j = min(n, i + CHUNK)
        engine.prefill(q[:, :, i:j], k[:, :, i:j], v[:, :, i:j])
    engine.decode(q[:, :, n:], k[:, :, n:], v[:, :, n:])


def measure(backend: str, dtype: str, context: int, heads: int) -> dict:
    """One measurement, in this process (the child)."""
    dt = DTYPES[dtype]
    config = RetrievalConfig(index=backend, prefill_block=256,
                             **({"index_params": {"nlist": 64}} if backend == "ivf" else {}))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, context, HEAD_DIM, generator=g).to(dt) for h in (heads, KV_HEADS, KV_HEADS))
    first = RetrievalAttention(config, heads, KV_HEADS, HEAD_DIM)  # the model's first layer: stays alive
    first.reserve(context)
    _run(first, q, k, v)
    before = _settle()
    engine = RetrievalAttention(config, heads, KV_HEADS, HEAD_DIM)
    engine.reserve(context)
    _run(engine, q, k, v)
    grown = _settle() - before
    stats = engine.stats
    offloaded = stats.offloaded_tokens
    floor = offloaded * KV_HEADS * 2 * HEAD_DIM * dt.itemsize
    shape = ModelShape(num_layers=1, hidden_size=4096, num_heads=heads, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                       intermediate_size=14336, vocab_size=128256, weight_bytes=0)
    plan = plan_memory(shape, context, config, dtype=dt, device="cpu", prefill_chunk=CHUNK, check_available=False)
    return {
        "backend": backend, "dtype": dtype, "context": context, "query_heads": heads, "offloaded": offloaded,
        "index": stats.index, "rss_growth_bytes": grown, "floor_bytes": floor, "planned_bytes": plan.steady_host,
        "engine_bytes": stats.cpu_bytes + stats.device_bytes,
        "measured_over_floor": grown / floor, "planned_over_floor": plan.steady_host / floor,
        "planned_over_measured": plan.steady_host / grown,
        "bytes_per_token_measured": grown / offloaded, "bytes_per_token_floor": floor / offloaded,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["flat", "roar", "keygraph", "hnsw", "ivf"])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bfloat16", "float32"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--query-heads", type=int, default=8,
                        help="query heads of the layer (32 in Llama-3-8B; 8 keeps the CPU prefill affordable)")
    parser.add_argument("--out", default="results/memory")
    parser.add_argument("--child", nargs=4, metavar=("BACKEND", "DTYPE", "CONTEXT", "HEADS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))))
        return 0
    bad = [c for c in args.contexts if c <= 640 + CHUNK]
    if bad:
        raise SystemExit(f"--contexts must exceed sink + window + one prefill chunk ({640 + CHUNK}), got {bad}")
    if args.query_heads < KV_HEADS or args.query_heads % KV_HEADS:
        raise SystemExit(f"--query-heads must be a multiple of the {KV_HEADS} KV heads, got {args.query_heads}")
    rows = []
    for context in args.contexts:
        for dtype in args.dtypes:
            for backend in args.backends:
                print(f"measuring {backend} {dtype} {context} ...", file=sys.stderr, flush=True)
                done = subprocess.run([sys.executable, __file__, "--child", backend, dtype, str(context),
                                       str(args.query_heads)],
                                      capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{backend} {dtype} {context} failed:\n{done.stderr[-2000:]}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"one more Llama-3-8B-shaped layer ({args.query_heads} query heads, {KV_HEADS} KV heads, head dim "
          f"{HEAD_DIM}), sink 128 + window 512 on the device (the CPU), random q/k/v; RSS growth over its prefill "
          "and first decode step, after a first layer of the same size")
    print(format_columns(
        ["context", "dtype", "backend", "offloaded", "floor MiB", "measured MiB", "planned MiB", "measured/floor",
         "planned/floor", "planned/measured", "B/token measured", "B/token floor"],
        [[r["context"], r["dtype"], r["backend"], r["offloaded"], f"{r['floor_bytes'] / 2**20:.1f}",
          f"{r['rss_growth_bytes'] / 2**20:.1f}", f"{r['planned_bytes'] / 2**20:.1f}",
          f"{r['measured_over_floor']:.3f}", f"{r['planned_over_floor']:.3f}", f"{r['planned_over_measured']:.3f}",
          f"{r['bytes_per_token_measured']:.0f}", f"{r['bytes_per_token_floor']:.0f}"] for r in rows],
    ))
    write_json(f"{args.out}/memory.json", {"rows": rows})
    write_csv(f"{args.out}/memory.csv", rows)
    print(f"results: {args.out}/ (memory.json, memory.csv)")
    print(json.dumps([{k: r[k] for k in ("backend", "dtype", "context", "measured_over_floor",
                                         "planned_over_measured")} for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
