"""Selection matters: SmolLM2 recalls a fact stated before a long filler when restkv keeps it within a small
budget, and loses it when StreamingLLM (sinks + recent) drops it. One engine, three requests (per-request xargs)."""

from __future__ import annotations

import pytest

from conftest import SERVE_DTYPE
from test_engine_eviction import run_engine

pytestmark = pytest.mark.server

COLORS = ["red", "green", "blue", "yellow", "white", "black", "brown", "grey"]
THINGS = ["chair", "table", "lamp", "box", "book", "cup", "bag", "coat"]


def filler(sentences: int) -> str:
    return " ".join(
        f"Shelf {i} holds a {COLORS[(i * 3) % 8]} {THINGS[(i * 5) % 8]}." for i in range(sentences)
    )


def test_restkv_keeps_the_fact_streamingllm_drops_it(smollm2_model):
    prompt = ("The secret password is Kangaroo. " + filler(90) +
              " Question: what is the secret password? Answer: The secret password is")
    result = run_engine({
        "model": str(smollm2_model), "dtype": SERVE_DTYPE, "max_tokens": 4, "max_model_len": 2048,
        "kv_eviction": {"policy": "restkv", "budget": 128},
        "prompts": [prompt] * 3,
        "extra_args": [{"kv_eviction": "none"}, None, {"kv_eviction": "streamingllm"}],
    })
    full, restkv, streaming = result["texts"]
    assert "Kangaroo" in full, full
    assert "Kangaroo" in restkv, restkv
    assert "Kangaroo" not in streaming, streaming
    assert result["stats"]["requests_evicted"] == 2
