"""Random eviction (seeded by seed, layer and length, so runs repeat): the floor every scoring policy must beat."""

from __future__ import annotations

import torch

from vllm_restkv.policies.base import EvictionPolicy, LayerKV


class RandomPolicy(EvictionPolicy):
    name = "random"
    needs_query = False

    def __init__(self, window: int = 32, seed: int = 0, **_):
        super().__init__(window=window)
        self.seed = seed

    def prefix_scores(self, kv: LayerKV, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1000003 + kv.layer_idx * 7919 + kv.length)
        scores = torch.rand(kv.num_kv_heads, kv.length - self.window, generator=g, dtype=torch.float64)
        return scores.to(kv.key.device)
