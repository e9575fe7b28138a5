"""One-command GPU check of the Triton kernels (CUDA machine with torch and triton; about 1-2 minutes on one H200,
most of it Triton compilation):

    python loadtest/gpu_check_kernels.py [--lengths 4096 16384 32768 131072]

1. Correctness: `restkv_score` (Triton) against the torch reference on the same device (float32 compute, relative
   1e-4) and against the float64 reference, for SmolLM2-135M and Llama-3-8B layer shapes, bf16 and fp32 inputs, a
   strided key view; `compact_gather` (Triton) against the torch reference, bit-exact, in place / disjoint /
   overlapping destinations.
2. Timing: both kernels against their torch references for the given lengths (Llama-3-8B shapes, bf16 cache).
Prints markdown tables; exit status 0 only when every check passes. Refuses clearly without CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"smollm2": (9, 3, 64, 576), "llama3-8b": (32, 8, 128, 4096)}  # H, H_kv, d, D


def score_inputs(shape: str, length: int, dtype: torch.dtype, window: int = 32, key_view: bool = False):
    h, h_kv, d, hidden = SHAPES[shape]
    q = torch.randn(h, window, d, device="cuda", dtype=dtype)
    k = torch.randn(length, h_kv, d, device="cuda", dtype=dtype)  # the engine's token-major read
    k = k.transpose(0, 1) if key_view else k.transpose(0, 1).contiguous()
    v = torch.randn(h_kv, length, d, device="cuda", dtype=dtype)
    weight = torch.randn(hidden, h * d, device="cuda") / hidden**0.5
    return q, k, v, weight


def check_scores() -> list[dict]:
    from kernels import restkv_score_torch, restkv_score_triton
    from vllm_restkv import scoring

    rows = []
    for shape, length, dtype, key_view in [("smollm2", 1000, torch.float32, False),
                                           ("smollm2", 4113, torch.bfloat16, True),
                                           ("llama3-8b", 2048, torch.bfloat16, False),
                                           ("llama3-8b", 5000, torch.float32, True)]:
        q, k, v, weight = score_inputs(shape, length, dtype, key_view=key_view)
        factor = scoring.wo_factors(weight, q.shape[0])
        got = restkv_score_triton(q, k, v, factor)
        ref32 = restkv_score_torch(q, k, v, factor)
        ref64 = scoring.restkv_scores(q.double(), k.double(), v.double(), weight.double(), window=q.shape[1])
        err32 = float(((got - ref32).abs() / ref32.abs().clamp_min(1e-6)).max())
        err64 = float(((got.double() - ref64).abs() / ref64.abs().clamp_min(1e-6)).max())
        rows.append({"case": f"restkv_score {shape} L={length} {str(dtype)[6:]}{' key-view' if key_view else ''}",
                     "detail": f"rel err vs torch fp32 {err32:.1e}, vs fp64 {err64:.1e}",
                     "ok": err32 < 1e-4 and err64 < 1e-4})
    return rows


def check_compaction() -> list[dict]:
    from kernels import compact_gather_torch, compact_gather_triton

    rows = []
    nb, h_kv, bs, d, n, b = 300, 8, 16, 128, 3000, 1024
    src = torch.randperm(nb, device="cuda")[: -(-n // bs)]
    kept = torch.stack([torch.randperm(n, device="cuda")[:b].sort().values for _ in range(h_kv)])
    free = torch.tensor([x for x in range(nb) if x not in set(src.tolist())], device="cuda")
    need = -(-b // bs)
    for kind, dst in [("in place", src[:need]), ("disjoint", free[:need]), ("overlapping", src.flip(0)[:need])]:
        for dtype in (torch.bfloat16, torch.float32):
            k = torch.randn(nb, h_kv, bs, d, device="cuda").to(dtype)
            v = torch.randn_like(k)
            ek, ev = k.clone(), v.clone()
            compact_gather_torch(ek, ev, src, dst, kept)
            compact_gather_triton(k, v, src, dst, kept)
            rows.append({"case": f"compact_gather {kind} {str(dtype)[6:]}", "detail": "bit-exact",
                         "ok": torch.equal(k, ek) and torch.equal(v, ev)})
    return rows


def cuda_time(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def timings(lengths: list[int]) -> list[tuple]:
    from kernels import compact_gather_torch, compact_gather_triton, restkv_score_torch, restkv_score_triton
    from vllm_restkv import scoring

    rows = []
    for i, length in enumerate(lengths):
        print(f"  [{i + 1}/{len(lengths)}] L={length}", file=sys.stderr, flush=True)
        q, k, v, weight = score_inputs("llama3-8b", length, torch.bfloat16)
        factor = scoring.wo_factors(weight, q.shape[0])
        t_tri = cuda_time(lambda: restkv_score_triton(q, k, v, factor))
        t_ref = cuda_time(lambda: restkv_score_torch(q, k, v, factor))
        bs, b = 16, 1024
        blocks = -(-length // bs)
        cache_k = torch.randn(blocks, 8, bs, 128, device="cuda", dtype=torch.bfloat16)
        cache_v = torch.randn_like(cache_k)
        src = torch.arange(blocks, device="cuda")
        kept = torch.stack([torch.randperm(length, device="cuda")[:b].sort().values for _ in range(8)])
        c_tri = cuda_time(lambda: compact_gather_triton(cache_k, cache_v, src, src[: b // bs], kept))
        c_ref = cuda_time(lambda: compact_gather_torch(cache_k, cache_v, src, src[: b // bs], kept))
        rows.append((length, t_tri, t_ref, c_tri, c_ref))
        del q, k, v, cache_k, cache_v
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768, 131072])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check_kernels: no CUDA device. Run it on a GPU machine; on the CPU the kernels are checked "
              "under TRITON_INTERPRET=1 by tests/test_kernels.py.", file=sys.stderr)
        return 2
    import triton

    torch.manual_seed(0)
    print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}")
    print("[1/3] restkv_score correctness", file=sys.stderr, flush=True)
    checks = check_scores()
    print("[2/3] compact_gather correctness", file=sys.stderr, flush=True)
    checks += check_compaction()
    print("\n| check | result | ok |\n|---|---|---|")
    for row in checks:
        print(f"| {row['case']} | {row['detail']} | {'yes' if row['ok'] else '**NO**'} |")
    print("[3/3] timing (Llama-3-8B layer: H 32, H_kv 8, d 128, bf16; compaction keeps 1024 of L)", file=sys.stderr,
          flush=True)
    print("\n| L | restkv_score Triton (ms) | torch (ms) | speed-up | compact Triton (ms) | torch (ms) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for length, t_tri, t_ref, c_tri, c_ref in timings(args.lengths):
        print(f"| {length} | {t_tri:.2f} | {t_ref:.2f} | {t_ref / t_tri:.1f}x | {c_tri:.3f} | {c_ref:.3f} | "
              f"{c_ref / c_tri:.1f}x |")
    print(f"\ncommand: {' '.join(sys.argv)}")
    failed = [row["case"] for row in checks if not row["ok"]]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
