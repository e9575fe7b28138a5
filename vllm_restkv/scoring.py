"""Shared math of the eviction policies: window attention, EMA, the ReST-KV score, pooling, GQA aggregation.

Shapes: H query heads, H_kv KV heads (query head h reads KV head h // (H / H_kv)), d head size, D hidden size,
L cached tokens, w observation-window queries (the newest w positions), P = L - w prefix tokens.
Everything is computed in float32, or float64 when the inputs are float64 (the reference precision of the tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[H_kv, L, d] -> [H, L, d] (repeat each KV head for the query heads of its group)."""
    group = num_heads // x.shape[0]
    return x.repeat_interleave(group, dim=0) if group > 1 else x


def window_attention(query: torch.Tensor, key: torch.Tensor, query_positions: torch.Tensor | None = None,
                     key_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of the window queries over all cached keys: [H, w, L].

    Causal: a key whose (logical) position is after the query's is masked. Without positions, the queries are the
    last w of L contiguous tokens.
    """
    dtype = compute_dtype(query, key)
    h, w, d = query.shape
    h_kv, L, _ = key.shape
    group = h // h_kv
    # Grouped einsum: the query heads of a group share their KV head without copying it.
    q = query.to(dtype).view(h_kv, group, w, d)
    logits = torch.einsum("kgwd,kld->kgwl", q, key.to(dtype)) / math.sqrt(d)
    if query_positions is None:
        query_positions = torch.arange(L - w, L, device=query.device)
    if key_positions is None:
        key_positions = torch.arange(L, device=query.device).expand(h_kv, L)
    mask = key_positions[:, None, None, :] > query_positions[None, None, :, None]
    logits = logits.masked_fill(mask, float("-inf"))
    return torch.softmax(logits, dim=-1).view(h, w, L)


def ema_weights(w: int, alpha: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Closed form of E <- x_0; E <- a x_t + (1 - a) E: oldest (1-a)^(w-1), query t >= 1 gets a (1-a)^(w-1-t)."""
    t = torch.arange(w, dtype=dtype)
    weights = alpha * (1 - alpha) ** (w - 1 - t)
    weights[0] = (1 - alpha) ** (w - 1)
    return weights


def ema(x: torch.Tensor, alpha: float, dim: int) -> torch.Tensor:
    """EMA over `dim` (oldest first), via the closed-form weights."""
    weights = ema_weights(x.shape[dim], alpha, x.dtype).to(x.device)
    shape = [1] * x.dim()
    shape[dim] = -1
    return (x * weights.view(shape)).sum(dim)


def wo_factors(o_proj_weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """R_h [H, d, d] (upper triangular) with ||W_o^h x|| = ||R_h x|| for every x; computed once per layer.

    W_o^h is the D x d column block of o_proj for head h; QR gives W_o^h = Q R with orthonormal Q.
    """
    dtype = compute_dtype(o_proj_weight)
    w = o_proj_weight.to(dtype)
    d = w.shape[1] // num_heads
    blocks = w.view(w.shape[0], num_heads, d).permute(1, 0, 2)  # [H, D, d]
    return torch.linalg.qr(blocks, mode="r").R


def _odds(a: torch.Tensor) -> torch.Tensor:
    eps = 1e-15 if a.dtype == torch.float64 else 1e-6
    a = a.clamp(max=1 - eps)
    return a / (1 - a)


def _projected_norm(diff: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """||R_h diff|| for diff [H, N, d] and factor [H, d, d] -> [H, N]."""
    return torch.einsum("hij,hnj->hni", factor.to(diff.dtype), diff).norm(dim=-1)


def restkv_scores_from_attention(attn: torch.Tensor, value: torch.Tensor, factor: torch.Tensor, prefix: int,
                                 alpha: float) -> torch.Tensor:
    """ReST-KV "after" mode from window attention [H, w, L]: [H, P] with P = prefix.

    a_bar = EMA over window queries of the prefix attention; o_bar = sum_j a_bar_j v_j over the prefix only (the
    window keys are left out, as in the official code); S_j = a_bar_j / (1 - a_bar_j) * ||W_o^h (o_bar - v_j)||.
    """
    h = attn.shape[0]
    v = expand_kv(value.to(attn.dtype), h)[:, :prefix]  # [H, P, d]
    a_bar = ema(attn[:, :, :prefix], alpha, dim=1)  # [H, P]
    o_bar = torch.einsum("hp,hpd->hd", a_bar, v)
    return _odds(a_bar) * _projected_norm(o_bar[:, None, :] - v, factor)


def restkv_scores(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, o_proj_weight: torch.Tensor, *,
                  window: int = 32, alpha: float = 0.3) -> torch.Tensor:
    """Raw (pre-smoothing) ReST-KV scores, paper default "after" mode.

    query [H, w, d] post-RoPE window queries (w = window), key/value [H_kv, L, d] post-RoPE, all L tokens incl. the
    window, o_proj_weight [D, H*d]. Returns [H, L - w]: one score per query head and prefix token.
    """
    if query.shape[1] != window:
        raise ValueError(f"query has {query.shape[1]} window rows, expected window={window}")
    dtype = compute_dtype(query, key, value, o_proj_weight)
    attn = window_attention(query.to(dtype), key.to(dtype))
    factor = wo_factors(o_proj_weight.to(dtype), query.shape[0])
    return restkv_scores_from_attention(attn, value.to(dtype), factor, key.shape[1] - window, alpha)


def restkv_scores_before(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, o_proj_weight: torch.Tensor,
                         *, window: int = 32, alpha: float = 0.3) -> torch.Tensor:
    """ReST-KV "before" mode: exact leave-one-out per window query (true output over all L keys), then EMA. [H, P]."""
    dtype = compute_dtype(query, key, value, o_proj_weight)
    h = query.shape[0]
    attn = window_attention(query.to(dtype), key.to(dtype))  # [H, w, L]
    v = expand_kv(value.to(dtype), h)  # [H, L, d]
    factor = wo_factors(o_proj_weight.to(dtype), h)
    prefix = key.shape[1] - window
    out = torch.einsum("hwl,hld->hwd", attn, v)  # true outputs
    diff = out[:, :, None, :] - v[:, None, :prefix, :]  # [H, w, P, d]
    norms = torch.einsum("hij,hwpj->hwpi", factor, diff).norm(dim=-1)
    delta = _odds(attn[:, :, :prefix]) * norms  # [H, w, P]
    return ema(delta, alpha, dim=1)


def drift_score(attn: torch.Tensor, n: int) -> torch.Tensor:
    """AWS drift s_h [H]: mean over i < w/2 and rank of (top-n positions of query i) - (those of query i + w/2),
    each list in ascending order of attention."""
    h, w, L = attn.shape
    n = min(n, L)
    half = w // 2
    if half == 0 or n == 0:
        return torch.zeros(h, dtype=attn.dtype, device=attn.device)
    # top n per query, listed in ascending order of attention (topk is far cheaper than a full sort over L)
    early = attn[:, :half].topk(n, dim=-1).indices.flip(-1)
    late = attn[:, half : 2 * half].topk(n, dim=-1).indices.flip(-1)
    diff = early.to(attn.dtype) - late.to(attn.dtype)
    return diff.mean(dim=(1, 2))


def aws_kernel_and_shift(s: torch.Tensor, beta: float, k_min: int) -> tuple[list[int], list[int]]:
    ks, ms = [], []
    for value in s.tolist():
        ks.append(max(k_min, 2 * math.floor(abs(value) / beta) + 1))
        ms.append(math.floor(value / beta) if value > 0 else math.floor(value / beta) + 1)
    return ks, ms


def adaptive_window_pool(scores: torch.Tensor, attn: torch.Tensor, budget_prefix: int, beta: float = 2000.0,
                         k_min: int = 5) -> torch.Tensor:
    """Adaptive window-based smoothing: per head a box filter of width k_h centred on j + m_h, replicate padding."""
    s = drift_score(attn, budget_prefix)
    ks, ms = aws_kernel_and_shift(s, beta, k_min)
    out = torch.empty_like(scores)
    for h, (k, m) in enumerate(zip(ks, ms)):
        row = scores[h][None, None]
        padded = F.pad(row, (k // 2 - m, k // 2 + m), mode="replicate")
        out[h] = F.avg_pool1d(padded, k, stride=1)[0, 0]
    return out


def avg_pool_zero_pad(scores: torch.Tensor, k: int = 5) -> torch.Tensor:
    """SnapKV/PyramidKV pooling: width k, stride 1, zero padding counted in the average."""
    return F.avg_pool1d(scores[:, None], k, stride=1, padding=k // 2, count_include_pad=True)[:, 0]


def gqa_aggregate(scores: torch.Tensor, num_kv_heads: int, mode: str = "mean") -> torch.Tensor:
    """[H, N] per query head -> [H_kv, N] per KV head.

    mean: normalise each head to sum 1 (score scales differ a lot between heads), then average the group;
    max: normalise, then take the max over the group; mean_raw: plain average.
    """
    h, n = scores.shape
    group = h // num_kv_heads
    if mode in ("mean", "max"):
        scores = scores / scores.sum(dim=1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    grouped = scores.view(num_kv_heads, group, n)
    if mode == "max":
        return grouped.max(dim=1).values
    if mode in ("mean", "mean_raw"):
        return grouped.mean(dim=1)
    raise ValueError(f"unknown GQA aggregation {mode!r}; allowed: mean, max, mean_raw")
