"""The policy contract (after kvpress's presses): a policy scores the cached tokens of one layer of one request;
`select` keeps the observation window plus the best-scoring rest, exactly `budget` tokens per KV head."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch


@dataclasses.dataclass
class LayerKV:
    """One layer of one request, in physical (cache) order; per KV head that order is ascending logical position."""

    query: torch.Tensor | None  # [H, w, d] newest post-RoPE queries, oldest first (w may be < window early on)
    key: torch.Tensor  # [H_kv, L, d] post-RoPE
    value: torch.Tensor  # [H_kv, L, d]
    positions: torch.Tensor  # [H_kv, L] logical positions of the cached tokens
    o_proj_weight: torch.Tensor | None = None  # [D, H*d]
    layer_idx: int = 0
    num_layers: int = 1
    wo_factor: torch.Tensor | None = None  # cached scoring.wo_factors(o_proj_weight, H)
    state: dict | None = None  # per (request, layer) state kept between calls

    @property
    def length(self) -> int:
        return self.key.shape[1]

    def query_positions(self) -> torch.Tensor:
        """Logical positions of the query rows: the newest w positions."""
        newest = int(self.positions[:, -1].max())
        w = self.query.shape[1]
        return torch.arange(newest - w + 1, newest + 1, device=self.key.device)


class EvictionPolicy:
    name: ClassVar[str] = "base"
    needs_o_proj: ClassVar[bool] = False
    needs_query: ClassVar[bool] = True

    def __init__(self, window: int = 32, gqa_agg: str = "mean", **hyperparams):
        self.window = window
        self.gqa_agg = gqa_agg

    def score(self, kv: LayerKV) -> torch.Tensor:
        """[H_kv, P] importance of the P = L - window oldest tokens (higher = keep)."""
        raise NotImplementedError

    def select(self, kv: LayerKV, budget: int) -> torch.Tensor:
        """Sorted physical indices [H_kv, budget] to keep: all `window` newest tokens plus the top-scoring rest."""
        if budget < self.window:
            raise ValueError(f"budget {budget} is smaller than the window {self.window}")
        h_kv, length = kv.key.shape[0], kv.length
        device = kv.key.device
        if length <= budget:
            return torch.arange(length, device=device).expand(h_kv, length)
        prefix = length - self.window
        scores = self.score(kv)
        if scores.shape != (h_kv, prefix):
            raise RuntimeError(f"{self.name}.score returned {tuple(scores.shape)}, expected {(h_kv, prefix)}")
        # Ties broken towards later positions, deterministically (topk alone is not stable).
        top = self._top(scores, budget - self.window)
        window = torch.arange(prefix, length, device=device).expand(h_kv, self.window)
        return torch.cat([top.sort(dim=1).values, window], dim=1)

    @staticmethod
    def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
        scores = torch.nan_to_num(scores.double(), nan=-1.0)
        tie = torch.linspace(0, 1e-12, scores.shape[1], dtype=torch.float64, device=scores.device)
        return (scores + tie * scores.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)).topk(k, dim=1).indices

    def after_select(self, kv: LayerKV, kept: torch.Tensor) -> None:
        """Carry per-token state along with the kept tokens (every [H_kv, L] tensor in kv.state is gathered)."""
        if not kv.state:
            return
        for key, value in list(kv.state.items()):
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == kv.length:
                kv.state[key] = value.gather(1, kept)
