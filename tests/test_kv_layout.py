"""The CPU cache layout's fast path (`vec`: K transposed, V row-major, through strided views) against the general
per-element index path, on random caches: reads, and compaction writes of whole and partial blocks."""

from __future__ import annotations

import pytest
import torch

from vllm_restkv.engine.kv_layout import MappedKVLayout, compact


def vec_layout(bs: int, d: int, general: bool) -> MappedKVLayout:
    slot, dim = torch.arange(bs)[:, None], torch.arange(d)[None, :]
    layout = MappedKVLayout(dim * bs + slot, bs * d + slot * d + dim, "vec")
    assert layout.k_transposed_v_rows
    layout.k_transposed_v_rows = not general  # general: the same map through per-element index gathers
    return layout


def test_other_orders_take_the_general_path():
    bs, d = 4, 3
    order = torch.randperm(2 * bs * d, generator=torch.Generator().manual_seed(1))
    assert not MappedKVLayout(order[: bs * d].view(bs, d), order[bs * d:].view(bs, d), "amx").k_transposed_v_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kept_count", [1, 8, 11, 15])  # within a block, exactly 2 blocks, 2 blocks + 3, all
def test_fast_path_equals_the_general_path(dtype, kept_count):
    g = torch.Generator().manual_seed(kept_count)
    bs, d, h, nb = 4, 3, 2, 9
    fast, general = vec_layout(bs, d, general=False), vec_layout(bs, d, general=True)
    cache = torch.randn(nb, h, bs, 2 * d, generator=g).to(dtype)
    blocks = torch.tensor([7, 2, 5, 0])
    n = 15  # the last block holds 3 tokens
    k_fast, v_fast = fast.read(cache, blocks, n)
    k_general, v_general = general.read(cache, blocks, n)
    assert k_fast.shape == (h, n, d) and torch.equal(k_fast, k_general) and torch.equal(v_fast, v_general)
    kept = torch.stack([torch.randperm(n, generator=g)[:kept_count].sort().values for _ in range(h)])
    out_fast, out_general = cache.clone(), cache.clone()
    compact(fast, out_fast, blocks, k_fast, v_fast, kept)
    compact(general, out_general, blocks, k_general, v_general, kept)
    assert torch.equal(out_fast, out_general)  # same slots written, nothing else touched
    k_after, v_after = fast.read(out_fast, blocks, kept_count)
    index = kept[..., None].expand(-1, -1, d)
    assert torch.equal(k_after, k_fast.gather(1, index)) and torch.equal(v_after, v_fast.gather(1, index))
