"""Token-level views of vLLM's paged KV cache, per attention backend.

Eviction needs two things from a layer's cache tensor: read the K/V rows of one request (for scoring) and
write the kept rows into the request's first blocks (compaction). The byte layout differs per backend:

* CPU_ATTN (vLLM 0.32): `[num_blocks, num_kv_heads, block_size, 2 * head_size]`, but the element order inside one
  (block, head) slab depends on the ISA: with `vec` the first `block_size * head_size` values are **K transposed**
  and the next are V row-major; `amx` packs differently. `probe_cpu_layout` discovers the order once per process by
  writing known values through vLLM's own cache-write op, so any ISA works and an unmappable one fails loudly.
* FlashAttention / Triton (GPU): `[2, num_blocks, block_size, num_kv_heads, head_size]`. There compaction runs
  the Triton kernel kernels/compact_gather.py on the cache in place (`kernels` auto), without reading K/V out.
"""

from __future__ import annotations

import torch


class KVLayoutError(RuntimeError):
    pass


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

    @staticmethod
    def compact_in_place(kv_cache: torch.Tensor, block_ids: torch.Tensor, kept: torch.Tensor) -> None:
        """`compact` by the Triton kernel, on [nb, H, bs, d] views of K and V (same strides, as the kernel needs)."""
        from kernels import compact_gather_triton

        key, value = kv_cache[0].permute(0, 2, 1, 3), kv_cache[1].permute(0, 2, 1, 3)
        compact_gather_triton(key, value, block_ids, block_ids, kept)  # dst: the request's first blocks


def compact(layout, kv_cache: torch.Tensor, block_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            kept: torch.Tensor, triton: bool = False) -> None:
    """Gather the kept rows (per head, `kept` [H, B] indices into k/v [H, n, d], the rows of `block_ids`) into
    slots 0..B-1. `triton`: by the Triton kernel where the layout has one (FlashAttention's), else in torch."""
    if triton and hasattr(layout, "compact_in_place"):
        layout.compact_in_place(kv_cache, block_ids, kept)
        return
    index = kept.unsqueeze(-1).expand(-1, -1, k.shape[-1])
    layout.write_prefix(kv_cache, block_ids, torch.gather(k, 1, index), torch.gather(v, 1, index))


class MappedKVLayout:
    """CPU_ATTN with any ISA: a per-(block, head) slab of `block_size * 2 * head_size` values whose element order is
    discovered once by writing known values through vLLM's own cache-write op (`probe_cpu_layout`).

    `k_index[t, i]` / `v_index[t, i]` give the slab offset holding K / V of token slot t, dim i. This covers the
    `vec` layout (K transposed, V row-major) and packed layouts such as `amx` without hard-coding either.
    """

    name = "cpu-mapped"

    def __init__(self, k_index: torch.Tensor, v_index: torch.Tensor, isa: str):
        self.k_index = k_index.flatten()
        self.v_index = v_index.flatten()
        self.block_size, self.head_size = k_index.shape
        self.isa = isa
        # The `vec` order (K transposed, then V row-major) is read and written through strided views instead of
        # per-element index gathers: several times faster; every other order takes the general path.
        bs, d = self.block_size, self.head_size
        slot, dim = torch.arange(bs)[:, None], torch.arange(d)[None, :]
        self.k_transposed_v_rows = bool(torch.equal(k_index, dim * bs + slot)
                                        and torch.equal(v_index, bs * d + slot * d + dim))

    def _slabs(self, kv_cache: torch.Tensor) -> torch.Tensor:
        nb, h = kv_cache.shape[:2]
        return kv_cache.view(nb, h, -1)

    def read(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        slabs = self._slabs(kv_cache)[block_ids]  # [nblk, H, S]
        nblk, h = slabs.shape[:2]
        bs, d = self.block_size, self.head_size
        if self.k_transposed_v_rows:
            k = slabs[:, :, : bs * d].view(nblk, h, d, bs).permute(1, 0, 3, 2).reshape(h, nblk * bs, d)[:, :n]
            v = slabs[:, :, bs * d:].view(nblk, h, bs, d).permute(1, 0, 2, 3).reshape(h, nblk * bs, d)[:, :n]
            return k, v
        k = slabs[:, :, self.k_index].view(nblk, h, bs, d).permute(1, 0, 2, 3).reshape(h, nblk * bs, d)[:, :n]
        v = slabs[:, :, self.v_index].view(nblk, h, bs, d).permute(1, 0, 2, 3).reshape(h, nblk * bs, d)[:, :n]
        return k, v

    def write_prefix(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        slabs = self._slabs(kv_cache)
        h, b, d = k.shape
        bs = self.block_size
        if self.k_transposed_v_rows:
            full, rest = divmod(b, bs)
            k, v = k.to(slabs.dtype), v.to(slabs.dtype)
            if full:  # whole blocks: one slab each, K transposed then V
                k_blocks = k[:, : full * bs].reshape(h, full, bs, d).permute(1, 0, 3, 2).reshape(full, h, bs * d)
                v_blocks = v[:, : full * bs].reshape(h, full, bs, d).permute(1, 0, 2, 3).reshape(full, h, bs * d)
                slabs[block_ids[:full]] = torch.cat([k_blocks, v_blocks], dim=2)
            if rest:  # the last block: only its first `rest` slots
                slab = slabs[int(block_ids[full])]
                slab[:, : bs * d].view(h, d, bs)[:, :, :rest] = k[:, full * bs:].transpose(1, 2)
                slab[:, bs * d:].view(h, bs, d)[:, :rest] = v[:, full * bs:]
            return
        slots = torch.arange(b, device=block_ids.device)
        blk = block_ids[slots // bs]  # [B]
        off = (slots % bs)  # [B]
        k_pos = self.k_index.view(bs, d)[off]  # [B, d]
        v_pos = self.v_index.view(bs, d)[off]
        heads = torch.arange(h, device=block_ids.device)[:, None, None]
        slabs[blk[None, :, None], heads, k_pos[None]] = k.to(slabs.dtype)
        slabs[blk[None, :, None], heads, v_pos[None]] = v.to(slabs.dtype)


_layout_cache: dict[tuple, MappedKVLayout] = {}


def probe_cpu_layout(dtype: torch.dtype, num_kv_heads: int, head_size: int, block_size: int,
                     isa: str) -> MappedKVLayout:
    """Discover where vLLM's CPU cache-write op puts each (token slot, dim) of K and V, and check the result.

    Values are small integers (exact in bf16/fp16/fp32): one pass encodes the token slot, one the dim, with K
    positive and V negative, so every slab offset is attributed to exactly one (K|V, slot, dim).
    """
    key_ = (dtype, num_kv_heads, head_size, block_size, isa)
    if key_ in _layout_cache:
        return _layout_cache[key_]
    from vllm import _custom_ops as ops

    bs, d, h = block_size, head_size, num_kv_heads

    def write(values_k: torch.Tensor, values_v: torch.Tensor) -> torch.Tensor:
        cache = torch.zeros(1, h, bs, 2 * d, dtype=dtype)
        view = cache.view(1, h, bs * 2, -1)
        key_cache, value_cache = view.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(values_k.to(dtype).contiguous(), values_v.to(dtype).contiguous(), key_cache, value_cache,
                                       torch.arange(bs, dtype=torch.int64), isa)
        return cache.view(h, -1).float()

    slot_code = (torch.arange(bs, dtype=torch.float32) + 1)[:, None, None].expand(bs, h, d)
    dim_code = (torch.arange(d, dtype=torch.float32) + 1)[None, None, :].expand(bs, h, d)
    by_slot = write(slot_code, -slot_code)
    by_dim = write(dim_code, -dim_code)
    maps = []
    for sign in (1, -1):
        index = torch.full((bs, d), -1, dtype=torch.int64)
        for head in range(h):
            where = (by_slot[head] * sign > 0).nonzero().flatten()
            slot = (by_slot[head, where] * sign).long() - 1
            dim = (by_dim[head, where] * sign).long() - 1
            if head == 0:
                index[slot, dim] = where
            elif not torch.equal(index[slot, dim], where):
                index = None
                break
        if index is None or (index < 0).any() or index.unique().numel() != bs * d:
            raise KVLayoutError(
                f"vllm-restkv: cannot map the CPU KV cache layout for isa={isa!r}, dtype={dtype} "
                f"(head_size {d}, block_size {bs}); eviction would corrupt keys. Use --kv-eviction none."
            )
        maps.append(index)
    layout = MappedKVLayout(maps[0], maps[1], isa)
    # Round trip through our own read/write with random data must reproduce the op's result.
    n = bs + 3
    cache = torch.zeros(2, h, bs, 2 * d, dtype=dtype)
    key = torch.randn(n, h, d).to(dtype)
    value = torch.randn(n, h, d).to(dtype)
    view = cache.view(2, h, bs * 2, -1)
    key_cache, value_cache = view.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, torch.arange(n, dtype=torch.int64), isa)
    k, v = layout.read(cache, torch.arange(2), n)
    if not (torch.equal(k, key.transpose(0, 1)) and torch.equal(v, value.transpose(0, 1))):
        raise KVLayoutError(f"vllm-restkv: CPU KV layout round trip failed for isa={isa!r}, dtype={dtype}")
    _layout_cache[key_] = layout
    return layout
