"""Which compact key code should ``sketch``'s first stage score? Candidate codes measured on real keys.

What it measures: on the embedded model's real post-RoPE queries and keys (the recall sweep's capture,
cached under ``--cache-dir``), for each context length, sampled layer and KV head, the decode-like
setting of the sweep (sink 128 and window 512 static, the last 64 positions as test queries; the
middle keys are the offloaded ones), for each code: the fraction of each test query's exact top-k
middle keys found among its ``c`` best keys by the code's approximate score (``c`` = 1, 2, 4 x k).
That is recall@k after the exact second stage, which ranks the candidates by their exact scores.
Codes, with their bytes per key and head at head dim D (a bf16 key is 2D bytes):

- ``channel-int{8,4,2,1}``: per-channel affine quantisation (range of the keys per channel), D*b/8 bytes:
  what ``sketch`` keeps (``bits``);
- ``rotated-int4``: the same after a random orthogonal rotation of the keys (spreads outlier channels);
- ``key-int4``: per-key symmetric absmax scale after subtracting the mean key, D/2 + 2 bytes;
- ``sign``: sign bits after a random rotation of the centred key, with its norm and its sign
  correlation (RaBitQ-style estimator), D/8 + 4 bytes;
- ``block{8,16}``: per-channel min and max (fp16) of blocks of consecutive keys, scored by the bound
  ``sum_d max(q_d min_d, q_d max_d)``; candidates are whole blocks, 4D/B bytes per key.

Why: the code must hold recall@100 >= 0.95 on every head with at most 4 x top_k candidates at <= 1/4
of the bf16 key's bytes; this shows which family gets there and at what precision. Prints a table
(min and median over heads) and one final JSON line; writes sketch_codes.json into ``--out``.

    python bench/sketch_codes.py --lengths 8192 16384 32768
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from retrieval_attn.evaluation.capture import default_layers, load_or_capture, model_and_tokens
from retrieval_attn.evaluation.report import format_columns

SINK, WINDOW, TEST = 128, 512, 64


def _channel(keys: torch.Tensor, bits: int):
    """Per-channel affine levels: the dequantised keys (G, n, D)."""
    lo, hi = keys.amin(1, keepdim=True), keys.amax(1, keepdim=True)
    step = ((hi - lo) / ((1 << bits) - 1)).clamp_min(1e-12)
    return lo + ((keys - lo) / step).round() * step


def _rotation(dim: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


def approximate(code: str, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Approximate scores (G, m, n) of queries (G, m, D) against keys (G, n, D) under ``code``."""
    g, n, d = keys.shape
    if code.startswith("channel-int"):
        return torch.bmm(queries, _channel(keys, int(code.removeprefix("channel-int"))).transpose(1, 2))
    if code == "rotated-int4":
        rot = _rotation(d)
        return torch.bmm(queries @ rot, _channel(keys @ rot, 4).transpose(1, 2))
    if code == "key-int4":
        mean = keys.mean(1, keepdim=True)
        r = keys - mean
        scale = (r.abs().amax(-1, keepdim=True) / 7).clamp_min(1e-12)
        return torch.bmm(queries, (mean + (r / scale).round().clamp(-8, 7) * scale).transpose(1, 2))
    if code == "sign":
        rot = _rotation(d)
        mean = keys.mean(1, keepdim=True)
        r = (keys - mean) @ rot  # [G, n, D]
        norm = r.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        signs = torch.sign(r)
        corr = (r.abs().sum(-1, keepdim=True) / (math.sqrt(d) * norm)).clamp_min(1e-6)  # <o, x>
        est = torch.bmm(queries @ rot, (signs / math.sqrt(d) * norm / corr).transpose(1, 2))
        return est + torch.bmm(queries, mean.transpose(1, 2))
    if code.startswith("block"):
        b = int(code.removeprefix("block"))
        blocks = n // b * b
        kb = keys[:, :blocks].reshape(g, -1, b, d)
        lo, hi = kb.amin(2).half().float(), kb.amax(2).half().float()  # [G, nb, D]
        # sum_d max(q_d lo_d, q_d hi_d): hi where q_d > 0, lo where q_d < 0
        bound = torch.bmm(queries.clamp(min=0), hi.transpose(1, 2)) + torch.bmm(queries.clamp(max=0), lo.transpose(1, 2))
        per_key = bound.repeat_interleave(b, dim=-1)  # [G, m, blocks]: a block's keys share its bound
        tail = torch.bmm(queries, keys[:, blocks:].transpose(1, 2))  # the last partial block, exact
        return torch.cat([per_key, tail], dim=-1)
    raise ValueError(f"unknown code {code!r}")


def code_bytes(code: str, d: int) -> float:
    """Bytes per key and head of ``code`` at head dim ``d``."""
    if code.startswith("channel-int"):
        return d * int(code.removeprefix("channel-int")) / 8
    return {"rotated-int4": d / 2, "key-int4": d / 2 + 2, "sign": d / 8 + 4}.get(code) or 4 * d / int(code[5:])


CODES = ("channel-int8", "channel-int4", "channel-int2", "channel-int1", "rotated-int4", "key-int4", "sign",
         "block8", "block16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--layers", type=int, nargs="+", default=None)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--cache-dir", default="results/qk_cache")
    parser.add_argument("--out", default="results/sketch_codes")
    args = parser.parse_args()
    path, key, model, n_layers, ids = model_and_tokens(None, args.cache_dir, max(args.lengths))
    layers = args.layers or default_layers(n_layers)
    qk, _ = load_or_capture(model, ids, layers, args.cache_dir, key)
    k, factors = args.k, (1, 2, 4)
    results = []
    for n in args.lengths:
        for layer in layers:
            q_all, k_all = torch.from_numpy(qk.q[layer][:, :n]), torch.from_numpy(qk.k[layer][:, :n])
            groups, rep = k_all.shape[0], q_all.shape[0] // k_all.shape[0]
            keys = k_all[:, SINK : n - TEST - WINDOW].bfloat16().float()  # the offloaded middle, as stored
            queries = q_all[:, n - TEST :].reshape(groups, rep * TEST, -1)  # [G, m, D]
            exact = torch.bmm(queries, keys.transpose(1, 2))
            truth = exact.topk(k, dim=-1).indices  # [G, m, k]
            for code in CODES:
                approx = approximate(code, keys, queries)
                for f in factors:
                    cand = approx.topk(f * k, dim=-1).indices
                    hit = (truth[..., :, None] == cand[..., None, :]).any(-1).float().mean(-1)  # [G, m]
                    for head, r in enumerate(hit.mean(-1).tolist()):
                        results.append({"length": n, "layer": layer, "kv_head": head, "code": code,
                                        "bytes": code_bytes(code, keys.shape[-1]), "candidates": f * k, "recall": r})
    rows = []
    dim = qk.k[layers[0]].shape[-1]
    for n in args.lengths:
        for code in CODES:
            row = [n, code, f"{code_bytes(code, dim):g} ({code_bytes(code, dim) / (2 * dim):.3f})"]
            for f in factors:
                rs = [r["recall"] for r in results if r["length"] == n and r["code"] == code and r["candidates"] == f * k]
                row.append(f"{min(rs):.3f} / {np.median(rs):.3f}")
            rows.append(row)
    print(f"recall@{k} after the exact second stage, min / median over {len(layers)} layers x KV heads; "
          f"layers {list(layers)}, head dim {dim} (bf16 key {2 * dim} bytes)")
    print(format_columns(["tokens", "code", "bytes/key (of bf16)", *(f"c={f * k}" for f in factors)], rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sketch_codes.json").write_text(json.dumps({"layers": list(layers), "k": k, "results": results}))
    print(json.dumps({"codes": CODES, "rows": rows}))


if __name__ == "__main__":
    main()
