"""FlashAttention wrapper that captures observation-window queries (GPU; same contract as attention.py).

The V1 model runner is forced on GPU (compatibility.py). This forward must run as Python in every step: eager, or
with PIECEWISE CUDA graphs, which hold the layers between attentions and call attention (vLLM's custom op) outside
them; graph modes that contain attention are refused at start-up. Scoring and compaction run after the forward,
outside any graph.
"""

from __future__ import annotations

from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl

from vllm_restkv.engine import worker_state


class RestKVFlashAttentionImpl(FlashAttentionImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        if attn_metadata is not None:
            state = worker_state.current()
            if state is not None:
                state.capture_queries(layer.layer_name, query)
        return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)


class RestKVFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return RestKVFlashAttentionImpl
