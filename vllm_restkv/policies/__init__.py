# TEMPORARY stub (to be replaced by the full policies package)
from vllm_restkv.policies.base import LayerKV, EvictionPolicy

class _None(EvictionPolicy):
    name = "none"

class _Streaming(EvictionPolicy):
    name = "streamingllm"
    def score(self, kv):
        import torch
        s = kv.positions.float().clone()
        s[:, :4] = float("inf")
        return s

POLICIES = {"none": _None, "streamingllm": _Streaming, "restkv": _Streaming}

def available_policies():
    return sorted(POLICIES)

def get_policy(name, **kw):
    return POLICIES[name](**kw)
