"""Side-by-side engine benchmark at the same (capped) KV cache: no eviction vs ReST-KV vs the baselines.

    .venv/bin/python loadtest/bench_engine.py [--model tiny|smollm2] [--requests 16] [--prompt-len 1500]
        [--max-tokens 32] [--blocks 40] [--budget 256] [--policies none restkv snapkv h2o tova streamingllm]

Runs the real vLLM engine once per policy (in-process, so the allocator's free-block count can be read every
step) on the same random prompts, and prints requests/s, output tokens/s, the most requests running at once, the
lowest free-block count while running, preemptions and blocks freed by eviction, plus ratios against `none`.
A budget at or above the prompt length gives the no-eviction overhead point. With `--repeats N` the policies run
N times, interleaved (none, restkv, none, restkv, ...), so slow phases of a noisy machine hit all of them; the
table gives medians and the ratio to `none` of each round (median and range).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "tests" / "engine_driver.py"
sys.path.insert(0, str(REPO))

from vllm_restkv.cpu import DTYPE_HELP, default_serving_dtype  # noqa: E402


def run(spec: dict, timeout: float = 7200) -> dict:
    """One in-process engine run of tests/engine_driver.py in a subprocess; its RESULT_JSON (the benchmarks share
    this; the tests have their own assert-based twin, run_engine)."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run([sys.executable, str(DRIVER), "@" + f.name], capture_output=True, text=True,
                              timeout=timeout)
    finally:
        Path(f.name).unlink()
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT_JSON ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"engine run failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT_JSON "):])


def engine_inputs(args) -> tuple[Path, list[list[int]]]:
    """The model and `args.requests` random prompts of `args.prompt_len` tokens (seed 0) of these benchmarks."""
    import torch

    from vllm_restkv.models import prepare

    model = prepare(args.model, log=lambda m: print(m, file=sys.stderr))
    g = torch.Generator().manual_seed(0)
    return model, [torch.randint(100, 40000, (args.prompt_len,), generator=g).tolist() for _ in range(args.requests)]


def engine_spec(args, model: Path, prompts: list[list[int]], policy: str, budget: int) -> dict:
    """The engine_driver spec (shared with profile_overhead.py): a KV cache of `args.blocks` blocks, every request
    admitted at once if it fits."""
    spec = {"model": str(model), "prompts": prompts, "max_tokens": args.max_tokens, "dtype": args.dtype,
            "max_model_len": args.prompt_len + args.max_tokens + 64,
            "llm": {"num_gpu_blocks_override": args.blocks, "max_num_seqs": args.requests}}
    if policy != "none":
        spec["kv_eviction"] = {"policy": policy, "budget": budget}
    return spec


# two-sided 95% quantiles of Student's t, by degrees of freedom (a table: scipy is not a dependency)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
        25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def paired_interval(ratios: list[float]) -> tuple[float, float, float]:
    """Geometric mean of paired ratios and its 95% t interval (on log ratios: rounds pair up on a noisy machine)."""
    import math
    import statistics

    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), float("nan"), float("nan")
    df = len(logs) - 1
    t = T975[max(k for k in T975 if k <= df)]  # the next smaller tabulated d.f.: a slightly wider interval
    half = t * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=1500)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=40, help="KV cache size in blocks of 128 tokens")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--policies", nargs="+", default=["none", "restkv", "snapkv", "h2o", "tova", "streamingllm"])
    parser.add_argument("--dtype", default=default_serving_dtype(), help=DTYPE_HELP)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds over the policies")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    model, prompts = engine_inputs(args)
    runs: dict[str, list[dict]] = {p: [] for p in args.policies}
    total = len(args.policies) * args.repeats
    for round_ in range(args.repeats):
        for i, policy in enumerate(args.policies):
            step = round_ * len(args.policies) + i + 1
            print(f"[{step}/{total}] round {round_ + 1}: {policy} ...", file=sys.stderr, flush=True)
            r = run(engine_spec(args, model, prompts, policy, args.budget))
            running_free = [f for f, n in zip(r["trace"]["free_blocks"], r["trace"]["running"]) if n]
            runs[policy].append({
                "seconds": r["generate_seconds"], "max_running": r["max_running"],
                "min_free_blocks": min(running_free or [0]), "preemptions": r["preemptions"],
                "freed_blocks": (r["stats"] or {}).get("freed_blocks", 0),
            })
    import statistics

    base_policy = "none" if "none" in runs else args.policies[0]
    rows = []
    for policy, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        ratios = [b["seconds"] / r["seconds"] for r, b in zip(results, runs[base_policy])]  # req/s vs none
        geo, low, high = paired_interval(ratios)
        rows.append({"policy": policy, "seconds": seconds, "req_s": args.requests / seconds,
                     "vs_none_geomean": geo, "vs_none_ci95": [low, high],
                     "out_tok_s": args.requests * args.max_tokens / seconds,
                     "vs_none_median": statistics.median(ratios), "vs_none_min": min(ratios),
                     "vs_none_max": max(ratios), "runs": results,
                     **{k: results[-1][k] for k in ("max_running", "min_free_blocks", "preemptions",
                                                     "freed_blocks")}})
    print(f"| policy | wall (s) | requests/s | output tok/s | vs none | max running | min free blocks | "
          f"preemptions | blocks freed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        spread = (f" ({row['vs_none_min']:.3f}-{row['vs_none_max']:.3f})" if args.repeats > 1 else "")
        print(f"| {row['policy']} | {row['seconds']:.1f} | {row['req_s']:.2f} | {row['out_tok_s']:.1f} | "
              f"{row['vs_none_median']:.3f}x{spread} | {row['max_running']} | {row['min_free_blocks']} | "
              f"{row['preemptions']} | {row['freed_blocks']} |")
    if args.repeats > 1:
        for row in rows:
            if row["policy"] != base_policy:
                low, high = row["vs_none_ci95"]
                print(f"{row['policy']}: requests/s vs {base_policy}, geometric mean of {args.repeats} paired rounds "
                      f"{row['vs_none_geomean']:.3f}x, 95% interval {low:.3f}-{high:.3f} (t, {args.repeats - 1} d.f.)")
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    print(f"\ncommand: {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
