# TEMPORARY stub
import dataclasses
import torch

@dataclasses.dataclass
class LayerKV:
    query: object
    key: torch.Tensor
    value: torch.Tensor
    positions: torch.Tensor
    o_proj_weight: object = None
    layer_idx: int = 0
    num_layers: int = 1
    wo_factor: object = None
    state: object = None

class EvictionPolicy:
    name = "base"
    needs_o_proj = False
    def __init__(self, window=32, **kw):
        self.window = window
    def score(self, kv):
        return kv.positions.float()
    def select(self, kv, budget):
        L = kv.key.shape[1]
        if L <= budget:
            return torch.arange(L).expand(kv.key.shape[0], -1)
        s = self.score(kv).clone()
        s[:, -self.window:] = float("inf")
        return s.topk(budget, dim=1).indices.sort(dim=1).values
    def after_select(self, kv, kept):
        pass
