"""Pair an ablation run of bench_accuracy.py (one policy, --policy-config) with another run's baseline on the same
data set, item by item, and print the paired KL intervals (report.paired_kl_intervals). Both runs must have used
the same data (checked: the full cache's per-item results must be identical, which also shows the engine is
deterministic between the runs).

    .venv/bin/python loadtest/pair_ablation.py docs/bench/accuracy-s2-k1.json --base docs/bench/accuracy-s2.json \
        --baseline tova
    .venv/bin/python loadtest/pair_ablation.py docs/bench/accuracy-s2-proj-bfloat16.json \
        --base docs/bench/accuracy-s2-proj-float32.json --baseline restkv
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ablation", type=Path, help="bench_accuracy.py JSON of the restkv ablation")
    p.add_argument("--base", type=Path, required=True, help="bench_accuracy.py JSON with the baseline's rows")
    p.add_argument("--baseline", default="tova",
                   help="the base run's policy to pair with; restkv pairs restkv with itself under the base run's settings")
    p.add_argument("--first-token", action="store_true",
                   help="pair the first generated token's KL (kl_first) of --kl-token N > 1 runs instead")
    args = p.parse_args()
    base, ablation = json.loads(args.base.read_text()), json.loads(args.ablation.read_text())
    try:
        report.check_same_items([base, ablation])
    except ValueError as e:
        p.error(str(e))
    print(f"restkv with {ablation.get('policy_config') or 'the defaults'} ({args.ablation}) against "
          f"{args.baseline} ({args.base}):\n")
    for row in ablation["rows"]:
        if row["policy"] == "restkv":
            print(f"- restkv, budget {row['budget']}, length {row['length']}: KL {row['kl']:.4f}")
    baseline = args.baseline
    base_rows = [r for r in base["raw"] if r["policy"] == baseline]
    if baseline == "restkv":  # restkv with other settings (the base run's): pair the two restkv runs
        baseline = "restkv (base run)"
        base_rows = [{**r, "policy": baseline} for r in base_rows]
    merged = {"raw": base_rows + [r for r in ablation["raw"] if r["policy"] == "restkv"]}
    field = "kl_first" if args.first_token else "kl"
    print("\n" + "\n".join(report.paired_kl_intervals(merged, baselines=(baseline,), field=field)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
