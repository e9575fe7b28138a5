"""Attention backend wrappers that capture the observation-window queries (post-RoPE) for eviction scoring.

Registered through vLLM's backend registry as overrides of the stock backends: the subclasses change nothing in
the attention math; they only copy this step's newest queries of evicting requests into the worker's ring buffer
(one `index_copy_` per layer and step; a no-op when no request in the batch evicts).
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from vllm_restkv.engine import worker_state


class RestKVCPUAttentionImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query: torch.Tensor, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        if attn_metadata is not None:
            state = worker_state.current()
            if state is not None:
                state.capture_queries(layer.layer_name, query)
        return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)


class RestKVCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[CPUAttentionBackendImpl]:
        return RestKVCPUAttentionImpl

