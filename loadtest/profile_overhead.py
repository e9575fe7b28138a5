"""The plugin's own share of engine time, measured by profiling instead of by wall-clock differences.

Wall-clock comparisons of `none` against `restkv` with nothing to evict (bench_engine.py --repeats N) vary by
+-10% per run on a shared 2-core machine, too much to resolve the 2% overhead target. This script runs the engine
in one process under cProfile (tests/engine_driver.py) and attributes time to the plugin exactly: the cumulative
time of every vllm_restkv function called from outside the plugin's engine code (vLLM itself or the wrappers in
vllm_restkv/engine/patches.py), plus the wrappers' own time, against the whole `generate` call. cProfile slows
Python more than torch kernels, so the share it reports is an upper bound for the plugin's Python hooks.

Example (no eviction: budget above every request's length; and one that evicts, for scale):
  python loadtest/profile_overhead.py --budget 2048
  python loadtest/profile_overhead.py --budget 256
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "loadtest"))

from vllm_restkv.cpu import DTYPE_HELP, default_serving_dtype  # noqa: E402

PLUGIN_DIR = str(REPO / "vllm_restkv")
# wrappers around vLLM functions: only their own time is the plugin's (their callees include vLLM's originals)
WRAPPERS = {str(REPO / "vllm_restkv" / "engine" / name) for name in ("patches.py", "attention.py", "attention_gpu.py")}


def plugin_share(stats: pstats.Stats) -> tuple[float, dict[str, float]]:
    """(seconds inside the plugin, per entry point) from a profile: calls into vllm_restkv from outside it or from
    a wrapper, plus the wrappers' own time (their callees are vLLM's originals: not counted)."""
    per_entry: dict[str, float] = {}
    for func, (_cc, _nc, tottime, cumtime, callers) in stats.stats.items():
        filename = func[0]
        if not filename.startswith(PLUGIN_DIR):
            continue
        name = f"{Path(filename).stem}.{func[2]}"
        if filename in WRAPPERS:
            per_entry[name] = per_entry.get(name, 0.0) + tottime
            continue
        if not callers:  # called from the frame that started profiling
            per_entry[name] = per_entry.get(name, 0.0) + cumtime
        for caller, (_ccc, _cnc, _ctt, caller_cumtime) in callers.items():
            caller_file = caller[0]
            if caller_file == "~":  # a builtin calling back (any(generator), sorted(key=...)): its caller counts
                continue
            if caller_file in WRAPPERS or not caller_file.startswith(PLUGIN_DIR):
                per_entry[name] = per_entry.get(name, 0.0) + caller_cumtime
    return sum(per_entry.values()), per_entry


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=1500)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--blocks", type=int, default=200, help="KV cache size in blocks of 128 tokens")
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--policy", default="restkv")
    p.add_argument("--dtype", default=default_serving_dtype(), help=DTYPE_HELP)
    p.add_argument("--top", type=int, default=8, help="entry points to list")
    p.add_argument("--out", type=Path, help="also write the result as JSON")
    args = p.parse_args()
    import engine_driver
    from bench_engine import engine_inputs, engine_spec

    model, prompts = engine_inputs(args)
    spec = engine_spec(args, model, prompts, args.policy, args.budget)
    print(f"engine: {args.requests} requests of {args.prompt_len} + {args.max_tokens} tokens, {args.policy} "
          f"budget {args.budget}, {args.dtype}, under cProfile ...", file=sys.stderr, flush=True)
    from vllm import LLM

    profiler = cProfile.Profile()
    original_generate = LLM.generate

    def profiled_generate(self, *a, **kw):  # only generate is profiled: start-up is not per-request cost
        profiler.enable()
        try:
            return original_generate(self, *a, **kw)
        finally:
            profiler.disable()

    LLM.generate = profiled_generate
    result = engine_driver.main(spec)
    stats = pstats.Stats(profiler)
    generate = next(ct for func, (_cc, _nc, _tt, ct, _c) in stats.stats.items()
                    if func[2] == "generate" and func[0].endswith("llm.py"))
    plugin, per_entry = plugin_share(stats)
    evicted = (result.get("stats") or {}).get("evicted_tokens", 0)
    print(f"\ngenerate: {generate:.2f} s under cProfile; evicted tokens: {evicted}")
    print(f"plugin code: {plugin:.3f} s = {100 * plugin / generate:.2f}% of generate")
    print("| entry point | seconds | % of generate |\n|---|---|---|")
    for name, seconds in sorted(per_entry.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {name} | {seconds:.3f} | {100 * seconds / generate:.2f}% |")
    print(f"\ncommand: python {' '.join(sys.argv)}")
    if args.out:
        command = " ".join(["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
        args.out.write_text(json.dumps({"command": command, "generate_seconds": generate,
                                        "plugin_seconds": plugin, "evicted_tokens": evicted,
                                        "entry_points": per_entry}, indent=1))


if __name__ == "__main__":
    main()
