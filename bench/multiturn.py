"""Multi-turn (issue 15): a turn's exact attention over the offloaded rows, and the time to the first token
of a conversation's second turn against re-prefilling the whole conversation.

``--part kernel``: one layer of the Llama-3-8B shape (32 query / 8 KV heads, head dim 128, bf16) holding
``--offloaded`` rows in its CPU store and a full sink + window (128 + 512); a turn of n new tokens
attends over all of them. Timed on the CPU: ``engine.prefill.turn_attention`` (tiles of prefill_block
queries by as many rows, merged by lse: what the engine runs), sdpa over one copy of the context (the
first prompt's path), and the per-token way a turn must not take (n decode steps of the engine: one
index search with top-k truncation per query; flat index, top_k 100). It prints ms and GFLOP/s and,
from them and the bytes of a row, the chunk length above which moving the rows to a GPU over PCIe
(``--pcie-gbps``, not measured here) beats attending on the host's cores (``--host-cores`` times the
measured per-thread rate).

``--part index``: a long turn adds many keys to a roar index at once. One layer of the embedded model
(its real queries and keys, from the sweep's capture cache): an index over a ``--document-tokens``
document, a 32-step answer searching it, then a turn of each ``--turns`` length whose keys are added
in one call; the next answer's queries measure recall@100 of that index against rebuilds trained on
the turn's queries (what ``rebuild_growth`` trains a turn-triggered rebuild on) or on every query.

``--part conversation``: the embedded model (or ``--model``) reads ``--document-tokens`` tokens of the
shipped book through ``hf.Chat`` on a ``RetrievalCache`` (default settings), answers a first question
(``--answer-tokens``), then a second question arrives. Its time to the first token (only the turn's new
tokens prefilled, exact over the offloaded document) is set beside re-prefilling the whole conversation
so far in a fresh ``RetrievalCache`` (all a cache that holds one prompt can do) and in a ``DynamicCache``.

Prints tables and a final JSON line; writes multiturn.json into ``--out``.

    python bench/multiturn.py --part kernel --offloaded 16384 --chunks 1 16 128 512
    python bench/multiturn.py --part index --document-tokens 16384 --turns 1024 4096 8192
    python bench/multiturn.py --part conversation --document-tokens 16384
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from retrieval_attn import RetrievalAttention, RetrievalConfig
from retrieval_attn.engine.prefill import prompt_attention, turn_attention
from retrieval_attn.evaluation import format_columns, write_json

HQ, HKV, D = 32, 8, 128  # Llama-3-8B's attention


def _timed(fn, repeat: int) -> float:
    """Best seconds of ``repeat`` calls of fn after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def kernel(args: argparse.Namespace) -> dict:
    """Turn attention over ``args.offloaded`` rows on the CPU: tiles vs one copy vs per-token decode steps."""
    torch.set_num_threads(args.threads)
    cfg = RetrievalConfig(sink_tokens=128, window_tokens=512, top_k=100, index="flat")
    n_max = max(args.chunks)
    g = torch.Generator().manual_seed(0)
    total = args.offloaded + 640 + n_max
    q, k, v = (torch.randn(1, h, total, D, generator=g).bfloat16() for h in (HQ, HKV, HKV))
    engine = RetrievalAttention(cfg, HQ, HKV, D)
    held = args.offloaded + 640
    engine.prefill(q[:, :, :held], k[:, :, :held], v[:, :, :held])
    rows = []
    for n in args.chunks:
        chunk = [x[:, :, held : held + n] for x in (q, k, v)]
        flops = 4 * n * HQ * (held + n / 2) * D
        tiles = _timed(lambda: turn_attention(*chunk, engine.window, engine.store, cfg.prefill_block, D**-0.5),
                       args.repeat)
        copy = _timed(lambda: prompt_attention(*chunk, engine.window, engine.store, cfg.prefill_block, D**-0.5),
                      args.repeat)
        twin = engine.fork(cfg)  # per-token: n decode steps, each searching the index (built at the first)
        twin.decode(*(x[:, :, :1] for x in chunk))
        start = time.perf_counter()
        for t in range(n):
            twin.decode(*(x[:, :, t : t + 1] for x in chunk))
        steps = time.perf_counter() - start
        rows.append({"chunk": n, "tiles_ms": 1e3 * tiles, "one_copy_sdpa_ms": 1e3 * copy,
                     "decode_steps_ms": 1e3 * steps, "tiles_gflops": flops / tiles / 1e9,
                     "one_copy_gflops": flops / copy / 1e9})
    # per offloaded row: 4 n Hq D flops on the host, or 2 Hkv D bf16 values (K and V) over PCIe
    rate = max(r["tiles_gflops"] for r in rows) * 1e9 * args.host_cores / args.threads
    crossover = (2 * HKV * D * 2 / (args.pcie_gbps * 1e9)) * rate / (4 * HQ * D)
    return {"offloaded": args.offloaded, "threads": args.threads, "rows": rows,
            "host_flops_assumed": rate, "pcie_bytes_per_s_assumed": args.pcie_gbps * 1e9,
            "chunk_above_which_pcie_wins": crossover}


def index(args: argparse.Namespace) -> dict:
    """Recall after a turn's keys are added at once to roar, against rebuilds (evaluation.turn_drift)."""
    from retrieval_attn.evaluation import load_or_capture, model_and_tokens, turn_drift

    need = args.document_tokens + max(args.turns) + 32 + 64
    _, key, model, _, ids = model_and_tokens(args.model, args.cache_dir, need)
    rows = []
    for layer in args.layers:
        captured, _ = load_or_capture(model, ids, [layer], args.cache_dir, key)
        q, k = captured.q[layer], captured.k[layer]
        for turn in args.turns:
            r = turn_drift(q, k, "roar", {}, args.document_tokens, turn)
            rows.append({"layer": layer, "turn": turn, **r})
            print(f"layer {layer}, turn {turn}: {r}", file=sys.stderr)
    return {"document_tokens": args.document_tokens, "rows": rows}


def conversation(args: argparse.Namespace) -> dict:
    """TTFT of a second turn on one cache vs re-prefilling the conversation (fresh RetrievalCache, DynamicCache)."""
    from retrieval_attn.evaluation.texts import book_text
    from retrieval_attn.hf import Chat, Decoder, RetrievalCache, dynamic_cache, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    ids = tokenizer(book_text(), add_special_tokens=False).input_ids
    ids = (ids * (args.document_tokens // len(ids) + 1))[: args.document_tokens]
    document = tokenizer.decode(ids)
    config = RetrievalConfig()
    cache = RetrievalCache(model, config, max_context=args.document_tokens + 1024, prefill_chunk=args.prefill_chunk,
                           prompt_tokens=args.document_tokens + 64)
    chat = Chat(model, tokenizer, cache, document, prefill_chunk=args.prefill_chunk,
                max_new_tokens=args.answer_tokens)
    start = time.perf_counter()
    opening = chat.start()
    read = time.perf_counter() - start
    print(f"read {opening} tokens in {read:.1f} s", file=sys.stderr)
    chat.ask("Who is the main character of this story?")
    chat.ask("What happens at the tea party?")
    second = chat.turns[1]
    conversation_ids = torch.tensor([chat.held[: len(chat.held) - second.answer_tokens]])  # [1, up to turn 2]
    result = {"document_tokens": opening, "read_seconds": read, "turn1": vars(chat.turns[0]),
              "turn2": vars(second), "conversation_tokens_at_turn2": conversation_ids.shape[1]}
    for name, fresh in (("re-prefill, RetrievalCache", lambda: RetrievalCache(model, config)),
                        ("re-prefill, DynamicCache", dynamic_cache)):
        decoder = Decoder(model, fresh(), args.prefill_chunk)
        start = time.perf_counter()
        decoder.prefill(conversation_ids)
        result[name] = time.perf_counter() - start
        print(f"{name}: {result[name]:.1f} s", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["kernel", "index", "conversation"], required=True)
    parser.add_argument("--offloaded", type=int, default=16384, help="kernel: rows in the layer's CPU store")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 16, 128, 512], help="kernel: turn lengths")
    parser.add_argument("--repeat", type=int, default=3, help="kernel: timed calls (best kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    parser.add_argument("--host-cores", type=int, default=16, help="kernel: cores of the GPU host in the estimate")
    parser.add_argument("--pcie-gbps", type=float, default=25.0, help="kernel: host -> GPU GB/s in the estimate")
    parser.add_argument("--layers", type=int, nargs="+", default=[9, 16, 22], help="index: layers replayed")
    parser.add_argument("--turns", type=int, nargs="+", default=[1024, 4096, 8192], help="index: turn lengths")
    parser.add_argument("--cache-dir", default="results/qk_cache", help="index: captured q/k cache")
    parser.add_argument("--model", default=None, help="index, conversation: GGUF file or folder (default: SmolLM2)")
    parser.add_argument("--document-tokens", type=int, default=16384, help="index, conversation: document length")
    parser.add_argument("--answer-tokens", type=int, default=32, help="conversation: tokens of each answer")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="conversation: tokens per prefill pass")
    parser.add_argument("--out", default="results/multiturn")
    args = parser.parse_args(argv)
    if args.part == "kernel":
        result = kernel(args)
        print(f"turn attention over {args.offloaded} + 640 held tokens, one Llama-3-8B layer, bf16, "
              f"{args.threads} CPU thread(s):")
        print(format_columns(["new tokens", "tiles ms", "GFLOP/s", "one-copy sdpa ms", "GFLOP/s", "decode steps ms"],
                             [[r["chunk"], f"{r['tiles_ms']:.1f}", f"{r['tiles_gflops']:.1f}",
                               f"{r['one_copy_sdpa_ms']:.1f}", f"{r['one_copy_gflops']:.1f}",
                               f"{r['decode_steps_ms']:.1f}"] for r in result["rows"]]))
        print(f"moving rows to a GPU ({args.pcie_gbps} GB/s) beats {args.host_cores} such cores above "
              f"{result['chunk_above_which_pcie_wins']:.1f} new tokens per turn")
    elif args.part == "index":
        result = index(args)
        print(f"roar after a turn's keys are added at once, {args.document_tokens}-token document, recall@100 of "
              "the next answer's queries (mean over heads and 64 positions):")
        print(format_columns(["layer", "turn tokens", "add", "rebuilt (turn's queries)", "rebuilt (all queries)",
                              "add s", "rebuild s"],
                             [[r["layer"], r["turn"], f"{r['add']:.3f}", f"{r['rebuilt_turn']:.3f}",
                               f"{r['rebuilt_all']:.3f}", f"{r['add_s']:.2f}", f"{r['rebuild_turn_s']:.2f}"]
                              for r in result["rows"]]))
    else:
        result = conversation(args)
        t2 = result["turn2"]
        print(format_columns(None, [
            ("document tokens (read once)", result["document_tokens"]),
            ("conversation tokens at turn 2", result["conversation_tokens_at_turn2"]),
            ("turn 2: new tokens prefilled", t2["prompt_tokens"]),
            ("turn 2: seconds to the first token, same cache", f"{t2['first_token_seconds']:.2f}"),
            ("re-prefill of the conversation, fresh RetrievalCache", f"{result['re-prefill, RetrievalCache']:.1f}"),
            ("re-prefill of the conversation, DynamicCache", f"{result['re-prefill, DynamicCache']:.1f}"),
        ]))
    path = write_json(Path(args.out) / f"multiturn_{args.part}.json", result)
    print(f"results: {path}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
