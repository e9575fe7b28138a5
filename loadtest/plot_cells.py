"""Side-by-side bars of several `bench_load.py` results: requests/s of each policy relative to `none` of the same run
(ratios only make sense within one run), one group of bars per run.

    .venv/bin/python loadtest/plot_cells.py docs/bench/load-tiny-256-rerun.json docs/bench/load-tiny-256-slack.json \
        --labels "2026-11-30, AVX-512" "2026-12-01, AVX2" --out docs/bench/throughput-tiny-256-machines.png

A run with several budgets gets one group per budget (each against the run's `none`); the title names what every
run shares (model, KV blocks, prompt length, max_tokens), the labels should name the rest.
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
    """One group of bars per load level (concurrency or rate) and budget of a run, each with the run's `none`
    cells of that level: [(label, cells)]."""
    load = result["load"]
    levels = sorted({c[load] for c in result["cells"]})
    budgets = sorted({c["budget"] for c in result["cells"] if c.get("budget") is not None})
    out = []
    for level in levels:
        cells = [c for c in result["cells"] if c[load] == level]
        name = label if len(levels) == 1 else f"{label}\n{load} {level}"
        if len(budgets) <= 1:
            out.append((name, cells))
            continue
        unevicted = [c for c in cells if c.get("budget") is None]
        out += [(f"{name}\nbudget {budget}", unevicted + [c for c in cells if c.get("budget") == budget])
                for budget in budgets]
    return out


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
    # the title names what all runs share; what differs belongs in --labels
    shared = [f"{value}{suffix}" for key, suffix in (("model", ""), ("kv_blocks", " KV blocks"),
                                                     ("prompt_tokens", "-token prompts"))
              if len({str(run[key]) for run in runs}) == 1 for value in [runs[0][key]]]
    max_tokens = {cell["max_tokens"] for run in runs for cell in run["cells"]}
    if len(max_tokens) == 1:
        shared.append(f"max_tokens {max_tokens.pop()}")
    ax.set_title(", ".join(shared), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"plot -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
