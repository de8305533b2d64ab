"""Does a long generation stay healthy? 10,000 decode steps with a spill at every step (issue 6).

What it measures: a small randomly initialised Llama (``--shape``, one of ``retrieval_attn.hf.MODEL_SHAPES``)
prefilled with ``--prompt`` random tokens, or a real model (``--model embedded`` or a path) prefilled
with the first ``--prompt`` tokens of the built-in text, then decoded greedily for ``--steps`` steps through a
``RetrievalCache`` with telemetry on and a window small enough that every step spills its oldest
window token into the CPU store and the index. It reports, per window of ``--report-every`` steps:
the index's recall@k against the exact top-k (telemetry, mean over layers and heads) and the
attention mass held, the median and maximum step time, resident memory and what the CPU store and
index hold. Why: a runtime left running for thousands of tokens must not drift (recall), leak
(memory must grow only by the stored KV and the index), or stall (no step much slower than the
median). The verdicts are printed against the issue's bounds: recall decay <= 0.02 from the first
window to the last, RSS growth close to the stores' growth, max step <= 2x the median after warm-up.
With a real model the rows also answer how roar's recall changes with a decode query's distance in
positions from the prefill queries the index was trained on (each row is a band of such distances).

Prints a table and a final JSON line; writes long_generation.json and long_generation.csv into ``--out``.

    python bench/long_generation.py --steps 10000
    python bench/long_generation.py --steps 2000 --index flat
    python bench/long_generation.py --model embedded --prompt 2048 --steps 6000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from retrieval_attn import RetrievalConfig
from retrieval_attn.evaluation import format_columns, write_csv, write_json
from retrieval_attn.evaluation.texts import builtin_token_ids
from retrieval_attn.hf import MODEL_SHAPES, Decoder, RetrievalCache, load_model, random_model
from retrieval_attn.planner import resident_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(MODEL_SHAPES), default="small", help="random model shape")
    parser.add_argument("--model", default=None,
                        help="'embedded' (SmolLM2) or a GGUF file / model folder instead of a random model")
    parser.add_argument("--prompt", type=int, default=2048,
                        help="prompt tokens prefilled first (random ones; the built-in text's with --model)")
    parser.add_argument("--steps", type=int, default=10000, help="decode steps")
    parser.add_argument("--warmup", type=int, default=50, help="steps excluded from the timing verdict")
    parser.add_argument("--report-every", type=int, default=1000, help="steps per row of the table")
    parser.add_argument("--index", default="roar")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--sink", type=int, default=16)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--rebuild-growth", type=float, default=None,
                        help="RetrievalConfig.rebuild_growth (default: None, no background rebuilds)")
    parser.add_argument("--no-telemetry", action="store_true",
                        help="skip the exact recall measurement (its per-step scan of every offloaded key): "
                             "memory and step times without the instrument")
    parser.add_argument("--out", default="results/long_generation")
    args = parser.parse_args(argv)
    for name in ("prompt", "steps", "report_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.prompt <= args.sink + args.window:
        raise SystemExit(f"--prompt must exceed sink + window ({args.sink + args.window}) so that steps spill")

    if args.model is None:
        model = random_model(args.shape)
        ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        described = f"{args.shape} random Llama"
    else:
        model, tokenizer = load_model(None if args.model == "embedded" else args.model)
        ids = builtin_token_ids(tokenizer, args.prompt)
        described = f"model {args.model}"
    config = RetrievalConfig(sink_tokens=args.sink, window_tokens=args.window, top_k=args.top_k, index=args.index,
                             telemetry=not args.no_telemetry, rebuild_growth=args.rebuild_growth,
                             serve_while_building=False)  # every step's recall is the index's
    cache = RetrievalCache(model, config, max_context=args.prompt + args.steps + 1)
    rows, samples = [], []
    times: list[float] = []

    def sample(step: int, seconds: float) -> None:
        times.append(seconds)
        if (step + 1) % args.report_every == 0 or step + 1 == args.steps:
            stats = cache.stats
            kept = sum(layer.engine.telemetry.nbytes for layer in cache.layers) if config.telemetry else 0
            samples.append({"step": step + 1, "rss": resident_bytes(), "stored": sum(s.cpu_bytes for s in stats) + kept,
                            "offloaded": stats[0].offloaded_tokens})

    decoder = Decoder(model, cache, prefill_chunk=args.prompt)  # the prompt in one forward pass
    decoder.decode(decoder.prefill(ids), args.steps, on_step=sample)
    # telemetry: recall and mass of every layer, [steps, heads] each (NaN without telemetry)
    if config.telemetry:
        per_layer = [layer.engine.telemetry.tensors() for layer in cache.layers]
        recall = torch.stack([r.mean(dim=1) for r, _ in per_layer]).mean(dim=0)  # [steps]
        mass = torch.stack([m.mean(dim=1) for _, m in per_layer]).mean(dim=0)
    else:
        recall = mass = torch.full((args.steps,), float("nan"))
    start = 0
    for sample in samples:
        end = sample["step"]
        window_times = times[max(start, args.warmup):end] or times[start:end]
        rows.append({
            "steps": f"{start + 1}-{end}", "recall": float(recall[start:end].mean()), "mass": float(mass[start:end].mean()),
            "median_ms": 1e3 * statistics.median(window_times), "max_ms": 1e3 * max(window_times),
            "rss_mib": sample["rss"] / 2**20, "store_index_mib": sample["stored"] / 2**20,
            "offloaded": sample["offloaded"],
        })
        start = end
    after = times[args.warmup:]
    median, worst = statistics.median(after), max(after)
    verdict = {
        "recall_first_window": rows[0]["recall"], "recall_last_window": rows[-1]["recall"],
        "recall_decay": rows[0]["recall"] - rows[-1]["recall"],
        "rss_growth_mib": rows[-1]["rss_mib"] - rows[0]["rss_mib"],
        "store_index_growth_mib": rows[-1]["store_index_mib"] - rows[0]["store_index_mib"],
        "median_step_ms": 1e3 * median, "max_step_ms": 1e3 * worst, "max_over_median": worst / median,
        "steps_over_2x_median": sum(t > 2 * median for t in after),
    }
    print(f"{described}, prompt {args.prompt}, {args.steps} steps, index {args.index}, "
          f"top_k {args.top_k}, sink {args.sink}, window {args.window} (a spill every step), "
          f"rebuild_growth {args.rebuild_growth}, {sum(s.index_rebuilds for s in cache.stats)} rebuilds")
    print(format_columns(
        ["steps", "recall@k", "mass", "median ms", "max ms", "RSS MiB", "stored MiB", "offloaded"],
        [[r["steps"], f"{r['recall']:.4f}", f"{r['mass']:.4f}", f"{r['median_ms']:.2f}", f"{r['max_ms']:.2f}",
          f"{r['rss_mib']:.0f}", f"{r['store_index_mib']:.1f}", r["offloaded"]] for r in rows],
    ))
    print(f"recall decay first -> last window: {verdict['recall_decay']:+.4f} (bound 0.02); "
          f"RSS growth {verdict['rss_growth_mib']:.1f} MiB vs stored growth (store, index, telemetry) "
          f"{verdict['store_index_growth_mib']:.1f} MiB; "
          f"max step {verdict['max_over_median']:.2f}x the median after {args.warmup} warm-up steps "
          f"({verdict['steps_over_2x_median']} steps over 2x)")
    out = Path(args.out)
    write_csv(out / "long_generation.csv", rows)
    write_json(out / "long_generation.json", {
        "settings": vars(args), "windows": rows, "verdict": verdict,
        "recall_per_step": recall.tolist(), "step_ms": [1e3 * t for t in times],
    }, indent=None)
    print(json.dumps(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
