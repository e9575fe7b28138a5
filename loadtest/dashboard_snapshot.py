"""A picture of the Grafana dashboard drawn from real data: serves the default moderator with ReST-KV, lets a real
Prometheus scrape it, drives long moderation requests at it, then evaluates every panel's PromQL of
deploy/grafana/restkv-dashboard.json against Prometheus and draws the panels (matplotlib) in the dashboard's grid.

No Grafana server can be installed here, so this is the dashboard's queries and layout on real data, not a
Grafana screenshot.

    .venv/bin/python loadtest/dashboard_snapshot.py --seconds 150 --out docs/dashboard.png
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import httpx  # noqa: E402

from conftest import running_prometheus, running_server, server_env  # noqa: E402
from vllm_restkv.moderator import load_insults, prepare_moderator  # noqa: E402

PLUGINS = "restkv,restkv_metrics,restkv_moderations"
DASHBOARD = REPO / "deploy" / "grafana" / "restkv-dashboard.json"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def threads_of_comments(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    comments = load_insults("test")
    benign = [t for t, y in comments if not y and len(t) < 400]
    insults = [t for t, y in comments if y and len(t) < 200]
    out = []
    for _ in range(count):
        tokens = rng.choice([500, 1000, 2000, 3000])
        lines, chars = [], 0
        while chars < tokens * 4:
            text = rng.choice(benign if rng.random() > 0.03 else insults)
            lines.append(f"[user{rng.randrange(1000):03d}]: {text}")
            chars += len(text) + 12
        out.append("\n".join(lines))
    return out


def drive(url: str, texts: list[str], seconds: float, workers: int) -> int:
    stop = time.time() + seconds
    done = [0]

    def worker(k: int) -> None:
        i = k
        while time.time() < stop:
            httpx.post(url + "/v1/moderations", json={"input": texts[i % len(texts)]}, timeout=600)
            done[0] += 1
            i += workers

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(workers)]
    for t in pool:
        t.start()
    while any(t.is_alive() for t in pool):
        time.sleep(10)
        log(f"  {done[0]} moderation requests done")
    return done[0]


def concrete(expr: str) -> str:
    return expr.replace('=~"$model_name"', '=~".*"').replace("$__rate_interval", "20s")


def draw(prom: str, start: float, end: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit = 0.42  # inches per grid row
    fig = plt.figure(figsize=(24 * 0.75, rows * unit))
    for p in panels:
        g = p["gridPos"]
        rect = [g["x"] / 24 + 0.006, 1 - (g["y"] + g["h"]) / rows + 0.012, g["w"] / 24 - 0.012, g["h"] / rows - 0.03]
        if p["type"] == "row":
            fig.text(0.005, 1 - (g["y"] + 0.8) / rows, p["title"], fontsize=13, weight="bold")
            continue
        ax = fig.add_axes(rect)
        ax.set_title(p["title"], fontsize=9, loc="left")
        if p["type"] == "timeseries":
            for target in p.get("targets", []):
                r = httpx.get(prom + "/api/v1/query_range", params={
                    "query": concrete(target["expr"]), "start": start, "end": end, "step": 2}, timeout=30).json()
                for series in r["data"]["result"]:
                    xs = [float(t) - start for t, _ in series["values"]]
                    ys = [float(v) if v not in ("NaN", "+Inf", "-Inf") else float("nan") for _, v in series["values"]]
                    label = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: series["metric"].get(m.group(1), ""),
                                   target.get("legendFormat") or "") or "value"
                    ax.plot(xs, ys, label=label, linewidth=1)
            ax.tick_params(labelsize=7)
            ax.set_xlabel("seconds", fontsize=7)
            if ax.lines:
                ax.legend(fontsize=6, loc="upper left")
        else:
            target = p["targets"][0]
            r = httpx.get(prom + "/api/v1/query", params={"query": concrete(target["expr"]), "time": end},
                          timeout=30).json()["data"]["result"]
            ax.set_axis_off()
            if p["type"] == "table":
                text = "\n".join(", ".join(f"{k}={v}" for k, v in s["metric"].items()) for s in r) or "no data"
                ax.text(0.0, 0.5, text, fontsize=9, va="center", family="monospace")
            else:
                value = sum(float(s["value"][1]) for s in r) if r else float("nan")
                ax.text(0.5, 0.45, f"{value:,.0f}", fontsize=22, ha="center", va="center")
    fig.suptitle(f"{dashboard['title']} (panels drawn from real Prometheus data, {time.strftime('%Y-%m-%d')})",
                 fontsize=14, y=1 - 0.2 / rows)
    fig.savefig(out, dpi=80)
    log(f"dashboard picture -> {out}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=150, help="how long to drive load")
    p.add_argument("--workers", type=int, default=4, help="concurrent clients")
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--shadow-rate", type=float, default=0.25,
                   help="--kv-eviction-shadow-rate of the server (the shadow-check panels)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    args = p.parse_args()
    model = prepare_moderator(log=log)
    work = REPO / ".cache" / "dashboard-snapshot"
    work.mkdir(parents=True, exist_ok=True)
    serve_args = ["--runner", "pooling", "--max-model-len", "4096", "--max-num-batched-tokens", "512",
                  "--kv-eviction", "restkv", "--kv-eviction-budget", str(args.budget),
                  "--kv-eviction-shadow-rate", str(args.shadow_rate)]
    log("starting the server and Prometheus ...")
    with running_server(model, serve_args, work / "serve.log", env=server_env(VLLM_PLUGINS=PLUGINS)) as s, \
            running_prometheus([s.url.removeprefix("http://")], work / "prometheus") as prom:
        start = time.time()
        log(f"driving load for {args.seconds:.0f} s with {args.workers} clients ...")
        drive(s.url, threads_of_comments(0, 64), args.seconds, args.workers)
        time.sleep(25)  # one more rate window of idle, so the panels show the load ending (and shadow checks end)
        metrics = httpx.get(s.url + "/metrics", timeout=30).text
        shadow = re.findall(r'^restkv_moderation_shadow_checks_total\{[^}]*outcome="(\w+)"[^}]*\}\s+(\S+)$', metrics,
                            re.M)
        log(f"shadow checks (budget {args.budget}, rate {args.shadow_rate}): "
            + (", ".join(f"{outcome} {float(n):.0f}" for outcome, n in shadow) or "none"))
        draw(prom, start - 10, time.time(), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
