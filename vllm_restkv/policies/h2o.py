"""H2O (heavy hitters): attention accumulated over every query seen, per KV head.

One-shot (the ReST-KV repository's form): given all prompt queries, the score is the causal attention summed over
them. In the engine only the newest window queries exist at each eviction point, so the accumulated sums live in
`kv.state["h2o_acc"]` ([H_kv, L], gathered with the kept tokens by `after_select`), and each call adds only the
queries not counted before (`kv.state["h2o_seen"]`, the newest counted position). `recent_ratio` > 0 gives the
original split: that share of the budget goes to the most recent tokens, the rest to heavy hitters.
"""

from __future__ import annotations

import torch

from vllm_restkv import scoring
from vllm_restkv.policies.base import EvictionPolicy, LayerKV


class H2O(EvictionPolicy):
    name = "h2o"

    def __init__(self, window: int = 32, recent_ratio: float = 0.0, gqa_agg: str = "mean", **_):
        super().__init__(window=window, gqa_agg=gqa_agg)
        self.recent_ratio = recent_ratio

    def accumulated(self, kv: LayerKV) -> torch.Tensor:
        qpos = kv.query_positions()
        attn = scoring.window_attention(kv.query, kv.key, qpos, kv.positions)  # [H, w, L]
        state = kv.state if kv.state is not None else {}
        seen = state.get("h2o_seen", -1)
        fresh = qpos > seen
        add = attn[:, fresh].sum(dim=1)  # [H, L]
        h_kv = kv.key.shape[0]
        add = add.view(h_kv, -1, kv.length).sum(dim=1)  # sum over the group's query heads
        acc = state.get("h2o_acc")
        if acc is None:
            acc = torch.zeros_like(add)
        elif acc.shape[1] < kv.length:
            acc = torch.cat([acc, acc.new_zeros(h_kv, kv.length - acc.shape[1])], dim=1)
        acc = acc.to(add.dtype) + add
        state["h2o_acc"], state["h2o_seen"] = acc, int(qpos[-1])
        return acc

    def score(self, kv: LayerKV):
        return self.accumulated(kv)[:, : kv.length - self.window]

    def select(self, kv: LayerKV, budget: int):
        recent = int(round(self.recent_ratio * (budget - self.window)))
        if recent == 0 or kv.length <= budget:
            return super().select(kv, budget)
        saved = self.window
        try:  # the recent share extends the always-kept window
            self.window = saved + recent
            return super().select(kv, budget)
        finally:
            self.window = saved
