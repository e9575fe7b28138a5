"""Build the `restkv-modthreads` long-context moderation data set (offline, deterministic) with its manifest.

    .venv/bin/python loadtest/make_dataset.py --out .cache/bench/modthreads [--split test] [--lengths 1024 2048 4096]
        [--threads-per-length 12] [--needles-per-length 6] [--seed 0]

Same arguments, same bytes (the manifest's checksums show it). See vllm_restkv/benchdata.py for what an item is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make(out: Path, split: str, lengths: list[int], threads: int, needles: int, seed: int, log=print) -> dict:
    from vllm_restkv.benchdata import build_dataset, write_dataset
    from vllm_restkv.models import prepare_smollm2, set_offline_env

    set_offline_env()
    from transformers import AutoTokenizer

    tokenizer_dir = prepare_smollm2(log=log)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    items = build_dataset(tokenizer, split=split, lengths=lengths, threads_per_length=threads,
                          needles_per_length=needles, seed=seed)
    params = {"split": split, "lengths": lengths, "threads_per_length": threads, "needles_per_length": needles,
              "seed": seed}
    manifest = write_dataset(out, items, params, "SmolLM2-135M-Instruct")
    log(f"{out}: {manifest['counts']} (sha256 {manifest['items_jsonl_sha256'][:12]})")
    return manifest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--threads-per-length", type=int, default=12)
    p.add_argument("--needles-per-length", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    make(a.out, a.split, a.lengths, a.threads_per_length, a.needles_per_length, a.seed,
         log=lambda m: print(m, file=sys.stderr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
