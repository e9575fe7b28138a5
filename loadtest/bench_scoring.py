"""Micro-benchmark: ReST-KV scoring vs SnapKV scoring vs one layer's prefill attention (SmolLM2-135M shapes).

    .venv/bin/python loadtest/bench_scoring.py [--lengths 4096 16384 32768] [--repeats 3] [--quick]

Prints a markdown table with the median times and the ratios the project tracks (ReST-KV / SnapKV, and scoring as
a share of one layer's causal prefill attention). Scoring is per layer and per request, on the torch path, timed
through `policy.select` as the engine calls it (scores, smoothing, GQA aggregation and top-k). `--quick` runs small
sizes once, as a smoke test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from vllm_restkv.policies import LayerKV, get_policy
from vllm_restkv.scoring import wo_factors

H, H_KV, D_HEAD, D_MODEL, WINDOW = 9, 3, 64, 576, 32


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="lengths 1024 2048, one repeat, budget 256")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.repeats, args.budget = [1024, 2048], 1, 256
    torch.manual_seed(0)
    weight = torch.randn(D_MODEL, H * D_HEAD) / D_MODEL**0.5
    factor = wo_factors(weight, H)
    restkv, snapkv = get_policy("restkv", window=WINDOW), get_policy("snapkv", window=WINDOW)
    rows = []
    for i, L in enumerate(args.lengths):
        print(f"[{i + 1}/{len(args.lengths)}] L={L} ...", file=sys.stderr, flush=True)
        k = torch.randn(H_KV, L, D_HEAD)
        v = torch.randn(H_KV, L, D_HEAD)
        q = torch.randn(H, WINDOW, D_HEAD)
        kv = LayerKV(query=q, key=k, value=v, positions=torch.arange(L).expand(H_KV, L), o_proj_weight=weight,
                     wo_factor=factor)
        t_rest = timed(lambda: restkv.select(kv, args.budget), args.repeats)
        t_snap = timed(lambda: snapkv.select(kv, args.budget), args.repeats)
        q_all = torch.randn(1, H, L, D_HEAD, dtype=torch.bfloat16)
        k_all = k.repeat_interleave(H // H_KV, 0)[None].to(torch.bfloat16)
        v_all = v.repeat_interleave(H // H_KV, 0)[None].to(torch.bfloat16)
        t_attn = timed(lambda: F.scaled_dot_product_attention(q_all, k_all, v_all, is_causal=True), 1)
        rows.append((L, t_rest, t_snap, t_attn))
    print("| L | ReST-KV select (ms) | SnapKV select (ms) | ReST-KV / SnapKV | one layer attention (ms) "
          "| ReST-KV / attention |")
    print("|---|---|---|---|---|---|")
    for L, r, s, a in rows:
        print(f"| {L} | {r * 1e3:.1f} | {s * 1e3:.1f} | {r / s:.2f}x | {a * 1e3:.1f} | {100 * r / a:.1f}% |")
    print(f"\ncommand: {' '.join(sys.argv)}; torch {torch.__version__}, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
