"""Shared math of the eviction policies: window attention, EMA, the ReST-KV score, pooling, GQA aggregation.

Shapes: H query heads, H_kv KV heads (query head h reads KV head h // (H / H_kv)), d head size, D hidden size,
L cached tokens, w observation-window queries (the newest w positions), P = L - w prefix tokens.
Everything is computed in float32 whatever the input dtype (the official code's bf16 odds ratio has about three
significant digits), or in float64 when any input is float64 (the reference precision of the tests). One exception,
by choice: ReST-KV's W_o projection may run its matmul in bfloat16 (`projection_dtype`, see `projection_matmul_dtype`).
Formulas and oracles: shared/docs/restkv-algorithm.md, sections 2-4 and 10.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
import torch.nn.functional as F

GQA_MODES = ("mean", "max", "mean_raw", "layer")
PROJECTION_DTYPES = ("auto", "float32", "bfloat16")
DISTANCE_CHUNK = 2048  # prefix tokens projected at once in "after" mode (a buffer of chunk * H * d floats) ...
SCRATCH_ELEMENTS = 1 << 22  # ... at most this many floats per buffer (16 MiB in fp32; wide models take shorter chunks)
BEFORE_CHUNK = 4096  # prefix keys projected at once in "before" mode (memory H * w * chunk * d)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[H_kv, L, d] -> [H, L, d]: each KV head repeated for the query heads of its group."""
    group = num_heads // x.shape[0]
    return x.repeat_interleave(group, dim=0) if group > 1 else x


# The policies' window attention goes through two reused buffers (`reuse=True`) up to this many elements each: at
# 2.5k-9k tokens fresh ones cost the select up to 2.5x in page faults (docs/benchmarks.md, 2026-12-05).
ATTENTION_SCRATCH_ELEMENTS = 1 << 23


def window_attention(query: torch.Tensor, key: torch.Tensor, *, causal_window: bool = True,
                     query_positions: torch.Tensor | None = None,
                     key_positions: torch.Tensor | None = None, reuse: bool = False) -> torch.Tensor:
    """Softmax attention of the w window queries over all L cached keys, [H, w, L], scale 1/sqrt(d).

    With `causal_window`, key j is masked for query t when j comes after t. Without positions the queries are the
    last w of L contiguous tokens (mask inside the window only); with positions (`query_positions` [w],
    `key_positions` [H_kv, L], logical and possibly non-contiguous after earlier evictions) the mask compares them.
    `reuse`: the result lives in this thread's scratch buffers (CPU, up to ATTENTION_SCRATCH_ELEMENTS), valid until
    the next such call; for a policy's select, which drops it before returning.
    """
    dtype = compute_dtype(query, key)
    h, w, d = query.shape
    h_kv, length, _ = key.shape
    # One batched matmul per KV head: the query heads of a group share their KV head without copying it.
    q = query.to(dtype).reshape(h_kv, (h // h_kv) * w, d) / math.sqrt(d)
    shape = (h_kv, (h // h_kv) * w, length)
    reuse = reuse and key.device.type == "cpu" and math.prod(shape) <= ATTENTION_SCRATCH_ELEMENTS
    logits = torch.bmm(q, key.to(dtype).transpose(1, 2), out=scratch(2, shape, key, dtype) if reuse else None)
    logits = logits.view(h_kv, h // h_kv, w, length)
    if causal_window:
        # Only keys newer than the oldest query can be masked. In a logical view (positions ascending, the
        # policies' case) they are among the last w columns, so the mask covers those instead of all L.
        tail = min(w, length)
        if query_positions is None:
            query_positions = torch.arange(length - w, length, device=key.device)
        if key_positions is None:
            key_positions = torch.arange(length - tail, length, device=key.device).expand(h_kv, tail)
        elif length > tail and bool((key_positions[:, : length - tail] <= query_positions.min()).all()):
            key_positions = key_positions[:, length - tail:]
        else:
            tail = length
        logits[..., length - tail:].masked_fill_(
            key_positions[:, None, None, :] > query_positions[None, None, :, None], float("-inf"))
    if reuse:
        out = scratch(3, logits.shape, key, dtype)
        return torch.ops.aten._softmax.out(logits, -1, False, out=out).view(h, w, length)
    return torch.softmax(logits, dim=-1).view(h, w, length)


def ema_weights(w: int, alpha: float, dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Closed form of E <- x_0; E <- alpha x_t + (1 - alpha) E over w values (oldest first):
    the oldest gets (1-alpha)^(w-1), value t >= 1 gets alpha (1-alpha)^(w-1-t); they sum to 1."""
    t = torch.arange(w, dtype=dtype, device=device)
    weights = alpha * (1 - alpha) ** (w - 1 - t)
    weights[0] = (1 - alpha) ** (w - 1)
    return weights


def ema(x: torch.Tensor, alpha: float, dim: int) -> torch.Tensor:
    """EMA over `dim` (oldest first), via the closed-form weights."""
    weights = ema_weights(x.shape[dim], alpha, x.dtype, x.device)
    shape = [1] * x.dim()
    shape[dim] = -1
    return (x * weights.view(shape)).sum(dim)


def wo_factors(o_proj_weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """R_h [H, d, d], upper triangular, with ||W_o^h x|| = ||R_h x|| for every x; computed once per layer.

    W_o^h is the D x d column block of o_proj for head h; QR gives W_o^h = Q_h R_h with orthonormal Q_h, so the
    projected norm costs d^2 instead of D d per token (oracle O5).
    """
    dtype = compute_dtype(o_proj_weight)
    weight = o_proj_weight.to(dtype)
    d = weight.shape[1] // num_heads
    blocks = weight.reshape(weight.shape[0], num_heads, d).permute(1, 0, 2)  # [H, D, d]
    return torch.linalg.qr(blocks, mode="r").R


def odds(a: torch.Tensor) -> torch.Tensor:
    """a / (1 - a), the attention-redistribution factor; a is clamped below 1 so a sink with a = 1 stays finite."""
    eps = 1e-15 if a.dtype == torch.float64 else 1e-6
    a = a.clamp(max=1 - eps)
    return a / (1 - a)


# Below this many projected rows (query heads x tokens) a CPU bf16 matmul loses to fp32 when oneDNN's global
# primitive cache is off (the plugin's default on CPU, see plugin.py): each bf16 bmm then builds its oneDNN primitive
# anew (~0.1-0.2 ms). Measured crossover at 4 heads: between 768 and 1,536 tokens (docs/benchmarks.md).
BF16_MIN_ROWS_WITHOUT_PRIMITIVE_CACHE = 4096


def projection_matmul_dtype(setting: str, like: torch.Tensor, rows: int | None = None) -> torch.dtype:
    """The dtype of the W_o projection's matmul when scores are computed in like.dtype on like.device, for `rows`
    projected vectors (query heads x tokens; None: many).

    float64 stays float64 (the tests' reference). "auto" is bfloat16 where bf16 matmuls are native (a CUDA device
    with bf16, a CPU with AVX512-BF16 or AMX), else float32. On such a CPU the matmul ran 4-6x faster in bf16 and
    the whole projection step (difference and norm stay fp32; products accumulate in fp32) about 2x at 4k-16k
    tokens; a score moves by bf16 rounding (~0.4%), and the engine's fidelity to the full cache did not measurably
    change (docs/benchmarks.md, "ReST-KV's projection in bfloat16"). Except on a CPU whose oneDNN primitive cache
    is off, for fewer than BF16_MIN_ROWS_WITHOUT_PRIMITIVE_CACHE rows: building the bf16 primitive costs more there
    than bf16 saves.
    """
    if setting not in PROJECTION_DTYPES:
        raise ValueError(f"unknown projection_dtype {setting!r}; allowed: {', '.join(PROJECTION_DTYPES)}")
    if like.dtype == torch.float64 or setting == "float32":
        return like.dtype
    if setting == "bfloat16":
        return torch.bfloat16
    if like.device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else like.dtype
    if like.device.type == "cpu":
        from vllm_restkv.cpu import native_bf16, onednn_primitive_cache_off

        if rows is not None and rows < BF16_MIN_ROWS_WITHOUT_PRIMITIVE_CACHE and onednn_primitive_cache_off():
            return like.dtype
        return torch.bfloat16 if native_bf16() else like.dtype
    return like.dtype


def projected_norm(diff: torch.Tensor, factor: torch.Tensor, matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """||R_h x|| for x = diff[h, ..., :] ([H, ..., d]) and factor [H, d, d] -> [H, ...] in diff's dtype; the
    product in `matmul_dtype` (default: diff's)."""
    h, d = diff.shape[0], diff.shape[-1]
    mm = matmul_dtype or diff.dtype
    flat = diff.reshape(h, -1, d).to(mm)
    projected = torch.einsum("hij,hnj->hni", factor.to(mm), flat)
    return torch.linalg.vector_norm(projected, dim=-1, dtype=diff.dtype).reshape(diff.shape[:-1])


_SCRATCH = threading.local()


def scratch(slot: int, shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised [shape] buffer of `dtype` (default like's) on like's device, reused across calls on the CPU
    (per thread, slot and dtype): glibc hands large blocks back to the kernel on free, so a fresh one costs a page
    fault per 4 KiB (~0.25 ms per eviction at the engine's sizes, more than the arithmetic it holds). Elsewhere a
    fresh tensor (CUDA's caching allocator already reuses)."""
    dtype = dtype or like.dtype
    if like.device.type != "cpu":
        return like.new_empty(shape, dtype=dtype)
    numel = math.prod(shape)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buffer = buffers.get((slot, dtype))
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[(slot, dtype)] = like.new_empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


def projected_distance(value: torch.Tensor, center: torch.Tensor, factor: torch.Tensor,
                       chunk: int = DISTANCE_CHUNK, matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """||R_h (center_h - v_j)|| for every query head h and token j: value [H_kv, P, d] (not expanded), center
    [H, d], factor [H, d, d] -> [H, P] in value's dtype; the product in `matmul_dtype` (default: value's).

    The difference comes first and in value's dtype, as in the official code and the Triton kernel (projecting
    first would cancel badly for a sink with a_bar ~ 1, whose o_bar ~ v_j); only the difference is rounded to the
    matmul dtype. Tokens go in chunks through reused buffers: fresh [H, P, d] tensors cost more in page faults than
    the products themselves.
    """
    h_kv, length, d = value.shape
    h = center.shape[0]
    group = h // h_kv
    mm = matmul_dtype or value.dtype
    factor_t = factor.to(mm).transpose(1, 2)  # x @ R^T = (R x)^T
    center = center.to(value.dtype).view(h_kv, group, 1, d)
    out = value.new_empty(h, length)
    chunk = min(chunk, max(1, SCRATCH_ELEMENTS // (h * d)))
    size = min(chunk, length)
    diff_buffer, projected_buffer = scratch(0, (h, size, d), value, mm), scratch(1, (h, size, d), value, mm)
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        diff, projected = diff_buffer[:, : stop - start], projected_buffer[:, : stop - start]
        torch.sub(center, value[:, None, start:stop], out=diff.view(h_kv, group, stop - start, d))
        torch.bmm(diff, factor_t, out=projected)
        torch.linalg.vector_norm(projected, dim=-1, dtype=value.dtype, out=out[:, start:stop])
    return out


# The expanded distance ||R(o - v)||^2 = ||R o||^2 - 2 (R^T R o).v + ||R v||^2 loses digits where it cancels, i.e.
# where it is small against its terms ||R o||^2 + ||R v||^2; below this fraction of them (by the precision ||R v||^2
# was computed in) the distance is computed directly. Rounding of the terms is ~1e-16 / 1e-6 / 4e-3 of their size,
# so the expanded distances that are kept are within ~1e-12 / 3e-5 / 1e-2 (relative) of the direct ones. On real
# attention (SmolLM2-135M and the tiny model, 2,048 tokens) the fp32 guard sends 0.01-0.04% of the tokens to the direct
# form, the bf16 one 0.4-23%: hence fp32 norms unless bf16 is asked for (policies/restkv.py).
EXPANSION_GUARD = {torch.float64: 1e-4, torch.float32: 0.05, torch.bfloat16: 0.2}


def projected_sq_norms(value: torch.Tensor, factor: torch.Tensor, matmul_dtype: torch.dtype | None = None
                       ) -> torch.Tensor:
    """||R_h v_j||^2 for every query head h and token j: value [H_kv, L, d], factor [H, d, d] -> [H, L] in value's
    dtype; the product in `matmul_dtype`. The part of ReST-KV's distance that depends on the token alone."""
    center = value.new_zeros(factor.shape[0], value.shape[-1])
    return projected_distance(value, center, factor, matmul_dtype=matmul_dtype).square()


def projected_distance_expanded(value: torch.Tensor, center: torch.Tensor, factor: torch.Tensor,
                                value_sq_norms: torch.Tensor, guard: float) -> torch.Tensor:
    """projected_distance (||R_h (center_h - v_j)||, [H, P]) from the tokens' ||R_h v_j||^2 (`value_sq_norms`
    [H, P], e.g. carried from an earlier eviction): ||R o||^2 - 2 (R^T R o).v_j + ||R v_j||^2 costs d per token
    instead of d^2. Where that is below `guard` x (||R o||^2 + ||R v_j||^2) the difference is projected directly
    (a sink with a_bar ~ 1 has o_bar ~ v_j, the case the direct form exists for)."""
    h_kv, length, d = value.shape
    h = center.shape[0]
    group = h // h_kv
    factor = factor.to(value.dtype)
    projected_center = torch.bmm(factor, center.to(value.dtype)[:, :, None])  # R o [H, d, 1]
    center_sq = projected_center.square().sum(dim=1)  # [H, 1]
    pulled_back = torch.bmm(factor.transpose(1, 2), projected_center)  # R^T R o [H, d, 1]
    cross = torch.bmm(pulled_back.view(h_kv, group, d), value.transpose(1, 2)).view(h, length)  # [H, P]
    terms = center_sq + value_sq_norms.to(value.dtype)
    sq = terms - 2 * cross
    close = sq < guard * terms
    out = sq.clamp_min_(0).sqrt_()
    counts = close.sum(dim=1)
    most = int(counts.max()) if length else 0
    if most == 0:
        return out
    if most > length // 4:  # mostly cancelling (e.g. near-identical values): the direct form costs no more
        return projected_distance(value, center, factor)
    # the close tokens of each head, padded to the same count, projected directly in one batched matmul
    heads, tokens = close.nonzero(as_tuple=True)  # sorted by head
    slot = torch.arange(heads.numel(), device=heads.device) - (counts.cumsum(0) - counts)[heads]
    diff = value.new_zeros(h, most, d)
    diff[heads, slot] = center.to(value.dtype)[heads] - value[heads // group, tokens]
    projected = torch.bmm(diff, factor.transpose(1, 2))
    out[heads, tokens] = torch.linalg.vector_norm(projected[heads, slot], dim=-1)
    return out


def restkv_scores_from_attention(attn: torch.Tensor, value: torch.Tensor, factor: torch.Tensor, prefix: int,
                                 alpha: float, matmul_dtype: torch.dtype | None = None,
                                 value_sq_norms: torch.Tensor | None = None,
                                 norms_dtype: torch.dtype | None = None) -> torch.Tensor:
    """ReST-KV "after" mode from the window attention [H, w, L]: [H, P] with P = `prefix`.

    a_bar = EMA over the window queries of the prefix attention; o_bar = sum_j a_bar_j v_j over the prefix only (the
    window keys are left out, as in the official code); S_j = a_bar_j / (1 - a_bar_j) * ||W_o^h (o_bar - v_j)||,
    the exact leave-one-out error of a virtual query with attention a_bar (oracle O2). `matmul_dtype`: that of the
    W_o projection (default: attn's). With `value_sq_norms` ([H, >= P]: ||R_h v_j||^2, computed in `norms_dtype`)
    the distance is expanded around them (projected_distance_expanded) instead of projected token by token.
    """
    h, w, _ = attn.shape
    h_kv = value.shape[0]
    v = value.to(attn.dtype)[:, :prefix]  # [H_kv, P, d], shared by the query heads of a group
    weights = ema_weights(w, alpha, attn.dtype, attn.device)
    a_bar = torch.matmul(weights, attn[:, :, :prefix])  # [H, P]
    o_bar = torch.bmm(a_bar.view(h_kv, h // h_kv, prefix), v).view(h, -1)  # [H, d]
    if value_sq_norms is None:
        return odds(a_bar) * projected_distance(v, o_bar, factor, matmul_dtype=matmul_dtype)
    guard = EXPANSION_GUARD[norms_dtype or attn.dtype]
    return odds(a_bar) * projected_distance_expanded(v, o_bar, factor, value_sq_norms[:, :prefix], guard)


def restkv_scores_before_from_attention(attn: torch.Tensor, value: torch.Tensor, factor: torch.Tensor,
                                        prefix: int, alpha: float,
                                        matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """ReST-KV "before" mode: the exact leave-one-out error of every window query (true output over all L keys),
    then the EMA over the queries (oracle O1). [H, P]; projected in chunks of prefix keys to bound memory."""
    h = attn.shape[0]
    v = expand_kv(value.to(attn.dtype), h)  # [H, L, d]
    out = torch.einsum("hwl,hld->hwd", attn, v)  # [H, w, d] true outputs
    weights = ema_weights(attn.shape[1], alpha, attn.dtype, attn.device)
    scores = []
    for start in range(0, prefix, BEFORE_CHUNK):
        stop = min(start + BEFORE_CHUNK, prefix)
        diff = out[:, :, None, :] - v[:, None, start:stop, :]  # [H, w, chunk, d]
        delta = odds(attn[:, :, start:stop]) * projected_norm(diff, factor, matmul_dtype)  # [H, w, chunk]
        scores.append(torch.einsum("w,hwp->hp", weights, delta))
    return torch.cat(scores, dim=1) if scores else attn.new_zeros(h, 0)


def _scores_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, o_proj_weight: torch.Tensor,
                   window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(window attention, value, R factors, P) in the compute dtype, for contiguous tokens."""
    if query.shape[1] != window:
        raise ValueError(f"query has {query.shape[1]} window rows, expected window={window}")
    dtype = compute_dtype(query, key, value, o_proj_weight)
    attn = window_attention(query.to(dtype), key.to(dtype))
    factor = wo_factors(o_proj_weight.to(dtype), query.shape[0])
    return attn, value.to(dtype), factor, key.shape[1] - window


def restkv_scores(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, o_proj_weight: torch.Tensor, *,
                  window: int = 32, alpha: float = 0.3) -> torch.Tensor:
    """Raw (pre-smoothing) ReST-KV scores, paper default "after" mode.

    query [H, w, d] post-RoPE window queries (w = window), key/value [H_kv, L, d] post-RoPE, all L contiguous tokens
    including the window, o_proj_weight [D, H*d]. Returns [H, L - w]: one score per query head and prefix token.
    """
    attn, value, factor, prefix = _scores_inputs(query, key, value, o_proj_weight, window)
    return restkv_scores_from_attention(attn, value, factor, prefix, alpha)


def restkv_scores_before(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, o_proj_weight: torch.Tensor,
                         *, window: int = 32, alpha: float = 0.3) -> torch.Tensor:
    """Raw ReST-KV scores, "before" mode (per-query exact leave-one-out, then EMA); same contract as restkv_scores."""
    attn, value, factor, prefix = _scores_inputs(query, key, value, o_proj_weight, window)
    return restkv_scores_before_from_attention(attn, value, factor, prefix, alpha)


def drift_score(attn: torch.Tensor, n: int) -> torch.Tensor:
    """AWS drift s_h [H]: mean over i < w/2 and rank r of (position of the r-th top key of query i) minus (that of
    query i + w/2), the n top keys of each query listed in ascending order of attention.

    A mean over ranks of a difference is the difference of the mean positions of the two top-n sets, so the order
    inside each set does not matter: an unsorted top-n suffices, and integer sums keep positions beyond 2^24 exact.
    """
    h, w, length = attn.shape
    n = min(n, length)
    half = w // 2
    if half == 0 or n <= 0:
        return torch.zeros(h, dtype=attn.dtype, device=attn.device)
    sums = top_n_index_sums(attn[:, : 2 * half], n).view(h, 2, half).sum(dim=2)  # [H, (early, late)]
    return (sums[:, 0] - sums[:, 1]).to(attn.dtype) / (half * n)


def windowed_drift(query: torch.Tensor, key: torch.Tensor, n: int, *, query_positions: torch.Tensor | None = None,
                   key_positions: torch.Tensor | None = None) -> torch.Tensor:
    """drift_score(window_attention(query, key, ...), n) computed one KV head (and its query heads) at a time: the
    same [H] drift without [H, w, L] in memory at once (for the GPU path, whose scores come from the Triton kernel:
    at 128k tokens with 32 query heads that is 512 MiB of fp32 probabilities, here 1/H_kv of it)."""
    h_kv = key.shape[0]
    group = query.shape[0] // h_kv
    parts = []
    for g in range(h_kv):
        attn = window_attention(query[g * group:(g + 1) * group], key[g:g + 1], query_positions=query_positions,
                                key_positions=None if key_positions is None else key_positions[g:g + 1])
        parts.append(drift_score(attn, n))
    return torch.cat(parts)


# Exact selection on the CPU. torch's topk copies (value, index) pairs and runs one row per thread; numpy's
# introselect on the values is 2-4x faster at every size the engine and the benchmarks use (64 rows of 768 to
# 144 rows of 32k), and releases the GIL, so big inputs go to a small pool in row blocks.
_SELECT_POOL = None
_PARALLEL_MIN_ELEMENTS = 1 << 20


def _numpy_rows(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.shape[-1] > 0


def _map_row_blocks(fn, rows):
    """fn over row blocks of a 2-D numpy array, on up to torch.get_num_threads() threads when it is large."""
    global _SELECT_POOL
    threads = min(torch.get_num_threads(), rows.shape[0])
    if threads < 2 or rows.size < _PARALLEL_MIN_ELEMENTS:
        return fn(rows)
    if _SELECT_POOL is None or _SELECT_POOL._max_workers < threads:
        from concurrent.futures import ThreadPoolExecutor

        _SELECT_POOL = ThreadPoolExecutor(threads, thread_name_prefix="restkv-select")
    blocks = np.array_split(rows, threads)
    return np.concatenate(list(_SELECT_POOL.map(fn, blocks)))


def top_n_index_sums(x: torch.Tensor, n: int) -> torch.Tensor:
    """[..., L] -> [...] int64: the sum of the column indices of the n largest entries of each row (ties: any of
    the tied columns, as with topk)."""
    length = x.shape[-1]
    if n >= length:
        return torch.full(x.shape[:-1], length * (length - 1) // 2, dtype=torch.long, device=x.device)
    if not _numpy_rows(x):
        return x.topk(n, dim=-1, sorted=False).indices.sum(dim=-1)
    rows = x.detach().reshape(-1, length).numpy()
    sums = _map_row_blocks(lambda a: np.argpartition(a, length - n, axis=1)[:, length - n:].sum(axis=1), rows)
    return torch.from_numpy(np.ascontiguousarray(sums, dtype=np.int64)).reshape(x.shape[:-1])


def kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """[R, L] -> [R, 1]: the k-th largest entry of each row (1 <= k <= L); NaN-free input."""
    length = x.shape[-1]
    if not _numpy_rows(x):
        return x.topk(k, dim=-1, sorted=False).values.min(dim=-1, keepdim=True).values
    rows = x.detach().numpy()
    kth = _map_row_blocks(lambda a: np.partition(a, length - k, axis=1)[:, length - k], rows)
    return torch.from_numpy(np.ascontiguousarray(kth)).to(x.dtype).view(-1, 1)


def aws_kernel_and_shift(s: torch.Tensor, beta: float, k_min: int, official_zero_shift: bool = False
                         ) -> tuple[list[int], list[int]]:
    """Per head k = max(k_min, 2 floor(|s|/beta) + 1) and m = floor(s/beta) if s > 0 else floor(s/beta) + 1 (the
    official code's rule), except that no drift (s = 0) means no shift, m = 0; the official code's m = +1 there is
    an artefact of its sign test (`official_zero_shift=True` keeps it)."""
    ks, ms = [], []
    for value in s.tolist():
        ks.append(max(k_min, 2 * math.floor(abs(value) / beta) + 1))
        if value == 0 and not official_zero_shift:
            ms.append(0)
        else:
            ms.append(math.floor(value / beta) if value > 0 else math.floor(value / beta) + 1)
    return ks, ms


def adaptive_window_pool(scores: torch.Tensor, attn: torch.Tensor | None, budget_prefix: int, beta: float = 2000.0,
                         k_min: int = 5, official_zero_shift: bool = False, length: int | None = None,
                         drift: torch.Tensor | None = None) -> torch.Tensor:
    """Adaptive window-based smoothing of scores [H, P]: per head a box filter of width k_h centred on j + m_h with
    replicate padding; k_h and m_h follow the drift of the top `budget_prefix` keys across the window attention
    attn [H, w, L] (section 4; oracle O4).

    The drift is a mean difference of the mean positions of two sets of n keys among L, so |s| <= L - n; below beta
    every head gets k = k_min and m = 0 whatever s is, and the drift's top-n selections (a quarter of ReST-KV's
    select at 768 tokens) are skipped. On SmolLM2's attention |s| stayed under 710 tokens up to 2k and was 0 once in
    30,240 cases (loadtest/drift_stats.py). Without `attn`, `length` (the number of keys L) decides whether the
    drift is needed, and `drift` ([H], e.g. windowed_drift's) must then be given."""
    if not drift_needed(attn.shape[-1] if attn is not None else length, budget_prefix, beta, official_zero_shift):
        return _shifted_box(scores, max(k_min, 1), 0)
    if drift is None:
        if attn is None:
            raise ValueError("adaptive_window_pool: the drift needs the window attention or the drift itself")
        drift = drift_score(attn, budget_prefix)
    ks, ms = aws_kernel_and_shift(drift, beta, k_min, official_zero_shift)
    heads_by_shape: dict[tuple[int, int], list[int]] = {}
    for h, shape in enumerate(zip(ks, ms)):
        heads_by_shape.setdefault(shape, []).append(h)
    if len(heads_by_shape) == 1:  # the usual case: k = k_min and the same m for every head
        (k, m), = heads_by_shape
        return _shifted_box(scores, k, m)
    out = torch.empty_like(scores)
    for (k, m), heads in heads_by_shape.items():
        index = torch.tensor(heads, device=scores.device)
        out[index] = _shifted_box(scores[index], k, m)
    return out


def drift_needed(length: int, budget_prefix: int, beta: float, official_zero_shift: bool = False) -> bool:
    """Whether adaptive_window_pool reads the window attention for the drift: only where |s| <= L - n may reach
    beta (or with the official rule's shift at s = 0, which needs s itself)."""
    return official_zero_shift or length - min(budget_prefix, length) >= beta


def _shifted_box(scores: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """[N, P] -> [N, P]: the mean of the k entries centred on j + m, with replicate padding."""
    if k == 1 and m == 0:  # the identity (chunk_kernel_size 1 inside the prompt)
        return scores
    return box_mean(F.pad(scores[:, None], (k // 2 - m, k // 2 + m), mode="replicate")[:, 0], k)


def avg_pool_zero_pad(scores: torch.Tensor, k: int = 5) -> torch.Tensor:
    """SnapKV/PyramidKV pooling of [N, P]: width k, stride 1, zero padding counted in the average."""
    return box_mean(F.pad(scores, (k // 2, k // 2)), k)


def box_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """[N, M] -> [N, M - k + 1]: the mean of each k consecutive entries (avg_pool1d with stride 1, which on the CPU
    is about 10x slower than this view-and-sum)."""
    return x.unfold(-1, k, 1).mean(dim=-1)


def gqa_aggregate(scores: torch.Tensor, num_kv_heads: int, mode: str = "mean") -> torch.Tensor:
    """[H, N] per query head -> [H_kv, N] per KV head, over the G query heads of each group.

    mean: normalise each head to sum 1 (odds ratio x W_o-norm scales differ a lot between heads), then average;
    max: normalise, then take the maximum; mean_raw: plain average; layer: normalise, then average over all H heads
    of the layer, so every KV head keeps the same tokens (TOVA's rule, and an ablation of ReST-KV's per-group one).
    """
    if mode not in GQA_MODES:
        raise ValueError(f"unknown GQA aggregation {mode!r}; allowed: {', '.join(GQA_MODES)}")
    h, n = scores.shape
    if mode != "mean_raw":
        scores = scores / scores.sum(dim=1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    if mode == "layer":
        return scores.mean(dim=0, keepdim=True).expand(num_kv_heads, n)
    grouped = scores.reshape(num_kv_heads, h // num_kv_heads, n)
    return grouped.amax(dim=1) if mode == "max" else grouped.mean(dim=1)
