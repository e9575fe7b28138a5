"""Inputs longer than the whole KV cache: with eviction on, a real `vllm serve` starts with a cache smaller than
--max-model-len and answers prompts longer than the cache; what cannot fit is refused with a reason."""

from __future__ import annotations

import concurrent.futures
import re

import httpx
import pytest

from conftest import SERVE_DTYPE, running_server, run_vllm
from vllm_restkv.config import KVEvictionConfig
from vllm_restkv.engine.capacity import held_tokens_bound

pytestmark = pytest.mark.server

BLOCKS = 8  # one is vLLM's null block: 7 x 128 = 896 tokens of KV cache
CAPACITY = (BLOCKS - 1) * 128
SMALL_CACHE = ["--max-model-len", "4096", "--num-gpu-blocks-override", str(BLOCKS), "--max-num-batched-tokens", "256",
               "--dtype", SERVE_DTYPE]


def long_prompt(words: int = 1350) -> str:  # about 2,650 tokens
    return " ".join(f"item{i % 97} is fine." for i in range(words // 3))


@pytest.fixture(scope="module")
def small_cache_server(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("beyond") / "server.log"
    args = [*SMALL_CACHE, "--kv-eviction", "restkv", "--kv-eviction-budget", "256"]
    with running_server(tiny_model, args, log) as server:
        yield server


def complete(url: str, prompt: str, **extra) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 16,
                                                    "ignore_eos": True, "temperature": 0, **extra}, timeout=300)


def test_server_starts_with_a_cache_smaller_than_max_model_len(small_cache_server):
    log = small_cache_server.output()
    match = re.search(r"the KV cache holds (\d+) tokens, fewer than --max-model-len 4096; served anyway", log)
    assert match, log[-3000:]
    assert int(match.group(1)) == CAPACITY
    assert "a request holds at most 512 tokens" in log  # budget 256 + one chunk of 256


def test_prompts_longer_than_the_cache_are_answered(small_cache_server):
    url = small_cache_server.url
    prompt = long_prompt()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: complete(url, prompt), range(3)))
    for answer in answers:
        assert answer.status_code == 200, answer.text
        usage = answer.json()["usage"]
        assert usage["prompt_tokens"] > 2 * CAPACITY, usage
        assert usage["completion_tokens"] == 16
    metrics = httpx.get(url + "/metrics").text
    evicted = sum(float(v) for v in re.findall(r"^restkv_evicted_tokens_total(?:\{[^}]*\})? (\S+)$", metrics, re.M))
    assert evicted >= 3 * (answers[0].json()["usage"]["prompt_tokens"] - CAPACITY)


@pytest.mark.parametrize(
    "xargs, message",
    [
        ({"kv_eviction": "none"}, "KV cache holds 896 tokens, fewer than --max-model-len 4096, so a request cannot "
                                  "turn eviction off"),
        ({"kv_eviction_budget": 700}, "a request would hold up to 956 tokens, but this server's KV cache holds 896"),
        ({"kv_eviction_during_prefill": False}, "kv_eviction_during_prefill false: this server's KV cache holds 896 "
                                                "tokens, fewer than --max-model-len 4096, and a request that is not "
                                                "evicted during prefill holds its whole prompt"),
    ],
)
def test_requests_that_cannot_fit_get_400_and_harm_nobody(small_cache_server, xargs, message):
    url = small_cache_server.url
    bad = complete(url, "Hello", vllm_xargs=xargs)
    assert bad.status_code == 400, bad.text
    assert message in bad.json()["error"]["message"]
    good = complete(url, long_prompt(), vllm_xargs={"kv_eviction_budget": 384})  # 384 + 256 = 640 <= 896
    assert good.status_code == 200, good.text


def test_a_budget_the_cache_cannot_hold_stops_start_up(tiny_model):
    result = run_vllm(["serve", str(tiny_model), *SMALL_CACHE, "--kv-eviction", "restkv",
                       "--kv-eviction-budget", "700"], timeout=240)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "the KV cache holds 896 tokens, but with --kv-eviction restkv and budget 700 a request holds up to 956" \
        in out, out[-3000:]


def test_held_tokens_bound():
    config = KVEvictionConfig(policy="restkv", budget=256, decode_interval=64)
    # generate: budget + the larger of one chunk and the decode growth (64 rounded up to fill the last block)
    assert held_tokens_bound(config, "restkv", 256, 256, 128, pooling=False) == 512
    assert held_tokens_bound(config, "restkv", 256, 64, 128, pooling=False) == 384
    assert held_tokens_bound(config, "restkv", 256, 64, 128, pooling=True) == 320  # pooling ends with its prompt
    assert held_tokens_bound(config, "none", 256, 256, 128, pooling=False) is None
    never_in_decode = KVEvictionConfig(policy="restkv", budget=256, decode_interval=0)
    assert held_tokens_bound(never_in_decode, "restkv", 256, 256, 128, pooling=False) is None
    assert held_tokens_bound(never_in_decode, "restkv", 256, 256, 128, pooling=True) == 512
    no_prefill = KVEvictionConfig(policy="restkv", budget=256, evict_during_prefill=False)
    assert held_tokens_bound(no_prefill, "restkv", 256, 256, 128, pooling=True) is None


def _vllm_config(chunk: int, max_model_len: int = 4096, policy: str = "restkv", budget: int = 256):
    """The fields of VllmConfig that capacity.check_enough_kv_cache_memory reads."""
    from types import SimpleNamespace

    return SimpleNamespace(
        additional_config={"kv_eviction": {"policy": policy, "budget": budget}},
        scheduler_config=SimpleNamespace(max_num_batched_tokens=chunk),
        cache_config=SimpleNamespace(block_size=128),
        model_config=SimpleNamespace(runner_type="generate", original_max_model_len=max_model_len))


def _vllm_check(available, get_needed_memory, max_model_len, estimate):  # vLLM's rule, as in kv_cache_utils
    if get_needed_memory() > available:
        raise ValueError(f"To serve at least one request with the model's max seq len ({max_model_len})")


@pytest.mark.parametrize(
    "chunk, policy, budget, outcome",
    [
        (256, "restkv", 256, "served"),  # holds 512 of the 896 tokens the cache holds
        (256, "none", 256, "To serve at least one request"),  # vanilla vLLM's rule
        (256, "restkv", 700, "a request holds up to 956"),  # our refusal
        (4096, "restkv", 256, "lower --max-num-batched-tokens"),  # vLLM's refusal, with the hint
    ],
)
def test_start_up_check_branches(chunk, policy, budget, outcome):
    from vllm_restkv.engine.capacity import check_enough_kv_cache_memory

    per_token = 10  # bytes: the cache holds 896 tokens, one request of --max-model-len needs 4096
    config = _vllm_config(chunk, policy=policy, budget=budget)
    args = (896 * per_token, lambda: 4096 * per_token, 4096, lambda available: available // per_token)
    if outcome == "served":
        assert check_enough_kv_cache_memory(_vllm_check, config, *args) is None
    else:
        with pytest.raises(ValueError, match=re.escape(outcome)):
            check_enough_kv_cache_memory(_vllm_check, config, *args)


@pytest.mark.parametrize("api_servers", [1, 2])
def test_the_settings_hold_from_the_first_request_on_with_one_or_several_api_servers(tiny_model, tmp_path,
                                                                                     api_servers):
    """The very first request the worker decodes may set its own policy (before 2026-12-02 the worker checked it
    before it knew the server's settings, refused it, and the engine died). With --api-server-count 2 each API
    server process rebuilds its engine args from the parsed flags before vLLM has loaded our plugin there; both must
    still know eviction is on (a request's own policy accepted, what cannot fit refused: before, they took eviction
    for off, refused every per-request policy and let `kv_eviction: none` through on this small cache)."""
    args = [*SMALL_CACHE, "--kv-eviction", "restkv", "--kv-eviction-budget", "256", "--api-server-count",
            str(api_servers)]
    with running_server(tiny_model, args, tmp_path / "server.log") as server:
        if api_servers > 1:
            assert len(set(re.findall(r"ApiServer_(\d+)", server.output()))) == api_servers
        for _ in range(3):  # new connections, spread over the two servers by the kernel
            own = complete(server.url, long_prompt(), vllm_xargs={"kv_eviction": "snapkv"})
            assert own.status_code == 200, own.text
            assert own.json()["usage"]["prompt_tokens"] > 2 * CAPACITY
            off = complete(server.url, "Hello", vllm_xargs={"kv_eviction": "none"})
            assert off.status_code == 400 and "cannot turn eviction off" in off.json()["error"]["message"], off.text
            big = complete(server.url, "Hello", vllm_xargs={"kv_eviction_budget": 700})
            assert big.status_code == 400 and "KV cache holds 896" in big.json()["error"]["message"], big.text
        events = httpx.get(server.url + "/metrics").text
        assert re.search(r'^restkv_eviction_events_total\{[^}]*policy="snapkv"[^}]*\} [1-9]', events, re.M), \
            "snapkv evictions missing from /metrics"


@pytest.mark.parametrize("multiprocessing, skip_client_check", [("0", False), ("1", True)])
def test_offline_requests_that_cannot_fit_are_refused_and_harm_nobody(tiny_model, multiprocessing,
                                                                      skip_client_check):
    """Offline `LLM`: SamplingParams built before the engine existed were never checked against its cache. Before
    2026-12-03 such a request (eviction off on a cache 3x too small) waited at the head of the queue forever and
    everything behind it with it. In one process the client's check now runs at generate (it was switched off when
    the in-process engine started); with an engine process and the client's check skipped, the engine core refuses
    the request itself (finish reason "error") and the good request of the same batch is answered."""
    import json
    import subprocess
    import sys

    from conftest import REPO, server_env

    cmd = [sys.executable, str(REPO / "tests" / "offline_refusal_driver.py"), str(tiny_model), multiprocessing]
    if skip_client_check:
        cmd.append("--skip-client-check")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=server_env())
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    if skip_client_check:
        assert result.get("batch") == [["error", 0], ["length", 4]], result
        assert "refused: vllm_xargs: this server's KV cache holds 896 tokens" in done.stdout + done.stderr
    else:
        assert "cannot turn eviction off" in result.get("raised", ""), result
        assert "KV cache holds 896 tokens" in result["raised"]
    finish, generated, prompt_tokens = result["after"]
    assert (finish, generated) == ("length", 4) and prompt_tokens > 2 * CAPACITY, result
