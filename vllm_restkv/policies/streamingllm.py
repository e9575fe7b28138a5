"""StreamingLLM: the first `sinks` tokens (attention sinks) plus the most recent ones; no scoring."""

from __future__ import annotations

import torch

from vllm_restkv.policies.base import EvictionPolicy, LayerKV


class StreamingLLM(EvictionPolicy):
    name = "streamingllm"
    needs_query = False

    def __init__(self, window: int = 32, sinks: int = 4, **_):
        super().__init__(window=window)
        self.sinks = sinks

    def score(self, kv: LayerKV):
        prefix = kv.length - self.window
        positions = kv.positions[:, :prefix].to(torch.float64)
        scores = positions.clone()  # recency
        sink = kv.positions[:, :prefix] < self.sinks
        return scores.masked_fill(sink, float("inf"))
