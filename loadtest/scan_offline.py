"""Which positions should a token-scan moderator read? Full-cache thread AUROC of a moderator's head under the
three `/v1/moderations` scorings, computed offline with transformers (fp32, no server, no eviction) on the same
threads as `eval_moderator.py` (held-out comments, clean filler, half with one buried insult):

- last_token: the prompt's last position (what vLLM's /classify reads),
- max_token: the highest P(insult) over every text position and the last position,
- max_line: the highest over the last token of each line and the last position.

Two line aggregations that no server offers are printed after them, to test whether an insult shows better as an
outlier of its own thread than as an absolute score (they rank threads only, so no rate at 0.5): the highest line's
log-odds minus the thread's mean line log-odds, and its margin over the second-highest line.

    .venv/bin/python loadtest/scan_offline.py --variant moderator-threads --threads 60

About 7 minutes for 60 threads of 2,000 tokens on 2 cores. Prints one line per scoring (AUROC, share of benign
threads flagged at 0.5, recall at 0.5); progress on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "loadtest"))

from eval_moderator import build_threads  # noqa: E402
from vllm_restkv.moderator import auroc, line_ends, prepare_moderator, rates_at, template_parts  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=["moderator", "moderator-threads"], default="moderator-threads")
    p.add_argument("--threads", type=int, default=60)
    p.add_argument("--thread-tokens", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    model_dir = prepare_moderator(log=lambda m: print(m, file=sys.stderr),
                                  variant="comments" if args.variant == "moderator" else "threads")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    weights = load_file(str(model_dir / "model.safetensors"))
    head_w, head_b = weights["score.weight"].float(), weights["score.bias"].float()
    prefix, tail = template_parts(tokenizer)
    threads = build_threads(args.threads, args.thread_tokens, args.seed, tokenizer)
    scores: dict[str, list[float]] = {"last_token": [], "max_token": [], "max_line": []}
    outliers: dict[str, list[float]] = {"line max minus line mean (log-odds)": [], "line max minus 2nd line": []}
    started = time.time()
    for k, thread in enumerate(threads):
        text = thread["text"]
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = prefix + enc["input_ids"] + tail
        with torch.no_grad():
            hidden = model(torch.tensor([ids])).last_hidden_state[0]
            logits = hidden @ head_w.T + head_b
            p_insult = torch.softmax(logits, -1)[:, 1]
        last = float(p_insult[-1])
        ends = [len(prefix) + e for e in line_ends(enc["offset_mapping"], text)]
        scores["last_token"].append(last)
        scores["max_token"].append(max(float(p_insult[len(prefix): len(ids) - len(tail)].max()), last))
        scores["max_line"].append(max(float(p_insult[ends].max()), last))
        line_odds = (logits[ends, 1] - logits[ends, 0]).sort(descending=True).values
        outliers["line max minus line mean (log-odds)"].append(float(line_odds[0] - line_odds.mean()))
        outliers["line max minus 2nd line"].append(float(line_odds[0] - line_odds[1]) if len(line_odds) > 1 else 0.0)
        print(f"  thread {k + 1}/{len(threads)} ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    labels = [t["label"] for t in threads]
    print(f"{args.variant}, {len(threads)} threads of ~{args.thread_tokens} tokens (seed {args.seed}), full cache:")
    for name, s in scores.items():
        rates = rates_at(s, labels)
        print(f"  {name:10s} AUROC {auroc(s, labels):.3f}  benign flagged at 0.5 {rates['false_positive_rate']:.2f}  "
              f"recall at 0.5 {rates['recall']:.2f}")
    print("not served, outlier aggregations of the line ends:")
    for name, s in outliers.items():
        print(f"  {name:36s} AUROC {auroc(s, labels):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
