"""Checks of what a caller hands ``RetrievalAttention``: the construction arguments, and the q, k, v of
a prefill or decode call, alone and against what the engine holds (call order, batch, dtype and
device of its buffers, handed in as values). Each raises ValueError naming the argument.

Stateless. Knows nothing about the window, the index or transformers.
"""

from __future__ import annotations

import os

import numba
import torch

from ..checks import check_int, check_number
from ..config import RetrievalConfig
from ..index import params_class

__all__ = ["check_call", "check_construction", "check_cpu_threads", "check_finite", "check_fork", "check_qkv", "finite_flag"]


def check_construction(
    config: RetrievalConfig, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None
) -> None:
    """The arguments of ``RetrievalAttention(config, num_heads, num_kv_heads, head_dim, scale)``."""
    if not isinstance(config, RetrievalConfig):
        raise ValueError(f"config must be a RetrievalConfig, got {type(config).__name__}")
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        check_int("", name, value, 1)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    check_number("", "scale", scale, 0.0, low_open=True, none_allowed=True)
    check_cpu_threads(config.cpu_threads)


def check_fork(config: RetrievalConfig, held: RetrievalConfig, prompt_over: bool, sample_kept: bool) -> bool:
    """The ``config`` of ``RetrievalAttention.fork`` on an engine configured with ``held``, whose prompt is
    over or not, that kept a sample of prefill queries (or has seen nothing yet) or not. Returns whether
    ``config``'s index trains on prefill queries (the fork copies the sample only then)."""
    if not isinstance(config, RetrievalConfig):
        raise ValueError(f"config must be a RetrievalConfig, got {type(config).__name__}")
    if prompt_over:
        raise ValueError("fork is only possible before the first decode and before start_index_build()")
    if any(getattr(config, f) != getattr(held, f) for f in ("sink_tokens", "window_tokens")):
        raise ValueError(
            f"fork: config must keep sink_tokens={held.sink_tokens} and window_tokens={held.window_tokens}, "
            f"got {config.sink_tokens} and {config.window_tokens}"
        )
    trains = params_class(config.index).uses_train_queries
    if trains and not sample_kept:
        raise ValueError(
            f"fork: index {config.index!r} trains on prefill queries, which this engine's index "
            f"{held.index!r} did not keep; prefill with a config whose index trains (e.g. roar)"
        )
    return trains


def check_cpu_threads(n: int | None, name: str = "RetrievalConfig.cpu_threads") -> None:
    """A thread count this machine can run (None: the libraries' defaults), else ValueError naming ``name``."""
    if n is not None and not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(
            f"{name} must be in [1, {numba.config.NUMBA_NUM_THREADS}] on this machine "
            f"(os.cpu_count()={os.cpu_count()}), got {n}"
        )


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    """Types, ranks, dtypes, shapes and device of q (B, Hq, n, D) and k, v (B, Hkv, n, D), all on one
    real device in one float dtype."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 (batch, heads, seq_len, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    b, hq, n, d = q.shape
    if hq != num_heads:
        raise ValueError(f"q has {hq} heads, the engine was built for num_heads={num_heads}")
    if k.shape[1] != num_kv_heads:
        raise ValueError(f"k has {k.shape[1]} heads, the engine was built for num_kv_heads={num_kv_heads}")
    if d != head_dim or k.shape[3] != head_dim:
        raise ValueError(f"head_dim of q ({d}) and k ({k.shape[3]}) must equal the engine's head_dim={head_dim}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != b or k.shape[2] != n:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and seq_len")
    if b < 1 or n < 1:
        raise ValueError(f"batch and seq_len must be >= 1, got q shape {tuple(q.shape)}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type == "meta":
        raise ValueError("q, k, v are meta tensors (no data); pass tensors on a real device")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def check_call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    held: tuple[int, torch.dtype, torch.device] | None, seen: int, decode: bool, dirty: bool,
) -> None:
    """A prefill (``decode`` False) or decode call's q, k, v (``check_qkv``) against an engine that holds
    ``held`` = (batch, dtype, device) of its buffers (None before the first prefill) and ``seen`` tokens;
    ``dirty``: an earlier call was interrupted while it updated the state. A prefill's tensors are also
    checked for NaN/Inf here (a decode step checks them with its one device sync)."""
    check_qkv(q, k, v, num_heads, num_kv_heads, head_dim)
    if dirty:
        raise ValueError("an earlier call was interrupted while it updated the engine's state; call reset() first")
    if held is not None and q.shape[0] != held[0]:
        raise ValueError(f"batch size changed from {held[0]} to {q.shape[0]}; call reset() first")
    if held is not None and (q.dtype, q.device) != held[1:]:
        raise ValueError(
            f"q, k, v are {q.dtype} on {q.device}, the engine holds {held[1]} on "
            f"{held[2]}; call reset() first to change dtype or device"
        )
    if decode and q.shape[2] != 1:
        raise ValueError(f"decode takes one new token per sequence (seq_len 1), got seq_len {q.shape[2]}")
    if decode and seen == 0:
        raise ValueError("decode called before prefill")
    if not decode:
        check_finite(q, k, v)


def finite_flag(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Whether q, k, v hold no NaN or Inf: a 0-d bool tensor on their device, read without a sync here."""
    return torch.isfinite(q).all() & torch.isfinite(k).all() & torch.isfinite(v).all()


def check_finite(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """No NaN or Inf in q, k, v: one reduction and one device sync; the culprit is named only on failure."""
    if not bool(finite_flag(q, k, v)):  # one device sync
        bad = next(name for name, t in (("q", q), ("k", k), ("v", v)) if not bool(torch.isfinite(t).all()))
        raise ValueError(f"{bad} contains NaN or Inf; nothing was stored")
