"""Compaction of one request's paged KV cache after eviction: per KV head, gather the kept tokens into slots
0..B-1 of the destination blocks (each head has its own kept set, so its own permutation).

    compact_gather(key_cache, value_cache, src_blocks, dst_blocks, kept) -> None   (in place)

key_cache / value_cache: [num_blocks, H_kv, block_size, head_size], a generic token-major layout (the engine maps
vLLM's backend layouts onto it); src_blocks [n_src] the request's blocks in token order (token t lives in block
src_blocks[t // block_size], offset t % block_size); dst_blocks [>= ceil(B / block_size)]; kept [H_kv, B] token
indices. dst may overlap src in any way (the usual case is dst = src[:ceil(B / block_size)], compaction in place):
both paths read every kept row before writing any, the Triton one through a [H_kv, B, head_size] scratch copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def compact_gather_torch(key_cache: torch.Tensor, value_cache: torch.Tensor, src_blocks: torch.Tensor,
                         dst_blocks: torch.Tensor, kept: torch.Tensor) -> None:
    """Reference: advanced indexing reads a copy of the kept rows, then writes it."""
    _check(key_cache, value_cache, dst_blocks, kept)
    block_size = key_cache.shape[2]
    h_kv, b = kept.shape
    heads = torch.arange(h_kv, device=kept.device)[:, None]
    src_block, src_off = src_blocks.long()[kept // block_size], kept % block_size  # [H_kv, B]
    slots = torch.arange(b, device=kept.device)
    dst_block = dst_blocks.long()[slots // block_size][None].expand(h_kv, b)
    dst_off = (slots % block_size)[None].expand(h_kv, b)
    for cache in (key_cache, value_cache):
        cache[dst_block, heads, dst_off] = cache[src_block, heads, src_off]


def compact_gather(key_cache: torch.Tensor, value_cache: torch.Tensor, src_blocks: torch.Tensor,
                   dst_blocks: torch.Tensor, kept: torch.Tensor) -> None:
    """Triton on CUDA, the torch reference elsewhere."""
    fn = compact_gather_triton if key_cache.is_cuda else compact_gather_torch
    fn(key_cache, value_cache, src_blocks, dst_blocks, kept)


def compact_gather_triton(key_cache: torch.Tensor, value_cache: torch.Tensor, src_blocks: torch.Tensor,
                          dst_blocks: torch.Tensor, kept: torch.Tensor, *, block_b: int = 64) -> None:
    """Two launches on the same stream: gather the kept rows into scratch, then write them to the dst slots."""
    _check(key_cache, value_cache, dst_blocks, kept)
    _, h_kv, block_size, d = key_cache.shape
    b = kept.shape[1]
    if b == 0:
        return
    kept = kept.contiguous()
    scratch_k = torch.empty(h_kv, b, d, dtype=key_cache.dtype, device=key_cache.device)
    scratch_v = torch.empty_like(scratch_k)
    grid = (h_kv, triton.cdiv(b, block_b))
    meta = dict(BLOCK_B=block_b, BLOCK_D=triton.next_power_of_2(d))
    if key_cache.stride() != value_cache.stride():
        raise ValueError("the Triton path needs key and value caches with the same strides")
    strides = key_cache.stride()
    _gather_kernel[grid](key_cache, value_cache, *strides, src_blocks, kept, scratch_k, scratch_v, b, block_size, d,
                         **meta)
    _scatter_kernel[grid](key_cache, value_cache, *strides, dst_blocks, scratch_k, scratch_v, b, block_size, d,
                          **meta)


def _check(key_cache: torch.Tensor, value_cache: torch.Tensor, dst_blocks: torch.Tensor, kept: torch.Tensor) -> None:
    """Shape checks only (value checks would synchronise the device)."""
    if key_cache.shape != value_cache.shape or key_cache.dim() != 4:
        raise ValueError(f"key/value caches must both be [num_blocks, H_kv, block_size, head_size], got "
                         f"{tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    if kept.dim() != 2 or kept.shape[0] != key_cache.shape[1]:
        raise ValueError(f"kept must be [H_kv={key_cache.shape[1]}, B], got {tuple(kept.shape)}")
    needed = -(-kept.shape[1] // key_cache.shape[2])
    if dst_blocks.numel() < needed:
        raise ValueError(f"{kept.shape[1]} kept tokens need {needed} destination blocks, got {dst_blocks.numel()}")


@triton.jit
def _gather_kernel(k_ptr, v_ptr, s_b, s_h, s_t, s_d, src_ptr, kept_ptr, sk_ptr, sv_ptr, b, block_size, d,
                   BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    head = tl.program_id(0)
    slot = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    i = tl.arange(0, BLOCK_D)
    live = slot < b
    token = tl.load(kept_ptr + head * b + slot, mask=live, other=0).to(tl.int64)
    block = tl.load(src_ptr + token // block_size, mask=live, other=0).to(tl.int64)
    row = block * s_b + head * s_h + (token % block_size) * s_t
    mask = live[:, None] & (i[None, :] < d)
    src = row[:, None] + i[None, :] * s_d
    dst = (head * b + slot)[:, None].to(tl.int64) * d + i[None, :]
    tl.store(sk_ptr + dst, tl.load(k_ptr + src, mask=mask), mask=mask)
    tl.store(sv_ptr + dst, tl.load(v_ptr + src, mask=mask), mask=mask)


@triton.jit
def _scatter_kernel(k_ptr, v_ptr, s_b, s_h, s_t, s_d, dst_ptr, sk_ptr, sv_ptr, b, block_size, d,
                    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    head = tl.program_id(0)
    slot = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    i = tl.arange(0, BLOCK_D)
    live = slot < b
    block = tl.load(dst_ptr + slot // block_size, mask=live, other=0).to(tl.int64)
    row = block * s_b + head * s_h + (slot % block_size).to(tl.int64) * s_t
    mask = live[:, None] & (i[None, :] < d)
    src = (head * b + slot)[:, None].to(tl.int64) * d + i[None, :]
    dst = row[:, None] + i[None, :] * s_d
    tl.store(k_ptr + dst, tl.load(sk_ptr + src, mask=mask), mask=mask)
    tl.store(v_ptr + dst, tl.load(sv_ptr + src, mask=mask), mask=mask)
