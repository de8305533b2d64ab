"""Post-RoPE queries and keys of a model on a long text, captured once and cached on disk.

``capture_layers`` runs the model once over the tokens (``hf.capture_qk`` records q and k where the
attention function sees them) and stops after the deepest layer asked for; ``load_or_capture`` keeps
each layer's capture in ``{cache_dir}/{model key}/layer{L:03d}.npz`` and reuses a capture of a longer
or equal prefix of the same tokens; ``model_and_tokens`` finds the model's key, layer count and the
built-in text's tokens without loading the model when the cache already holds them. ``CapturedQK``
is what the sweep and the insertion-drift bench consume: CPU fp32 NumPy arrays per layer.

This module runs a model but does not know what the captures are used for; it imports
``retrieval_attn.hf`` (and so transformers) only inside the functions that load or run a model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..model_files import model_cache_key
from .texts import builtin_token_ids

__all__ = [
    "CACHED_TOKENS",
    "CapturedQK",
    "default_layers",
    "capture_layers",
    "load_or_capture",
    "model_and_tokens",
]

CACHED_TOKENS = 131072  # built-in text tokens kept in the capture cache, so re-runs need not load the model


@dataclass
class CapturedQK:
    """Post-RoPE queries and keys of some layers for one sequence (batch 1), CPU fp32 NumPy.

    q : layer -> (Hq, n, D); k : layer -> (Hkv, n, D); scale : the attention logit scale.
    """

    q: dict[int, np.ndarray]
    k: dict[int, np.ndarray]
    scale: float

    @property
    def n(self) -> int:
        """Tokens captured (the same for every layer)."""
        return min(a.shape[1] for a in self.k.values())

    @classmethod
    def from_pairs(cls, pairs: Mapping[int, tuple[Any, Any]], scale: float | None = None) -> CapturedQK:
        """From ``{layer: (q, k)}`` of torch or NumPy arrays, (1, H, n, D) as ``hf.capture_qk`` records or (H, n, D).

        ``scale`` defaults to D ** -0.5.
        """
        q, k = {}, {}
        for layer, (qa, ka) in pairs.items():
            qa, ka = (np.ascontiguousarray(_numpy3(x), dtype=np.float32) for x in (qa, ka))
            if qa.shape[0] % ka.shape[0] or qa.shape[1:] != ka.shape[1:]:
                raise ValueError(f"layer {layer}: q {qa.shape} and k {ka.shape} must be (Hq, n, D), (Hkv, n, D), Hkv | Hq")
            q[int(layer)], k[int(layer)] = qa, ka
        if not q:
            raise ValueError("no layers given")
        dim = next(iter(k.values())).shape[2]
        return cls(q, k, float(dim**-0.5 if scale is None else scale))


def _numpy3(x: Any) -> np.ndarray:
    a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError(f"captured arrays must have batch size 1, got shape {a.shape}")
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"captured arrays must be (1, H, n, D) or (H, n, D), got shape {a.shape}")
    return a


def default_layers(num_layers: int, count: int = 5) -> tuple[int, ...]:
    """``count`` layers spread evenly from 10% of the depth to the last (30 layers: 3, 9, 16, 22, 29)."""
    return tuple(sorted({int(round(x)) for x in np.linspace(0.1 * (num_layers - 1), num_layers - 1, count)}))


class _StopForward(Exception):
    """Raised by a forward hook after the deepest sampled layer: the rest of the model is not needed."""


def capture_layers(
    model: torch.nn.Module, token_ids: torch.Tensor, layers: Sequence[int], progress: bool = True
) -> CapturedQK:
    """Run ``model`` on token_ids (1, n) once, up to the deepest of ``layers``, and return their q/k.

    Uses ``hf.capture_qk`` (transformers' sdpa attention, memory-efficient on CPU); the forward stops
    after the deepest sampled decoder layer.
    """
    from ..hf import capture_qk

    decoder = model.get_decoder().layers
    last = max(layers)
    bar = tqdm(total=last + 1, desc=f"capture {token_ids.shape[1]} tok", unit="layer", disable=not progress)

    def step(module: torch.nn.Module, args: Any, output: Any) -> None:
        bar.update(1)
        if module is decoder[last]:
            raise _StopForward

    hooks = [decoder[i].register_forward_hook(step) for i in range(last + 1)]
    try:
        with torch.no_grad(), capture_qk(model, list(layers)) as store:
            try:
                model(token_ids.to(model.device), use_cache=False)
            except _StopForward:
                pass
            pairs = dict(store)
    finally:
        for h in hooks:
            h.remove()
        bar.close()
    scale = next(float(m.scaling) for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "k_proj"))
    return CapturedQK.from_pairs(pairs, scale)


def load_or_capture(
    model: torch.nn.Module | Callable[[], torch.nn.Module] | None,
    token_ids: torch.Tensor,
    layers: Sequence[int],
    cache_dir: str | Path | None = None,
    cache_key: str | None = None,
    progress: bool = True,
) -> tuple[CapturedQK, float | None]:
    """q/k of ``layers`` on token_ids (1, n): from ``cache_dir`` where a capture of a longer or equal
    prefix of the same tokens exists, else captured (one forward) and saved there.

    Returns the capture and the seconds the forward took (None: everything came from the cache).
    Files: ``{cache_dir}/{cache_key}/layer{L:03d}.npz`` holding q, k, token ids and scale. No caching
    when ``cache_dir`` or ``cache_key`` is None. ``model`` may be a function returning the model (called
    only if a capture is needed), or None if everything is cached.
    """
    n = token_ids.shape[1]
    folder = Path(cache_dir) / cache_key if cache_dir is not None and cache_key is not None else None
    pairs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    scale = None
    for layer in layers:
        path = folder / f"layer{layer:03d}.npz" if folder else None
        if path is None or not path.is_file():
            continue
        with np.load(path) as f:
            if f["k"].shape[1] >= n and np.array_equal(f["token_ids"][:n], token_ids[0].numpy()):
                pairs[layer] = (f["q"][:, :n], f["k"][:, :n])
                scale = float(f["scale"])
    missing = [layer for layer in layers if layer not in pairs]
    seconds = None
    if missing:
        if model is None:
            raise ValueError(f"layers {missing} are not cached for these tokens and no model was given")
        model = model if isinstance(model, torch.nn.Module) else model()
        start = time.perf_counter()
        fresh = capture_layers(model, token_ids, missing, progress)
        seconds = time.perf_counter() - start
        scale = fresh.scale
        for layer in missing:
            pairs[layer] = (fresh.q[layer], fresh.k[layer])
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = folder / f"layer{layer:03d}.tmp.npz"
                np.savez(tmp, q=fresh.q[layer], k=fresh.k[layer], token_ids=token_ids[0].numpy(), scale=scale)
                tmp.replace(folder / f"layer{layer:03d}.npz")
    return CapturedQK.from_pairs({layer: pairs[layer] for layer in sorted(layers)}, scale), seconds


def model_and_tokens(
    model_path: str | Path | None, cache_dir: str | Path | None, need: int
) -> tuple[Path, str, Callable[[], torch.nn.Module] | torch.nn.Module, int, torch.Tensor]:
    """For a model file or folder (None: the embedded one): its path, cache key, the model or a loader of
    it, its layer count, and the built-in text's first ``need`` token ids (1, need).

    When ``cache_dir`` holds the layer count and enough tokens of this model (``builtin_tokens.npz``),
    the model is not loaded here: ``load_or_capture`` loads it only if a layer is not cached.
    """
    from ..hf import embedded_model_path, load_model

    path = embedded_model_path() if model_path is None else Path(model_path)
    key = model_cache_key(path)
    meta = Path(cache_dir) / key / "builtin_tokens.npz" if cache_dir is not None else None
    if meta is not None and meta.is_file():
        with np.load(meta) as f:
            if len(f["token_ids"]) >= need:
                ids = torch.from_numpy(f["token_ids"][:need]).unsqueeze(0)
                return path, key, lambda: load_model(path)[0], int(f["num_layers"]), ids
    model, tokenizer = load_model(path)
    n_layers = model.config.get_text_config().num_hidden_layers
    ids = builtin_token_ids(tokenizer, max(need, CACHED_TOKENS))
    if meta is not None:
        meta.parent.mkdir(parents=True, exist_ok=True)
        np.savez(meta, token_ids=ids[0].numpy(), num_layers=n_layers)
    return path, key, model, n_layers, ids[:, :need]
