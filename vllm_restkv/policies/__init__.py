"""Eviction policies, one small file each, all with the `EvictionPolicy` contract (see base.py)."""

from __future__ import annotations

from vllm_restkv.policies.base import EvictionPolicy, LayerKV
from vllm_restkv.policies.h2o import H2O
from vllm_restkv.policies.none import NoEviction
from vllm_restkv.policies.pyramidkv import PyramidKV, pyramid_budgets
from vllm_restkv.policies.random_policy import RandomPolicy
from vllm_restkv.policies.restkv import RestKV
from vllm_restkv.policies.snapkv import SnapKV
from vllm_restkv.policies.streamingllm import StreamingLLM
from vllm_restkv.policies.tova import TOVA

POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (NoEviction, RestKV, SnapKV, H2O, TOVA, StreamingLLM, PyramidKV, RandomPolicy)
}


def available_policies() -> list[str]:
    """Sorted names the engine can run (the values of --kv-eviction), "none" included. The engine keeps one block
    table for all layers, so policies with per-layer budgets (PyramidKV) are left out; `POLICIES` has them all."""
    return sorted(name for name, cls in POLICIES.items() if cls.uniform_budget)


def get_policy(name: str, **hyperparams) -> EvictionPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; allowed: {', '.join(sorted(POLICIES))}")
    return POLICIES[name](**hyperparams)


__all__ = ["POLICIES", "EvictionPolicy", "LayerKV", "available_policies", "get_policy", "pyramid_budgets"]
