"""Token-level views of vLLM's paged KV cache, per attention backend.

Eviction needs two things from a layer's cache tensor: read the K/V rows of one request (for scoring) and
write the kept rows into the request's first blocks (compaction). The byte layout differs per backend:

* CPU_ATTN (vLLM 0.32): `[num_blocks, num_kv_heads, block_size, 2 * head_size]`, but inside one (block, head) slab
  the first `block_size * head_size` values are **K transposed** (`[head_size, block_size]`) and the next are V
  row-major (`[block_size, head_size]`). The layout is checked once per process by writing known values through
  vLLM's own cache-write op (`probe_cpu_layout`), so a different ISA layout fails loudly instead of corrupting keys.
* FlashAttention / Triton (GPU): `[2, num_blocks, block_size, num_kv_heads, head_size]`.
"""

from __future__ import annotations

import torch


class KVLayoutError(RuntimeError):
    pass


class CpuKVLayout:
    """CPU_ATTN: per (block, head) slab = K^T [d, bs] followed by V [bs, d]."""

    name = "cpu"

    @staticmethod
    def views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_t [nb, H, d, bs], v [nb, H, bs, d]) views sharing storage with the cache."""
        nb, h, bs, two_d = kv_cache.shape
        d = two_d // 2
        flat = kv_cache.view(nb, h, 2, bs * d)
        return flat[:, :, 0].unflatten(-1, (d, bs)), flat[:, :, 1].unflatten(-1, (bs, d))

    @classmethod
    def read(cls, kv_cache: torch.Tensor, block_ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the first n token slots of the request's blocks, each [H, n, d] (copies)."""
        k_t, v = cls.views(kv_cache)
        h, d = v.shape[1], v.shape[3]
        k = k_t[block_ids].permute(1, 0, 3, 2).reshape(h, -1, d)[:, :n]
        vv = v[block_ids].permute(1, 0, 2, 3).reshape(h, -1, d)[:, :n]
        return k, vv

    @classmethod
    def write_prefix(cls, kv_cache: torch.Tensor, block_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k/v [H, B, d] into token slots 0..B-1 of the request's blocks (every head its own rows)."""
        k_t, vv = cls.views(kv_cache)
        h, b, _ = k.shape
        bs = vv.shape[2]
        slots = torch.arange(b, device=block_ids.device)
        dst_blk = block_ids[slots // bs][None, :]
        dst_off = (slots % bs)[None, :]
        heads = torch.arange(h, device=block_ids.device)[:, None]
        k_t[dst_blk, heads, :, dst_off] = k.to(k_t.dtype)
        vv[dst_blk, heads, dst_off, :] = v.to(vv.dtype)


class FlashKVLayout:
    """FlashAttention/Triton on GPU: [2, nb, bs, H, d] (K and V token-major)."""

    name = "flash"

    @staticmethod
    def read(kv_cache: torch.Tensor, block_ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, bs, h, d = kv_cache.shape
        k = kv_cache[0, block_ids].reshape(-1, h, d)[:n].transpose(0, 1)
        v = kv_cache[1, block_ids].reshape(-1, h, d)[:n].transpose(0, 1)
        return k, v

    @staticmethod
    def write_prefix(kv_cache: torch.Tensor, block_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        h, b, _ = k.shape
        bs = kv_cache.shape[2]
        slots = torch.arange(b, device=block_ids.device)
        blk, off = block_ids[slots // bs], slots % bs
        kv_cache[0, blk, off] = k.transpose(0, 1).to(kv_cache.dtype)
        kv_cache[1, blk, off] = v.transpose(0, 1).to(kv_cache.dtype)


def compact(layout, kv_cache: torch.Tensor, block_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            kept: torch.Tensor) -> None:
    """Gather the kept rows (per head, `kept` [H, B] indices into k/v [H, n, d]) into slots 0..B-1."""
    index = kept.unsqueeze(-1).expand(-1, -1, k.shape[-1])
    layout.write_prefix(kv_cache, block_ids, torch.gather(k, 1, index), torch.gather(v, 1, index))


def probe_cpu_layout(dtype: torch.dtype, num_kv_heads: int, head_size: int, block_size: int, isa: str) -> None:
    """Write distinct K/V values through vLLM's cache-write op into a scratch cache and read them back."""
    from vllm import _custom_ops as ops

    num_blocks, n = 2, block_size + 3
    cache = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
    # Small integers are exact in every supported dtype.
    key = (torch.arange(n * num_kv_heads * head_size) % 251).to(dtype).view(n, num_kv_heads, head_size)
    value = -key - 1
    slots = torch.arange(n, dtype=torch.int64)
    view = cache.view(num_blocks, num_kv_heads, block_size * 2, -1)
    key_cache, value_cache = view.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)
    k, v = CpuKVLayout.read(cache, torch.arange(num_blocks), n)
    if not (torch.equal(k, key.transpose(0, 1)) and torch.equal(v, value.transpose(0, 1))):
        raise KVLayoutError(
            f"vllm-restkv: the CPU KV cache layout for isa={isa!r}, dtype={dtype} is not the one this plugin "
            f"knows (K transposed per block and head). Eviction would corrupt keys; use --kv-eviction none."
        )
