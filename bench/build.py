"""Index build speed per layer: roar's top lists and graph separately, beside IVF's and HNSW's builds (issue 13).

What it measures: for each number of keys per head n, one layer's index over ``--groups`` KV heads of
head dim ``--dim`` is built from scratch, as the engine builds it after prefill: keys from the
embedded model's captured post-RoPE keys of one layer (``--keys real``: the sweep's capture cache,
tiled with a small perturbation beyond its length) or Gaussian (``--keys random``), and roar's
training queries the prefill queries of the same positions (one per position, heads taken in
turn, as the engine samples them). For roar the time of the exact top lists (``dense.exact_top_keys``,
a matmul + topk on the build's device) is split from the rest (the graph: co-occurrence candidates,
pruning, reverse and connectivity edges, reachability). Throughput is keys (n x groups) per second
per core (``--threads``). Why: the engine builds each layer's index while later layers prefill; at
128K tokens Llama-3-8B offloads 33.5M keys, so the build must keep pace with the prefill.

Prints a table and a final JSON line; writes build.json and build.csv into ``--out``.

    python bench/build.py --sizes 8192 32768 131072
    python bench/build.py --sizes 32768 --backends roar --keys random
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from retrieval_attn.evaluation.report import format_columns, write_csv, write_json
from retrieval_attn.index import cpu_threads, make_index
from retrieval_attn.index import roar as roar_module


def _keys_and_queries(kind: str, n: int, groups: int, dim: int, cache_dir: str, layer: int, seed: int = 0):
    """Keys [G, n, D] and training queries [G, m, D] (fp32): captured ones tiled, or Gaussian."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return (rng.standard_normal((groups, n, dim), dtype=np.float32),
                rng.standard_normal((groups, n, dim), dtype=np.float32))
    from retrieval_attn.evaluation.capture import load_or_capture, model_and_tokens

    need = min(n, 32768)
    _, key, model, _, ids = model_and_tokens(None, cache_dir, need)
    captured, _ = load_or_capture(model, ids, [layer], cache_dir, key, progress=False)
    q, k = captured.q[layer], captured.k[layer]  # (Hq, need, D), (Hkv, need, D)
    rep = q.shape[0] // k.shape[0]
    heads = np.arange(need) % rep  # one query per position, the group's heads in turn
    qg = q.reshape(k.shape[0], rep, need, -1)[:, heads, np.arange(need)]  # [Hkv, need, D]
    reps = -(-n // need)
    tile = [k + 0.01 * i * rng.standard_normal(k.shape, dtype=np.float32) for i in range(reps)]
    keys = np.concatenate(tile, axis=1)[:, :n]
    queries = np.concatenate([qg] * reps, axis=1)[:, :n]
    g = -(-groups // k.shape[0])
    keys, queries = np.concatenate([keys] * g)[:groups], np.concatenate([queries] * g)[:groups]
    if keys.shape[2] != dim:
        raise SystemExit(f"--keys real has head dim {keys.shape[2]}; pass --dim {keys.shape[2]}")
    return np.ascontiguousarray(keys), np.ascontiguousarray(queries)


def _timed_build(name: str, keys: np.ndarray, queries: np.ndarray, params: dict) -> dict:
    """Build once; for roar also the seconds spent in its exact top lists."""
    spent = {"top": 0.0}
    exact = roar_module.exact_top_keys

    def timed_top(*args, **kwargs):
        start = time.perf_counter()
        out = exact(*args, **kwargs)
        spent["top"] += time.perf_counter() - start
        return out

    roar_module.exact_top_keys = timed_top
    try:
        index = make_index(name, **params)
        start = time.perf_counter()
        index.build(keys, queries if index.uses_train_queries else None)
        total = time.perf_counter() - start
    finally:
        roar_module.exact_top_keys = exact
    return {"total_s": total, "top_lists_s": spent["top"], "graph_s": total - spent["top"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768, 131072], help="keys per head")
    parser.add_argument("--backends", nargs="+", default=["roar", "ivf", "hnsw"])
    parser.add_argument("--keys", choices=["real", "random"], default="real")
    parser.add_argument("--groups", type=int, default=3, help="KV heads of the layer (3: the embedded model's)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layer", type=int, default=16, help="captured layer (--keys real)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cache-dir", default="results/qk_cache")
    parser.add_argument("--out", default="results/build")
    args = parser.parse_args(argv)
    rows = []
    with cpu_threads(args.threads):
        warm_k, warm_q = _keys_and_queries("random", 2048, 1, args.dim, args.cache_dir, args.layer)
        for name in args.backends:  # compile the kernels first
            _timed_build(name, warm_k, warm_q, {"nlist": 32} if name == "ivf" else {})
        for n in args.sizes:
            keys, queries = _keys_and_queries(args.keys, n, args.groups, args.dim, args.cache_dir, args.layer)
            for name in args.backends:
                print(f"building {name} over {n} keys x {args.groups} heads ...", file=sys.stderr, flush=True)
                params = {"nlist": int(4 * n**0.5)} if name == "ivf" else {}
                r = _timed_build(name, keys, queries, params)
                keys_total = n * args.groups
                rows.append({
                    "backend": name, "keys_per_head": n, "heads": args.groups, "threads": args.threads, **r,
                    "keys_per_s_per_core": keys_total / r["total_s"] / args.threads,
                    "graph_keys_per_s_per_core": keys_total / r["graph_s"] / args.threads if name == "roar" else None,
                })
    print(f"{args.keys} keys, {args.groups} heads of dim {args.dim}, {args.threads} threads")
    print(format_columns(
        ["keys/head", "backend", "build s", "top lists s", "graph s", "keys/s/core", "graph keys/s/core"],
        [[r["keys_per_head"], r["backend"], f"{r['total_s']:.2f}", f"{r['top_lists_s']:.2f}" if r["backend"] == "roar"
          else "-", f"{r['graph_s']:.2f}" if r["backend"] == "roar" else "-", f"{r['keys_per_s_per_core']:.0f}",
          f"{r['graph_keys_per_s_per_core']:.0f}" if r["graph_keys_per_s_per_core"] else "-"] for r in rows],
    ))
    write_json(f"{args.out}/build.json", {"settings": vars(args), "rows": rows})
    write_csv(f"{args.out}/build.csv", rows)
    print(f"results: {args.out}/ (build.json, build.csv)")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
