"""Does an index keep its recall while decoding adds keys to it? (issue 3: add() over >= 2,000 steps)

What it measures: one layer of the embedded model (its real post-RoPE queries and keys, from the
sweep's capture cache), decoded step by step as the engine does: the index is built at the end of
prefill, each step's queries (all heads) search it, then the key leaving the window is added. For
each backend it reports recall@100 over the first and the last 100 steps, the recall of an index
rebuilt from scratch at the end (what add() should match), and the milliseconds of search and add
per step. Why: decode-time insertion must not let recall decay over long generations.

    python bench/add_recall.py --layer 16 --prefill 8192 --steps 2000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from retrieval_attn.evaluation import (
    format_columns,
    insertion_drift,
    load_or_capture,
    model_and_tokens,
    parse_backend_spec,
    write_json,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file or transformers folder (default: embedded SmolLM2)")
    parser.add_argument("--layer", type=int, default=16)
    parser.add_argument("--prefill", type=int, default=8192, help="tokens before decoding starts")
    parser.add_argument("--steps", type=int, default=2000, help="decode steps (>= 2,000 for the issue)")
    parser.add_argument("--backend", action="append", default=None, metavar="NAME[:PARAM=V]",
                        help="backend with single parameter values, repeatable (default: roar, keygraph, hnsw, ivf)")
    parser.add_argument("--cache-dir", default="results/qk_cache")
    parser.add_argument("--out", default="results/add_recall")
    args = parser.parse_args(argv)
    specs = [parse_backend_spec(s) for s in (args.backend or ["roar", "keygraph", "hnsw:ef=400", "ivf:nprobe=64"])]
    need = args.prefill + args.steps
    path, key, model, _, ids = model_and_tokens(args.model, args.cache_dir, need)
    captured, _ = load_or_capture(model, ids, [args.layer], args.cache_dir, key)
    q, k = captured.q[args.layer], captured.k[args.layer]
    rows, results = [], {}
    for spec in specs:
        params = {name: values[0] for name, values in spec.params.items()}
        r = insertion_drift(q, k, spec.name, params, args.prefill, args.steps)
        first, last = r["recall"][:100].mean(), r["recall"][-100:].mean()
        results[str(spec)] = {
            "recall_first_100": first, "recall_last_100": last, "rebuilt_recall_last": r["rebuilt_recall_last"],
            "search_ms_median": 1e3 * float(np.median(r["search_s"])), "add_ms_median": 1e3 * float(np.median(r["add_s"])),
            "recall_per_step": r["recall"].tolist(),
        }
        rows.append([str(spec), f"{first:.3f}", f"{last:.3f}", f"{r['rebuilt_recall_last']:.3f}",
                     f"{last - first:+.3f}", f"{1e3 * np.median(r['search_s']):.2f}", f"{1e3 * np.median(r['add_s']):.3f}"])
    print(f"layer {args.layer}, prefill {args.prefill} tokens, {args.steps} decode steps, recall@100 (mean over heads)")
    print(format_columns(["backend", "R first 100", "R last 100", "R rebuilt", "drift", "search ms", "add ms"], rows))
    write_json(Path(args.out) / "add_recall.json",
               {"layer": args.layer, "prefill": args.prefill, "steps": args.steps, "results": results}, indent=None)
    print(json.dumps({k: {m: v for m, v in r.items() if m != "recall_per_step"} for k, r in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
