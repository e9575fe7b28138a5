"""`vllm serve` end to end with the plugin: loaded in every process, flags validated, SmolLM2 served offline."""

from __future__ import annotations

import math
import re

import httpx
import pytest

from conftest import SERVE_DTYPE, running_server, run_vllm, server_env

pytestmark = pytest.mark.server


CHUNK = 256


@pytest.fixture(scope="module")
def smollm2_server(smollm2_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # every /v1/moderations request is shadow-checked (--kv-eviction-shadow-rate 1): the generate runner's path;
    # chunked prefill of 256 tokens, so that a one-token verdict on a long input is evicted at its chunk boundaries
    # (never after its prompt: the step that samples a request's last token does not evict)
    args = ["--max-model-len", "2048", "--dtype", SERVE_DTYPE, "--kv-eviction", "restkv",
            "--kv-eviction-budget", "128", "--kv-eviction-shadow-rate", "1", "--max-num-batched-tokens", str(CHUNK)]
    # VLLM_PLUGINS must name endpoint plugins for vLLM to load them (/v1/moderations)
    env = server_env(VLLM_PLUGINS="restkv,restkv_metrics,restkv_moderations")
    with running_server(smollm2_model, args, log, env=env) as server:
        yield server


def test_plugin_registered_in_every_process(smollm2_server):
    log = smollm2_server.output()
    lines = [l for l in log.splitlines() if "vllm-restkv 0.1.0 registered in process" in l]
    # Engine core and worker log it (each its own pid). In the API server it runs before vLLM configures logging;
    # there the proof is that the --kv-eviction flags parsed at all (they exist only through the plugin).
    pids = {re.search(r"pid (\d+)", l).group(1) for l in lines}
    assert len(pids) >= 2, lines
    assert any("EngineCore" in l for l in lines), lines
    assert any("Worker" in l for l in lines), lines


def test_no_bf16_warning_when_serving_the_native_dtype(smollm2_server):
    """The emulated-bf16 warning (vllm_restkv/cpu.py) fires only for bf16 on a CPU without it; this server runs the
    dtype the CPU runs natively, so it must stay quiet (the firing case: tests/test_cpu.py and the note in
    docs/benchmarks.md)."""
    assert "no native bf16" not in smollm2_server.output()
    assert f"dtype=torch.{SERVE_DTYPE}" in smollm2_server.output()


def test_settings_reach_the_engine(smollm2_server):
    log = smollm2_server.output()
    assert "KV eviction on in the scheduler: {'policy': 'restkv', 'budget': 128" in log
    assert "prefix caching is turned off because KV eviction (restkv) is on" in log


def test_endpoints_answer(smollm2_server):
    url = smollm2_server.url
    assert httpx.get(url + "/health").status_code == 200
    models = httpx.get(url + "/v1/models").json()
    assert models["data"][0]["id"] == "m"
    metrics = httpx.get(url + "/metrics").text
    assert "vllm:num_requests_running" in metrics


def test_smollm2_knows_the_capital_of_france(smollm2_server):
    response = httpx.post(
        smollm2_server.url + "/v1/completions",
        json={"model": "m", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert "Paris" in response.json()["choices"][0]["text"]


def test_chat_completions_answer(smollm2_server):
    response = httpx.post(
        smollm2_server.url + "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16,
              "temperature": 0},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"].strip()


def test_help_lists_the_flags():
    result = run_vllm(["serve", "--help=KVEvictionConfig"])
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--kv-eviction", "--kv-eviction-budget", "--kv-eviction-window", "--kv-eviction-decode-interval",
                 "--kv-eviction-shadow-rate", "--kv-eviction-config"):
        assert flag in result.stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kv-eviction", "bogus"], "invalid choice: 'bogus'"),
        (["--kv-eviction", "restkv", "--kv-eviction-budget", "-1"], "expected a positive integer, got '-1'"),
        (["--kv-eviction", "restkv", "--kv-eviction-budget", "8"], "budget 8 is smaller than the observation window 32"),
        (["--additional-config", '{"kv_eviction": {"policy": "nope"}}'], "unknown policy 'nope'; allowed policies:"),
        (["--kv-eviction", "restkv", "--async-scheduling"], "--async-scheduling is not supported with KV eviction"),
    ],
)
def test_bad_start_up_configuration_stops_with_a_message(tiny_model, flags, message):
    result = run_vllm(["serve", str(tiny_model), "--max-model-len", "512", *flags])
    assert result.returncode != 0
    assert message in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]


@pytest.mark.parametrize(
    "xargs, message",
    [
        ({"kv_eviction_budget": 4}, "kv_eviction_budget 4 is smaller than the observation window 32"),
        ({"kv_eviction_budget": "lots"}, "kv_eviction_budget must be an integer"),
        ({"kv_eviction": "bogus"}, "unknown policy 'bogus'"),
    ],
)
def test_bad_per_request_settings_get_400_and_harm_nobody(smollm2_server, xargs, message):
    url = smollm2_server.url + "/v1/completions"
    bad = httpx.post(url, json={"model": "m", "prompt": "Hello", "max_tokens": 2, "vllm_xargs": xargs}, timeout=60)
    assert bad.status_code == 400, bad.text
    assert message in bad.json()["error"]["message"]
    good = httpx.post(url, json={"model": "m", "prompt": "The capital of France is", "max_tokens": 4,
                                 "temperature": 0, "vllm_xargs": {"kv_eviction_budget": 64}}, timeout=60)
    assert good.status_code == 200 and "Paris" in good.json()["choices"][0]["text"]


def _metric_total(text: str, name: str, must: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if m and must in (m.group(1) or ""):
            total += float(m.group(2))
    return total


def test_eviction_metrics_move_with_eviction_and_stay_flat_without(smollm2_server):
    url = smollm2_server.url
    prompt = "Tell me about the weather. " * 120  # ~720 tokens > budget 128
    before = httpx.get(url + "/metrics").text
    off = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 4, "temperature": 0,
                                                   "vllm_xargs": {"kv_eviction": "none"}}, timeout=120)
    assert off.status_code == 200
    flat = httpx.get(url + "/metrics").text
    for name in ("restkv_evicted_tokens_total", "restkv_freed_blocks_total", "restkv_eviction_events_total"):
        assert _metric_total(flat, name) == _metric_total(before, name), name
    on = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 140,
                                                  "temperature": 0, "ignore_eos": True}, timeout=300)
    assert on.status_code == 200
    after = httpx.get(url + "/metrics").text
    prefill = _metric_total(after, "restkv_eviction_events_total", 'phase="prefill"') - \
        _metric_total(flat, "restkv_eviction_events_total", 'phase="prefill"')
    decode = _metric_total(after, "restkv_eviction_events_total", 'phase="decode"') - \
        _metric_total(flat, "restkv_eviction_events_total", 'phase="decode"')
    # at every chunk boundary and after the prompt, then every 64 decode steps rounded up to fill the last block:
    # 128 + 128 = 2 blocks of 128
    prompt_tokens = on.json()["usage"]["prompt_tokens"]
    assert prefill == -(-prompt_tokens // CHUNK) >= 3 and decode == 1, (prefill, decode, prompt_tokens)
    evicted = _metric_total(after, "restkv_evicted_tokens_total") - _metric_total(flat, "restkv_evicted_tokens_total")
    assert evicted >= prompt_tokens - 128, (evicted, prompt_tokens)
    assert _metric_total(after, "restkv_freed_blocks_total") > _metric_total(flat, "restkv_freed_blocks_total")
    assert 'restkv_build_info{' in after and 'policy="restkv"' in after
    assert 'model_name="m"' in after


def test_moderations_with_a_generative_model_score_yes_against_no(smollm2_server, smollm2_model):
    """Generate runner: /v1/moderations prompts the model with the default template and scores
    P(Yes) / (P(Yes) + P(No)) from the first token's top log-probabilities; recomputed here from /v1/completions."""
    from transformers import AutoTokenizer

    from vllm_restkv.serving.moderations import DEFAULT_GENERATE

    text = "You are a pathetic idiot and everybody laughs at you."
    r = httpx.post(smollm2_server.url + "/v1/moderations", json={"input": [text, "Have a nice day!"]}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "m" and len(body["results"]) == 2
    score = body["results"][0]["category_scores"]["harassment"]
    assert 0.0 < score < 1.0
    assert body["results"][0]["flagged"] == (score >= DEFAULT_GENERATE["threshold"])
    assert body["restkv"]["policy"] == "restkv"

    tok = AutoTokenizer.from_pretrained(str(smollm2_model))
    head, _, tail = DEFAULT_GENERATE["prompt_template"].partition("{text}")
    ids = [tok(part, add_special_tokens=False)["input_ids"] for part in (head, text, tail)]
    c = httpx.post(smollm2_server.url + "/v1/completions", timeout=120, json={
        "model": "m", "prompt": ids[0] + ids[1] + ids[2], "max_tokens": 1, "temperature": 0, "logprobs": 20}).json()
    top = c["choices"][0]["logprobs"]["top_logprobs"][0]
    yes = sum(math.exp(lp) for t, lp in top.items() if t in DEFAULT_GENERATE["positive_tokens"])
    no = sum(math.exp(lp) for t, lp in top.items() if t in DEFAULT_GENERATE["negative_tokens"])
    assert yes + no > 0.05, top  # the template makes the model answer Yes or No
    assert abs(score - yes / (yes + no)) < 1e-3


def test_moderations_pass_vllm_xargs_to_the_generative_path(smollm2_server, smollm2_model):
    """Generate runner: `vllm_xargs` on /v1/moderations reach the completions request it makes. With eviction off
    for the request the score is the full cache's (what /v1/completions answers with the same setting) and no
    eviction metric moves; without it, the long input is evicted."""
    from transformers import AutoTokenizer

    from vllm_restkv.serving.moderations import DEFAULT_GENERATE

    import time

    url = smollm2_server.url
    text = "Tell me about the weather, you absolute clown. " * 60  # ~600 tokens > budget 128
    scores = {}
    shadow_before = httpx.get(url + "/metrics").text
    for name, xargs in (("off", {"kv_eviction": "none"}), ("on", None)):
        before = httpx.get(url + "/metrics").text
        r = httpx.post(url + "/v1/moderations", json={"input": text, "vllm_xargs": xargs}, timeout=300)
        assert r.status_code == 200, r.text
        after = httpx.get(url + "/metrics").text
        events = (_metric_total(after, "restkv_eviction_events_total")
                  - _metric_total(before, "restkv_eviction_events_total"))
        assert (events > 0) == (name == "on"), (name, events)
        assert r.json()["restkv"]["policy"] == ("none" if name == "off" else "restkv")
        scores[name] = r.json()["results"][0]["category_scores"]["harassment"]
    bad = httpx.post(url + "/v1/moderations", json={"input": text, "vllm_xargs": {"kv_eviction_budget": 4}},
                     timeout=60)
    assert bad.status_code == 400 and "smaller than the observation window" in bad.json()["error"]["message"]
    tok = AutoTokenizer.from_pretrained(str(smollm2_model))
    head, _, tail = DEFAULT_GENERATE["prompt_template"].partition("{text}")
    ids = [tok(part, add_special_tokens=False)["input_ids"] for part in (head, text, tail)]
    c = httpx.post(url + "/v1/completions", timeout=300, json={
        "model": "m", "prompt": ids[0] + ids[1] + ids[2], "max_tokens": 1, "temperature": 0, "logprobs": 20,
        "vllm_xargs": {"kv_eviction": "none"}}).json()
    top = c["choices"][0]["logprobs"]["top_logprobs"][0]
    yes = sum(math.exp(lp) for t, lp in top.items() if t in DEFAULT_GENERATE["positive_tokens"])
    no = sum(math.exp(lp) for t, lp in top.items() if t in DEFAULT_GENERATE["negative_tokens"])
    assert abs(scores["off"] - yes / (yes + no)) < 1e-3
    # the evicted request was shadow-checked (the other one had eviction off): one input, its score against the
    # full cache's
    deadline = time.monotonic() + 60
    while True:
        shadow = httpx.get(url + "/metrics").text
        checks = (_metric_total(shadow, "restkv_moderation_shadow_checks_total")
                  - _metric_total(shadow_before, "restkv_moderation_shadow_checks_total"))
        if checks >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    agree = (scores["on"] >= 0.5) == (scores["off"] >= 0.5)
    outcome = 'outcome="agree"' if agree else 'outcome="disagree"'
    assert checks == 1 and (_metric_total(shadow, "restkv_moderation_shadow_checks_total", outcome)
                            - _metric_total(shadow_before, "restkv_moderation_shadow_checks_total", outcome)) == 1
    diff = (_metric_total(shadow, "restkv_moderation_shadow_score_diff_sum")
            - _metric_total(shadow_before, "restkv_moderation_shadow_score_diff_sum"))
    assert abs(diff - abs(scores["on"] - scores["off"])) < 1e-3, (diff, scores)
