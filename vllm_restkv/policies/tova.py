"""TOVA, one-shot form (as in kvpress): attention of the newest query averaged over all heads of the layer, so every
KV head keeps the same tokens; plus the window. Stateless: repeated calls use the newest query each time, which is
the original decode-time rule applied every N steps instead of every step."""

from __future__ import annotations

import torch

from vllm_restkv import scoring
from vllm_restkv.policies.base import EvictionPolicy, LayerKV


class TOVA(EvictionPolicy):
    name = "tova"

    def prefix_scores(self, kv: LayerKV, n: int) -> torch.Tensor:
        attn = scoring.window_attention(kv.query[:, -1:], kv.key, query_positions=kv.query_positions()[-1:],
                                        key_positions=kv.positions, reuse=True)
        mean = attn[:, 0, : kv.length - self.window].mean(dim=0)
        return mean.expand(kv.num_kv_heads, -1)
