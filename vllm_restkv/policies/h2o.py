"""H2O (heavy hitters): attention accumulated over every query seen, per KV head (the group's query heads summed:
attention rows are already normalised per head, so this is the GQA mean up to the constant G).

One-shot (the ReST-KV repository's form): given all prompt queries as `kv.query`, the score is the causal attention
summed over them. Incremental (the engine keeps only the newest window queries): the running sums live in state
"h2o_acc" ([H_kv, L], they follow their tokens through `after_select`, new tokens start at 0) and each call adds
only the queries newer than state "h2o_seen", even when it evicts nothing. Queries that fell out of the window
between two calls are not counted. `recent_ratio` > 0 gives the original split: that share of the budget (window
included) goes to the most recent tokens, the rest to heavy hitters (0.5 = half and half).
"""

from __future__ import annotations

import torch

from vllm_restkv import scoring
from vllm_restkv.policies.base import EvictionPolicy, LayerKV


class H2O(EvictionPolicy):
    name = "h2o"

    def __init__(self, window: int = 32, recent_ratio: float = 0.0, **_):
        super().__init__(window=window)
        if not 0.0 <= recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio must be in [0, 1], got {recent_ratio}")
        self.recent_ratio = recent_ratio

    def accumulate(self, kv: LayerKV) -> torch.Tensor:
        """Add the attention of the not yet counted queries; [H_kv, L] running sums of a logical view."""
        qpos = kv.query_positions()
        attn = scoring.window_attention(kv.query, kv.key, query_positions=qpos, key_positions=kv.positions,
                                        reuse=True)
        state = kv.state if kv.state is not None else {}
        fresh = qpos > state.get("h2o_seen", -1)
        add = attn[:, fresh].sum(dim=1).reshape(kv.num_kv_heads, -1, kv.length).sum(dim=1)
        acc = kv.carried("h2o_acc", 0.0)
        acc = add if acc is None else acc.to(add.dtype) + add
        kv.store("h2o_acc", acc)
        state["h2o_seen"] = int(qpos[-1])
        return acc

    def prefix_scores(self, kv: LayerKV, n: int) -> torch.Tensor:
        scores = self.accumulate(kv)[:, : kv.length - self.window].clone()
        recent = min(n, max(0, round(self.recent_ratio * (n + self.window)) - self.window))
        if recent:
            scores[:, scores.shape[1] - recent:] = float("inf")
        return scores

    def select(self, kv: LayerKV, budget: int) -> torch.Tensor:
        if kv.length <= budget and kv.query is not None:
            self.accumulate(kv.logical())  # nothing to evict, but these queries still count
        return super().select(kv, budget)
