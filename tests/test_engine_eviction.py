"""Real eviction inside vLLM's V1 engine (in-process engine via tests/engine_driver.py, tiny random Llama, fp32).

The oracle is independent of our code: plain transformers, fp32, one forward over prompt + generated tokens with
a 4D mask in which each query sees exactly the tokens that StreamingLLM (sinks + recent, a kept set known in
advance) leaves in the cache at that moment, at their true RoPE positions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.server
DRIVER = Path(__file__).with_name("engine_driver.py")
SINKS = 4


def run_engine(spec: dict, timeout: float = 600) -> dict:
    proc = subprocess.run([sys.executable, str(DRIVER), json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT_JSON ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:] + proc.stderr[-6000:])
    return json.loads(lines[-1][len("RESULT_JSON "):])


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n,), generator=g).tolist()


def streaming_keep(cache: list[int], budget: int) -> list[int]:
    return cache[:SINKS] + cache[len(cache) - (budget - SINKS):] if len(cache) > budget else cache


def streaming_mask(prompt_len: int, total: int, budget: int, interval: int, chunk: int) -> torch.Tensor:
    """allowed[q, k]: may the query at position q see the key at position k, under sinks+recent eviction."""
    allowed = torch.zeros(total, total, dtype=torch.bool)
    cache: list[int] = []
    start = 0
    while start < prompt_len:  # prefill chunks, evicting at every chunk boundary
        end = min(start + chunk, prompt_len)
        for q in range(start, end):
            allowed[q, cache + list(range(start, q + 1))] = True
        cache = streaming_keep(cache + list(range(start, end)), budget)
        start = end
    for q in range(prompt_len, total):  # decode: evict back to the budget every `interval` extra tokens
        cache.append(q)
        allowed[q, cache] = True
        if len(cache) - budget >= interval:
            cache = streaming_keep(cache, budget)
    return allowed


def oracle_logprobs(model_dir: Path, tokens: list[int], allowed: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        logits = model(torch.tensor([tokens]), attention_mask=mask[None, None],
                       position_ids=torch.arange(len(tokens))[None]).logits[0]
    return torch.log_softmax(logits.float(), -1)


@pytest.mark.parametrize("chunk", [4096, 256], ids=["one-chunk", "chunked-prefill"])
def test_streaming_eviction_matches_masked_oracle(tiny_model, chunk):
    prompt_len, budget, interval, new = 1000, 160, 32, 70
    prompt = prompt_ids(prompt_len, seed=1)
    result = run_engine({
        "model": str(tiny_model),
        "kv_eviction": {"policy": "streamingllm", "budget": budget, "decode_interval": interval},
        "llm": {"max_num_batched_tokens": chunk},
        "prompts": [prompt], "max_tokens": new,
    })
    generated = result["tokens"][0]
    tokens = prompt + generated
    allowed = streaming_mask(prompt_len, len(tokens), budget, interval, chunk)
    logprobs = oracle_logprobs(tiny_model, tokens, allowed)
    oracle = torch.tensor([logprobs[prompt_len - 1 + i, t].item() for i, t in enumerate(generated)])
    ours = torch.tensor(result["logprobs"][0])
    assert torch.allclose(ours, oracle, atol=1e-4), (ours - oracle).abs().max()
    # greedy choices equal the oracle's argmax
    argmax = logprobs[prompt_len - 1 : len(tokens) - 1].argmax(-1).tolist()
    assert argmax == generated
    # and eviction really changed something: full attention gives different log-probs
    full = oracle_logprobs(tiny_model, tokens, torch.ones_like(allowed).tril())
    full_lp = torch.tensor([full[prompt_len - 1 + i, t].item() for i, t in enumerate(generated)])
    assert (full_lp - oracle).abs().max() > 1e-3
    stats = result["stats"]
    assert stats["events"].get("decode", 0) >= 2 and stats["evicted_tokens"] > 0
    assert result["final_free_blocks"] == result["idle_free_blocks"]  # every block came back
    if chunk == 256:  # the request never held more than budget + one chunk of KV
        peak = max(max(step.values(), default=0) for step in result["trace"]["req_blocks"])
        assert peak <= -(-(budget + chunk) // result["block_size"]), peak
