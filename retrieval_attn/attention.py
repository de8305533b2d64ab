"""The math of split attention: partial attention with its log-sum-exp, the exact merge of two partial
attentions, and a plain reference attention for tests.

Every function here works on torch tensors on any device. Shapes and ids are checked up front; NaN or
Inf in an input is caught in the (small) result; either raises ``ValueError`` naming the input. Partial results are always fp32 and the
log-sum-exp (``lse``) is natural-log: ``lse = log(sum_j exp(scale * q . k_j))``. An empty key set has
``lse = -inf`` and ``out = 0``; merging with it is the identity. Maxima are subtracted before every
``exp``, so logits of any finite magnitude neither overflow nor produce NaN.

This module knows nothing about caches, indexes or models.
"""

from __future__ import annotations

import torch

__all__ = ["merge_state", "partial_attention", "scored_attention", "reference_attention"]


def _refuse_non_finite(
    where: str, out: torch.Tensor, lse: torch.Tensor, finite_logits: torch.Tensor, **inputs: torch.Tensor
) -> None:
    """ValueError naming the inputs that hold NaN or Inf, if the logits or the result show any.

    ``finite_logits`` is a 0-d bool tensor: were the logits (q . k, before masking) all finite? NaN or
    Inf in q or k always reaches them; in v (or a merged output) it always reaches ``out`` (0 * inf is
    NaN). So one reduction over small tensors and one device sync guard every call; the inputs are
    only scanned to name the culprit. For ``lse_*`` inputs ``-inf`` (an empty key set) is valid.
    """
    if bool(finite_logits & torch.isfinite(out).all() & (lse < float("inf")).all()):  # NaN < inf is False
        return
    bad = [
        name for name, t in inputs.items()
        if not bool((t < float("inf")).all() if name.startswith("lse") else torch.isfinite(t).all())
    ]
    raise ValueError(f"{where}: {', '.join(bad) or 'an input'} contains NaN or Inf")


def merge_state(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor, validate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions over disjoint key sets into the attention over their union.

    Parameters
    ----------
    o_a, o_b : (..., head_dim)
        Normalised partial outputs.
    lse_a, lse_b : (...)
        Their natural-log log-sum-exp of scaled logits; ``-inf`` marks an empty key set.
    validate : refuse NaN/Inf (one device sync on a GPU); the engine, whose inputs were checked on
        entry, passes False on its decode path.

    Returns
    -------
    o : (..., head_dim), fp32
    lse : (...), fp32
    """
    if o_a.shape != o_b.shape or lse_a.shape != lse_b.shape or o_a.shape[:-1] != lse_a.shape:
        raise ValueError(
            f"merge_state: o_a {tuple(o_a.shape)}, o_b {tuple(o_b.shape)} must be equal and lse_a "
            f"{tuple(lse_a.shape)}, lse_b {tuple(lse_b.shape)} must equal o's shape without the last dimension"
        )
    lse_a, lse_b = lse_a.float(), lse_b.float()
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, 0.0)  # both empty: keep exp() finite
    w_a = torch.exp(lse_a - m)
    w_b = torch.exp(lse_b - m)
    total = w_a + w_b
    lse = m + torch.log(total)  # -inf when both sides are empty
    denom = torch.where(total > 0, total, 1.0)
    o = (w_a / denom).unsqueeze(-1) * o_a.float() + (w_b / denom).unsqueeze(-1) * o_b.float()
    if validate:
        _refuse_non_finite("merge_state", o, lse, torch.tensor(True), o_a=o_a, lse_a=lse_a, o_b=o_b, lse_b=lse_b)
    return o, lse


def _softmax_with_lse(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row softmax and natural-log lse of fp32 logits (..., T) that may hold -inf; empty rows give 0 and -inf."""
    if logits.shape[-1] == 0:
        return logits, torch.full(logits.shape[:-1], float("-inf"), dtype=logits.dtype, device=logits.device)
    m = logits.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    p = torch.exp(logits - m)
    s = p.sum(dim=-1, keepdim=True)
    lse = (m + torch.log(s)).squeeze(-1)
    p = p / torch.where(s > 0, s, 1.0)
    return p, lse


def partial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = False,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over one set of keys, with its lse, in fp32, on the tensors' device.

    Parameters
    ----------
    q : (batch, num_heads, q_len, head_dim)
    k, v : (batch, num_kv_heads, kv_len, head_dim); num_heads must be a multiple of num_kv_heads (GQA).
    scale : multiplier of q . k.
    causal : if True, query i sees key j iff j <= i + (kv_len - q_len) (queries are the last q_len positions).
    validate : refuse NaN/Inf (one device sync on a GPU); False for callers whose inputs are already
        checked (the engine's decode path).

    Returns
    -------
    out : (batch, num_heads, q_len, head_dim), fp32
    lse : (batch, num_heads, q_len), fp32; -inf where a query sees no key.
    """
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"partial_attention: q {tuple(q.shape)} must be (batch, heads, q_len, head_dim) and k {tuple(k.shape)}, "
            f"v {tuple(v.shape)} one shape (batch, kv_heads, kv_len, head_dim)"
        )
    b, hq, n, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d or hkv == 0 or hq % hkv:
        raise ValueError(
            f"partial_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head_dim, "
            "and q's heads must be a multiple of k's"
        )
    group = hq // hkv
    # qg: [B, Hkv, group * N, D], row r is query head (r // N) of the group at position r % N
    qg = q.float().reshape(b, hkv, group * n, d)
    logits = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # [B, Hkv, group*N, T]
    finite_logits = torch.isfinite(logits).all() if validate else None
    if causal:
        rows = torch.arange(n, device=q.device).repeat(group)  # position of each row within the queries
        cols = torch.arange(t, device=q.device)
        visible = cols[None, :] <= rows[:, None] + (t - n)
        logits = logits.masked_fill(~visible, float("-inf"))
    p, lse = _softmax_with_lse(logits)
    out = torch.matmul(p, v.float())  # [B, Hkv, group*N, D]
    if validate:
        _refuse_non_finite("partial_attention", out, lse, finite_logits, q=q, k=k, v=v)
    return out.reshape(b, hq, n, d), lse.reshape(b, hq, n)


def scored_attention(scores: torch.Tensor, values: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its own keys given their raw scores and their (already gathered) values.

    No value checks: callers pass checked data (the engine's decode path, whose inputs were checked on entry).

    Parameters
    ----------
    scores : (groups, m, k), raw inner products q . key.
    values : (groups, m, k, head_dim), the value of each of those keys.

    Returns
    -------
    out : (groups, m, head_dim) fp32
    lse : (groups, m) fp32; -inf when k == 0.
    """
    p, lse = _softmax_with_lse(scores.float() * scale)  # p: [G, m, k]
    out = torch.matmul(p.unsqueeze(-2), values.float()).squeeze(-2)  # [G, m, D]
    return out, lse


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = True
) -> torch.Tensor:
    """Plain softmax attention in float64 for tests: q (B, Hq, N, D), k/v (B, Hkv, T, D) -> (B, Hq, N, D)."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    logits = torch.matmul(q.double(), kk.transpose(-1, -2)) * scale
    if causal:
        n, t = q.shape[2], k.shape[2]
        visible = torch.arange(t)[None, :] <= torch.arange(n)[:, None] + (t - n)
        logits = logits.masked_fill(~visible.to(q.device), float("-inf"))
    return torch.matmul(torch.softmax(logits, dim=-1), vv)
