"""PyramidKV: SnapKV scores with a per-layer budget that shrinks with depth (arithmetic schedule, beta_p = 20).

vLLM keeps one block table for all layers, so the engine needs the same kept count in every layer: there this
policy is not offered (`available_policies` leaves it out). It is for offline comparisons, through
`select(kv, budget)`, which keeps `pyramid_budgets(...)[kv.layer_idx]` tokens.
"""

from __future__ import annotations

import torch

from vllm_restkv.policies.base import LayerKV
from vllm_restkv.policies.snapkv import SnapKV


def pyramid_budgets(budget: int, window: int, num_layers: int, prompt_len: int, beta_p: int = 20) -> list[int]:
    """Per-layer budgets, window included, layer 0 largest (KVCache-Factory's PyramidKV, which the ReST-KV code
    uses): with b = budget - window, min = b // beta_p, max = 2b - min, capped at prompt_len - window (then
    min = 2b - max); step = (max - min) // (num_layers - 1); layer l keeps max - l * step + window. As in that code,
    prompts shorter than 2b get the uniform budget."""
    b = budget - window
    if num_layers == 1 or prompt_len < 2 * b:
        return [budget] * num_layers
    low = b // beta_p
    high = 2 * b - low
    if high >= prompt_len - window:
        high = prompt_len - window
        low = 2 * b - high
    step = (high - low) // (num_layers - 1)
    return [high - layer * step + window for layer in range(num_layers)]


class PyramidKV(SnapKV):
    name = "pyramidkv"
    uniform_budget = False

    def __init__(self, window: int = 32, pool_kernel: int = 5, gqa_agg: str = "mean", beta_p: int = 20, **_):
        super().__init__(window=window, pool_kernel=pool_kernel, gqa_agg=gqa_agg)
        self.beta_p = beta_p

    def select(self, kv: LayerKV, budget: int) -> torch.Tensor:
        if budget < self.window:
            raise ValueError(f"budget {budget} is smaller than the window {self.window}")
        budgets = pyramid_budgets(budget, self.window, kv.num_layers, kv.length, self.beta_p)
        return super().select(kv, budgets[kv.layer_idx])
