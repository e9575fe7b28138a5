"""No eviction: keeps every token (the engine treats "none" as eviction off)."""

from __future__ import annotations

import torch

from vllm_restkv.policies.base import EvictionPolicy, LayerKV


class NoEviction(EvictionPolicy):
    name = "none"
    needs_query = False
    settings = ()

    def prefix_scores(self, kv: LayerKV, n: int) -> torch.Tensor:
        return torch.full((kv.num_kv_heads, kv.length - self.window), float("inf"), device=kv.key.device)

    def select(self, kv: LayerKV, budget: int) -> torch.Tensor:
        return torch.arange(kv.length, device=kv.key.device).expand(kv.num_kv_heads, -1).contiguous()
