"""SnapKV: attention summed over the window queries, average-pooled (kernel 5, zero padding) per query head, then
aggregated over the GQA group. Stateless: every call re-scores the current cache from the newest window queries."""

from __future__ import annotations

import torch

from vllm_restkv import scoring
from vllm_restkv.policies.base import EvictionPolicy, LayerKV


def snapkv_scores(kv: LayerKV, window: int, pool_kernel: int, gqa_agg: str) -> torch.Tensor:
    """[H_kv, P] SnapKV scores of a logical view (shared with PyramidKV)."""
    attn = scoring.window_attention(kv.query, kv.key, query_positions=kv.query_positions(),
                                    key_positions=kv.positions, reuse=True)
    summed = attn[:, :, : kv.length - window].sum(dim=1)
    return scoring.gqa_aggregate(scoring.avg_pool_zero_pad(summed, pool_kernel), kv.num_kv_heads, gqa_agg)


class SnapKV(EvictionPolicy):
    name = "snapkv"
    settings = ("window", "gqa_agg")

    def __init__(self, window: int = 32, pool_kernel: int = 5, gqa_agg: str = "mean", **_):
        super().__init__(window=window, gqa_agg=gqa_agg)
        self.pool_kernel = pool_kernel

    def prefix_scores(self, kv: LayerKV, n: int) -> torch.Tensor:
        return snapkv_scores(kv, self.window, self.pool_kernel, self.gqa_agg)
