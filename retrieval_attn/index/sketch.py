"""``sketch``: two-stage search. Every key's compact code is scored on the layer's device (first stage),
then the best ``candidates`` per query get their exact scores from the store's rows (second stage).

The code: per-channel affine scalar quantisation. For each group (batch element and KV head) and
channel ``d``, the keys of the build span ``[lo_d, hi_d]``; a key's channel is stored as the level
``c_d = round((k_d - lo_d) / step_d)`` of ``2 ** bits`` levels (``step_d = (hi_d - lo_d) / (2 ** bits - 1)``),
packed ``8 / bits`` channels per byte (byte ``j`` holds channels ``j, j + D/planes, ...``, plane ``p`` at
bit ``p * bits``). So a key costs ``D * bits / 8`` bytes on the device: 4 bits and head dim 128 give
64 bytes, 1/4 of its 256-byte bf16 row. The approximate score folds the scales into the query:
``q . k ~ (q * step) . c + q . lo``, one batched matmul over every key of every group
(``approximate_scores``, exposed for estimates of what the top-k leaves out), and ``torch.topk`` picks the
candidates. Chosen by measuring on the embedded model's real keys against int8/int2, per-key scales,
sign bits after a random rotation and per-block bounds (bench/README.md, "sketch").

Keys added after the build (decode's spills) are coded with the build's ranges; a channel outside
them takes the nearest end level, which only makes its approximate score less exact (``saturated``
counts such values; the exact second stage is unaffected).

Where things live. The codes and the ranges live on ``build`` 's ``device`` (the layer's device; the
CPU by default), written at the build (one bulk copy) and by ``add`` (the spilled rows coded on the
host from the store's rows, then one small non-blocking copy from a pinned staging buffer: no device
sync). The rows stay in the key source (the ``KVStore``, in the model's dtype): the second stage
(``exact_top_k``, a numba kernel) reads the candidates' rows in place. ``search`` (the ``KeyIndex``
protocol: NumPy in and out) runs both stages; the engine's device selection
(``retrieval_attn.engine.selection``) calls ``candidates`` on device tensors instead and runs the
second stage where the rows are. ``scored`` counts the keys scored exactly (the candidates); the first
stage scores every key's code.

This module knows nothing about models, caches or the engine.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import numpy as np
import torch
from numba import njit, prange

from ..rows import FASTMATH, f32, grown_capacity, to_float32
from .base import KeyIndex, Param, SearchResult
from .registry import register_index

__all__ = ["SketchIndex", "exact_top_k"]

_ENCODE_ROWS = 16384  # rows coded per chunk at build (bounds the fp32 temporaries)
_BLOCK = 256  # keys per parallel work item of the CPU first stage
_scratch = threading.local()  # .by_device: device -> _Scratch, this thread's first-stage buffers


class _Scratch:
    """One thread's first-stage buffers on one device, shared by every sketch index it searches (layers run
    one after another), grown by a quarter when too small: the unpacked codes, their planes, the scores."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bufs: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous (shape) view of buffer ``name``, grown when it holds fewer elements."""
        size = int(np.prod(shape))
        buf = self.bufs.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < size:
            buf = self.bufs[name] = torch.empty(grown_capacity(size), dtype=dtype, device=self.device)
        return buf[:size].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.bufs.values())


def _scratch_for(device: torch.device) -> _Scratch:
    by_device = getattr(_scratch, "by_device", None)
    if by_device is None:
        by_device = _scratch.by_device = {}
    if device not in by_device:
        by_device[device] = _Scratch(device)
    return by_device[device]


@njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def _rescore(rows, cand, queries, scores):
    """scores[g, i, j] = queries[g, i] . rows[g, cand[g, i, j]]: rows [G, cap, D] kernel rows, cand [G, m, c]
    int64, queries [G, m, D] fp32, scores [G, m, c] fp32 (the same sum, in the same order, as flat's)."""
    groups, m, c = cand.shape
    dim = queries.shape[2]
    for t in prange(groups * m):
        g = t // m
        i = t - g * m
        for j in range(c):
            row = cand[g, i, j]
            s = np.float32(0.0)
            for d in range(dim):
                s += queries[g, i, d] * f32(rows[g, row, d])
            scores[g, i, j] = s


@njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def _approximate_cpu(codes, n, bits, scaled, bias, out):
    """out[g, i, j] = bias[g, i, 0] + scaled[g, i] . levels(codes[g, j]) for j < n: the first stage on the CPU,
    reading the packed codes [G, cap, W] uint8 in place (plane p of byte w is channel p * W + w);
    scaled [G, m, D] fp32, bias [G, m, 1] fp32, out [G, m, n] fp32."""
    groups, m, dim = scaled.shape
    width = codes.shape[2]
    planes = dim // width
    mask = (1 << bits) - 1
    blocks = (n + _BLOCK - 1) // _BLOCK
    for t in prange(groups * blocks):
        g = t // blocks
        b = t - g * blocks
        for j in range(b * _BLOCK, min(n, (b + 1) * _BLOCK)):
            for i in range(m):
                s = np.float32(0.0)
                for p in range(planes):
                    for w in range(width):
                        s += scaled[g, i, p * width + w] * np.float32((codes[g, j, w] >> (p * bits)) & mask)
                out[g, i, j] = s + bias[g, i, 0]


def exact_top_k(rows: np.ndarray, cand: np.ndarray, queries: np.ndarray, k: int, ids: np.ndarray,
                scores: np.ndarray, work: tuple[np.ndarray, np.ndarray]) -> None:
    """The second stage on the CPU: the exact scores of the candidates from the rows, read in place, and
    their top ``k``.

    rows : (G, cap, D) kernel rows (``retrieval_attn.rows``); cand : (G, m, c) int64 rows of each query's
    candidates; queries : (G, m, D) fp32; writes ids (G, m, k) int64 and scores (G, m, k) fp32, best
    first; work : scratch the caller made once: the candidates' exact scores (G, m, c) fp32 and the
    positions of the best among them (G, m, k) int64.
    """
    exact, best = work
    _rescore(rows, cand, queries, exact)
    best_t = torch.from_numpy(best)
    torch.topk(torch.from_numpy(exact), k, dim=-1, sorted=True, out=(torch.from_numpy(scores), best_t))
    torch.gather(torch.from_numpy(cand), 2, best_t, out=torch.from_numpy(ids))


@register_index
class SketchIndex(KeyIndex):
    """Per-channel quantised key codes scored on the layer's device, then exact scores of the best candidates.

    Parameters: ``bits`` (4; 1, 2, 4 or 8) per channel, ``candidates`` (400; search-time) per query,
    at least the ``k`` searched for (all keys when there are fewer).
    """

    name = "sketch"
    params = {
        "bits": Param(4, 1, 8, doc="bits per channel of a key's code: 1, 2, 4 or 8"),
        "candidates": Param(400, 1, doc="keys per query whose exact score the second stage computes (>= k)"),
    }
    search_params = ("candidates",)
    selects_on_device: ClassVar[bool] = True  # the engine runs its first stage where the layer runs

    @classmethod
    def validate_params(cls, params: dict[str, Any], only: tuple[str, ...] | None = None) -> dict[str, Any]:
        out = super().validate_params(params, only)
        if "bits" in out and 8 % out["bits"]:
            raise ValueError(f"index 'sketch': parameter 'bits' must be one of 1, 2, 4, 8, got {out['bits']}")
        return out

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.bits = self.config["bits"]
        self.planes = 8 // self.bits  # channels per byte
        self.device = torch.device("cpu")
        self.saturated = 0  # channel values of added keys outside the build's ranges (coded at an end level)
        self._codes: torch.Tensor | None = None  # [G, cap, D / planes] uint8 on self.device
        self._lo: torch.Tensor | None = None  # [G, D] fp32 on self.device, and on the host for coding
        self._step: torch.Tensor | None = None  # [G, D] fp32
        self._host_ranges: tuple[torch.Tensor, torch.Tensor] | None = None  # (lo, 1 / step) [G, D] fp32, CPU
        self._staging: torch.Tensor | None = None  # pinned [G, t, D / planes] codes of added rows (CUDA)
        self._staged: torch.cuda.Event | None = None  # recorded after the last copy out of the staging buffer

    @staticmethod
    def code_bytes(dim: int, bits: int) -> int:
        """Bytes of one key's code: ``dim * bits / 8``."""
        return dim * bits // 8

    # -- build and add ---------------------------------------------------------------------------------

    def _build(self, train_queries: np.ndarray | None) -> None:
        if self.dim % self.planes:
            raise ValueError(f"index 'sketch': the keys' dim {self.dim} must be a multiple of {self.planes} "
                             f"(channels per byte at bits={self.bits})")
        if self.build_device is not None:
            self.device = torch.device(self.build_device)
        rows, n = self.rows(), len(self)
        lo = torch.full((self.groups, self.dim), np.inf)
        hi = torch.full((self.groups, self.dim), -np.inf)
        for a in range(0, n, _ENCODE_ROWS):
            x = torch.from_numpy(to_float32(rows[:, a : min(n, a + _ENCODE_ROWS)]))  # [G, t, D]
            lo, hi = torch.minimum(lo, x.amin(1)), torch.maximum(hi, x.amax(1))
        levels = (1 << self.bits) - 1
        lo = torch.where(torch.isfinite(lo), lo, torch.zeros(()))  # n == 0: nothing to span yet
        width = torch.where(torch.isfinite(hi), hi - lo, torch.zeros(()))
        step = torch.where(width > 0, width / levels, torch.ones(()))  # a constant channel: any step
        self._host_ranges = (lo.contiguous(), (1.0 / step).contiguous())
        self._lo, self._step = lo.to(self.device), step.to(self.device)
        self._codes = torch.empty((self.groups, rows.shape[1], self.dim // self.planes), dtype=torch.uint8,
                                  device=self.device)
        for a in range(0, n, _ENCODE_ROWS):
            b = min(n, a + _ENCODE_ROWS)
            self._codes[:, a:b] = self._encode(rows[:, a:b])[0].to(self.device)

    def _encode(self, rows: np.ndarray) -> tuple[torch.Tensor, int]:
        """Codes (G, t, D / planes) uint8 on the CPU of kernel rows (G, t, D), and how many channel values
        fell outside the ranges."""
        lo, inv = self._host_ranges
        levels = (1 << self.bits) - 1
        x = (torch.from_numpy(to_float32(rows)) - lo[:, None]) * inv[:, None]  # [G, t, D] in level units
        outside = int(((x < -0.5) | (x > levels + 0.5)).sum())
        c = x.round_().clamp_(0, levels).to(torch.uint8)
        g, t, d = c.shape
        planes = c.view(g, t, self.planes, d // self.planes)  # channel p * D / planes + j -> plane p, byte j
        packed = planes[:, :, 0].clone()
        for p in range(1, self.planes):
            packed |= planes[:, :, p] << (p * self.bits)
        return packed, outside

    def _add(self, n_old: int, t: int) -> None:
        capacity = self.rows().shape[1]
        if n_old + t > self._codes.shape[1]:  # the source grew: so do the codes (to its capacity)
            grown = torch.empty((self.groups, max(capacity, grown_capacity(n_old + t)), self._codes.shape[2]),
                                dtype=torch.uint8, device=self.device)
            grown[:, :n_old] = self._codes[:, :n_old]
            self._codes = grown
        codes, outside = self._encode(self.rows()[:, n_old : n_old + t])  # [G, t, D / planes]
        self.saturated += outside
        if self.device.type != "cuda":
            self._codes[:, n_old : n_old + t] = codes
            return
        if self._staging is None or self._staging.shape[1] < t:
            self._staging = torch.empty((self.groups, t, codes.shape[2]), dtype=torch.uint8, pin_memory=True)
            self._staged = torch.cuda.Event()
        else:
            self._staged.synchronize()  # the last step's copy out of it has long landed: free in practice
        self._staging[:, :t] = codes
        self._codes[:, n_old : n_old + t].copy_(self._staging[:, :t], non_blocking=True)  # one small write
        self._staged.record()

    @property
    def codes(self) -> torch.Tensor:
        """The codes of the indexed keys, (G, n, D * bits / 8) uint8 on the layer's device, a view."""
        return self._codes[:, : len(self)]

    def coded_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the key source coded afresh with this index's ranges, (G, t, D * bits / 8)
        uint8 on the CPU: what ``codes`` must hold for them, however they were written."""
        return self._encode(self.rows()[:, start:stop])[0]

    # -- the first stage -------------------------------------------------------------------------------

    def approximate_scores(self, queries: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The codes' approximation of ``q . key`` for every indexed key: queries (G, m, D) on the codes'
        device -> (G, m, n) fp32 there (``out``: a (G, m, n) fp32 tensor to fill instead of a new one)."""
        g, m, _ = queries.shape
        n = len(self)
        if out is None:
            out = torch.empty((g, m, n), dtype=torch.float32, device=self.device)
        scratch = _scratch_for(self.device)
        q = queries.float()
        scaled = torch.mul(q, self._step[:, None], out=scratch.take("scaled", (g, m, self.dim), torch.float32))
        bias = torch.bmm(q, self._lo[:, :, None], out=scratch.take("bias", (g, m, 1), torch.float32))  # [G, m, 1]
        if self.device.type == "cpu":  # one numba pass over the packed codes, nothing unpacked
            _approximate_cpu(self._codes.numpy(), n, self.bits, scaled.numpy(), bias.numpy(), out.numpy())
            return out
        return self._approximate_torch(scaled, bias, out)

    def _approximate_torch(self, scaled: torch.Tensor, bias: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The first stage as torch ops on any device (the GPU's path): the codes unpacked into fp32 levels
        (G, n, D) in the scratch, then one batched matmul into out (G, m, n)."""
        levels = self._unpacked(out.shape[2], _scratch_for(self.device))  # [G, n, D]
        return torch.baddbmm(bias, scaled, levels.transpose(1, 2), out=out)

    def _unpacked(self, n: int, scratch: _Scratch) -> torch.Tensor:
        """The levels of the first ``n`` keys' codes as fp32 (G, n, D), in the scratch."""
        width = self.dim // self.planes
        levels = scratch.take("levels", (self.groups, n, self.dim), torch.float32)
        plane = scratch.take("plane", (self.groups, n, width), torch.uint8)
        codes, mask = self._codes[:, :n], (1 << self.bits) - 1
        for p in range(self.planes):
            torch.bitwise_right_shift(codes, p * self.bits, out=plane)
            if self.bits < 8:
                plane.bitwise_and_(mask)
            levels[:, :, p * width : (p + 1) * width].copy_(plane)
        return levels

    def candidates(self, queries: torch.Tensor, c: int, out: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The first stage: the ``c`` keys of best approximate score of each query, in no particular order.

        queries : (G, m, D) on the codes' device; out : (values (G, m, c) fp32, ids (G, m, c) int64) there.
        Returns the ids. No device sync: the caller copies them where the rows are.
        """
        g, m, _ = queries.shape
        scores = self.approximate_scores(queries, _scratch_for(self.device).take("scores", (g, m, len(self)),
                                                                                 torch.float32))
        torch.topk(scores, c, dim=-1, sorted=False, out=out)
        return out[1]

    def candidate_count(self, k: int, candidates: int | None = None) -> int:
        """Candidates per query for a search of ``k`` keys: ``candidates`` (default: the configured one), or
        every indexed key when there are fewer; ValueError when it is below ``k``."""
        c = self.config["candidates"] if candidates is None else candidates
        if c < k:
            raise ValueError(f"index 'sketch': candidates ({c}) must be >= k ({k}); raise index_params['candidates']")
        return min(c, len(self))

    # -- the KeyIndex protocol ---------------------------------------------------------------------------

    def _search(self, queries: np.ndarray, k: int, config: dict[str, Any], out: SearchResult) -> None:
        g, m, _ = queries.shape
        c = self.candidate_count(k, config["candidates"])
        scratch, host = _scratch_for(self.device), _scratch_for(torch.device("cpu"))
        first = (scratch.take("cand_scores", (g, m, c), torch.float32), scratch.take("cand", (g, m, c), torch.int64))
        cand = self.candidates(torch.from_numpy(queries).to(self.device), c, first).cpu().numpy()
        work = (host.take("exact", (g, m, c), torch.float32).numpy(), host.take("best", (g, m, k), torch.int64).numpy())
        exact_top_k(self.rows(), cand, queries, k, out.ids, out.scores, work)
        out.scored[:] = c

    @property
    def device_nbytes(self) -> int:
        """Bytes of the codes and ranges on the layer's device (the CPU's memory when that is the CPU)."""
        if self._codes is None:
            return 0
        return self._codes.numel() + 2 * self._lo.numel() * 4

    def _own_nbytes(self) -> int:
        """Host bytes besides the source's rows and the codes (``device_nbytes``, on the layer's device even
        when that is the CPU): the host copy of the ranges and the pinned staging buffer."""
        host = 2 * self._host_ranges[0].numel() * 4 if self._host_ranges is not None else 0
        return host + (self._staging.numel() if self._staging is not None else 0)

    @classmethod
    def estimate_device_nbytes(cls, groups: int, n: int, dim: int, params: dict[str, Any], capacity: int) -> int:
        """Bytes one layer's codes and ranges hold on the device: codes for ``capacity`` rows (the store's)."""
        bits = cls.resolved_params(params)["bits"]
        return groups * capacity * cls.code_bytes(dim, bits) + 2 * groups * dim * 4

    @classmethod
    def estimate_shared_device_nbytes(cls, groups: int, n: int, dim: int, params: dict[str, Any],
                                      queries: int = 1) -> int:
        """Bytes of the first stage's buffers on the device, shared by every layer a thread searches: the
        unpacked levels (fp32), one plane of codes, the approximate scores, each with its growth slack,
        and the scaled query and its bias."""
        bits = cls.resolved_params(params)["bits"]
        levels = grown_capacity(groups * n * dim) * 4
        plane = grown_capacity(groups * n * dim * bits // 8)
        scores = grown_capacity(groups * queries * n) * 4
        small = (grown_capacity(groups * queries * dim) + grown_capacity(groups * queries)) * 4
        return levels + plane + scores + small

    @classmethod
    def estimate_nbytes(cls, groups: int, n: int, dim: int, params: dict[str, Any], queries: int = 1,
                        k: int = 100, added: int = 0) -> int:
        """Host bytes besides the rows: the ranges on the host (the codes are counted on the device side)."""
        return 2 * groups * dim * 4

    @classmethod
    def estimate_build_nbytes(cls, groups: int, n: int, dim: int, params: dict[str, Any], train: int = 0) -> int:
        """The build's fp32 temporaries: a chunk of rows widened, its level units and codes."""
        rows = min(n, _ENCODE_ROWS)
        return groups * rows * dim * (4 + 4 + 1)
