"""SnapKV: attention summed over the window queries, average-pooled (kernel 5, zero padding), per KV head."""

from __future__ import annotations

from vllm_restkv import scoring
from vllm_restkv.policies.base import EvictionPolicy, LayerKV


class SnapKV(EvictionPolicy):
    name = "snapkv"

    def __init__(self, window: int = 32, pool_kernel: int = 5, gqa_agg: str = "mean", **_):
        super().__init__(window=window, gqa_agg=gqa_agg)
        self.pool_kernel = pool_kernel

    def score(self, kv: LayerKV):
        attn = scoring.window_attention(kv.query, kv.key, kv.query_positions(), kv.positions)
        summed = attn[:, :, : kv.length - self.window].sum(dim=1)
        return scoring.gqa_aggregate(scoring.avg_pool_zero_pad(summed, self.pool_kernel), kv.key.shape[0], self.gqa_agg)
