"""One command for the whole long-context moderation benchmark: data set -> accuracy -> load tests -> report.

    .venv/bin/python loadtest/run_benchmark.py                 # preset `cpu`: about 80 min on 2 CPU cores
    .venv/bin/python loadtest/run_benchmark.py --preset ci --out-dir /tmp/bench --markdown /tmp/bench/benchmarks.md
    .venv/bin/python loadtest/run_benchmark.py --stages report # redraw from the JSON results already there

Stages: `data` (loadtest/make_dataset.py), `accuracy` (loadtest/bench_accuracy.py, SmolLM2 through the engine),
`load` (loadtest/bench_load.py, one real server per policy at the same KV cache), `overhead`
(loadtest/profile_overhead.py: the plugin's share of engine time with nothing to evict), `report` (loadtest/report.py:
the Markdown section and the plots). Each stage writes JSON under --out-dir; later stages read it, so a stage can be
re-run alone. Progress goes to stderr. For the 7B/13B GPU tables see loadtest/gpu_bench.sh.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
ALL_POLICIES = ["restkv", "snapkv", "h2o", "tova", "streamingllm", "random"]
LOAD_POLICIES = ["none", "restkv", "snapkv", "h2o", "tova", "streamingllm"]

PRESETS = {
    "cpu": {
        "data": ["--lengths", "1024", "2048", "--threads-per-length", "8", "--needles-per-length", "4"],
        "accuracy": ["--model", "smollm2", "--policies", *ALL_POLICIES, "--budgets", "64", "128", "256", "512", "1024"],
        "loads": {
            # every policy at 8x compression, with 1, 32 and 256 output tokens
            "tiny": ["--model", "tiny", "--policies", *LOAD_POLICIES, "--budgets", "256", "--kv-blocks", "64",
                     "--prompt-tokens", "2048", "--concurrency", "16", "--requests", "32", "--max-tokens", "1", "32",
                     "256", "--reference-kv-blocks", "512"],  # and vanilla vLLM with 8x the memory
            # ReST-KV across compression ratios; budget 4096 > prompt: nothing evicted, the overhead point
            "tiny-compression": ["--model", "tiny", "--policies", "none", "restkv", "--budgets", "128", "512", "1024", "4096",
                                 "--kv-blocks", "64", "--prompt-tokens", "2048", "--concurrency", "16",
                                 "--requests", "32", "--max-tokens", "1", "32", "256"],
            # concurrency sweep
            "tiny-concurrency": ["--model", "tiny", "--policies", "none", "restkv", "--budgets", "256", "--kv-blocks",
                                 "64", "--prompt-tokens", "2048", "--concurrency", "1", "4", "64", "--requests", "32",
                                 "--max-tokens", "32"],
            "smollm2": ["--model", "smollm2", "--policies", "none", "restkv", "snapkv", "--budgets", "256",
                        "--kv-blocks", "48", "--prompt-tokens", "2048", "--concurrency", "16", "--requests", "16",
                        "--max-tokens", "32"],
        },
        # the plugin's share of engine time with nothing to evict (loadtest/profile_overhead.py), two cases:
        # every request fits its budget (1,532 <= 2,048) / requests could outgrow it (queries captured, 1,532 > 1,520)
        "overhead": {"args": ["--requests", "16", "--prompt-len", "1500", "--max-tokens", "32", "--blocks", "200"],
                     "budgets": {"fits": 2048, "captures": 1520}},
    },
    # A few minutes: the same pipeline end to end on the tiny model (CI runs it).
    "ci": {
        "data": ["--lengths", "512", "--threads-per-length", "6", "--needles-per-length", "2"],
        "accuracy": ["--model", "tiny", "--policies", "restkv", "snapkv", "--budgets", "64", "128", "--chunk", "256"],
        "loads": {
            "tiny": ["--model", "tiny", "--policies", "none", "restkv", "--budgets", "128", "4096", "--kv-blocks", "12",
                     "--prompt-tokens", "512", "--prompts", "8", "--concurrency", "8", "--requests", "8",
                     "--max-tokens", "64", "--chunk", "256", "--reference-kv-blocks", "48",
                     "--poll-interval", "0.1"],
        },
        "overhead": {"args": ["--requests", "4", "--prompt-len", "400", "--max-tokens", "8", "--blocks", "40"],
                     "budgets": {"fits": 512, "captures": 404}},
    },
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(args: list[str]) -> None:
    log("$ " + " ".join(str(a) for a in args))
    proc = subprocess.run([PY, *map(str, args)], cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"stage failed (exit {proc.returncode}): {' '.join(map(str, args))}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--out-dir", type=Path, default=REPO / "docs" / "bench", help="JSON results and plots")
    p.add_argument("--markdown", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--data-dir", type=Path, default=None, help="data set directory (default: .cache/bench/<preset>)")
    p.add_argument("--stages", nargs="+", choices=["data", "accuracy", "load", "overhead", "report"],
                   default=["data", "accuracy", "load", "overhead", "report"])
    p.add_argument("--loads", nargs="+", default=None, help="which load tests of the preset (default: all)")
    a = p.parse_args(argv)
    preset = PRESETS[a.preset]
    data = a.data_dir or REPO / ".cache" / "bench" / a.preset
    a.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    loads = a.loads or list(preset["loads"])
    if "data" in a.stages:
        run([REPO / "loadtest" / "make_dataset.py", "--out", data, *preset["data"]])
    if "accuracy" in a.stages:
        run([REPO / "loadtest" / "bench_accuracy.py", "--data", data, "--out", a.out_dir / "accuracy.json",
             *preset["accuracy"]])
    if "load" in a.stages:
        for name in loads:
            run([REPO / "loadtest" / "bench_load.py", "--out", a.out_dir / f"load-{name}.json", *preset["loads"][name]])
    if "overhead" in a.stages:
        for case, budget in preset["overhead"]["budgets"].items():
            run([REPO / "loadtest" / "profile_overhead.py", *preset["overhead"]["args"], "--budget", budget,
                 "--out", a.out_dir / f"overhead-{case}.json"])
    if "report" in a.stages:
        machine = (f"Machine: {platform.machine()}, {_cpus()} CPU cores, {platform.system()} "
                   f"(preset `{a.preset}`; one command: `python loadtest/run_benchmark.py --preset {a.preset}`).")
        args = [REPO / "loadtest" / "report.py", "--markdown", a.markdown, "--plots", a.out_dir, "--preamble", machine]
        if (a.out_dir / "accuracy.json").exists():
            args += ["--accuracy", a.out_dir / "accuracy.json"]
        for name in preset["loads"]:
            if (a.out_dir / f"load-{name}.json").exists():
                args += ["--load", a.out_dir / f"load-{name}.json"]
        for case in preset["overhead"]["budgets"]:
            if (a.out_dir / f"overhead-{case}.json").exists():
                args += ["--overhead", a.out_dir / f"overhead-{case}.json"]
        run(args)
    log(f"done in {(time.time() - started) / 60:.1f} min")
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
