"""What this CPU does natively, for choosing a serving dtype.

vLLM's CPU build serves a bfloat16 checkpoint in bfloat16 ("auto" takes the checkpoint's dtype). On x86 CPUs
without native bf16 arithmetic (no AVX512-BF16, no AMX: e.g. AMD EPYC before Zen 4, Intel before Cooper Lake)
oneDNN emulates it, and the same server ran about 5x slower than in float32 (docs/benchmarks.md, 2026-12-02:
64 moderation requests in 132 s bf16 vs 26 s fp32 on a 2-core AMD EPYC). The plugin warns about it at start-up;
the benchmarks and tests default to the dtype this CPU runs fast.
"""

from __future__ import annotations

import functools
import os
import platform

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it cannot be read: not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


# oneDNN's global primitive cache, sized by either variable (DNNL_ is the older name); the plugin turns it off on CPU
ONEDNN_CACHE_ENVS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")


def onednn_primitive_cache_off() -> bool:
    return any(os.environ.get(name) == "0" for name in ONEDNN_CACHE_ENVS)


def native_bf16() -> bool:
    """Whether bf16 matmuls run natively here. x86: AVX512-BF16 or AMX-BF16; other architectures (Arm with BF16,
    POWER) are given the benefit of the doubt, as are CPUs whose flags cannot be read."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    flags = cpu_flags()
    return not flags or any(f in flags for f in BF16_FLAGS)


def fast_cpu_dtype() -> str:
    """The `--dtype` to serve this repository's bf16 checkpoints with on this CPU: bfloat16 where native, else
    float32."""
    return "bfloat16" if native_bf16() else "float32"


def emulated_bf16_warning(dtype: object, is_cpu: bool) -> str | None:
    """The start-up warning for serving in bf16 on a CPU that emulates it, else None."""
    if not is_cpu or "bfloat16" not in str(dtype) or native_bf16():
        return None
    return ("vllm-restkv: this CPU has no native bf16 (no AVX512-BF16/AMX), so serving in bfloat16 is emulated and "
            "was about 5x slower than float32 in our measurements; start the server with `--dtype float32` "
            "(the KV cache then takes twice the memory per token)")


DTYPE_HELP = "vLLM --dtype; default: bfloat16 on a GPU or a CPU with native bf16, else float32 (vllm_restkv/cpu.py)"


def default_serving_dtype() -> str:
    """The benchmarks' default `--dtype`: bfloat16 on a GPU or a CPU with native bf16, float32 on other CPUs."""
    import torch

    return "bfloat16" if torch.cuda.is_available() else fast_cpu_dtype()
