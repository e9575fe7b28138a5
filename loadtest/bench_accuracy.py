"""Accuracy harness: what each eviction policy changes, against the full cache, through the real vLLM engine.

    .venv/bin/python loadtest/bench_accuracy.py --data .cache/bench/modthreads --out docs/bench/accuracy.json
        [--model smollm2] [--policies restkv snapkv h2o tova streamingllm random] [--budgets 64 128 256 512 1024]
        [--chunk 512]

For every item of a `restkv-modthreads` data set (loadtest/make_dataset.py) it runs the prompt once with the full
cache (vanilla vLLM: eviction off in the engine) and once per policy x budget (one engine per policy; the budget is
set per request through `vllm_xargs`), with chunked prefill of `--chunk` tokens, so eviction runs at chunk
boundaries as it does when serving. Budgets at or above an item's length are skipped (nothing to evict).

Measured per policy x budget x length, against the full cache:
- threads (moderation prompt of /v1/moderations' generate mode): P(flagged) = P(Yes) / (P(Yes) + P(No)) of the
  next token; verdict agreement with the full cache (threshold: the full cache's median P over all threads, so that
  verdicts are balanced; a 135M model's raw P(Yes) is not calibrated), mean |delta P|, AUROC and recall against the
  true labels (secondary: small models are weak detectors);
- threads and needles: next-token KL(full || evicted) over the full cache's top-`--top-k` tokens plus one bucket for
  the remaining mass (a token missing from the evicted top-k gets the evicted distribution's smallest listed
  probability: an upper bound for an unlisted token);
- needles: retrieval accuracy (the password appears in the greedy answer).

`--kl-token N` moves the KL to the N-th generated token (greedy, so the tokens before it are the full cache's own as
long as the evicted run generated the same ones; each item records whether it did, and the first token's KL too).
With `--policy-config '{"evict_during_prefill": false}'` eviction runs once, after the whole prompt (the paper's
setting: the question is in the observation window), and after the forward that gives the first token: its
distribution is the full cache's, so the first token that shows what eviction lost is the second (`--kl-token 2`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_engine import run as run_driver  # noqa: E402  (loadtest/ is on sys.path when run as a script)
from vllm_restkv.cpu import DTYPE_HELP, default_serving_dtype  # noqa: E402
POSITIVE = (" Yes", "Yes", " yes")
NEGATIVE = (" No", "No", " no")
NEEDLE_TOKENS = 8


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def p_flagged(top: list[list], yes_ids: set[int], no_ids: set[int]) -> float:
    probs = {int(t): max(math.exp(lp), 1e-300) for t, lp in top}
    floor = min(probs.values())  # an unlisted token has at most the smallest listed probability
    p_yes = sum(probs[t] for t in yes_ids if t in probs) or floor
    p_no = sum(probs[t] for t in no_ids if t in probs) or floor
    return p_yes / (p_yes + p_no)


def kl_top(full: list[list], evicted: list[list]) -> float:
    """KL(full || evicted) over full's listed tokens plus one bucket for the rest."""
    p = {int(t): max(math.exp(lp), 1e-300) for t, lp in full}
    q = {int(t): max(math.exp(lp), 1e-300) for t, lp in evicted}
    q_floor = min(q.values())
    kl, q_listed = 0.0, 0.0
    for t, pt in p.items():
        qt = q.get(t, q_floor)
        q_listed += qt
        kl += pt * (math.log(pt) - math.log(qt))
    rest_p = max(1.0 - sum(p.values()), 0.0)
    rest_q = max(1.0 - q_listed, 1e-12)
    if rest_p > 0:
        kl += rest_p * (math.log(rest_p) - math.log(rest_q))
    return max(kl, 0.0)


def generated_tokens(item: dict, kl_token: int) -> int:
    return max(1 if item["kind"] == "thread" else NEEDLE_TOKENS, kl_token)


def engine_spec(model: Path, items: list[dict], extra: list[dict | None], kv_eviction: dict | None, args) -> dict:
    return {
        "model": str(model), "dtype": args.dtype,
        "max_model_len": max(i["prompt_tokens"] for i in items) + 64 + args.kl_token,
        "prompts": [i["prompt"] for i in items], "extra_args": extra, "logprobs": args.top_k, "top_logprobs": True,
        # ignore_eos when a later token is measured: an answer that ends at its first token still has a second
        "params": [{"max_tokens": generated_tokens(i, args.kl_token), "ignore_eos": args.kl_token > 1} for i in items],
        "kv_eviction": kv_eviction,
        "llm": {"max_num_batched_tokens": args.chunk, "max_logprobs": args.top_k, "max_num_seqs": args.max_num_seqs,
                "num_gpu_blocks_override": args.kv_blocks},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="a data set directory from loadtest/make_dataset.py")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="smollm2", help="smollm2, tiny, or a model directory")
    p.add_argument("--policies", nargs="+", default=["restkv", "snapkv", "h2o", "tova", "streamingllm", "random"])
    p.add_argument("--budgets", nargs="+", type=int, default=[64, 128, 256, 512, 1024])
    p.add_argument("--chunk", type=int, default=512, help="max_num_batched_tokens (chunked prefill size)")
    p.add_argument("--top-k", type=int, default=100, help="logprobs per position used for KL and P(flagged)")
    p.add_argument("--kl-token", type=int, default=1, metavar="N",
                   help="compare the next-token distributions at the N-th generated token (default 1; 2 with "
                        "evict_during_prefill false, whose first token comes from the full cache)")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--kv-blocks", type=int, default=None, help="KV cache size in blocks (default: vLLM's)")
    p.add_argument("--dtype", default=default_serving_dtype(), help=DTYPE_HELP)
    p.add_argument("--policy-config", type=json.loads, default={}, metavar="JSON",
                   help='more --kv-eviction-config settings for every policy run, e.g. \'{"kernel_size": 1}\' (ablations; '
                        "recorded in the result)")
    args = p.parse_args()
    if args.kl_token < 1:
        p.error(f"--kl-token must be 1 or more, got {args.kl_token}")
    from vllm_restkv.config import KVEvictionConfig, KVEvictionConfigError

    if not isinstance(args.policy_config, dict):
        p.error(f"--policy-config must be a JSON object of settings, got {args.policy_config!r}")
    fixed = sorted(set(args.policy_config) & {"policy", "budget"})  # they come from --policies and --budgets
    if fixed:
        p.error(f"--policy-config: {', '.join(fixed)} cannot be set here (use --policies and --budgets)")
    for policy, budget in itertools.product(args.policies, {min(args.budgets), max(args.budgets)}):
        try:  # every value checked now, not when that policy's engine starts minutes later
            KVEvictionConfig.from_value({**args.policy_config, "policy": policy, "budget": budget})
        except KVEvictionConfigError as e:
            p.error(f"--policy-config: {e}")
    result = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    log(f"-> {args.out}")
    return 0


def measure(args) -> dict:
    from vllm_restkv.benchdata import load_dataset
    from vllm_restkv.models import MODEL_NAMES, prepare

    manifest, items = load_dataset(args.data)
    model = prepare(args.model, log=log) if args.model in MODEL_NAMES else Path(args.model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    ids_of = lambda words: {tokenizer.encode(w, add_special_tokens=False)[0] for w in words}  # noqa: E731
    yes_ids, no_ids = ids_of(POSITIVE), ids_of(NEGATIVE)
    started = time.time()
    runs = 1 + len(args.policies)
    log(f"{len(items)} items; full cache, then {len(args.policies)} policies x budgets {args.budgets}")
    full = run_driver(engine_spec(model, items, None, None, args))
    log(f"[1/{runs}] full cache done ({time.time() - started:.0f} s)")
    at = args.kl_token - 1
    reference = [{"top": full["top_logprobs"][k][at], "first": full["top_logprobs"][k][0], "text": full["texts"][k],
                  "tokens": list(full["tokens"][k])} for k in range(len(items))]

    requests = []  # (item index, policy, budget)
    for policy in args.policies:
        for budget in args.budgets:
            for k, item in enumerate(items):
                if budget < item["prompt_tokens"]:
                    requests.append((k, policy, budget))
    raw = []
    for n, policy in enumerate(args.policies, start=2):
        mine = [r for r in requests if r[1] == policy]
        if not mine:  # every budget at or above every prompt: nothing to evict
            continue
        t0 = time.time()
        out = run_driver(engine_spec(
            model, [items[k] for k, _, _ in mine],
            [{"kv_eviction": policy, "kv_eviction_budget": b} for _, _, b in mine],
            {**args.policy_config, "policy": policy, "budget": max(args.budgets)}, args))
        for j, (k, _, budget) in enumerate(mine):
            raw.append({"item": k, "policy": policy, "budget": budget, "top": out["top_logprobs"][j][at],
                        "first": out["top_logprobs"][j][0], "text": out["texts"][j], "tokens": list(out["tokens"][j])})
        per_run = (time.time() - started) / n
        log(f"[{n}/{runs}] {policy}: {len(mine)} requests in {time.time() - t0:.0f} s "
            f"(about {per_run * (runs - n) / 60:.1f} min left)")

    thread_scores = [p_flagged(reference[k]["first"], yes_ids, no_ids) for k, i in enumerate(items) if i["kind"] == "thread"]
    threshold = statistics.median(thread_scores) if thread_scores else 0.5
    per_item = []
    for k, item in enumerate(items):
        ref = reference[k]
        per_item.append({"id": item["id"], "kind": item["kind"], "label": item.get("label"),
                         "length": item["target_tokens"], "prompt_tokens": item["prompt_tokens"],
                         "p_full": p_flagged(ref["first"], yes_ids, no_ids) if item["kind"] == "thread" else None,
                         "needle_full": (item["answer"].lower() in ref["text"].lower()) if item["kind"] == "needle" else None})
    rows = [summarise("none", None, None, [(items[k], per_item[k], None) for k in range(len(items))], threshold)]
    for policy in args.policies:
        for budget in args.budgets:
            for length in sorted({i["target_tokens"] for i in items}):
                group = []
                for r in raw:
                    item = items[r["item"]]
                    if r["policy"] != policy or r["budget"] != budget or item["target_tokens"] != length:
                        continue
                    ref = reference[r["item"]]
                    measured = {"kl": kl_top(ref["top"], r["top"])}
                    if args.kl_token > 1:  # conditioned on the same tokens as the full cache's, or not
                        measured["same_prefix"] = r["tokens"][:at] == ref["tokens"][:at]
                        measured["kl_first"] = kl_top(ref["first"], r["first"])
                    if item["kind"] == "thread":
                        measured["p"] = p_flagged(r["first"], yes_ids, no_ids)
                    else:
                        measured["needle"] = item["answer"].lower() in r["text"].lower()
                    r.update(measured)  # per item in the JSON too: the report pairs policies item by item
                    group.append((item, per_item[r["item"]], measured))
                if group:
                    rows.append(summarise(policy, budget, length, group, threshold))
    for length in sorted({i["target_tokens"] for i in items}):
        rows.append(summarise("none", None, length, [(items[k], per_item[k], None) for k in range(len(items))
                                                     if items[k]["target_tokens"] == length], threshold))
    return {"date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv), "model": str(model.name),
            "data": {"name": manifest["name"], "version": manifest["version"], "params": manifest["params"],
                     "sha256": manifest["items_jsonl_sha256"]},
            "chunk": args.chunk, "dtype": args.dtype, "top_k": args.top_k, "kl_token": args.kl_token,
            "threshold": threshold,
            "policy_config": args.policy_config, "settings": effective_settings(args), "code": code_version(),
            "seconds": time.time() - started, "rows": rows, "items": per_item,
            "raw": [{k: v for k, v in r.items() if k not in ("top", "first", "tokens")} for r in raw]}


def effective_settings(args) -> dict:
    """Every setting each policy of the run used, defaults included: a policy's name and --policy-config say what
    was asked; the defaults behind them may change between versions (e.g. ReST-KV's chunk_* of 2026-12-05)."""
    from vllm_restkv.config import KVEvictionConfig
    from vllm_restkv.policies import POLICIES

    out = {}
    for policy in args.policies:
        config = KVEvictionConfig.from_value({**args.policy_config, "policy": policy, "budget": max(args.budgets)})
        used = [*POLICIES[policy].settings, "evict_during_prefill", "evict_after_prefill", "decode_interval"]
        out[policy] = {name: getattr(config, name) for name in used}
    return out


def code_version() -> str | None:
    """The plugin's commit ("+" when the working tree differs from it), None outside a git checkout."""
    import subprocess

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=30, check=True).stdout

    try:
        changed = git("status", "--porcelain", "--untracked-files=no").strip()
        return git("rev-parse", "--short", "HEAD").strip() + ("+" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return None


def summarise(policy: str, budget: int | None, length: int | None, group: list, threshold: float) -> dict:
    from vllm_restkv.moderator import auroc

    threads = [(item, ref, m) for item, ref, m in group if item["kind"] == "thread"]
    needles = [(item, ref, m) for item, ref, m in group if item["kind"] == "needle"]
    full = policy == "none"
    scores = [ref["p_full"] if full else m["p"] for _, ref, m in threads]
    labels = [item["label"] for item, _, _ in threads]
    row = {"policy": policy, "budget": budget, "length": length, "threads": len(threads), "needles": len(needles),
           "compression": (statistics.mean(i["prompt_tokens"] for i, _, _ in group) / budget) if budget else 1.0}
    if threads:
        flags = [s >= threshold for s in scores]
        full_flags = [ref["p_full"] >= threshold for _, ref, _ in threads]
        row["agreement"] = sum(a == b for a, b in zip(flags, full_flags)) / len(threads)
        row["mean_abs_dp"] = statistics.mean(abs(s - ref["p_full"]) for s, (_, ref, _) in zip(scores, threads))
        row["auroc"] = auroc(scores, labels) if 0 < sum(labels) < len(labels) else None
        row["recall"] = sum(f for f, y in zip(flags, labels) if y) / max(sum(labels), 1)
    row["kl"] = 0.0 if full else statistics.mean(m["kl"] for _, _, m in group)
    if not full and "same_prefix" in group[0][2]:
        row["same_prefix"] = statistics.mean(float(m["same_prefix"]) for _, _, m in group)
        row["kl_first"] = statistics.mean(m["kl_first"] for _, _, m in group)
    if needles:
        row["needle_accuracy"] = statistics.mean(
            float(ref["needle_full"] if full else m["needle"]) for _, ref, m in needles)
    return row


def print_table(result: dict) -> None:
    later = result.get("kl_token", 1) > 1
    print(f"{result['data']['name']} v{result['data']['version']}, model {result['model']}, chunk {result['chunk']}, "
          f"verdict threshold {result['threshold']:.3f} (full-cache median), KL at generated token "
          f"{result.get('kl_token', 1)}")
    extra = " KL at token 1 | same tokens before |" if later else ""
    print(f"| policy | budget | length | compression | agreement | mean abs dP | KL | needle acc | AUROC |{extra}")
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|" if later else ""))
    for r in result["rows"]:
        if r["length"] is None and r["policy"] != "none":
            continue
        f = lambda key, fmt: (fmt.format(r[key]) if r.get(key) is not None else "-")  # noqa: E731
        print(f"| {r['policy']} | {r['budget'] or 'full'} | {r['length'] or 'all'} | {r['compression']:.1f}x | "
              f"{f('agreement', '{:.3f}')} | {f('mean_abs_dp', '{:.4f}')} | {f('kl', '{:.4f}')} | "
              f"{f('needle_accuracy', '{:.2f}')} | {f('auroc', '{:.3f}')} |"
              + (f" {f('kl_first', '{:.4f}')} | {f('same_prefix', '{:.2f}')} |" if later else ""))
    print(f"\ncommand: {result['command']}")


if __name__ == "__main__":
    sys.exit(main())
