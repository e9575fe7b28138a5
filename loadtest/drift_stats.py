"""How large ReST-KV's AWS drift s gets on a real model's attention, and how often it is exactly 0.

    .venv/bin/python loadtest/drift_stats.py --data .cache/bench/modthreads-s4 [--items 6] [--lengths 512 768 1024]

For each item's prompt, SmolLM2-135M (transformers, eager attention, fp32) runs once; for every layer, query head,
length L (the prompt cut to L tokens) and budget, the drift of section 4 of the algorithm is computed from the last
`--window` queries' attention over the first L keys, as the engine's eviction at that length would. Prints, per
(L, budget), how many heads had s = 0 (where the official code shifts by +1 and ours does not), the largest |s| and
the bound L - n below which the plugin skips the drift (|s| <= L - n < beta).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vllm_restkv import models, scoring


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a benchmark data directory (items.jsonl)")
    parser.add_argument("--items", type=int, default=6)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 768, 1024])
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--target-tokens", type=int, default=None, help="only items of this target length")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    path = models.prepare("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    items = [json.loads(line) for line in (args.data / "items.jsonl").open()]
    items = [it for it in items if args.target_tokens in (None, it.get("target_tokens"))][: args.items]
    stats: dict[tuple[int, int], list] = {}
    w = args.window
    for i, item in enumerate(items, 1):
        ids = tokenizer(item["prompt"], return_tensors="pt").input_ids[:, : max(args.lengths)]
        with torch.no_grad():
            attentions = model(ids, output_attentions=True).attentions
        for length in args.lengths:
            if ids.shape[1] < length:
                continue
            for budget in args.budgets:
                n = budget - w
                if n <= 0 or budget >= length:
                    continue
                entry = stats.setdefault((length, budget), [0, 0, 0.0])
                for layer in attentions:
                    attn = layer[0, :, length - w: length, :length].double()
                    attn = attn / attn.sum(-1, keepdim=True)  # the window's rows over the first L keys only
                    s = scoring.drift_score(attn, n)
                    entry[0] += s.numel()
                    entry[1] += int((s == 0).sum())
                    entry[2] = max(entry[2], float(s.abs().max()))
        print(f"[{i}/{len(items)}] {item['id']}: {ids.shape[1]} tokens", file=sys.stderr, flush=True)
    print("| L | budget | heads x layers x items | s = 0 | largest abs(s) | bound L - n |")
    print("|---|---|---|---|---|---|")
    for (length, budget), (total, zero, largest) in sorted(stats.items()):
        print(f"| {length} | {budget} | {total} | {zero} | {largest:.1f} | {length - budget + w} |")
    print(f"\ncommand: {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
