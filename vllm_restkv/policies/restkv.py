"""ReST-KV (An et al., ICLR 2026): layer-wise output reconstruction, EMA over the window queries, adaptive
window-based smoothing; paper defaults ("after" mode, alpha 0.3, beta 2000, k_min 5).

Repeated use (chunk boundaries, decode): each call scores the current cache afresh from the newest window queries
(attention is causal by logical position, so kept old tokens and new ones are treated alike); nothing is carried
over, which makes eviction at step t on the kept set equal to one-shot scoring of that set.
"""

from __future__ import annotations

import torch

from vllm_restkv import scoring
from vllm_restkv.policies.base import EvictionPolicy, LayerKV


class RestKV(EvictionPolicy):
    name = "restkv"
    needs_o_proj = True

    def __init__(self, window: int = 32, alpha: float = 0.3, beta: float = 2000.0, kernel_size: int = 5,
                 gqa_agg: str = "mean", mode: str = "after", **_):
        super().__init__(window=window, gqa_agg=gqa_agg)
        if mode not in ("after", "before"):
            raise ValueError(f"unknown ReST-KV mode {mode!r}; allowed: after, before")
        self.alpha, self.beta, self.kernel_size, self.mode = alpha, beta, kernel_size, mode
        self.budget_prefix = None

    def raw_scores(self, kv: LayerKV) -> tuple[torch.Tensor, torch.Tensor]:
        """([H, P] raw per-query-head scores, [H, w, L] window attention)."""
        h = kv.query.shape[0]
        attn = scoring.window_attention(kv.query, kv.key, kv.query_positions(), kv.positions)
        factor = kv.wo_factor if kv.wo_factor is not None else scoring.wo_factors(kv.o_proj_weight, h)
        prefix = kv.length - self.window
        if self.mode == "after":
            raw = scoring.restkv_scores_from_attention(attn, kv.value, factor.to(attn.dtype), prefix, self.alpha)
        else:
            v = scoring.expand_kv(kv.value.to(attn.dtype), h)
            out = torch.einsum("hwl,hld->hwd", attn, v)
            diff = out[:, :, None, :] - v[:, None, :prefix, :]
            norms = torch.einsum("hij,hwpj->hwpi", factor.to(attn.dtype), diff).norm(dim=-1)
            raw = scoring.ema(scoring._odds(attn[:, :, :prefix]) * norms, self.alpha, dim=1)
        return raw, attn

    def score(self, kv: LayerKV) -> torch.Tensor:
        raw, attn = self.raw_scores(kv)
        n = self.budget_prefix if self.budget_prefix is not None else raw.shape[1]
        smoothed = scoring.adaptive_window_pool(raw, attn, n, self.beta, self.kernel_size)
        return scoring.gqa_aggregate(smoothed, kv.key.shape[0], self.gqa_agg)

    def select(self, kv: LayerKV, budget: int) -> torch.Tensor:
        self.budget_prefix = budget - self.window  # the AWS drift uses the n = C - w top keys
        try:
            return super().select(kv, budget)
        finally:
            self.budget_prefix = None
