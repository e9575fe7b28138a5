"""Triton kernels of vllm-restkv, each next to a torch reference with the same signature (`*_torch`) and a
dispatcher that runs Triton on CUDA tensors and the reference elsewhere. Tested against the references under
`TRITON_INTERPRET=1` on the CPU (tests/test_kernels.py) and on a GPU by loadtest/gpu_check_kernels.py."""

from kernels.compact_gather import compact_gather, compact_gather_torch, compact_gather_triton
from kernels.restkv_score import restkv_score, restkv_score_torch, restkv_score_triton

__all__ = ["compact_gather", "compact_gather_torch", "compact_gather_triton", "restkv_score", "restkv_score_torch",
           "restkv_score_triton"]
