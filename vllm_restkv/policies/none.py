from vllm_restkv.policies.base import EvictionPolicy, LayerKV


class NoEviction(EvictionPolicy):
    """Keeps everything (the engine treats "none" as eviction off)."""

    name = "none"
    needs_query = False

    def select(self, kv: LayerKV, budget: int):
        import torch

        return torch.arange(kv.length, device=kv.key.device).expand(kv.key.shape[0], kv.length)
