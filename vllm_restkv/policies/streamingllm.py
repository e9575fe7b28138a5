"""StreamingLLM: the first `sinks` logical positions (attention sinks) plus the most recent tokens; no scoring.
Uses logical positions, so sinks and recency stay right after earlier evictions made positions non-contiguous."""

from __future__ import annotations

import torch

from vllm_restkv.policies.base import EvictionPolicy, LayerKV


class StreamingLLM(EvictionPolicy):
    name = "streamingllm"
    needs_query = False

    def __init__(self, window: int = 32, sinks: int = 4, **_):
        super().__init__(window=window)
        self.sinks = sinks

    def prefix_scores(self, kv: LayerKV, n: int) -> torch.Tensor:
        positions = kv.positions[:, : kv.length - self.window]
        return positions.to(torch.float64).masked_fill(positions < self.sinks, float("inf"))
