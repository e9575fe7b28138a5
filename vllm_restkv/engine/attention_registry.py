"""Registers our attention-backend wrappers in vLLM's backend registry (a class path only: nothing imported yet)."""

from __future__ import annotations


def register_backends() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, "vllm_restkv.engine.attention.RestKVCPUAttentionBackend")
    # GPU: written against vLLM 0.32's FlashAttention backend; not run in CI (no GPU there).
    register_backend(AttentionBackendEnum.FLASH_ATTN, "vllm_restkv.engine.attention_gpu.RestKVFlashAttentionBackend")
