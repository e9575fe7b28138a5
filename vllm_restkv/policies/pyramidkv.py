"""PyramidKV: SnapKV scores with a per-layer budget that shrinks with depth (arithmetic schedule, beta_p = 20).

vLLM keeps one block table for all layers, so the engine needs the same kept count in every layer: there this
policy is not selectable (config validation says so). It is provided for offline comparisons, through
`select(kv, budget)`, which keeps `pyramid_budgets(...)[kv.layer_idx]` tokens.
"""

from __future__ import annotations

from vllm_restkv.policies.base import LayerKV
from vllm_restkv.policies.snapkv import SnapKV


def pyramid_budgets(budget: int, window: int, num_layers: int, prompt_len: int, beta_p: int = 20) -> list[int]:
    """Per-layer budgets (window included), deepest layer smallest; they average to `budget`."""
    b = budget - window
    low = b // beta_p
    high = 2 * b - low
    if high >= prompt_len - window:
        high = prompt_len - window
        low = 2 * b - high
    if num_layers == 1:
        return [budget]
    step = (high - low) // (num_layers - 1)
    return [high - layer * step + window for layer in range(num_layers)]


class PyramidKV(SnapKV):
    name = "pyramidkv"
    uniform_budget = False

    def select(self, kv: LayerKV, budget: int):
        layer_budget = pyramid_budgets(budget, self.window, kv.num_layers, kv.length)[kv.layer_idx]
        return super().select(kv, max(layer_budget, self.window))
