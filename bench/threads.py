"""Decode-step time under each thread setting, side by side from one prefill (issue 12).

What it measures: a random Llama (``--shape``, fp32 on the CPU by default) prefilled once to each
``--contexts`` length through a ``RetrievalCache`` and once through transformers' ``DynamicCache``
(full attention, the reference). Each ``--threads`` setting decodes from its own fork of the one
prefill with ``--index``: ``default`` is ``cpu_threads=None`` (each layer's search timed with 1
thread and with the thread budget, the faster kept: ``index.ThreadChooser``), a number is that
``cpu_threads``. The settings and full attention take turns, ``--steps`` steps each per round for
``--rounds`` rounds (after ``--warmup`` untimed steps each), so a change in the machine's load hits
them alike. Reported per context and
setting: seconds per step (median over rounds of each round's median), the ratio to the best
explicit thread count, the speed-up over full attention, and the step's parts summed over layers
(``engine.STEP_PARTS``, median over steps). Why: the default must stay within 1.15x of the best
explicit count on any machine, busy or quiet, with no one choosing (README.md, "The thread budget").

Prints a table and a final JSON line; writes threads.json into ``--out``.

    python bench/threads.py                                   # small shape, 8K and 32K, roar
    python bench/threads.py --contexts 4096 --threads default 1 2 4 --index flat
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from retrieval_attn import RetrievalConfig
from retrieval_attn.engine import STEP_PARTS
from retrieval_attn.evaluation.report import format_columns, write_json
from retrieval_attn.hf import MODEL_SHAPES, Decoder, RetrievalCache, dynamic_cache, random_model

FULL = "full"


def thread_setting(text: str) -> int | None:
    """``default`` -> None (the engine chooses), else a thread count >= 1."""
    if text == "default":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a thread setting is 'default' or an int >= 1, got {text!r}")
    return int(text)


def measure(model: torch.nn.Module, context: int, args: argparse.Namespace) -> list[dict]:
    """One prefill per cache kind at ``context`` tokens, then rounds of decode steps of every setting."""
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
    total = context + 2 + args.warmup + args.rounds * args.steps
    # the source prefill builds no index (retrieve=False) but keeps the training queries of --index
    source = RetrievalCache(model, RetrievalConfig(index=args.index, retrieve=False), max_context=total,
                            prefill_chunk=args.prefill_chunk)
    logits = Decoder(model, source, args.prefill_chunk).prefill(ids)
    runs = {}  # name -> (decoder, cache or None)
    for setting in args.threads:
        cache = source.fork(RetrievalConfig(index=args.index, cpu_threads=setting))
        runs["default" if setting is None else f"cpu_threads={setting}"] = (Decoder(model, cache, args.prefill_chunk), cache)
    full = Decoder(model, dynamic_cache(), args.prefill_chunk)
    full.prefill(ids)
    runs[FULL] = (full, None)
    token = int(logits[0, -1].argmax())
    for decoder, _ in runs.values():
        for _ in range(1 + args.warmup):  # not timed: the forks build their indexes at the first step
            decoder.step(token)
    medians = {name: [] for name in runs}
    parts = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (decoder, cache) in runs.items():
            seconds = []
            for _ in range(args.steps):  # the same token each step: a random model's choice means nothing
                start = time.perf_counter()
                decoder.step(token)
                decoder.synchronize()
                seconds.append(time.perf_counter() - start)
                if cache is not None:
                    parts[name].append({p: sum(st.step_seconds[p] for st in cache.stats) for p in STEP_PARTS})
            medians[name].append(statistics.median(seconds))
    rows = []
    for name in runs:
        row = {"context": context, "setting": name, "s_per_step": statistics.median(medians[name]),
               "rounds_s": medians[name]}
        if parts[name]:
            row.update({p: statistics.median(x[p] for x in parts[name]) for p in STEP_PARTS})
        rows.append(row)
    explicit = [r["s_per_step"] for r in rows if r["setting"].startswith("cpu_threads=")]
    full_s = next(r["s_per_step"] for r in rows if r["setting"] == FULL)
    for r in rows:
        r["over_best_explicit"] = r["s_per_step"] / min(explicit) if explicit and r["setting"] != FULL else None
        r["x_faster_than_full"] = full_s / r["s_per_step"] if r["setting"] != FULL else None
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="small", choices=list(MODEL_SHAPES))
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--index", default="roar")
    parser.add_argument("--threads", type=thread_setting, nargs="+", default=[None, 1, 2],
                        help="settings to compare: 'default' or a cpu_threads count (default: default 1 2)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="decode steps per setting and round")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps of each setting after the first")
    parser.add_argument("--prefill-chunk", type=int, default=4096)
    parser.add_argument("--out", default="results/threads")
    args = parser.parse_args(argv)
    for name, low in (("rounds", 1), ("steps", 1), ("warmup", 0)):
        if getattr(args, name) < low:
            parser.error(f"--{name} must be >= {low}, got {getattr(args, name)}")
    try:
        defaults = RetrievalConfig(index=args.index)
    except ValueError as err:
        parser.error(str(err))
    held = defaults.sink_tokens + defaults.window_tokens
    if any(c <= held for c in args.contexts):
        parser.error(f"--contexts must exceed sink + window = {held} tokens (else nothing is offloaded), got {args.contexts}")

    torch.manual_seed(0)
    model = random_model(args.shape)
    rows = []
    for context in args.contexts:
        print(f"context {context}: prefill, then {args.rounds} rounds of {args.steps} steps per setting", file=sys.stderr)
        rows += measure(model, context, args)

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1e3:.2f}"

    print(format_columns(
        ["context", "setting", "ms/step", "/ best explicit", "x faster than full", *(f"{p} ms" for p in STEP_PARTS)],
        [[r["context"], r["setting"], ms(r["s_per_step"]),
          "-" if r["over_best_explicit"] is None else f"{r['over_best_explicit']:.2f}",
          "-" if r["x_faster_than_full"] is None else f"{r['x_faster_than_full']:.2f}",
          *(ms(r.get(p)) for p in STEP_PARTS)] for r in rows]))
    write_json(f"{args.out}/threads.json", {"settings": vars(args), "rows": rows}, indent=2)
    print(json.dumps([{k: r[k] for k in ("context", "setting", "s_per_step", "over_best_explicit",
                                          "x_faster_than_full")} for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
