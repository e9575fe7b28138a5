"""Report generator: turns bench_accuracy.py and bench_load.py results into Markdown tables and plots.

    .venv/bin/python loadtest/report.py --accuracy docs/bench/accuracy.json --load docs/bench/load-tiny.json \
        [--load docs/bench/load-smollm2.json] --markdown docs/benchmarks.md --plots docs/bench

The section it writes sits between `<!-- BEGIN modthreads-benchmark -->` and `<!-- END modthreads-benchmark -->`
in the Markdown file (replaced on every run, the rest of the file is kept). Plots: accuracy vs budget
(`accuracy.png`), throughput vs compression (`throughput-<model>.png`) and throughput at equal accuracy
(`equal-accuracy.png`: each policy at the smallest budget where its verdicts agree with the full cache on at least
`--agreement` of the threads).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

BEGIN, END = "<!-- BEGIN modthreads-benchmark -->", "<!-- END modthreads-benchmark -->"
BASELINES = ("snapkv", "h2o", "tova")


def aggregate(rows: list[dict]) -> list[dict]:
    """Per (policy, budget) over all lengths: means weighted by the number of items behind each row."""
    out = {}
    for r in rows:
        if r["length"] is None or r["policy"] == "none":
            continue
        key = (r["policy"], r["budget"])
        a = out.setdefault(key, {"policy": r["policy"], "budget": r["budget"], "threads": 0, "needles": 0,
                                 "_agree": 0.0, "_dp": 0.0, "_kl": 0.0, "_needle": 0.0, "_comp": 0.0, "lengths": [],
                                 "_kl_first": 0.0 if "kl_first" in r else None})
        n, t, nd = r["threads"] + r["needles"], r["threads"], r["needles"]
        a["threads"] += t
        a["needles"] += nd
        a["lengths"].append(r["length"])
        a["_agree"] += r.get("agreement", 0) * t
        a["_dp"] += r.get("mean_abs_dp", 0) * t
        a["_kl"] += r["kl"] * n
        if a["_kl_first"] is not None:  # a --kl-token N > 1 run: the first token's KL too
            a["_kl_first"] += r["kl_first"] * n
        a["_needle"] += r.get("needle_accuracy", 0) * nd
        a["_comp"] += r["compression"] * n
    result = []
    for a in out.values():
        n = a["threads"] + a["needles"]
        result.append({
            "policy": a["policy"], "budget": a["budget"], "lengths": sorted(a["lengths"]), "threads": a["threads"],
            "needles": a["needles"], "agreement": a["_agree"] / a["threads"] if a["threads"] else None,
            "mean_abs_dp": a["_dp"] / a["threads"] if a["threads"] else None, "kl": a["_kl"] / n,
            "needle_accuracy": a["_needle"] / a["needles"] if a["needles"] else None, "compression": a["_comp"] / n,
            "kl_first": a["_kl_first"] / n if a["_kl_first"] is not None else None})
    return result


def check_same_items(runs: list[dict]) -> None:
    """ValueError unless the bench_accuracy.py runs used the same data and got the same full-cache results (then the
    engine was deterministic between them and their items pair up)."""
    base = runs[0]
    for run in runs[1:]:
        if run["data"]["sha256"] != base["data"]["sha256"]:
            raise ValueError("the runs used different data sets")
        if run.get("kl_token", 1) != base.get("kl_token", 1):
            raise ValueError(f"the runs measured KL at different generated tokens ({base.get('kl_token', 1)} and "
                             f"{run.get('kl_token', 1)}, --kl-token)")
        if [i["p_full"] for i in run["items"]] != [i["p_full"] for i in base["items"]]:
            raise ValueError("the full cache's results differ between the runs: items cannot be paired")


def settings_name(policy: str, config: dict | None) -> str:
    """`policy` named after the settings of a run's --policy-config that apply to it: the policy settings it uses
    (EvictionPolicy.settings) and any engine setting; e.g. `restkv {"alpha": 1.0}` but plain `tova` for that run."""
    from vllm_restkv.config import POLICY_SETTINGS
    from vllm_restkv.policies import POLICIES

    used = POLICIES[policy].settings if policy in POLICIES else POLICY_SETTINGS
    applied = {k: v for k, v in (config or {}).items() if k not in POLICY_SETTINGS or k in used}
    return f"{policy} {json.dumps(applied, sort_keys=True)}" if applied else policy


def merge_accuracy(runs: list[dict]) -> dict:
    """Several bench_accuracy.py runs on the same items as one (baselines from one run, a restkv setting from
    another). A run's policies are named after the settings of its --policy-config that apply to them
    (`settings_name`), so that an ablation and the defaults can sit in one table and plot; the same name at the same
    budget from two runs is refused (at other budgets it extends the first run's). Settings that every run shares
    (e.g. `evict_during_prefill` false for all) stay out of the names: they are the merged run's `policy_config`.
    The runs must pass `check_same_items`."""
    check_same_items(runs)
    configs = [run.get("policy_config") or {} for run in runs]
    common = {k: v for k, v in configs[0].items() if all(k in c and c[k] == v for c in configs[1:])}
    merged = dict(runs[0], rows=[], raw=[], command=" ; ".join(r["command"] for r in runs),
                  seconds=sum(r["seconds"] for r in runs), policy_config=common or None)
    owner = {}  # name -> the run it came from
    for i, run in enumerate(runs):
        for key in ("rows", "raw"):
            for r in run.get(key, []):
                if r["policy"] == "none":
                    if i == 0:  # the full cache once
                        merged[key].append(r)
                    continue
                name = settings_name(r["policy"], {k: v for k, v in configs[i].items() if k not in common})
                if owner.setdefault((name, r["budget"]), i) != i:
                    raise ValueError(f"{name} at budget {r['budget']} is in runs {owner[name, r['budget']] + 1} and "
                                     f"{i + 1} with the same settings; leave it out of one of them")
                merged[key].append({**r, "policy": name})
    return merged


def dtype_note(result: dict) -> str:
    """", float32" for results that record their serving dtype (older ones did not: bfloat16 then)."""
    return f", {result['dtype']}" if result.get("dtype") else ""


def eviction_when(acc: dict) -> str:
    config = acc.get("policy_config") or {}
    said = (f"every policy with {json.dumps(config, sort_keys=True)}, " if config else "")
    if config.get("evict_during_prefill") is False:
        return said + "eviction runs once, after the whole prompt (the question in the observation window)"
    return said + "eviction runs at every chunk boundary"


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def accuracy_section(acc: dict, agg: list[dict]) -> list[str]:
    d = acc["data"]
    lines = [
        f"**Fidelity to the full cache** ({acc['date']}; model {acc['model']}{dtype_note(acc)}; data `{d['name']}` v{d['version']} "
        f"{d['params']}, sha256 `{d['sha256'][:16]}`; chunked prefill {acc['chunk']}, so {eviction_when(acc)}; "
        f"{acc['seconds'] / 60:.0f} min). Command: `{acc['command']}`",
        "",
        "Means over all lengths. Agreement: same verdict as the full cache (threshold = the full cache's median "
        f"P(flagged), {acc['threshold']:.3f}); KL: next-token KL(full || evicted) at generated token "
        f"{acc.get('kl_token', 1)}, threads and needles; needle: "
        "password retrieved (the full cache: "
        f"{fmt(next(r for r in acc['rows'] if r['policy'] == 'none' and r['length'] is None).get('needle_accuracy'), '.2f')}).",
        "",
    ]
    first = any(r.get("kl_first") is not None for r in agg)  # a --kl-token N > 1 run also compared token 1
    lines += [f"| policy | budget | compression | agreement | mean abs dP | KL |{' KL at token 1 |' if first else ''} "
              "needle acc |", "|---|---|---|---|---|---|---|" + ("---|" if first else "")]
    for r in sorted(agg, key=lambda r: (r["budget"], r["policy"] != "restkv", r["policy"])):
        lines.append(f"| {r['policy']} | {r['budget']} | {r['compression']:.1f}x | {fmt(r['agreement'], '.3f')} | "
                     f"{fmt(r['mean_abs_dp'], '.4f')} | {fmt(r['kl'], '.4f')} |"
                     + (f" {fmt(r.get('kl_first'), '.4f')} |" if first else "")
                     + f" {fmt(r['needle_accuracy'], '.2f')} |")
    lines += ["", "Per length (the raw rows):", "",
              "| policy | budget | length | compression | agreement | KL | needle acc | AUROC |", "|---|---|---|---|---|---|---|---|"]
    for r in acc["rows"]:
        if r["length"] is None:
            continue
        lines.append(f"| {r['policy']} | {r['budget'] or 'full'} | {r['length']} | {r['compression']:.1f}x | "
                     f"{fmt(r.get('agreement'), '.3f')} | {fmt(r['kl'], '.4f')} | {fmt(r.get('needle_accuracy'), '.2f')} | "
                     f"{fmt(r.get('auroc'), '.3f')} |")
    lines += ["", *verdict_vs_baselines(agg)]
    kinds = sorted({i.get("kind") for i in acc.get("items", [])} - {None})
    fields = ["kl"]
    # the first token with eviction at chunk boundaries: what the evictions inside the prompt alone decided (with one
    # eviction after the prompt it is the full cache's for every policy: the column above shows it)
    if first and (acc.get("policy_config") or {}).get("evict_during_prefill") is not False:
        fields.append("kl_first")
    for field in fields:
        lines += paired_kl_intervals(acc, field=field)
        for kind in kinds if len(kinds) > 1 else []:  # threads and needles measure different things
            lines += paired_kl_intervals(acc, kind=kind, field=field)
        for variant in sorted({r["policy"] for r in agg if r["policy"].startswith("restkv ")}):  # merged settings
            lines += paired_kl_intervals(acc, subject=variant, field=field)
    return lines


def paired_kl_intervals(acc: dict | list[dict], resamples: int = 2000, seed: int = 0,
                        baselines: tuple[str, ...] = BASELINES, subject: str = "restkv",
                        kind: str | None = None, field: str = "kl") -> list[str]:
    """Mean per-item KL difference `subject` (restkv, or a restkv setting of a merged run) - each of `baselines` at
    each budget <= 512 with a 95% paired bootstrap interval (same items, resampled together): whether a ranking
    between policies is more than the choice of items. Several runs (on different draws of the data set) are pooled:
    items are told apart by run. `kind` ("thread" or "needle"): those items only. `field`: "kl" (at the run's --kl-token)
    or "kl_first" (at the first generated token, which a --kl-token N > 1 run also records)."""
    import random

    per = {}
    for run, result in enumerate(acc if isinstance(acc, list) else [acc]):
        for r in result.get("raw", []):
            if field in r and (kind is None or result["items"][r["item"]]["kind"] == kind):
                per.setdefault((r["policy"], r["budget"]), {})[(run, r["item"])] = r[field]
    if not per:
        return ["Per-item KL is not in this run's JSON (older bench_accuracy.py), so no intervals.", ""]
    rng = random.Random(seed)
    which = f", {kind}s only" if kind else ""
    which += ", KL at the first generated token" if field == "kl_first" else ""
    out = [f"Paired by item{which}, {subject} KL minus baseline KL (mean, 95% bootstrap interval; below 0 = {subject} "
           "closer to the full cache; an interval across 0 does not separate them):", ""]
    for (policy, budget), baseline in sorted(per.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        mine = per.get((subject, budget))
        if policy not in baselines or budget > 512 or not mine:
            continue
        diffs = [mine[i] - baseline[i] for i in sorted(set(mine) & set(baseline))]
        means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(resamples))
        low, high = means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]
        verdict = f"{subject} closer" if high < 0 else f"{policy} closer" if low > 0 else "not separated"
        out.append(f"- budget {budget}, vs {policy}: {sum(diffs) / len(diffs):+.4f} [{low:+.4f}, {high:+.4f}] over "
                   f"{len(diffs)} items: {verdict}")
    return [*out, ""] if len(out) > 2 else []


def pooled_accuracy(runs: list[dict]) -> list[str]:
    """Paired KL intervals pooled over draws of the data set: runs on the same draw (same data) are merged first
    (merge_accuracy: e.g. an ablation run next to its baselines' run), then the draws pooled; restkv and every restkv
    setting of the merged runs is paired with the baselines (a setting also with restkv's defaults, where present)."""
    draws = {}
    for run in runs:
        draws.setdefault(run["data"]["sha256"], []).append(run)
    merged = [merge_accuracy(group) for group in draws.values()]
    for m in merged[1:]:  # a name means the same settings and the same measurement in every draw
        for key, what, default in (("policy_config", "settings shared by all their runs", None),
                                   ("kl_token", "--kl-token", 1)):
            if m.get(key, default) != merged[0].get(key, default):
                raise ValueError(f"the draws differ in {what}: {merged[0].get(key, default)} and {m.get(key, default)}")
    subjects = sorted({r["policy"] for m in merged for r in m.get("raw", []) if r["policy"].split(" ")[0] == "restkv"})
    lines = [f"{len(runs)} run(s), {len(merged)} draw(s) of the data set.", ""]
    for subject in subjects or ["restkv"]:
        baselines = BASELINES + (("restkv",) if subject != "restkv" else ())
        lines += paired_kl_intervals(merged, baselines=baselines, subject=subject)
    return lines


def verdict_vs_baselines(agg: list[dict]) -> list[str]:
    """The issue's fidelity target: restkv better than snapkv/h2o/tova at every budget <= 512 (lower KL)."""
    out = ["ReST-KV vs the attention-weight baselines at equal budgets (lower KL is better):", ""]
    met = True
    for budget in sorted({r["budget"] for r in agg if r["budget"] <= 512}):
        mine = next((r for r in agg if r["policy"] == "restkv" and r["budget"] == budget), None)
        others = [r for r in agg if r["policy"] in BASELINES and r["budget"] == budget]
        if not mine or not others:
            continue
        best = min(others, key=lambda r: r["kl"])
        better = mine["kl"] < best["kl"]
        met &= better
        out.append(f"- budget {budget}: restkv KL {mine['kl']:.4f} vs best baseline {best['policy']} {best['kl']:.4f}: "
                   f"{'**better**' if better else '**not better**'}")
    if len(out) == 2:
        return ["ReST-KV vs the attention-weight baselines: not measured in this run (needs restkv and one of "
                f"{', '.join(BASELINES)} at a common budget <= 512).", ""]
    out += ["", f"Target (better at every budget <= 512): **{'met' if met else 'not met'}** in this run.", ""]
    return out


def baseline_cells(load: dict, loads: list[dict]) -> dict:
    """`none` cells of every load test run on the same server set-up (model, KV cache, prompts, chunk), by
    (max_tokens, load level), for a load test without a `none` of its own; its own `none` wins (same run, same noise)."""
    same = lambda other: all(other[k] == load[k] for k in ("model", "kv_blocks", "prompt_tokens", "chunk", "load"))  # noqa: E731
    ordered = [other for other in loads if other is not load and same(other)] + [load]
    return {(c["max_tokens"], c[other["load"]]): c for other in ordered for c in other["cells"] if c["policy"] == "none"}


def load_section(load: dict, none: dict) -> list[str]:
    key = load["load"]
    servers = ("one real `vllm serve` for all policies, chosen per request (`none` = eviction off for that request)"
               if load.get("one_server") else "real `vllm serve` per policy")
    lines = [f"**Load test, {load['model']}{dtype_note(load)}** ({load['date']}; {servers} on 127.0.0.1, KV cache "
             f"{load['kv_blocks']} blocks of {load['server'].get('block_size')} tokens for every server"
             f"{reference_note(load)}, prompts of "
             f"{load['prompt_tokens']} tokens, chunked prefill {load['chunk']}, max {load['max_num_seqs']} sequences, "
             f"{load['requests_per_cell']} requests per cell; {load['seconds'] / 60:.0f} min; peak memory is the "
             f"{load.get('memory_measure', 'summed PSS of the server processes, polled during the cell')}). "
             f"Command: `{load['command']}`", "",
             f"| policy | budget | compression | max_tokens | {key} | req/s | vs none | out tok/s | total tok/s | "
             "TTFT p50/p90/p99 (s) | TPOT p50/p99 (ms) | max running | peak KV | preempt. | peak mem (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {k: c["req_s"] for k, c in none.items()}
    for c in load["cells"]:
        ratio = c["req_s"] / base[(c["max_tokens"], c[key])] if (c["max_tokens"], c[key]) in base else None
        comp = c["mean_prompt_tokens"] / c["budget"] if c["budget"] else 1.0
        tpot = ("-" if c["tpot_p50"] is None else f"{c['tpot_p50'] * 1000:.0f}/{c['tpot_p99'] * 1000:.0f}")
        lines.append(
            f"| {c['policy']} | {c['budget'] or '-'} | {'none' if comp <= 1 else f'{comp:.1f}x'} | {c['max_tokens']} | "
            f"{c[key]:g} | {c['req_s']:.2f} | {fmt(ratio, '.2f')}{'x' if ratio else ''} | {c['output_tok_s']:.1f} | "
            f"{c['total_tok_s']:.0f} | {c['ttft_p50']:.2f}/{c['ttft_p90']:.2f}/{c['ttft_p99']:.2f} | {tpot} | "
            f"{c['max_running']:.0f} | {c['max_kv_usage']:.0%} | {c['preemptions']:.0f} | {c['peak_memory_gib']:.2f} |")
    lines += ["", *load_findings(load, none), ""]
    return lines


def reference_note(load: dict) -> str:
    """The one server with a different cache: bench_load's --reference-kv-blocks (vanilla vLLM given more memory)."""
    blocks = load.get("reference_kv_blocks")
    return f" except `none@{blocks}` (vanilla vLLM with {blocks} blocks)" if blocks else ""


def is_reference_server(cell: dict, load: dict) -> bool:
    """A cell of the reference server (--reference-kv-blocks): a cache other than the run's."""
    return cell.get("kv_blocks") not in (None, load["kv_blocks"])


def load_findings(load: dict, none: dict) -> list[str]:
    """restkv vs none at about 8x compression (the issue's >= 3x target) and at no compression (<= 2% overhead)."""
    key = load["load"]
    out = []
    for c in load["cells"]:
        if is_reference_server(c, load) and (c["max_tokens"], c[key]) in none:
            base = none[(c["max_tokens"], c[key])]
            peers = [p for p in load["cells"] if p["policy"] == "restkv" and p["budget"]
                     and (p["max_tokens"], p[key]) == (c["max_tokens"], c[key])]
            reached = "; restkv " + ", ".join(f"{p['req_s'] / c['req_s']:.0%} of it at budget {p['budget']}"
                                              for p in peers) if peers else ""
            out.append(f"- vanilla vLLM with {c['kv_blocks']} KV blocks instead of {load['kv_blocks']}, "
                       f"max_tokens {c['max_tokens']}, {key} {c[key]:g}: {c['req_s'] / base['req_s']:.2f}x the "
                       f"requests/s of `none`{reached}")
        if c["policy"] != "restkv" or not c["budget"] or (c["max_tokens"], c[key]) not in none:
            continue
        comp = c["mean_prompt_tokens"] / c["budget"]
        base = none[(c["max_tokens"], c[key])]
        if 6 <= comp <= 10:
            out.append(f"- restkv at {comp:.1f}x compression, max_tokens {c['max_tokens']}, {key} {c[key]:g}: "
                       f"**{c['req_s'] / base['req_s']:.2f}x** the requests/s of `none` "
                       f"({c['req_s']:.2f} vs {base['req_s']:.2f}; target >= 3x)")
        if comp <= 1:
            out.append(f"- restkv with budget >= prompt (nothing evicted), max_tokens {c['max_tokens']}, {key} "
                       f"{c[key]:g}: overhead **{(base['req_s'] / c['req_s'] - 1) * 100:+.1f}%** in time per request "
                       f"({c['req_s']:.2f} vs {base['req_s']:.2f} req/s; target <= 2%)")
    return out


def pooled_load_ratios(runs: list[dict]) -> list[str]:
    """Requests/s of every cell relative to `none` in the same run (same max_tokens and load level), run by run, with
    the median and range over the runs: on a noisy machine a ratio that holds in every run is more than one draw."""
    setup = ("model", "kv_blocks", "prompt_tokens", "chunk", "load")
    for run in runs[1:]:
        differ = [k for k in setup if run[k] != runs[0][k]]
        if differ:
            raise ValueError(f"the load tests differ in {', '.join(differ)}: their ratios cannot be pooled")
    key = runs[0]["load"]
    ratios: dict[tuple, list[float]] = {}
    for run in runs:
        none = {(c["max_tokens"], c[key]): c["req_s"] for c in run["cells"] if c["policy"] == "none"}
        for c in run["cells"]:
            level = (c["max_tokens"], c[key])
            if c["policy"] != "none" and level in none:
                ratios.setdefault((c["policy"], c["budget"] or 0, *level), []).append(c["req_s"] / none[level])
    lines = [f"| policy | budget | max_tokens | {key} | req/s vs none, run by run | median | range |",
             "|---|---|---|---|---|---|---|"]
    for (policy, budget, max_tokens, level), values in sorted(ratios.items(), key=lambda kv: (kv[0][2:], kv[0][:2])):
        lines.append(f"| {policy} | {budget or '-'} | {max_tokens} | {level:g} | "
                     f"{', '.join(f'{v:.2f}x' for v in values)} | **{statistics.median(values):.2f}x** | "
                     f"{min(values):.2f}-{max(values):.2f}x |")
    return lines + [""]


def overhead_section(results: list[dict]) -> list[str]:
    """The plugin's share of engine time with nothing to evict, profiled (loadtest/profile_overhead.py)."""
    lines = ["**Overhead with nothing to evict, profiled** (`loadtest/profile_overhead.py`: the in-process engine "
             "under cProfile; the plugin's own code against the whole `generate`; target <= 2%):", "",
             "| command | evicted tokens | plugin time (s) | share of generate |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| `{r['command']}` | {r['evicted_tokens']} | {r['plugin_seconds']:.3f} | "
                     f"**{100 * r['plugin_seconds'] / r['generate_seconds']:.2f}%** |")
    return lines + [""]


def equal_accuracy(agg: list[dict], loads: list[dict], threshold: float) -> list[dict]:
    """Each policy's smallest budget with agreement >= threshold, and its measured throughput there."""
    out = []
    for policy in sorted({r["policy"] for r in agg}):
        ok = sorted((r for r in agg if r["policy"] == policy and r["agreement"] is not None
                     and r["agreement"] >= threshold), key=lambda r: r["budget"])
        entry = {"policy": policy, "budget": ok[0]["budget"] if ok else None, "throughput": {}}
        for load in loads:
            key = load["load"]
            for c in load["cells"]:
                if c["policy"] == policy and c["budget"] == entry["budget"]:
                    entry["throughput"].setdefault(load["model"], []).append(
                        (c["max_tokens"], c[key], c["req_s"]))
        out.append(entry)
    return out


def plots(acc: dict | None, agg: list[dict], loads: list[dict], eq: list[dict], directory: Path,
          names: list[str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if agg:
        panels = [("agreement", "verdict agreement with the full cache"),
                  ("kl", f"next-token KL(full || evicted), token {acc.get('kl_token', 1)}"),
                  ("needle_accuracy", "needle retrieval accuracy")]
        if any(r.get("kl_first") is not None for r in agg):  # a --kl-token N > 1 run: the first token too
            panels.insert(2, ("kl_first", "next-token KL(full || evicted), token 1"))
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
        for ax, (key, title) in zip(axes, panels):
            for policy in sorted({r["policy"] for r in agg}):
                rs = sorted((r for r in agg if r["policy"] == policy and r.get(key) is not None),
                            key=lambda r: r["budget"])
                ax.plot([r["budget"] for r in rs], [r[key] for r in rs], marker="o", label=policy,
                        linewidth=2.5 if policy == "restkv" else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("budget (tokens per layer and KV head)")
            ax.set_title(title)
            if key in ("kl", "kl_first"):
                ax.set_yscale("log")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"restkv-modthreads, {acc['model']}, chunked prefill {acc['chunk']} ({acc['date']})")
        fig.tight_layout()
        fig.savefig(directory / "accuracy.png", dpi=100)
        plt.close(fig)
        written.append("accuracy.png")
    for load, load_name in zip(loads, names):
        key = load["load"]
        max_tokens = sorted({c["max_tokens"] for c in load["cells"]})
        fig, axes = plt.subplots(1, len(max_tokens), figsize=(6 * len(max_tokens), 4), squeeze=False)
        for ax, mt in zip(axes[0], max_tokens):
            level = max(c[key] for c in load["cells"] if c["max_tokens"] == mt)
            cells = [c for c in load["cells"] if c["max_tokens"] == mt and c[key] == level]
            for policy in sorted({c["policy"] for c in cells if c["budget"]}):
                cs = sorted((c for c in cells if c["policy"] == policy),
                            key=lambda c: c["mean_prompt_tokens"] / c["budget"])
                ax.plot([c["mean_prompt_tokens"] / c["budget"] for c in cs], [c["req_s"] for c in cs], marker="o",
                        label=policy, linewidth=2.5 if policy == "restkv" else 1.2)
            for c in cells:
                if c["policy"] == "none":
                    ax.axhline(c["req_s"], color="black", linestyle="--", label="none (full cache)")
                elif is_reference_server(c, load):
                    ax.axhline(c["req_s"], color="grey", linestyle=":",
                               label=f"none with {c['kv_blocks']} blocks (more memory)")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("compression (prompt tokens / budget)")
            ax.set_ylabel("requests/s")
            ax.set_title(f"max_tokens {mt}, {key} {level:g}")
            ax.legend(fontsize=8)
        fig.suptitle(f"Throughput at the same KV cache ({load['kv_blocks']} blocks), {load['model']} ({load['date']})")
        fig.tight_layout()
        name = f"throughput-{load_name}.png"
        fig.savefig(directory / name, dpi=100)
        plt.close(fig)
        written.append(name)
    bars = [(e["policy"], max(e["throughput"][m], key=lambda t: (t[0], t[1]))[2], e["budget"], m)
            for e in eq for m in e["throughput"]]
    if bars:
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar([f"{p}\n@{b} ({m})" for p, _, b, m in bars], [v for _, v, _, _ in bars])
        ax.set_ylabel("requests/s")
        ax.set_title("Throughput at equal accuracy (smallest budget reaching the agreement target)")
        fig.tight_layout()
        fig.savefig(directory / "equal-accuracy.png", dpi=100)
        plt.close(fig)
        written.append("equal-accuracy.png")
    return written


def write_section(markdown: Path, body: list[str]) -> None:
    text = markdown.read_text() if markdown.exists() else "# Benchmarks\n"
    section = "\n".join([BEGIN, *body, END])
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    markdown.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--accuracy", type=Path, nargs="+", default=None, metavar="JSON",
                   help="bench_accuracy.py result(s); several runs on the same items are merged (merge_accuracy)")
    p.add_argument("--load", type=Path, action="append", default=[])
    p.add_argument("--overhead", type=Path, action="append", default=[], help="loadtest/profile_overhead.py JSON")
    p.add_argument("--markdown", type=Path)
    p.add_argument("--plots", type=Path)
    p.add_argument("--pool-accuracy", type=Path, nargs="+", default=None, metavar="JSON",
                   help="only print the paired KL intervals of these bench_accuracy.py runs pooled (different draws "
                        "of the data set: more items, tighter intervals; runs on the same draw are merged first), "
                        "then exit")
    p.add_argument("--pool-load", type=Path, nargs="+", default=None, metavar="JSON",
                   help="only print each cell's requests/s relative to none, run by run, with the median and range "
                        "over these bench_load.py runs (repeats of one set-up), then exit")
    p.add_argument("--agreement", type=float, default=0.95)
    p.add_argument("--preamble", default="", help="text placed first in the section (e.g. the machine)")
    args = p.parse_args(argv)
    for files, pool in ((args.pool_accuracy, pooled_accuracy), (args.pool_load, pooled_load_ratios)):
        if files:
            try:
                lines = pool([json.loads(f.read_text()) for f in files])
            except ValueError as e:
                p.error(str(e))
            print(f"Pooled over {', '.join(str(f) for f in files)}:\n")
            print("\n".join(lines))
            return 0
    if args.markdown is None or args.plots is None:
        p.error("--markdown and --plots are required (unless --pool-accuracy or --pool-load)")
    try:
        acc = merge_accuracy([json.loads(f.read_text()) for f in args.accuracy]) if args.accuracy else None
    except ValueError as e:
        p.error(str(e))
    loads = [json.loads(f.read_text()) for f in args.load]
    agg = aggregate(acc["rows"]) if acc else []
    eq = equal_accuracy(agg, loads, args.agreement)
    names = [f.stem.removeprefix("load-") for f in args.load]
    written = plots(acc, agg, loads, eq, args.plots, names)
    rel = lambda name: os.path.relpath(args.plots / name, args.markdown.parent)  # noqa: E731
    body = ["## Long-context moderation benchmark: ReST-KV vs attention-weight eviction vs the full cache", "",
            f"Written by `loadtest/report.py` on {time.strftime('%Y-%m-%d')}. {args.preamble}".rstrip(), ""]
    if acc:
        body += accuracy_section(acc, agg)
        body += [f"![accuracy vs budget]({rel('accuracy.png')})", ""]
    for load, load_name in zip(loads, names):
        body += load_section(load, baseline_cells(load, loads))
        name = f"throughput-{load_name}.png"
        body += [f"![throughput vs compression]({rel(name)})", ""]
    if args.overhead:
        body += overhead_section([json.loads(f.read_text()) for f in args.overhead])
    if eq and loads:
        body += [f"**Throughput at equal accuracy** (smallest budget with verdict agreement >= {args.agreement:.0%}):",
                 "", "| policy | budget | requests/s (model: max_tokens, load level) |", "|---|---|---|"]
        for e in eq:
            tp = "; ".join(f"{m}: " + ", ".join(f"{mt} tok @ {lv:g}: {v:.2f}" for mt, lv, v in vals)
                           for m, vals in e["throughput"].items())
            tp = tp or ("budget not in the load test" if e["budget"] else "-")
            body.append(f"| {e['policy']} | {e['budget'] or 'never reached'} | {tp} |")
        body.append("")
        if "equal-accuracy.png" in written:
            body += [f"![throughput at equal accuracy]({rel('equal-accuracy.png')})", ""]
    write_section(args.markdown, body)
    print(f"wrote {args.markdown} and {', '.join(written)} in {args.plots}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
