"""ReST-KV raw scores of one layer ("after" mode, the paper default) as three Triton kernels, with the torch
reference and a dispatcher sharing one signature:

    restkv_score(query [H, w, d], key [H_kv, L, d], value [H_kv, L, d], wo_factor [H, d, d], *, alpha) -> [H, L - w]

The output equals `vllm_restkv.scoring.restkv_scores(query, key, value, o_proj_weight, window=w, alpha=alpha)` with
wo_factor = scoring.wo_factors(o_proj_weight, H) (the engine caches the factor per layer). Tokens are contiguous:
the window queries are the last w of the L cached tokens, causal inside the window (the engine's physical order).

Why three kernels: the window attention needs each query row's softmax normaliser over all L keys before any
probability is final, and o_bar needs every a_bar before any score is final.
1. `_row_lse_kernel`, grid (H, splits): partial max and exp-sum of every window query row over a split of keys.
2. `_abar_kernel`, grid (H, splits): a_bar_j = sum_t ema_t exp(q_t.k_j / sqrt(d) - lse_t) for prefix keys, and
   the split's partial o_bar = sum_j a_bar_j v_j (summed by torch afterwards: deterministic, no atomics).
3. `_score_kernel`, grid (H, prefix tiles): a/(1-a) * ||R_h (o_bar - v_j)||.
All arithmetic is float32 with IEEE dot products (no TF32); float64 inputs take the torch path.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vllm_restkv import scoring

NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for the running max: no inf - inf in masked tiles
ODDS_CLAMP = tl.constexpr(1.0 - 1.0e-6)  # as scoring.odds in float32


def restkv_score_torch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, wo_factor: torch.Tensor, *,
                       alpha: float = 0.3) -> torch.Tensor:
    """Reference: [H, L - w] in float32 (float64 when any input is float64)."""
    dtype = scoring.compute_dtype(query, key, value, wo_factor)
    attn = scoring.window_attention(query.to(dtype), key.to(dtype))
    prefix = key.shape[1] - query.shape[1]
    return scoring.restkv_scores_from_attention(attn, value.to(dtype), wo_factor.to(dtype), prefix, alpha)


def restkv_score(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, wo_factor: torch.Tensor, *,
                 alpha: float = 0.3) -> torch.Tensor:
    """Triton on CUDA (float32 compute), the torch reference elsewhere and for float64 inputs."""
    if query.is_cuda and torch.float64 not in (query.dtype, key.dtype, value.dtype, wo_factor.dtype):
        return restkv_score_triton(query, key, value, wo_factor, alpha=alpha)
    return restkv_score_torch(query, key, value, wo_factor, alpha=alpha)


def restkv_score_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, wo_factor: torch.Tensor, *,
                        alpha: float = 0.3, block_l: int = 64, split: int = 1024) -> torch.Tensor:
    """The Triton path. `block_l` keys per tile, `split` keys per program of kernels 1-2 (a multiple of block_l);
    tests shrink both to cover several tiles and splits with tiny inputs."""
    h, w, d = query.shape
    h_kv, length, _ = key.shape
    prefix = length - w
    device = query.device
    if prefix <= 0:
        return torch.zeros(h, max(prefix, 0), dtype=torch.float32, device=device)
    split = max(block_l, split // block_l * block_l)
    n_split = triton.cdiv(length, split)
    block_w = max(16, triton.next_power_of_2(w))
    block_d = max(16, triton.next_power_of_2(d))
    # 8 warps for d = 128 keep the [BLOCK_D, BLOCK_D] factor tile and the key tile in registers
    meta = dict(BLOCK_W=block_w, BLOCK_L=block_l, BLOCK_D=block_d, num_warps=8 if block_d >= 128 else 4)
    ema = torch.zeros(block_w, dtype=torch.float32, device=device)
    ema[:w] = scoring.ema_weights(w, alpha, torch.float32, device)
    scale = 1.0 / math.sqrt(d)
    group = h // h_kv
    q_args = (query, query.stride(0), query.stride(1), query.stride(2))
    k_args = (key, key.stride(0), key.stride(1), key.stride(2))

    row_max = torch.empty(h, n_split, block_w, dtype=torch.float32, device=device)
    row_sum = torch.empty_like(row_max)
    _row_lse_kernel[(h, n_split)](*q_args, *k_args, row_max, row_sum, length, prefix, w, d, group, scale, split,
                                  **meta)
    lse = torch.logsumexp(row_max + row_sum.log(), dim=1).contiguous()  # [H, BLOCK_W]

    prefix_splits = triton.cdiv(prefix, split)
    a_bar = torch.empty(h, prefix, dtype=torch.float32, device=device)
    o_part = torch.empty(h, prefix_splits, block_d, dtype=torch.float32, device=device)
    _abar_kernel[(h, prefix_splits)](*q_args, *k_args, value, value.stride(0), value.stride(1), value.stride(2),
                                     lse, ema, a_bar, o_part, prefix, w, d, group, scale, split, **meta)
    o_bar = o_part.sum(dim=1).contiguous()  # [H, BLOCK_D]

    out = torch.empty(h, prefix, dtype=torch.float32, device=device)
    _score_kernel[(h, triton.cdiv(prefix, block_l))](
        value, value.stride(0), value.stride(1), value.stride(2), wo_factor, wo_factor.stride(0),
        wo_factor.stride(1), wo_factor.stride(2), a_bar, o_bar, out, prefix, d, group, **meta)
    return out


@triton.jit
def _load_query(q_ptr, s_qh, s_qt, s_qd, head, w, d, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.arange(0, BLOCK_W)
    i = tl.arange(0, BLOCK_D)
    ptrs = q_ptr + head * s_qh + t[:, None] * s_qt + i[None, :] * s_qd
    return tl.load(ptrs, mask=(t[:, None] < w) & (i[None, :] < d), other=0.0).to(tl.float32)


@triton.jit
def _load_rows(ptr, s_h, s_l, s_d, head, start, n, d, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows start..start+BLOCK_L of one KV head, [BLOCK_L, BLOCK_D] float32, zero outside [0, n) x [0, d)."""
    j = start + tl.arange(0, BLOCK_L)
    i = tl.arange(0, BLOCK_D)
    ptrs = ptr + head * s_h + j[:, None].to(tl.int64) * s_l + i[None, :] * s_d
    return tl.load(ptrs, mask=(j[:, None] < n) & (i[None, :] < d), other=0.0).to(tl.float32)


@triton.jit
def _row_lse_kernel(q_ptr, s_qh, s_qt, s_qd, k_ptr, s_kh, s_kl, s_kd, max_ptr, sum_ptr, length, prefix, w, d,
                    group, scale, split, BLOCK_W: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    head = tl.program_id(0)
    part = tl.program_id(1)
    q = _load_query(q_ptr, s_qh, s_qt, s_qd, head, w, d, BLOCK_W, BLOCK_D)
    t = tl.arange(0, BLOCK_W)
    m = tl.full((BLOCK_W,), NEG_BIG, tl.float32)
    s = tl.zeros((BLOCK_W,), tl.float32)
    for start in range(part * split, part * split + split, BLOCK_L):
        k = _load_rows(k_ptr, s_kh, s_kl, s_kd, head // group, start, length, d, BLOCK_L, BLOCK_D)
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        j = start + tl.arange(0, BLOCK_L)
        # prefix keys are visible to every window query; window key prefix + u only to queries t >= u
        visible = (j[None, :] < length) & ((j[None, :] < prefix) | (j[None, :] - prefix <= t[:, None]))
        logits = tl.where(visible, logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m = m_new
    out = (head * tl.num_programs(1) + part) * BLOCK_W + t
    tl.store(max_ptr + out, m)
    tl.store(sum_ptr + out, s)


@triton.jit
def _abar_kernel(q_ptr, s_qh, s_qt, s_qd, k_ptr, s_kh, s_kl, s_kd, v_ptr, s_vh, s_vl, s_vd, lse_ptr, ema_ptr,
                 abar_ptr, opart_ptr, prefix, w, d, group, scale, split, BLOCK_W: tl.constexpr,
                 BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    head = tl.program_id(0)
    part = tl.program_id(1)
    q = _load_query(q_ptr, s_qh, s_qt, s_qd, head, w, d, BLOCK_W, BLOCK_D)
    t = tl.arange(0, BLOCK_W)
    lse = tl.load(lse_ptr + head * BLOCK_W + t)
    ema = tl.load(ema_ptr + t)  # zero on padding rows
    o = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(part * split, part * split + split, BLOCK_L):
        k = _load_rows(k_ptr, s_kh, s_kl, s_kd, head // group, start, prefix, d, BLOCK_L, BLOCK_D)
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        j = start + tl.arange(0, BLOCK_L)
        a = tl.sum(ema[:, None] * tl.exp(logits - lse[:, None]), axis=0)
        a = tl.where(j < prefix, a, 0.0)
        tl.store(abar_ptr + head * prefix + j, a, mask=j < prefix)
        v = _load_rows(v_ptr, s_vh, s_vl, s_vd, head // group, start, prefix, d, BLOCK_L, BLOCK_D)
        o += tl.sum(a[:, None] * v, axis=0)
    i = tl.arange(0, BLOCK_D)
    tl.store(opart_ptr + (head * tl.num_programs(1) + part) * BLOCK_D + i, o)


@triton.jit
def _score_kernel(v_ptr, s_vh, s_vl, s_vd, r_ptr, s_rh, s_ri, s_rk, abar_ptr, obar_ptr, out_ptr, prefix, d, group,
                  BLOCK_W: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    head = tl.program_id(0)
    start = tl.program_id(1) * BLOCK_L
    j = start + tl.arange(0, BLOCK_L)
    i = tl.arange(0, BLOCK_D)
    o = tl.load(obar_ptr + head * BLOCK_D + i)  # zero beyond d
    v = _load_rows(v_ptr, s_vh, s_vl, s_vd, head // group, start, prefix, d, BLOCK_L, BLOCK_D)
    r = tl.load(r_ptr + head * s_rh + i[:, None] * s_ri + i[None, :] * s_rk,
                mask=(i[:, None] < d) & (i[None, :] < d), other=0.0).to(tl.float32)
    y = tl.dot(o[None, :] - v, tl.trans(r), input_precision="ieee")  # rows R_h (o_bar - v_j)
    norm = tl.sqrt(tl.sum(y * y, axis=1))
    a = tl.minimum(tl.load(abar_ptr + head * prefix + j, mask=j < prefix, other=0.0), ODDS_CLAMP)
    tl.store(out_ptr + head * prefix + j, a / (1.0 - a) * norm, mask=j < prefix)
