"""Load test: long moderation requests against real `vllm serve` processes, one per policy, same KV cache size.

    .venv/bin/python loadtest/bench_load.py --model tiny --policies none restkv snapkv h2o tova streamingllm \
        --budgets 256 --kv-blocks 64 --prompt-tokens 2048 --concurrency 4 16 64 --requests 48 --max-tokens 1 32 \
        --out docs/bench/load-tiny.json

Every server gets the same KV cache (`--num-gpu-blocks-override`), the same chunked-prefill size, the same
`--max-num-seqs`, prefix caching off (the prompts repeat across cells; a cache hit would flatter `none`) and
`--enforce-eager` (`--compile`: vLLM's default instead, torch.compile on the CPU, for every server alike). Budgets are swept per request (`vllm_xargs.kv_eviction_budget`) on one server per policy. The
prompts are `restkv-modthreads` threads (real held-out comments, loadtest/make_dataset.py's builder) of
`--prompt-tokens` tokens wrapped in the moderation prompt; every request asks for exactly `max_tokens` tokens
(`ignore_eos`). A closed-loop client (an `httpx` async client, streaming `/v1/completions`) keeps `concurrency`
requests in flight, or with `--rate`, requests arrive as a Poisson process.

Per cell (policy x budget x max_tokens x concurrency): requests/s, output and total tokens/s, TTFT and TPOT
percentiles, the most requests running at once and the mean/peak KV-cache usage (from vLLM's own /metrics, polled
every --poll-interval s), preemptions, and the server's memory (peak RSS of the whole process tree, polled; its PSS
read after the cell, since reading PSS stalls the server).

`--reference-kv-blocks N` adds one more vanilla server (`none`) with N blocks instead of `--kv-blocks`, reported as
policy `none@N`: what buying that much more memory would give at the same load, the ceiling an eviction policy is
measured against (with N = 8 x --kv-blocks: does 8x compression deliver what 8x memory would?).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from tests.conftest import running_server, server_env  # noqa: E402
from vllm_restkv.cpu import DTYPE_HELP, default_serving_dtype  # noqa: E402

PLUGINS = "restkv,restkv_metrics"
# What a cell's peak_memory_gib is. Results before 2026-12-03 have no memory_measure: theirs was the summed PSS,
# polled during the cell, which stalled the server (see tree_pss).
MEMORY_MEASURE = ("peak summed RSS of the server's processes, polled during the cell (PSS, which "
                  "splits shared pages, is read after each cell: pss_after_gib)")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def metric(text: str, name: str) -> float:
    """Sum of a Prometheus metric's samples (over label sets) in /metrics text."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M):
        total += float(m.group(1))
    return total


def server_processes(pid: int) -> list:
    """The server's process tree, the API server (the root) first; empty once it has exited."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def pss_by_process(pid: int) -> dict[str, int]:
    """Proportional set size in bytes of each process of the server's tree, by "name (pid)" (the root is the API
    server); shared pages are counted once across them, unlike RSS."""
    import psutil

    out = {}
    for k, p in enumerate(server_processes(pid)):
        with contextlib.suppress(psutil.NoSuchProcess):
            out[f"{'api-server' if k == 0 else p.name()} ({p.pid})"] = p.memory_full_info().pss
    return out


def tree_pss(pid: int) -> int:
    """Proportional set size of the server's whole process tree. Slow (walks every page table) and it stalls the
    server while it runs (0.3-1 s under load here: streamed tokens bunched up), so never while a cell is timed."""
    return sum(pss_by_process(pid).values())


def tree_rss(pid: int) -> int:
    """Resident set size summed over the server's process tree (a page shared by several processes counts in
    each): read from counters, cheap enough to poll while a cell runs."""
    import psutil

    total = 0
    for p in server_processes(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


class Sampler:
    """Polls /metrics and the server's resident memory while a cell runs."""

    def __init__(self, url: str, pid: int, interval: float):
        self.url, self.pid, self.interval = url, pid, interval
        self.running, self.waiting, self.kv, self.mem = [], [], [], []
        self.errors = 0  # polls /metrics did not answer

    async def run(self, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                text = (await client.get(self.url + "/metrics", timeout=5)).text
                self.running.append(metric(text, "vllm:num_requests_running"))
                self.waiting.append(metric(text, "vllm:num_requests_waiting"))
                self.kv.append(metric(text, "vllm:kv_cache_usage_perc"))
            except httpx.HTTPError:
                self.errors += 1
            self.mem.append(tree_rss(self.pid))
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
            except asyncio.TimeoutError:
                pass


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, xargs: dict | None) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if xargs:
        body["vllm_xargs"] = xargs
    start = time.perf_counter()
    first, usage = None, None
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=3600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"error in the stream: {chunk['error']}")
            if chunk.get("choices") and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                usage = chunk["usage"]
    end = time.perf_counter()
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk")
    out = usage["completion_tokens"]
    ttft = (first or end) - start
    return {"ttft": ttft, "latency": end - start, "output_tokens": out,
            "prompt_tokens": usage["prompt_tokens"],
            "tpot": (end - first) / (out - 1) if first and out > 1 else None}


async def run_cell(url: str, pid: int, prompts: list[str], n: int, concurrency: int, rate: float | None,
                   max_tokens: int, xargs: dict | None, poll_interval: float = 0.25) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        before = (await client.get(url + "/metrics")).text
        sampler, stop = Sampler(url, pid, poll_interval), asyncio.Event()
        sampling = asyncio.create_task(sampler.run(client, stop))
        queue = list(range(n))
        results = []
        started = time.perf_counter()

        async def worker():
            while queue:
                i = queue.pop(0)
                results.append(await one_request(client, url, prompts[i % len(prompts)], max_tokens, xargs))

        try:
            if rate:
                rng = random.Random(0)
                tasks = []
                for i in range(n):
                    tasks.append(asyncio.create_task(
                        one_request(client, url, prompts[i % len(prompts)], max_tokens, xargs)))
                    await asyncio.sleep(rng.expovariate(rate))
                results = await asyncio.gather(*tasks)
            else:
                await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            wall = time.perf_counter() - started
            stop.set()
            await sampling
        pss = await asyncio.to_thread(tree_pss, pid)  # after the timed part: reading PSS stalls the server
        after = (await client.get(url + "/metrics")).text
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results if r["tpot"] is not None]
    out_tokens = sum(r["output_tokens"] for r in results)
    prompt_tokens = sum(r["prompt_tokens"] or 0 for r in results)
    return {
        "requests": n, "seconds": wall, "req_s": n / wall, "output_tok_s": out_tokens / wall,
        "total_tok_s": (out_tokens + prompt_tokens) / wall, "mean_prompt_tokens": prompt_tokens / n,
        **{f"ttft_p{q}": percentile(ttft, q / 100) for q in (50, 90, 99)},
        **{f"tpot_p{q}": percentile(tpot, q / 100) for q in (50, 90, 99)},
        "max_running": max(sampler.running or [0]), "mean_running": statistics.mean(sampler.running or [0]),
        "metrics_polls": len(sampler.running), "metrics_poll_errors": sampler.errors,
        "max_waiting": max(sampler.waiting or [0]),
        "mean_kv_usage": statistics.mean(sampler.kv or [0]), "max_kv_usage": max(sampler.kv or [0]),
        "preemptions": metric(after, "vllm:num_preemptions_total") - metric(before, "vllm:num_preemptions_total"),
        "evicted_tokens": metric(after, "restkv_evicted_tokens_total")
        - metric(before, "restkv_evicted_tokens_total"),
        "peak_memory_gib": max(sampler.mem or [0]) / 2**30,  # peak summed RSS (see memory_measure)
        "pss_after_gib": pss / 2**30,
        # the engine's own timing of eviction (restkv_*_duration_seconds), to attribute throughput differences
        **{f"{part}_seconds": metric(after, f"restkv_{part}_duration_seconds_sum")
           - metric(before, f"restkv_{part}_duration_seconds_sum") for part in ("scoring", "compaction")},
    }


def build_prompts(n: int, tokens: int, seed: int) -> list[str]:
    from vllm_restkv.benchdata import build_dataset
    from vllm_restkv.models import prepare_smollm2, set_offline_env

    set_offline_env()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(prepare_smollm2(log=log)))
    items = build_dataset(tokenizer, split="test", lengths=[tokens], threads_per_length=n, needles_per_length=0,
                          seed=seed)
    return [i["prompt"] for i in items]


def serve_args(args, policy: str, model: Path, kv_blocks: int | None = None) -> list[str]:
    from vllm_restkv.models import is_dummy_shape

    out = ["--load-format", "dummy"] if is_dummy_shape(model) else []
    out += ["--num-gpu-blocks-override", str(kv_blocks or args.kv_blocks), "--max-num-batched-tokens", str(args.chunk),
           "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.prompt_tokens + 256 + max(args.max_tokens)),
           "--no-enable-prefix-caching", "--dtype", args.dtype, "--kv-eviction", policy, *args.serve_args]
    if policy != "none":
        out += ["--kv-eviction-budget", str(max(args.budgets))]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny, smollm2, or a model directory")
    p.add_argument("--policies", nargs="+", default=["none", "restkv", "snapkv", "h2o", "tova", "streamingllm"])
    p.add_argument("--budgets", nargs="+", type=int, default=[256])
    p.add_argument("--kv-blocks", type=int, default=64, help="KV cache size in blocks, the same for every server")
    p.add_argument("--reference-kv-blocks", type=int, default=None, metavar="N",
                   help="also run vanilla vLLM with N KV blocks, reported as policy none@N (the same server given more "
                        "memory: the ceiling for eviction at this load)")
    p.add_argument("--chunk", type=int, default=512, help="--max-num-batched-tokens")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--prompts", type=int, default=32, help="distinct prompts (reused round-robin)")
    p.add_argument("--concurrency", nargs="+", type=int, default=[4, 16, 64])
    p.add_argument("--rate", nargs="+", type=float, default=None, help="Poisson arrival rates (req/s) instead")
    p.add_argument("--requests", type=int, default=48, help="requests per cell")
    p.add_argument("--max-tokens", nargs="+", type=int, default=[1, 32])
    p.add_argument("--dtype", default=default_serving_dtype(), help=DTYPE_HELP)
    p.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="more `vllm serve` arguments (must come last: everything after it is passed on)")
    p.add_argument("--one-server", action="store_true",
                   help="one server (eviction on) for all policies, chosen per request through vllm_xargs: saves "
                        "start-ups on a GPU; `none` then means eviction off for that request, not vanilla vLLM")
    p.add_argument("--poll-interval", type=float, default=0.25, metavar="S",
                   help="seconds between polls of /metrics and memory during a cell (each poll costs the API server "
                        "~10 ms of CPU)")
    p.add_argument("--compile", action="store_true",
                   help="run every server without --enforce-eager (vLLM's default: torch.compile on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.poll_interval <= 0:
        p.error(f"--poll-interval must be > 0 seconds, got {args.poll_interval}")
    if args.reference_kv_blocks is not None and args.reference_kv_blocks <= args.kv_blocks:
        p.error(f"--reference-kv-blocks ({args.reference_kv_blocks}) must be larger than --kv-blocks ({args.kv_blocks})")
    result = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    log(f"-> {args.out}")
    return 0


def measure(args) -> dict:
    from vllm_restkv.models import MODEL_NAMES, prepare

    model = prepare(args.model, log=log) if args.model in MODEL_NAMES else Path(args.model)
    prompts = build_prompts(args.prompts, args.prompt_tokens, args.seed)
    loads = [("rate", r) for r in args.rate] if args.rate else [("concurrency", c) for c in args.concurrency]
    log_dir = REPO / ".cache" / "bench-load"
    log_dir.mkdir(parents=True, exist_ok=True)
    # one server per policy; or with --one-server a single server where each request names its policy
    groups = [("restkv", args.policies, None)] if args.one_server else [(p, [p], None) for p in args.policies]
    if args.reference_kv_blocks:
        groups.append(("none", ["none"], args.reference_kv_blocks))
    cells_total = sum((1 if pol == "none" else len(args.budgets)) for _, pols, _ in groups for pol in pols) \
        * len(args.max_tokens) * len(loads)
    done, started, cells = 0, time.time(), []
    server_info = {}
    refused = []
    for server_policy, policies, kv_blocks in groups:
        log_path = log_dir / f"serve-{server_policy}{f'-{kv_blocks}' if kv_blocks else ''}.log"
        with contextlib.ExitStack() as stack:
            try:
                server = stack.enter_context(running_server(model, serve_args(args, server_policy, model, kv_blocks),
                                                            log_path, env=server_env(VLLM_PLUGINS=PLUGINS),
                                                            eager=not args.compile))
            except RuntimeError as e:  # refused to start: e.g. vanilla vLLM with a cache < --max-model-len
                reason = start_up_refusal(log_path.read_text(errors="replace")) or str(e)[:300]
                refused.append({"policy": reference_name(server_policy, kv_blocks), "reason": reason})
                done += len(policies) * len(args.max_tokens) * len(loads)
                log(f"{refused[-1]['policy']}: the server did not start: {reason}")
                continue
            info = httpx.get(server.url + "/metrics").text
            m = re.search(r'vllm:cache_config_info\{([^}]*)\}', info)
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) if m else {}
            if not kv_blocks:
                server_info = {k: labels.get(k) for k in ("block_size", "num_gpu_blocks", "cache_dtype")}
            asyncio.run(run_cell(server.url, server.proc.pid, prompts, 2, 2, None, 2, None))  # warm-up
            for policy in policies:
                for budget in ([None] if policy == "none" else args.budgets):
                    xargs = {"kv_eviction_budget": budget} if budget else None
                    if args.one_server:
                        xargs = {"kv_eviction": policy, **(xargs or {})}
                    for max_tokens in args.max_tokens:
                        for kind, level in loads:
                            cell = asyncio.run(run_cell(
                                server.url, server.proc.pid, prompts, args.requests,
                                level if kind == "concurrency" else 10_000, level if kind == "rate" else None,
                                max_tokens, xargs, args.poll_interval))
                            cell.update({"policy": reference_name(policy, kv_blocks), "budget": budget,
                                         "max_tokens": max_tokens, kind: level,
                                         "kv_blocks": kv_blocks or args.kv_blocks,
                                         # what the server itself reports (vLLM's cache_config_info)
                                         "server_num_gpu_blocks": labels.get("num_gpu_blocks")})
                            cells.append(cell)
                            done += 1
                            left = (time.time() - started) / done * (cells_total - done)
                            log(f"[{done}/{cells_total}] {cell['policy']} budget={budget} max_tokens={max_tokens} "
                                f"{kind}={level}: {cell['req_s']:.2f} req/s, max running {cell['max_running']:.0f}, "
                                f"TTFT p50 {cell['ttft_p50']:.2f} s (about {left / 60:.1f} min left)")
    return {"date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv), "model": model.name,
            "kv_blocks": args.kv_blocks, "reference_kv_blocks": args.reference_kv_blocks, "dtype": args.dtype,
            "server": server_info, "chunk": args.chunk, "max_num_seqs": args.max_num_seqs,
            "prompt_tokens": args.prompt_tokens, "requests_per_cell": args.requests, "load": loads[0][0],
            "one_server": args.one_server, "compile": args.compile, "memory_measure": MEMORY_MEASURE, "poll_interval": args.poll_interval,
            "seconds": time.time() - started, "cells": cells, "refused": refused}


def reference_name(policy: str, kv_blocks: int | None) -> str:
    """`none@N` for the reference server with N blocks, else the policy."""
    return f"{policy}@{kv_blocks}" if kv_blocks else policy


def start_up_refusal(log_text: str) -> str | None:
    """The line of a server log that says why it refused to start (vLLM's KV cache check or ours, a config
    validation error such as a --max-model-len beyond the model's positions), else the log's last error line."""
    for pattern in (r"(To serve at least one request[^\n]*?)(?: Try increasing|$)", r"(vllm-restkv: the KV cache holds[^\n]*)",
                    r"(ValueError: [^\n]*)", r"Value error, ([^\n]*?)(?: \[type=|$)"):
        m = re.search(pattern, log_text, re.M)
        if m:
            return m.group(1).strip()
    errors = [line.strip() for line in log_text.splitlines() if re.search(r"\w*Error\b", line)]
    return errors[-1] if errors else None


def print_table(result: dict) -> None:
    key = result["load"]
    print(f"model {result['model']}, KV cache {result['kv_blocks']} blocks ({result['server']}), prompts of "
          f"{result['prompt_tokens']} tokens, chunk {result['chunk']}, {result['requests_per_cell']} requests per cell")
    print(f"| policy | budget | max_tokens | {key} | req/s | vs none | out tok/s | TTFT p50 (s) | TTFT p99 (s) | "
          f"TPOT p50 (ms) | max running | peak KV use | preemptions | peak mem (GiB) | scoring (% of wall) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = {(c["max_tokens"], c[key]): c["req_s"] for c in result["cells"] if c["policy"] == "none"}
    for c in result["cells"]:
        ratio = c["req_s"] / base[(c["max_tokens"], c[key])] if (c["max_tokens"], c[key]) in base else None
        tpot = f"{c['tpot_p50'] * 1000:.0f}" if c["tpot_p50"] is not None else "-"
        print(f"| {c['policy']} | {c['budget'] or '-'} | {c['max_tokens']} | {c[key]:g} | {c['req_s']:.2f} | "
              f"{f'{ratio:.2f}x' if ratio else '-'} | {c['output_tok_s']:.1f} | {c['ttft_p50']:.2f} | "
              f"{c['ttft_p99']:.2f} | {tpot} | {c['max_running']:.0f} | {c['max_kv_usage']:.0%} | "
              f"{c['preemptions']:.0f} | {c['peak_memory_gib']:.2f} | "
              f"{100 * c.get('scoring_seconds', 0.0) / c['seconds']:.1f}% |")
    for r in result.get("refused", []):
        print(f"| {r['policy']} | did not start: {r['reason']} |")
    print(f"\ncommand: {result['command']}")


if __name__ == "__main__":
    sys.exit(main())
