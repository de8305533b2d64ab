"""Smoke test of a model split across devices with accelerate's ``device_map`` (issue 12).

What it checks: a randomly initialised Llama (``--shape``, fp32 so that both runs round alike) is
dispatched with ``accelerate.dispatch_model``: the embeddings and the first half of the layers on
``--device`` (cuda:0), the other layers, the final norm and the LM head on the CPU. The model
generates ``--new-tokens`` greedily after a ``--context``-token random prompt with plain sdpa
attention (the reference); then the same tokens are fed, one decode step each, through a
``RetrievalCache`` whose ``top_k`` covers every offloaded key (so it must equal full attention).
Reported: each layer's device and where its engine keeps the window, tokens offloaded per layer,
the largest logit difference against the reference over the prefill's last position and every
decode step, and whether greedy decoding through the cache picks the reference's tokens. Why: one
GPU is enough to exercise a split model, the case where each layer's engine must follow the device
its tensors arrive on and the host copies cross devices.

Prints a table and a final JSON line; writes device_map.json into ``--out``. Exit status 1 when the
logits differ by more than ``--tolerance`` or a window is not where its layer runs.

    python bench/device_map.py --device cuda:0 --out results/device_map   # half the layers on the GPU
    python bench/device_map.py --device cpu --shape tiny                  # everything on the CPU (CI)
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from accelerate import dispatch_model

from retrieval_attn import RetrievalConfig
from retrieval_attn.evaluation.report import format_columns, write_json
from retrieval_attn.hf import MODEL_SHAPES, Decoder, RetrievalCache, dynamic_cache, random_model

SINK, WINDOW = 64, 128  # the device part of each layer's cache; the rest is offloaded and retrieved


def split_map(layers: int, device: str) -> dict[str, str]:
    """device_map: embeddings, rotary embedding and the first half of the layers on ``device``, the rest on the CPU."""
    first = max(1, layers // 2)
    return {"model.embed_tokens": device, "model.rotary_emb": device,
            **{f"model.layers.{i}": device if i < first else "cpu" for i in range(layers)},
            "model.norm": "cpu", "lm_head": "cpu"}


def teacher_forced_logits(model: torch.nn.Module, cache, ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Logits (1 + len(tokens), vocab) of the prompt's last position, then of each token fed as a decode step."""
    decoder = Decoder(model, cache, prefill_chunk=1024)
    rows = [decoder.prefill(ids)[0, -1]]
    rows += [decoder.step(t)[0] for t in tokens[:-1]]
    return torch.stack([r.float().cpu() for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="small", choices=list(MODEL_SHAPES))
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest logit difference accepted")
    parser.add_argument("--out", default="results/device_map")
    args = parser.parse_args(argv)
    if args.context <= SINK + WINDOW:
        parser.error(f"--context must exceed sink + window = {SINK + WINDOW} tokens (else nothing is offloaded), "
                     f"got {args.context}")
    if args.new_tokens < 1:
        parser.error(f"--new-tokens must be >= 1, got {args.new_tokens}")

    model = random_model(args.shape, device="cpu", dtype=torch.float32)
    layers = model.config.num_hidden_layers
    device_map = split_map(layers, args.device)
    model = dispatch_model(model, device_map=device_map)
    first = torch.device(device_map["model.embed_tokens"])
    ids = torch.randint(0, model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    ids = ids.to(first)

    plain = Decoder(model, dynamic_cache(), prefill_chunk=1024)
    tokens = plain.decode(plain.prefill(ids), args.new_tokens)
    reference = teacher_forced_logits(model, dynamic_cache(), ids, tokens)
    config = RetrievalConfig(sink_tokens=SINK, window_tokens=WINDOW, top_k=args.context + args.new_tokens, index="flat")
    cache = RetrievalCache(model, config)
    logits = teacher_forced_logits(model, cache, ids, tokens)
    diff = float((logits - reference).abs().max())
    greedy = RetrievalCache(model, config)
    decoder = Decoder(model, greedy, prefill_chunk=1024)
    same_tokens = decoder.decode(decoder.prefill(ids), args.new_tokens) == tokens

    rows, misplaced = [], []
    for i, (layer, stats) in enumerate(zip(cache.layers, cache.stats)):
        expected = torch.device(device_map[f"model.layers.{i}"]).type
        window = layer.engine.window.k.device.type
        if window != expected:
            misplaced.append(i)
        rows.append([i, device_map[f"model.layers.{i}"], str(layer.engine.window.k.device), stats.device_tokens,
                     stats.offloaded_tokens])
    print(format_columns(["layer", "device_map", "window on", "tokens on device", "offloaded"], rows))
    ok = diff <= args.tolerance and not misplaced
    summary = {"ok": ok, "device": args.device, "shape": args.shape, "context": args.context,
               "new_tokens": args.new_tokens, "max_logit_diff": diff, "tolerance": args.tolerance,
               "greedy_tokens_equal": same_tokens, "misplaced_windows": misplaced, "device_map": device_map,
               "layers": [dict(zip(["layer", "device_map", "window_on", "device_tokens", "offloaded"], r)) for r in rows]}
    write_json(f"{args.out}/device_map.json", summary, indent=2)
    print(f"max logit difference against plain sdpa: {diff:.2e} (tolerance {args.tolerance:g}); "
          f"greedy tokens equal: {same_tokens}; windows where their layers run: {not misplaced}")
    print(json.dumps({k: summary[k] for k in ("ok", "max_logit_diff", "greedy_tokens_equal", "misplaced_windows")}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
