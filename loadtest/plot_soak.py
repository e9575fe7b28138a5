"""Plot several soak runs (loadtest/soak.py JSON) side by side: server PSS and the CPU worker's PSS per round.

    .venv/bin/python loadtest/plot_soak.py OUT.png RUN.json=LABEL [RUN.json=LABEL ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (total, worker) = plt.subplots(1, 2, figsize=(11, 4))
    for spec in argv[1:]:
        path, _, label = spec.partition("=")
        result = json.loads(Path(path).read_text())
        rounds = [r["round"] for r in result["rounds"]]
        total.plot(rounds, [r["pss_mib"] for r in result["rounds"]], marker=".",
                   label=f"{label or path} ({result['growth_mib_per_round']} MiB/round)")
        worker.plot(rounds, [sum(v for k, v in r["pss_by_process"].items() if "Worker" in k) for r in result["rounds"]],
                    marker=".", label=label or path)
    total.set(title="server process tree (PSS)", xlabel="round", ylabel="MiB")
    worker.set(title="VLLM::Worker (PSS)", xlabel="round", ylabel="MiB")
    total.legend(fontsize=8)
    worker.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(argv[0], dpi=110)
    print(f"-> {argv[0]}")


if __name__ == "__main__":
    main(sys.argv[1:])
