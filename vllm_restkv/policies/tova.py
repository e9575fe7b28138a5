"""TOVA: attention of the newest query, averaged over all heads of the layer (every head keeps the same tokens)."""

from __future__ import annotations

from vllm_restkv import scoring
from vllm_restkv.policies.base import EvictionPolicy, LayerKV


class TOVA(EvictionPolicy):
    name = "tova"

    def score(self, kv: LayerKV):
        attn = scoring.window_attention(kv.query[:, -1:], kv.key, kv.query_positions()[-1:], kv.positions)
        mean = attn[:, 0, : kv.length - self.window].mean(dim=0)
        return mean.expand(kv.key.shape[0], -1)
