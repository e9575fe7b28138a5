"""Soak: round after round of mixed traffic against one real `vllm serve` with eviction on; fails when memory grows,
a block leaks, a request is lost or a reference answer changes.

    .venv/bin/python loadtest/soak.py --minutes 60                      # manual soak, starts its own server
    .venv/bin/python loadtest/soak.py --rounds 4 --url URL --pid PID   # against a running server (CI does this)

Each round sends at once: long evicting requests (server policy, other budgets, snapkv), requests without eviction,
short prompts that grow by decoding (preemption), clients that disconnect during prefill and during a stream, and
bad per-request arguments (must get a 4xx). Then it waits until nothing runs and vLLM's KV usage gauge reads 0
(every block back in the pool), checks that a reference request still answers exactly as in round 1, and records
the proportional set size (PSS) of the server's process tree (and per process). Memory counts from round `--warmup`
on (allocators and caches settle in the first rounds); a least-squares slope above `--max-growth-mib-per-round`
fails the run. Measured 2026-11-30 (tiny model, 20 rounds): 0.75 MiB per round, after the plugin turned oneDNN's
global primitive cache off on CPU (it was ~6 MiB per round, eviction on or off; docs/benchmarks.md, "Worker memory").
The result (per-round memory, requests, statuses, preemptions) goes to `--out` as JSON, with a plot next to it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "loadtest"))

import httpx  # noqa: E402

from bench_load import metric, pss_by_process  # noqa: E402

MIB = 1 << 20


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prompt_ids(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(1000, 40000) for _ in range(n)]


class Client:
    def __init__(self, url: str, api_key: str | None):
        self.url = url
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def complete(self, prompt, max_tokens: int, xargs: dict | None = None, timeout: float = 600) -> httpx.Response:
        body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        if xargs is not None:
            body["vllm_xargs"] = xargs
        return httpx.post(self.url + "/v1/completions", json=body, headers=self.headers, timeout=timeout)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=30).text

    def disconnect_in_prefill(self, prompt) -> str:
        try:
            self.complete(prompt, 8, timeout=0.3)
        except httpx.TimeoutException:
            return "disconnected"
        return "finished"

    def disconnect_in_stream(self, prompt) -> str:
        body = {"model": "m", "prompt": prompt, "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", self.url + "/v1/completions", json=body, headers=self.headers, timeout=600) as r:
            if r.status_code != 200:
                return f"status {r.status_code}"
            events = 0
            for line in r.iter_lines():
                events += line.startswith("data: ")
                if events >= 3:
                    return "disconnected"
        return "finished"

    def wait_idle(self, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while True:
            text = self.metrics()
            busy = metric(text, "vllm:num_requests_running") + metric(text, "vllm:num_requests_waiting")
            usage = metric(text, "vllm:kv_cache_usage_perc")
            if busy == 0 and usage == 0.0 and metric(text, "restkv_physical_tokens") == 0:
                return
            if time.time() > deadline:
                raise RuntimeError(f"not idle after {timeout} s: running+waiting={busy}, KV usage={usage}")
            time.sleep(0.5)


def round_jobs(rng: random.Random, scale: float) -> list[tuple[str, tuple]]:
    """(kind, arguments) of one round; `scale` shrinks prompt lengths for small caches."""
    n = lambda tokens: max(64, int(tokens * scale))  # noqa: E731
    jobs: list[tuple[str, tuple]] = []
    for xargs in (None, {"kv_eviction_budget": 256}, {"kv_eviction": "snapkv"}, {"kv_eviction": "none"}):
        for _ in range(2):
            jobs.append(("complete", (prompt_ids(n(rng.randrange(800, 1800)), rng), 32, xargs)))
    jobs.append(("complete", (prompt_ids(n(100), rng), n(1100), {"kv_eviction": "none"})))  # grows by decoding
    jobs.append(("complete", (prompt_ids(n(100), rng), n(1100), {"kv_eviction": "none"})))
    jobs.append(("prefill_disconnect", (prompt_ids(n(1900), rng),)))
    jobs.append(("stream_disconnect", (prompt_ids(n(700), rng),)))
    for xargs in ({"kv_eviction_budget": -1}, {"kv_eviction": "bogus"}, {"kv_eviction_budget": "abc"}):
        jobs.append(("bad", ("hi", 2, xargs)))
    rng.shuffle(jobs)
    return jobs


def run_job(client: Client, kind: str, args: tuple) -> str:
    if kind == "prefill_disconnect":
        return client.disconnect_in_prefill(*args)
    if kind == "stream_disconnect":
        return client.disconnect_in_stream(*args)
    r = client.complete(*args)
    if kind == "bad":
        return "4xx" if 400 <= r.status_code < 500 else f"unexpected {r.status_code}: {r.text[:200]}"
    if r.status_code != 200:
        return f"unexpected {r.status_code}: {r.text[:200]}"
    return "ok" if r.json()["usage"]["completion_tokens"] == args[1] else "short"


def soak(client: Client, pid: int, rounds: int | None, minutes: float | None, warmup: int, scale: float,
         seed: int) -> dict:
    rng = random.Random(seed)
    reference_prompt = prompt_ids(n := max(64, int(900 * scale)), rng)
    client.wait_idle()
    reference = client.complete(reference_prompt, 24).json()["choices"][0]["text"]
    preemptions0 = metric(client.metrics(), "vllm:num_preemptions_total")
    started = time.time()
    records: list[dict] = []
    i = 0
    while (rounds is not None and i < rounds) or (minutes is not None and time.time() - started < 60 * minutes):
        jobs = round_jobs(rng, scale)
        t0 = time.time()
        with ThreadPoolExecutor(len(jobs)) as pool:
            outcomes = list(pool.map(lambda job: run_job(client, *job), jobs))
        client.wait_idle()
        same = client.complete(reference_prompt, 24).json()["choices"][0]["text"] == reference
        client.wait_idle()
        counts: dict[str, int] = {}
        for outcome in outcomes:
            counts[outcome] = counts.get(outcome, 0) + 1
        memory = pss_by_process(pid)  # one walk of the process tree: the total is their sum
        record = {"round": i + 1, "seconds": round(time.time() - t0, 1), "requests": len(jobs), "outcomes": counts,
                  "reference_unchanged": same, "pss_mib": round(sum(memory.values()) / MIB, 1),
                  "pss_by_process": {name: round(b / MIB, 1) for name, b in memory.items()},
                  "preemptions": metric(client.metrics(), "vllm:num_preemptions_total") - preemptions0}
        records.append(record)
        log(f"round {i + 1}{f'/{rounds}' if rounds else ''}: {record['seconds']} s, {counts}, reference "
            f"{'unchanged' if same else 'CHANGED'}, server PSS {record['pss_mib']} MiB {record['pss_by_process']}, "
            f"preemptions so far {record['preemptions']:.0f}")
        i += 1
    return {"reference_tokens": n, "rounds": records, "warmup": warmup, "scale": scale, "seed": seed}


def verdict(result: dict, max_growth_mib_per_round: float) -> list[str]:
    """Failures (empty when the soak passed)."""
    failures = []
    rounds = result["rounds"]
    for r in rounds:
        bad = {k: v for k, v in r["outcomes"].items() if k not in ("ok", "4xx", "disconnected", "finished")}
        if bad:
            failures.append(f"round {r['round']}: lost or wrong requests {bad}")
        if not r["reference_unchanged"]:
            failures.append(f"round {r['round']}: the reference request answered differently")
    settled = [r["pss_mib"] for r in rounds[result["warmup"] - 1:]] if len(rounds) >= result["warmup"] else []
    if len(settled) >= 3:
        # least-squares slope in MiB per round: one noisy reading neither hides nor fakes a trend
        xs = range(len(settled))
        mean_x, mean_y = sum(xs) / len(settled), sum(settled) / len(settled)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, settled)) / sum((x - mean_x) ** 2 for x in xs)
        result["growth_mib_per_round"] = round(slope, 2)
        result["growth_mib"] = round(settled[-1] - settled[0], 1)
        if slope > max_growth_mib_per_round:
            failures.append(f"server memory grows by {slope:.1f} MiB per round from round {result['warmup']} "
                            f"(limit {max_growth_mib_per_round} MiB per round): {settled}")
    else:
        failures.append(f"too few rounds to judge memory growth: {len(rounds)} (need warm-up {result['warmup']} + 2)")
    return failures


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = result["rounds"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([r["round"] for r in rounds], [r["pss_mib"] for r in rounds], marker="o")
    ax.axvline(result["warmup"], color="grey", linestyle=":", label="memory counts from here")
    ax.set_xlabel("round")
    ax.set_ylabel("server PSS (MiB)")
    ax.set_title("Soak: server memory after each round (idle)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (with --pid); else one is started (tiny model, eviction on)")
    p.add_argument("--pid", type=int, help="the running server's process id (its tree's memory is measured)")
    p.add_argument("--api-key")
    p.add_argument("--rounds", type=int)
    p.add_argument("--minutes", type=float, help="run rounds until this much time has passed")
    p.add_argument("--warmup", type=int, default=2, help="memory counts from this round on")
    p.add_argument("--max-growth-mib-per-round", type=float, default=20.0,
                   help="fail above this slope (vLLM's own CPU worker grows ~8 MiB per round with eviction off)")
    p.add_argument("--scale", type=float, default=1.0, help="prompt-length factor (1.0: up to 1,900 tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-eviction", default="restkv", help="policy of the server this script starts")
    p.add_argument("--out", type=Path, default=REPO / ".cache" / "soak" / "soak.json")
    args = p.parse_args()
    if args.rounds is None and args.minutes is None:
        p.error("give --rounds or --minutes")
    if (args.url is None) != (args.pid is None):
        p.error("--url and --pid go together")
    if args.url:
        result = soak(Client(args.url, args.api_key), args.pid, args.rounds, args.minutes, args.warmup, args.scale,
                      args.seed)
    else:
        from tests.conftest import running_server, server_env
        from vllm_restkv.models import prepare_tiny

        args.out.parent.mkdir(parents=True, exist_ok=True)
        serve = ["--max-model-len", "2048", "--dtype", "float32", "--max-num-batched-tokens", "256",
                 "--max-num-seqs", "16", "--num-gpu-blocks-override", "24", "--kv-eviction", args.kv_eviction,
                 "--kv-eviction-budget", "128"]
        log(f"starting vllm serve (tiny model): {' '.join(serve)}")
        with running_server(prepare_tiny(), serve, args.out.with_suffix(".serve.log"),
                            env=server_env(VLLM_PLUGINS="restkv,restkv_metrics,restkv_moderations")) as server:
            result = soak(Client(server.url, None), server.proc.pid, args.rounds, args.minutes, args.warmup,
                          args.scale, args.seed)
    failures = verdict(result, args.max_growth_mib_per_round)
    result["failures"] = failures
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    log(f"-> {args.out} and {args.out.with_suffix('.png').name}")
    for failure in failures:
        log(f"FAIL: {failure}")
    if not failures:
        log(f"passed: {len(result['rounds'])} rounds, memory {result['growth_mib_per_round']} MiB per round from "
            f"round {args.warmup}, every request answered or refused with a 4xx, no block left in use")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
