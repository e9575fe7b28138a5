"""Side-by-side bars of several `bench_load.py` results: requests/s of each policy relative to `none` of the same run
(ratios only make sense within one run), one group of bars per run.

    .venv/bin/python loadtest/plot_cells.py docs/bench/load-tiny-256-rerun.json docs/bench/load-tiny-256-slack.json \
        --labels "2026-11-30, AVX-512" "2026-12-01, AVX2" --out docs/bench/throughput-tiny-256-machines.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def ratios(cells: list[dict]) -> dict[str, float]:
    """{policy: req/s / req/s of none} over cells of one run at one load (one cell per policy expected)."""
    base = next(c["req_s"] for c in cells if c["policy"] == "none")
    return {c["policy"]: c["req_s"] / base for c in cells}


def groups(result: dict, label: str) -> list[tuple[str, list[dict]]]:
    """One group of bars per load level of a run (concurrency or rate): [(label, cells)]."""
    load = result["load"]
    levels = sorted({c[load] for c in result["cells"]})
    if len(levels) == 1:
        return [(label, result["cells"])]
    return [(f"{label}\n{load} {level}", [c for c in result["cells"] if c[load] == level]) for level in levels]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--labels", nargs="+", default=None, help="one per result (default: the result's date)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(path.read_text()) for path in args.results]
    labels = args.labels or [r["date"] for r in runs]
    if len(labels) != len(runs):
        p.error("give one label per result")
    bar_groups = [g for run, label in zip(runs, labels) for g in groups(run, label)]
    policies = list(dict.fromkeys(c["policy"] for _, cells in bar_groups for c in cells))
    width = 0.8 / len(policies)
    fig, ax = plt.subplots(figsize=(2.5 + 2 * len(bar_groups), 4))
    for i, policy in enumerate(policies):
        values = [ratios(cells).get(policy, 0.0) for _, cells in bar_groups]
        label = f"none, {policy[5:]} KV blocks" if policy.startswith("none@") else policy  # bench_load's reference
        bars = ax.bar([j + i * width for j in range(len(bar_groups))], values, width, label=label)
        ax.bar_label(bars, fmt="%.2fx", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(bar_groups))], [label for label, _ in bar_groups])
    ax.set_ylabel("requests/s relative to none (same run)")
    first = runs[0]
    cell = first["cells"][0]
    ax.set_title(f"{first['model']}, {first['kv_blocks']} KV blocks, prompts of {first['prompt_tokens']} tokens, "
                 f"max_tokens {cell['max_tokens']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"plot -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
