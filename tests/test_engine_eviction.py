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


def run_driver(spec: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        return subprocess.run([sys.executable, str(DRIVER), "@" + f.name], capture_output=True, text=True,
                              timeout=timeout)
    finally:
        Path(f.name).unlink()


def run_engine(spec: dict, timeout: float = 600) -> dict:
    proc = run_driver(spec, timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT_JSON ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:] + proc.stderr[-6000:])
    return json.loads(lines[-1][len("RESULT_JSON "):])


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n,), generator=g).tolist()


def streaming_keep(cache: list[int], budget: int) -> list[int]:
    return cache[:SINKS] + cache[len(cache) - (budget - SINKS):] if len(cache) > budget else cache


def streaming_mask(prompt_len: int, total: int, budget: int, slack: int, chunk: int) -> tuple[torch.Tensor, int]:
    """allowed[q, k]: may the query at position q see the key at position k, under sinks+recent eviction; and the
    number of decode-time evictions (back to the budget whenever `slack` tokens have grown past it)."""
    allowed = torch.zeros(total, total, dtype=torch.bool)
    cache: list[int] = []
    start = 0
    while start < prompt_len:  # prefill chunks, evicting at every chunk boundary
        end = min(start + chunk, prompt_len)
        for q in range(start, end):
            allowed[q, cache + list(range(start, q + 1))] = True
        cache = streaming_keep(cache + list(range(start, end)), budget)
        start = end
    decode_evictions = 0
    for q in range(prompt_len, total):  # decode: evict back to the budget every `slack` extra tokens
        cache.append(q)
        allowed[q, cache] = True
        if len(cache) - budget >= slack:
            cache = streaming_keep(cache, budget)
            # the last token is never computed, and the step that samples it (computing q = total - 2) does not
            # evict: the request ends there (worker_state.ends_this_step)
            decode_evictions += q < total - 2
    return allowed, decode_evictions


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
    prompt_len, budget, interval, new = 1000, 160, 32, 230
    prompt = prompt_ids(prompt_len, seed=1)
    result = run_engine({
        "model": str(tiny_model),
        "kv_eviction": {"policy": "streamingllm", "budget": budget, "decode_interval": interval},
        "llm": {"max_num_batched_tokens": chunk},
        "prompts": [prompt], "max_tokens": new,
    })
    generated = result["tokens"][0]
    tokens = prompt + generated
    # the decode interval is rounded up so that the last KV block fills: 32 -> 96 with blocks of 128 (192 -> 256)
    bs = result["block_size"]
    slack = -(-(budget + interval) // bs) * bs - budget
    assert slack >= interval and (budget + slack) % bs == 0
    allowed, decode_evictions = streaming_mask(prompt_len, len(tokens), budget, slack, chunk)
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
    assert stats["events"].get("decode", 0) == decode_evictions >= 2 and stats["evicted_tokens"] > 0
    assert result["final_free_blocks"] == result["idle_free_blocks"]  # every block came back
    if chunk == 256:  # the request never held more than budget + one chunk of KV
        peak = max(max(step.values(), default=0) for step in result["trace"]["req_blocks"])
        assert peak <= -(-(budget + chunk) // result["block_size"]), peak


def test_budget_above_prompt_length_is_full_attention(tiny_model):
    """With a budget no prompt reaches, restkv evicts nothing and output equals full attention (oracle)."""
    prompt = prompt_ids(600, seed=2)
    result = run_engine({"model": str(tiny_model), "kv_eviction": {"policy": "restkv", "budget": 4096},
                         "prompts": [prompt], "max_tokens": 12})
    generated = result["tokens"][0]
    tokens = prompt + generated
    full = oracle_logprobs(tiny_model, tokens, torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril())
    oracle = torch.tensor([full[599 + i, t].item() for i, t in enumerate(generated)])
    assert torch.allclose(torch.tensor(result["logprobs"][0]), oracle, atol=1e-4)
    assert result["stats"]["evicted_tokens"] == 0
    # 600 + 12 tokens can never outgrow 4,096: its queries are not even captured (no per-step cost)
    assert result["captured_query_tokens"] == 0


def concurrency_spec(model, policy):
    prompts = [prompt_ids(1500, seed=10 + i) for i in range(8)]
    spec = {"model": str(model), "prompts": prompts, "max_tokens": 24, "max_model_len": 2048,
            "llm": {"num_gpu_blocks_override": 40, "max_num_seqs": 8}}
    if policy:
        spec["kv_eviction"] = {"policy": policy, "budget": 256}
    return spec


def test_eviction_frees_blocks_and_runs_more_requests_at_once(tiny_model):
    """Same capped KV cache (39 usable blocks of 128 tokens), 8 prompts of 1,500 tokens: restkv holds several
    times more requests at once than no eviction, every request completes, and every block comes back."""
    none = run_engine(concurrency_spec(tiny_model, None))
    restkv = run_engine(concurrency_spec(tiny_model, "restkv"))
    assert all(len(t) == 24 for t in none["tokens"] + restkv["tokens"])
    assert restkv["max_running"] >= 2 * none["max_running"], (restkv["max_running"], none["max_running"])
    assert restkv["stats"]["freed_blocks"] >= 8 * (12 - 3)
    assert restkv["captured_query_tokens"] >= 8 * (32 + 23)  # window queries at the end of prefill, then decode
    for result in (none, restkv):
        assert result["final_free_blocks"] == result["idle_free_blocks"]
    # the allocator's own count: while requests run, restkv leaves far more blocks free
    assert max(restkv["trace"]["free_blocks"]) > max(none["trace"]["free_blocks"][:-1] or [0])


def test_admission_by_what_a_request_will_hold(tiny_model):
    """8 prompts of 2,048 tokens (16 blocks each), 63 usable blocks, chunks of 512. vLLM admits a request when its
    whole prompt fits in the free blocks; an evicting request (budget 128) never holds more than budget + one chunk
    (5 blocks), so far more run at once. With a budget it never reaches, requests are sized by their whole prompt:
    3 at a time (3 x 17 blocks with decode), no preemption. That also needs the blocks promised to requests still
    in chunked prefill: chunks cut at eviction boundaries leave step budget to admit more requests, and counting
    only the blocks already held over-admitted (5 running, 8 preemptions before the fix)."""
    prompts = [prompt_ids(2048, seed=70 + i) for i in range(8)]
    spec = {"model": str(tiny_model), "prompts": prompts, "max_tokens": 32, "max_model_len": 4096,
            "llm": {"num_gpu_blocks_override": 64, "max_num_seqs": 8, "max_num_batched_tokens": 512}}
    evicting = run_engine({**spec, "kv_eviction": {"policy": "restkv", "budget": 128}})
    never_reached = run_engine({**spec, "kv_eviction": {"policy": "restkv", "budget": 4096}})
    assert evicting["max_running"] >= 6, evicting["max_running"]
    assert never_reached["max_running"] == 3, never_reached["max_running"]
    assert never_reached["preemptions"] == 0 and evicting["preemptions"] == 0
    for result in (evicting, never_reached):
        assert all(len(t) == 32 for t in result["tokens"])
        assert result["final_free_blocks"] == result["idle_free_blocks"]


def test_preemption_of_evicted_requests(tiny_model):
    """A cache too small for the decode growth forces preemptions of compacted requests; they recompute from
    scratch, are evicted again, and complete; no block leaks. One request runs without eviction. Run again with
    prefix caching on (the non-evicting request may then resume from its own cached blocks; the evicting ones
    bypass the cache): the same tokens."""
    prompts = [prompt_ids(600, seed=20 + i) for i in range(4)]
    spec = {"model": str(tiny_model), "prompts": prompts, "max_tokens": 200, "max_model_len": 1024,
            "kv_eviction": {"policy": "restkv", "budget": 512, "decode_interval": 256},
            "extra_args": [None, None, None, {"kv_eviction": "none"}],
            "llm": {"num_gpu_blocks_override": 16, "max_num_seqs": 4}}
    first = run_engine(spec)
    second = run_engine({**spec, "llm": {**spec["llm"], "enable_prefix_caching": True}})
    for result in (first, second):
        assert result["preemptions"] > 0
        assert all(len(t) == 200 for t in result["tokens"])
        assert result["final_free_blocks"] == result["idle_free_blocks"]
    assert second["tokens"] == first["tokens"]


def test_mixed_batch_with_per_request_settings(tiny_model):
    """One request evicts with the server policy, one with its own policy and budget, one turns eviction off."""
    prompts = [prompt_ids(900, seed=30 + i) for i in range(3)]
    result = run_engine({
        "model": str(tiny_model), "prompts": prompts, "max_tokens": 8,
        "kv_eviction": {"policy": "restkv", "budget": 256},
        "extra_args": [None, {"kv_eviction": "h2o", "kv_eviction_budget": 64}, {"kv_eviction": "none"}],
    })
    ratios = sorted(result["stats"]["kept_ratio"] if "kept_ratio" in result["stats"] else result["stats"]["kept_ratios"])
    assert len(ratios) == 2  # the "none" request was never evicted
    assert abs(ratios[0] - 64 / 900) < 1e-9 and abs(ratios[1] - 256 / 900) < 1e-9
    assert result["final_free_blocks"] == result["idle_free_blocks"]


def test_a_request_can_defer_eviction_to_the_end_of_its_prompt(tiny_model):
    """`vllm_xargs.kv_eviction_during_prefill` false: that request is evicted once, after its whole prompt (the
    paper's setting), while the other is evicted at every chunk boundary; the deferred one holds its whole prompt
    until then and is admitted by it."""
    prompts = [prompt_ids(900, seed=60), prompt_ids(900, seed=61)]
    result = run_engine({
        "model": str(tiny_model), "prompts": prompts, "max_tokens": 4,
        "kv_eviction": {"policy": "restkv", "budget": 128},
        "extra_args": [None, {"kv_eviction_during_prefill": False}],
        "llm": {"max_num_batched_tokens": 256, "max_num_seqs": 4},
    })
    # at 256, 512, 768 and after the prompt (900) for the first; after the prompt only for the second
    assert result["stats"]["events"] == {"prefill": 5}
    # kept / held at each eviction: 128 of 256, 512 and 768 tokens, then 128 of 900 for each request
    assert sorted(result["stats"]["kept_ratios"]) == pytest.approx(sorted([128 / 256, 128 / 512, 128 / 768] +
                                                                          [128 / 900] * 2))
    most = {}
    for step in result["trace"]["req_blocks"]:
        for rid, n in step.items():
            most[rid] = max(most.get(rid, 0), n)
    # (traced after each step) at most 128 + one chunk of 256 tokens: 3 blocks; the deferred request held its prompt
    # up to the last chunk (768 tokens: 6 blocks) and more
    at_chunks, deferred = sorted(most.values())
    assert at_chunks <= 3 and deferred >= 6
    assert all(len(t) == 4 for t in result["tokens"])
    assert result["final_free_blocks"] == result["idle_free_blocks"]


def test_eviction_points_and_outputs_do_not_depend_on_load(tiny_model):
    """Three evicting requests of different lengths run as one batch and one at a time: under load the scheduler
    would cut prefill chunks elsewhere, but chunks of evicting requests end at multiples of the chunk size, so
    they are evicted at the same positions, keep the same tokens and generate the same output."""
    spec = {"model": str(tiny_model), "prompts": [prompt_ids(700 + 230 * i, seed=50 + i) for i in range(3)],
            "max_tokens": 16, "kv_eviction": {"policy": "restkv", "budget": 128},
            "extra_args": [None, {"kv_eviction": "snapkv"}, {"kv_eviction_budget": 200}],
            "llm": {"max_num_batched_tokens": 256, "max_num_seqs": 8}}
    together = run_engine(spec)
    alone = run_engine({**spec, "one_at_a_time": True})
    assert together["max_running"] >= 2  # they did share steps
    assert together["stats"]["events"] == alone["stats"]["events"]
    assert together["stats"]["evicted_tokens"] == alone["stats"]["evicted_tokens"]
    assert together["tokens"] == alone["tokens"]
    for result in (together, alone):
        assert result["final_free_blocks"] == result["idle_free_blocks"]


def test_inputs_longer_than_the_whole_kv_cache(tiny_model):
    """Offline API: 7 usable blocks (896 tokens) and --max-model-len 4096, which vLLM alone refuses at start-up.
    With restkv (budget 256, chunks of 256) three prompts of 3,000 tokens run; no request ever holds more than
    budget + one chunk (4 blocks); the tokens are those of the same eviction with a cache that holds everything."""
    spec = {"model": str(tiny_model), "prompts": [prompt_ids(3000, seed=90 + i) for i in range(3)],
            "max_tokens": 40, "max_model_len": 4096, "kv_eviction": {"policy": "restkv", "budget": 256},
            "llm": {"num_gpu_blocks_override": 8, "max_num_batched_tokens": 256, "max_num_seqs": 4}}
    small = run_engine(spec)
    large = run_engine({**spec, "llm": {**spec["llm"], "num_gpu_blocks_override": 128}})
    assert small["num_gpu_blocks"] == 8
    assert all(len(t) == 40 for t in small["tokens"])
    assert max(n for step in small["trace"]["req_blocks"] for n in step.values()) <= 4
    assert small["final_free_blocks"] == small["idle_free_blocks"]
    assert small["stats"]["events"] == large["stats"]["events"]
    assert small["tokens"] == large["tokens"]


def test_restkv_carry_reaches_the_engine_and_changes_what_is_kept(tiny_model):
    """`carry` (ReST-KV's blend with the previous eviction's scores) through the engine: its per-token state follows
    the kept tokens across chunk-boundary evictions (policies.base.after_select). The same prompt with carry 0 and
    0.5 keeps other tokens (so the log-probs differ) while both evict at the same points and return every block."""
    prompt = prompt_ids(1000, seed=70)
    runs = [run_engine({"model": str(tiny_model), "prompts": [prompt], "max_tokens": 8,
                        "kv_eviction": {"policy": "restkv", "budget": 160, "carry": carry},
                        "llm": {"max_num_batched_tokens": 256}}) for carry in (0.0, 0.5)]
    for result in runs:
        assert result["stats"]["events"] == {"prefill": 4}  # at 256, 512, 768 and after the prompt (1000)
        assert result["final_free_blocks"] == result["idle_free_blocks"]
    plain, carried = (torch.tensor(r["logprobs"][0]) for r in runs)
    assert (plain - carried).abs().max() > 1e-4, (plain - carried).abs().max()


def test_no_eviction_in_the_step_that_ends_a_request(tiny_model):
    """A one-token verdict after a long prompt is evicted at its chunk boundaries but not after its prompt: the
    step that samples a request's last token (max_tokens) would only compact KV about to be released. Its token is
    the one a longer request gets first (that eviction ran after the forward anyway), and every block comes back."""
    prompt = prompt_ids(1000, seed=75)
    spec = {"model": str(tiny_model), "prompts": [prompt, prompt], "kv_eviction": {"policy": "restkv", "budget": 160},
            "llm": {"max_num_batched_tokens": 256}, "params": [{"max_tokens": 1}, {"max_tokens": 6}],
            "one_at_a_time": True}
    result = run_engine(spec)
    # the verdict: 256, 512, 768; the 6-token request: the same and after its prompt (1000), then nothing during
    # decode (6 tokens never reach the decode slack)
    assert result["stats"]["events"] == {"prefill": 3 + 4}
    verdict, longer = result["tokens"]
    assert len(verdict) == 1 and len(longer) == 6 and verdict[0] == longer[0]
    assert result["final_free_blocks"] == result["idle_free_blocks"]


def test_restkv_scores_inside_the_prompt_with_its_chunk_settings(tiny_model):
    """Evictions at chunk boundaries inside the prompt use ReST-KV's chunk_alpha / chunk_kernel_size (default: the
    newest query, no smoothing), the eviction after the prompt and those in decode alpha / kernel_size. Four servers
    (A: defaults; B: chunk_* = the paper's 0.3 / 5; C: B with alpha 1 / kernel 1; D: alpha 1 / kernel 1, chunk_*
    default): the first token follows only the evictions inside the prompt (A = D, B = C, A != B), the later ones
    also the eviction after it (A != D)."""
    prompt = prompt_ids(1000, seed=77)
    paper_inside = {"chunk_alpha": 0.3, "chunk_kernel_size": 5}
    newest_after = {"alpha": 1.0, "kernel_size": 1}
    settings = {"A": {}, "B": paper_inside, "C": {**paper_inside, **newest_after}, "D": newest_after}
    logprobs = {}
    for name, extra in settings.items():
        result = run_engine({"model": str(tiny_model), "prompts": [prompt], "max_tokens": 8,
                             "kv_eviction": {"policy": "restkv", "budget": 160, **extra},
                             "llm": {"max_num_batched_tokens": 256}})
        assert result["stats"]["events"] == {"prefill": 4}, name  # 256, 512, 768 inside the prompt; 1000 after it
        assert result["final_free_blocks"] == result["idle_free_blocks"], name
        logprobs[name] = torch.tensor(result["logprobs"][0])
    a, b, c, d = (logprobs[name] for name in "ABCD")
    assert a[0] == d[0] and b[0] == c[0], (a[0], d[0], b[0], c[0])
    assert abs(a[0] - b[0]) > 1e-5, (a[0], b[0])
    assert (a[1:] - d[1:]).abs().max() > 1e-4, (a - d).abs().max()


def test_restkv_scores_by_the_triton_kernel_in_the_engine(tiny_model):
    """`kernels` through the real engine: with kernels=triton (Triton's interpreter here; on a GPU `auto` does the
    same without it) every ReST-KV eviction of every layer is scored by kernels/restkv_score.py, and the engine
    keeps the tokens the torch path keeps: the same eviction points, tokens and log-probs, every block returned."""
    prompt = prompt_ids(700, seed=79)
    base = {"model": str(tiny_model), "prompts": [prompt], "max_tokens": 100, "llm": {"max_num_batched_tokens": 256},
            "count_triton_scores": True}
    # a decode eviction every 64 tokens with blocks of 128 (16, rounded up to fill the last block: 192 + 64 = 256)
    evict = {"policy": "restkv", "budget": 192, "decode_interval": 16}
    torch_run = run_engine({**base, "kv_eviction": {**evict, "kernels": "torch"}})
    triton_run = run_engine({**base, "kv_eviction": {**evict, "kernels": "triton"}, "env": {"TRITON_INTERPRET": "1"}})
    events = triton_run["stats"]["events"]
    assert events == torch_run["stats"]["events"] and events.get("decode", 0) >= 1, events
    layers = 4  # tiny-llama
    assert torch_run["triton_score_calls"] == 0
    # one per layer and eviction, and the two of the kernel check before the first use (fp32 and bf16 inputs)
    assert triton_run["triton_score_calls"] == layers * sum(events.values()) + 2
    assert triton_run["tokens"] == torch_run["tokens"]
    diff = (torch.tensor(triton_run["logprobs"][0]) - torch.tensor(torch_run["logprobs"][0])).abs().max()
    assert diff < 1e-4, diff
    assert triton_run["final_free_blocks"] == triton_run["idle_free_blocks"]


def test_eviction_under_torch_compile_on_the_cpu(tiny_model):
    """On the CPU vLLM compiles the model unless --enforce-eager, and eviction leaves that on (attention is a custom
    op outside the compiled graph, so the query capture still runs): compiled and eager engines evict at the same
    points, keep the same tokens (same outputs and log-probs), capture the same queries and return every block.
    A forward whose attention skipped the capture (as a replayed graph would) stops with a message instead."""
    prompts = [prompt_ids(700, seed=83), prompt_ids(450, seed=84)]
    base = {"model": str(tiny_model), "prompts": prompts, "max_tokens": 90,
            "kv_eviction": {"policy": "restkv", "budget": 192, "decode_interval": 16}}
    eager = run_engine({**base, "llm": {"max_num_batched_tokens": 256}})
    compiled = run_engine({**base, "llm": {"max_num_batched_tokens": 256, "enforce_eager": False}})
    assert eager["enforce_eager"] and eager["compilation_mode"] == 0
    assert not compiled["enforce_eager"] and compiled["compilation_mode"] > 0  # not switched off by the plugin
    assert compiled["cudagraph_mode"] == "NONE"  # no CUDA graphs on the CPU: attention runs as Python, captured
    events = compiled["stats"]["events"]
    assert events == eager["stats"]["events"] and events.get("decode", 0) >= 2 and events.get("prefill", 0) >= 3, events
    assert compiled["captured_query_tokens"] == eager["captured_query_tokens"] > 0
    assert compiled["tokens"] == eager["tokens"]
    for a, b in zip(compiled["logprobs"], eager["logprobs"]):
        diff = (torch.tensor(a) - torch.tensor(b)).abs().max()
        assert diff < 1e-4, diff
    assert compiled["final_free_blocks"] == compiled["idle_free_blocks"]
    broken = run_driver({**base, "llm": {"max_num_batched_tokens": 256}, "skip_query_capture": True})
    assert broken.returncode != 0 and "RESULT_JSON" not in broken.stdout
    assert "0 of 4 attention layers captured their queries" in broken.stderr + broken.stdout, broken.stderr[-3000:]
    assert "--enforce-eager" in broken.stderr + broken.stdout
