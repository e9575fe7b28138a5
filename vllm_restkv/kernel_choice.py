"""Which code runs ReST-KV's raw scores and the compaction of the KV cache: the Triton kernels of `kernels/` or the
torch paths (`scoring.py`, `engine/kv_layout.py`).

The `kernels` setting (`--kv-eviction-config '{"kernels": ...}'`):
* auto (default): Triton where the KV cache is on CUDA, torch elsewhere (the CPU build has no Triton backend);
* torch: the torch paths everywhere (e.g. to rule the kernels out when something looks wrong on a GPU);
* triton: Triton everywhere; on a CPU that needs Triton's interpreter (TRITON_INTERPRET=1, set before triton is
  imported), which is what the CPU tests use: slow, for checking the wiring, not for serving.

Before the kernels first run on a device they are checked against the torch references on small random inputs
(`verify`, once per process and device): a kernel that miscompiles on some GPU stops the worker with a message
naming kernels=torch instead of evicting tokens on wrong scores. `triton` is imported only when a kernel runs, so
the CPU path does not need it.
"""

from __future__ import annotations

import os

import torch

KERNEL_CHOICES = ("auto", "torch", "triton")


class KernelCheckError(RuntimeError):
    pass


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(setting: str) -> str | None:
    """Why `setting` cannot run in this process (None when it can): kernels=triton without CUDA or the interpreter."""
    if setting == "triton" and not torch.cuda.is_available() and not interpreter_on():
        return ("kernels=triton needs a CUDA device (or TRITON_INTERPRET=1, Triton's slow CPU interpreter, for "
                "tests); use kernels=auto (Triton on CUDA, torch elsewhere) or kernels=torch")
    return None


def use_triton(setting: str, like: torch.Tensor) -> bool:
    """Whether the Triton kernels run for tensors like `like` under `setting` (checked first on their device)."""
    if setting not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernels setting {setting!r}; allowed: {', '.join(KERNEL_CHOICES)}")
    wanted = setting == "triton" or (setting == "auto" and like.is_cuda)
    if wanted:
        verify(like.device)
    return wanted


_verified: set[str] = set()


def verify(device: torch.device | str) -> None:
    """Both kernels against their torch references on small random inputs on `device` (ReST-KV scores with GQA, a
    strided key view and bf16 inputs to 1e-4 relative; compaction in place in the GPU cache's token-major layout,
    bit-exact). Raises KernelCheckError; runs once per process and device."""
    device = torch.device(device)
    if str(device) in _verified:
        return
    reason = unavailable_reason("triton") if device.type == "cpu" else None
    if reason:
        raise KernelCheckError(f"vllm-restkv: {reason}")
    from kernels import restkv_score_torch, restkv_score_triton
    from vllm_restkv import scoring
    from vllm_restkv.engine import kv_layout

    g = torch.Generator().manual_seed(0)
    h, h_kv, w, d, hidden, length = 4, 2, 8, 32, 64, 200

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    failures = []
    for dtype in (torch.float32, torch.bfloat16):
        query, value = rand(h, w, d, dtype=dtype), rand(h_kv, length, d, dtype=dtype)
        key = rand(length, h_kv, d, dtype=dtype).transpose(0, 1)  # the engine reads K as a strided view
        factor = scoring.wo_factors(rand(hidden, h * d) / hidden**0.5, h)
        try:
            got = restkv_score_triton(query, key, value, factor, alpha=0.3, split=64)
        except Exception as e:  # a compile or launch failure is reported like a wrong result
            failures.append(f"restkv_score ({dtype}) raised {type(e).__name__}: {e}")
            continue
        ref = restkv_score_torch(query, key, value, factor, alpha=0.3)
        err = float(((got - ref).abs() / ref.abs().clamp_min(1e-6)).max())
        if not err < 1e-4:
            failures.append(f"restkv_score ({dtype}) differs from the torch reference by {err:.1e} (relative)")
    num_blocks, block_size, kept_n = 8, 16, 37
    cache = rand(2, num_blocks, block_size, h_kv, d, dtype=torch.bfloat16)  # FlashAttention's [2, nb, bs, H, d]
    blocks = torch.tensor([5, 2, 7, 0], device=device)
    kept = torch.stack([torch.randperm(60, generator=g)[:kept_n].sort().values for _ in range(h_kv)]).to(device)
    expect = cache.clone()
    kv_layout.compact(kv_layout.FlashKVLayout, expect, blocks, *kv_layout.FlashKVLayout.read(expect, blocks, 60), kept)
    try:  # the engine's own call (FlashKVLayout.compact_in_place), against its torch path
        kv_layout.FlashKVLayout.compact_in_place(cache, blocks, kept)
        if not torch.equal(cache, expect):
            failures.append("compact_gather differs from the torch reference")
    except Exception as e:
        failures.append(f"compact_gather raised {type(e).__name__}: {e}")
    if failures:
        raise KernelCheckError(f"vllm-restkv: the Triton kernels failed their check on {device}: "
                               f"{'; '.join(failures)}. Start with --kv-eviction-config '{{\"kernels\": \"torch\"}}' "
                               f"to use the torch paths, and please report this with the GPU and Triton version.")
    _verified.add(str(device))
