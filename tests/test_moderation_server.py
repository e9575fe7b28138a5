"""The moderation service end to end: the default moderator served by a real `vllm serve` (pooling runner, ReST-KV
eviction during chunked prefill, --api-key), `/v1/moderations` through the official `openai` client, vLLM's own
`/classify`, bad requests, and our Prometheus metrics on `/metrics`."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from conftest import SERVE_DTYPE, running_prometheus, running_server, server_env
from vllm_restkv.moderator import PROMPT_TEMPLATE, load_insults

API_KEY = "test-key-123"
PLUGINS = "restkv,restkv_metrics,restkv_moderations"
BUDGET = 128
CHUNK = 256

INSULTS = [
    "You are a worthless idiot and nobody wants to hear your stupid opinions.",
    "Shut up, you pathetic moron. Your brain must be the size of a pea.",
    "What a disgusting, lying loser you are. Go crawl back under your rock.",
]
BENIGN = [
    "Thanks for sharing the recipe, I will try it with my kids this weekend.",
    "The game last night was great, especially the second half comeback.",
    "I think the city council should fund more bike lanes downtown.",
]


@pytest.fixture(scope="module")
def moderator_model():
    from vllm_restkv.moderator import prepare_moderator

    return prepare_moderator()


SERVER_ARGS = ["--runner", "pooling", "--dtype", SERVE_DTYPE, "--max-model-len", "4096",
               "--max-num-batched-tokens", str(CHUNK),
               "--api-key", API_KEY, "--kv-eviction", "restkv", "--kv-eviction-budget", str(BUDGET)]


@pytest.fixture(scope="module")
def server(moderator_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("mod") / "serve.log"
    with running_server(moderator_model, SERVER_ARGS, log, env=server_env(VLLM_PLUGINS=PLUGINS)) as s:
        yield s


@pytest.fixture(scope="module", params=["max_token", "max_line"])
def scan_model(moderator_model, tmp_path_factory, request):
    """The default moderator's checkpoint with a token scan in its moderator.json (`max_line` is the `moderator-threads`
    variant's; the same head, so the test needs no second training)."""
    from vllm_restkv.moderator import with_scoring

    return with_scoring(moderator_model, request.param, tmp_path_factory.mktemp("scan") / moderator_model.name)


@pytest.fixture(scope="module")
def scan_server(scan_model, tmp_path_factory):
    """In fp32 whatever this CPU's fast dtype: the test compares scanned positions with an fp32 transformers run, and
    bf16 moved one line end's P(insult) by 0.066 on an AVX512-BF16 machine (0.609 vs 0.675), more than the positions
    differ by."""
    log = tmp_path_factory.mktemp("scan-serve") / "serve.log"
    args = [*SERVER_ARGS]
    args[args.index("--dtype") + 1] = "float32"
    with running_server(scan_model, args, log, env=server_env(VLLM_PLUGINS=PLUGINS)) as s:
        yield s


def headers():
    return {"Authorization": f"Bearer {API_KEY}"}


def metric_values(text: str, name: str) -> dict[str, float]:
    """{label string: value} of every sample of `name` in Prometheus text."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def total(text: str, name: str) -> float:
    return sum(metric_values(text, name).values())


def long_thread(tokens_wanted: int, insult: str | None, depth: float = 0.5) -> str:
    """A chat thread of real benign comments without profanity from the held-out `insults` split (the data set's
    non-insults often swear: see benchdata.comment_pools), optionally one insult in the middle."""
    from vllm_restkv.benchdata import is_explicit, profanity_words

    words = profanity_words()
    benign = [t for t, y in load_insults("test") if not y and len(t) < 300 and not is_explicit(t, words)]
    lines, chars = [], 0
    for i, text in enumerate(benign):
        lines.append(f"[user{i:03d}]: {text}")
        chars += len(text) + 12
        if chars > tokens_wanted * 4:
            break
    if insult:
        lines.insert(int(depth * len(lines)), f"[user999]: {insult}")
    return "\n".join(lines)


def test_openai_client_single_and_batch(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY)
    single = client.moderations.create(input=INSULTS[0])
    assert len(single.results) == 1 and single.model == "m"
    r = single.results[0]
    assert isinstance(r.flagged, bool)
    assert 0.0 <= r.category_scores.harassment <= 1.0
    assert r.categories.harassment == (r.category_scores.harassment >= 0.5)
    assert r.category_scores.sexual == 0.0 and r.categories.sexual is False  # not judged by this model

    batch = client.moderations.create(model="omni-moderation-latest", input=INSULTS + BENIGN)
    scores = [x.category_scores.harassment for x in batch.results]
    assert len(scores) == 6
    # every clear insult scores above every clear benign text
    assert min(scores[:3]) > max(scores[3:]), scores
    assert all(x.flagged for x in batch.results[:3]) and not any(x.flagged for x in batch.results[3:]), scores
    # the batch result for an input matches the single result (same engine path; bf16 sums depend on the batch)
    assert abs(scores[0] - r.category_scores.harassment) < 0.01
    # per-request settings through the client's extra_body, as on vLLM's own endpoints
    full = client.moderations.create(input=INSULTS[0], extra_body={"vllm_xargs": {"kv_eviction": "none"}})
    assert full.model_extra["restkv"]["policy"] == "none" and single.model_extra["restkv"]["policy"] == "restkv"
    assert abs(full.results[0].category_scores.harassment - r.category_scores.harassment) < 0.01  # short: not evicted


def reference_token_scores(model_dir, ids: list[int]) -> list[float]:
    """P(insult) at every position, computed apart from vLLM: transformers' LlamaModel (fp32) + the checkpoint's head."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    weights = load_file(str(model_dir / "model.safetensors"))
    with torch.inference_mode():
        hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        logits = hidden @ weights["score.weight"].float().T + weights["score.bias"].float()
    return logits.softmax(-1)[:, 1].tolist()


def test_moderation_matches_vllm_classify(server):
    """/v1/moderations (default moderator, scoring last_token) scores what vLLM's own /classify returns for the
    templated text."""
    text = BENIGN[1]
    mod = httpx.post(server.url + "/v1/moderations", json={"input": text}, headers=headers(), timeout=60).json()
    cls = httpx.post(server.url + "/classify", json={"model": "m", "input": PROMPT_TEMPLATE.format(text=text)},
                     headers=headers(), timeout=60).json()
    assert abs(mod["results"][0]["category_scores"]["harassment"] - cls["data"][0]["probs"][1]) < 0.01
    assert mod["restkv"]["policy"] == "restkv" and mod["restkv"]["scoring"] == "last_token"
    assert mod["restkv"]["inputs"][0]["segments"] == 1


@pytest.mark.parametrize("body,status,needle", [
    ({"input": ""}, 400, "empty"),
    ({"input": []}, 400, "must not be empty"),
    ({"input": 42}, 400, "string or a list"),
    ({"input": ["ok", 7]}, 400, "input[1] must be a string"),
    ({"input": [{"type": "image_url", "image_url": {"url": "http://x"}}]}, 400, "image inputs are not supported"),
    ({"input": ["x"] * 65}, 400, "at most 64"),
    ({"input": "a" * 1_000_001}, 400, "at most 1000000"),
    ({"input": "hello", "model": "gpt-nope"}, 404, "does not exist"),
    ({"inputs": "hello"}, 400, "unknown field"),
    ({"input": "hello", "model": 5}, 400, "must be a string"),
    ({"input": "hello", "vllm_xargs": 5}, 400, "`vllm_xargs` must be an object"),
    ({"input": "hello", "vllm_xargs": {"top_k": 5}}, 400, "unknown key(s) top_k"),
    ({"input": "hello", "vllm_xargs": {"kv_eviction": "bogus"}}, 400, "unknown policy 'bogus'"),
    ({"input": "hello", "vllm_xargs": {"kv_eviction_budget": 8}}, 400, "smaller than the observation window"),
    ({"input": "hello", "vllm_xargs": {"kv_eviction_during_prefill": "maybe"}}, 400, "must be true or false"),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, body, status, needle):
    r = httpx.post(server.url + "/v1/moderations", json=body, headers=headers(), timeout=60)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    ok = httpx.post(server.url + "/v1/moderations", json={"input": INSULTS[1]}, headers=headers(), timeout=60)
    assert ok.status_code == 200 and ok.json()["results"][0]["flagged"] is True


def test_invalid_json_and_api_key(server):
    r = httpx.post(server.url + "/v1/moderations", content=b"{not json", headers=headers(), timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/moderations", json={"input": "hi"}, timeout=30)
    assert r.status_code == 401
    r = httpx.post(server.url + "/v1/moderations", json={"input": "hi"},
                   headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert r.status_code == 401


def test_long_input_is_evicted_during_chunked_prefill_and_metrics_move(server):
    before = httpx.get(server.url + "/metrics", timeout=30).text
    # short inputs never exceed the budget: no eviction metric moves
    httpx.post(server.url + "/v1/moderations", json={"input": BENIGN}, headers=headers(), timeout=60)
    after_short = httpx.get(server.url + "/metrics", timeout=30).text
    assert total(after_short, "restkv_evicted_tokens_total") == total(before, "restkv_evicted_tokens_total")

    thread = long_thread(1500, INSULTS[2])
    r = httpx.post(server.url + "/v1/moderations", json={"input": thread}, headers=headers(), timeout=300)
    assert r.status_code == 200, r.text
    prompt_tokens = r.json()["restkv"]["inputs"][0]["prompt_tokens"]
    assert prompt_tokens > 4 * CHUNK
    after = httpx.get(server.url + "/metrics", timeout=30).text
    evicted = total(after, "restkv_evicted_tokens_total") - total(after_short, "restkv_evicted_tokens_total")
    events = total(after, "restkv_eviction_events_total") - total(after_short, "restkv_eviction_events_total")
    freed = total(after, "restkv_freed_blocks_total") - total(after_short, "restkv_freed_blocks_total")
    # one eviction per chunk boundary; every boundary leaves budget tokens, so the last chunk sees budget + chunk
    n_chunks = -(-prompt_tokens // CHUNK)
    assert events >= n_chunks - 2, (events, n_chunks)
    assert prompt_tokens - BUDGET - CHUNK <= evicted, (evicted, prompt_tokens)
    assert freed > 0
    assert 'phase="prefill"' in after and 'policy="restkv"' in after
    ratio_count = total(after, "restkv_kept_token_ratio_count") - total(after_short, "restkv_kept_token_ratio_count")
    assert ratio_count == events
    scoring = metric_values(after, "restkv_scoring_duration_seconds_count")
    assert sum(scoring.values()) >= events
    info = metric_values(after, "restkv_build_info")
    assert any('policy="restkv"' in k and f'budget="{BUDGET}"' in k and v == 1.0 for k, v in info.items()), info
    mod = metric_values(after, "restkv_moderation_results_total")
    assert any('outcome="flagged"' in k and v >= 1 for k, v in mod.items()), mod
    # nothing is left running: the gauges come back to zero and vLLM's KV usage too
    assert total(after, "restkv_physical_tokens") == 0.0
    assert total(after, "vllm:kv_cache_usage_perc") == 0.0


def eviction_totals(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return total(text, "restkv_eviction_events_total"), total(text, "restkv_evicted_tokens_total")


def test_per_request_eviction_settings_through_vllm_xargs(server):
    """/v1/moderations takes vLLM's `vllm_xargs` with the per-request eviction keys and hands them to the engine
    with each pooling request (PoolingParams.extra_kwargs): eviction off for one request, another budget, or no
    eviction during prefill (for a classifier, which ends with its prompt: none at all). The response's extension
    names what was applied; the metrics show it happened."""
    thread = long_thread(1500, INSULTS[2])
    url, budget = server.url + "/v1/moderations", 2 * BUDGET

    def moderate(xargs):
        before = eviction_totals(server.url)
        r = httpx.post(url, json={"input": thread, "vllm_xargs": xargs}, headers=headers(), timeout=300)
        assert r.status_code == 200, r.text
        after = eviction_totals(server.url)
        return r.json(), after[0] - before[0], after[1] - before[1]

    body, events, evicted = moderate({"kv_eviction": "none"})
    assert (events, evicted) == (0, 0)
    assert body["restkv"]["policy"] == "none" and body["restkv"]["budget"] is None
    body, events, evicted = moderate({"kv_eviction_during_prefill": False})
    assert (events, evicted) == (0, 0)
    assert body["restkv"]["policy"] == "restkv" and body["restkv"]["evict_during_prefill"] is False
    body, events, evicted = moderate({"kv_eviction_budget": budget})
    prompt_tokens = body["restkv"]["inputs"][0]["prompt_tokens"]
    assert body["restkv"]["budget"] == budget and body["restkv"]["evict_during_prefill"] is True
    # every chunk boundary but the prompt's end evicts down to this request's budget, not the server's
    assert events >= 1 and prompt_tokens - budget - CHUNK <= evicted <= prompt_tokens - budget, (evicted, prompt_tokens)
    body, events, evicted = moderate(None)
    assert body["restkv"]["budget"] == BUDGET and evicted >= prompt_tokens - BUDGET - CHUNK


def test_long_input_beyond_the_context_is_scored_in_segments(server):
    thread = long_thread(6000, INSULTS[0])  # max-model-len is 4096
    r = httpx.post(server.url + "/v1/moderations", json={"input": thread}, headers=headers(), timeout=600)
    assert r.status_code == 200, r.text
    info = r.json()["restkv"]["inputs"][0]
    assert info["segments"] >= 2 and info["input_tokens"] > 4096


def test_client_that_disconnects_cancels_its_moderation(server):
    """A client that gives up on a long moderation request (8 segments of ~3,000 tokens, about a minute of CPU
    prefill) cancels it: the engine requests are aborted, nothing keeps running, the KV blocks come back, and the
    outcome is counted as cancelled; the next request is served. (vLLM's classify handler; the token scan's own
    engine requests below.)"""
    before = httpx.get(server.url + "/metrics", timeout=30).text
    texts = [long_thread(6000, INSULTS[i % 3], 0.3) for i in range(4)]  # max-model-len 4096: 2 segments each
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/moderations", json={"input": texts}, headers=headers(), timeout=4)
    deadline = time.time() + 15
    while True:
        m = httpx.get(server.url + "/metrics", timeout=30).text
        idle = total(m, "vllm:num_requests_running") == 0 and total(m, "vllm:num_requests_waiting") == 0
        if idle and total(m, "vllm:kv_cache_usage_perc") == 0.0:
            break
        assert time.time() < deadline, "the cancelled moderation is still running"
        time.sleep(0.5)
    cancelled = metric_values(m, "restkv_moderation_results_total")
    before_cancelled = metric_values(before, "restkv_moderation_results_total")
    key = next(k for k in cancelled if 'outcome="cancelled"' in k)
    assert cancelled[key] == before_cancelled.get(key, 0.0) + 1
    ok = httpx.post(server.url + "/v1/moderations", json={"input": INSULTS[1]}, headers=headers(), timeout=60)
    assert ok.status_code == 200 and ok.json()["results"][0]["flagged"] is True


@pytest.fixture
def prometheus(server, tmp_path):
    with running_prometheus([server.url.removeprefix("http://")], tmp_path / "prometheus") as url:
        yield url


def prom_query(url: str, query: str) -> list[dict]:
    r = httpx.get(url + "/api/v1/query", params={"query": query}, timeout=10)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_for(url: str, query: str, accept, timeout: float = 30) -> list[dict]:
    deadline = time.time() + timeout
    while True:
        result = prom_query(url, query)
        if result and accept(result):
            return result
        assert time.time() < deadline, f"{query}: {result}"
        time.sleep(1)


def test_real_prometheus_scrapes_our_metrics_after_traffic(server, prometheus):
    wait_for(prometheus, 'up{job="vllm-restkv"}', lambda r: r[0]["value"][1] == "1")
    (info,) = wait_for(prometheus, "restkv_build_info", lambda r: True)
    assert info["metric"]["policy"] == "restkv" and info["metric"]["vllm_version"] == "0.32.0"
    assert info["metric"]["budget"] == str(BUDGET) and info["metric"]["model_name"] == "m"

    r = httpx.post(server.url + "/v1/moderations", json={"input": long_thread(1200, INSULTS[1])}, headers=headers(),
                   timeout=300)
    assert r.status_code == 200, r.text
    # once idle, Prometheus's last scrape agrees with what the server exports now
    server_evicted = total(httpx.get(server.url + "/metrics", timeout=30).text, "restkv_evicted_tokens_total")
    assert server_evicted > 0
    wait_for(prometheus, "sum(restkv_evicted_tokens_total)", lambda r: float(r[0]["value"][1]) == server_evicted)
    freed = prom_query(prometheus, 'sum(restkv_freed_blocks_total{policy="restkv"})')
    assert float(freed[0]["value"][1]) > 0
    events = prom_query(prometheus, 'sum by (phase) (restkv_eviction_events_total)')
    assert {e["metric"]["phase"] for e in events} >= {"prefill"}
    (median,) = prom_query(prometheus, "histogram_quantile(0.5, sum by (le) (restkv_scoring_duration_seconds_bucket))")
    assert 0 < float(median["value"][1]) < 60
    (kept,) = prom_query(prometheus, "histogram_quantile(0.5, sum by (le) (restkv_kept_token_ratio_bucket))")
    assert 0 < float(kept["value"][1]) < 1
    (flagged,) = prom_query(prometheus, 'sum(restkv_moderation_results_total{outcome="flagged"})')
    assert float(flagged["value"][1]) >= 1
    # vLLM's own metrics arrive through the same scrape, and its KV usage comes back to zero (a later scrape than
    # the one that saw the final eviction count: the request's last chunk evicts nothing and may still be running)
    wait_for(prometheus, "sum(vllm:kv_cache_usage_perc)", lambda r: float(r[0]["value"][1]) == 0.0)


def test_metrics_add_up_across_several_api_servers(moderator_model, tmp_path):
    """--api-server-count 2: each step's numbers reach exactly one API server and vLLM's multiprocess Prometheus
    mode sums them, so /metrics (from either server) counts every eviction exactly once."""
    args = ["--runner", "pooling", "--dtype", SERVE_DTYPE, "--max-model-len", "4096",
            "--max-num-batched-tokens", str(CHUNK), "--kv-eviction", "restkv", "--kv-eviction-budget", str(BUDGET),
            "--api-server-count", "2"]
    with running_server(moderator_model, args, tmp_path / "serve.log", env=server_env(VLLM_PLUGINS=PLUGINS)) as s:
        expected_events, n = 0, 6
        for i in range(n):  # one at a time, so chunk boundaries (and with them the events) are deterministic
            r = httpx.post(s.url + "/v1/moderations", json={"input": long_thread(700 + 150 * i, INSULTS[i % 3])},
                           timeout=300)
            assert r.status_code == 200, r.text
            prompt_tokens = r.json()["restkv"]["inputs"][0]["prompt_tokens"]
            expected_events += -(-prompt_tokens // CHUNK) - 1  # every chunk boundary; none after the last chunk
        pids = set(re.findall(r"ApiServer_(\d+)", s.output()))
        assert len(pids) >= 2, "expected two API server processes"
        time.sleep(2)  # stats of the last step arrive with the next engine output or the periodic log
        text = httpx.get(s.url + "/metrics", timeout=30).text
        assert total(text, "restkv_eviction_events_total") == expected_events
        assert total(text, "restkv_kept_token_ratio_count") == expected_events
        assert total(text, "restkv_moderation_results_total") == n
        assert total(text, "restkv_physical_tokens") == 0.0


def test_thread_training_positions_are_the_ends_of_comments():
    """The moderator's thread training data (recipes 2 and 3) labels the last token of each comment with that comment's
    label: decoding the prompt up to a labelled position ends exactly with the comment."""
    import random

    from transformers import AutoTokenizer

    from vllm_restkv.models import prepare_smollm2
    from vllm_restkv.moderator import template_parts, thread_sample

    tokenizer = AutoTokenizer.from_pretrained(str(prepare_smollm2()))
    prefix, tail = template_parts(tokenizer)
    lines = ["[user001]: Thanks, that recipe worked great.", "[user002]: " + INSULTS[1], "[user003]: See you Sunday!"]
    ids, positions, labels = thread_sample(tokenizer, lines, [0, 1, 0], random.Random(0))
    assert ids[:len(prefix)] == prefix and ids[-len(tail):] == tail
    assert labels == [0, 1, 0]
    for pos, line in zip(positions, lines):
        assert tokenizer.decode(ids[len(prefix): pos + 1]).endswith(line), (pos, line)
    # benign comments after the first insult are left out (their state may carry the insult); inner negatives are
    # positions strictly inside benign comments
    ids, positions, labels = thread_sample(tokenizer, lines, [0, 1, 0], random.Random(0), inner_negatives=3,
                                           before_first_insult=True)
    assert labels == [0, 0, 0, 0, 1]
    assert tokenizer.decode(ids[len(prefix): positions[0] + 1]).endswith(lines[0])
    assert all(len(prefix) <= p < positions[0] for p in positions[1:4]) and len(set(positions[1:4])) == 3
    assert tokenizer.decode(ids[len(prefix): positions[4] + 1]).endswith(lines[1])


def test_line_scan_reads_the_end_of_every_line_and_of_every_segment():
    """`max_line` reads, per prompt, the positions where the thread head judges a comment: decoding the prompt up to a
    read position ends with a whole line (the rule thread training uses), and a segment that cuts a line reads its
    last text token too. Checked on one prompt and on an input split into 3 segments."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from vllm_restkv.models import prepare_smollm2
    from vllm_restkv.moderator import template_parts
    from vllm_restkv.serving.moderations import Moderator

    tokenizer = AutoTokenizer.from_pretrained(str(prepare_smollm2()))
    prefix, tail = template_parts(tokenizer)
    lines = [f"[user{i:03d}]: " + (INSULTS + BENIGN)[i % 6] for i in range(12)]
    lines[4] = ""  # an empty line has no token and no read
    text = "\n".join(lines)

    def scanner(segment_tokens: int):
        return SimpleNamespace(tokenizer=tokenizer, prefix=prefix, tail_ids=tail, scan="max_line",
                               segment_tokens=segment_tokens)

    prompts, n, reads = Moderator.segments(scanner(4096), text, 0)
    assert len(prompts) == 1 and len(reads[0]) == 11
    for pos, line in zip(reads[0], [l for l in lines if l]):
        assert tokenizer.decode(prompts[0][len(prefix): pos + 1]).endswith(line), (pos, line)
    prompts, n2, reads = Moderator.segments(scanner(n // 3 + 1), text, 0)
    assert n2 == n and len(prompts) == 3
    whole = prefix + tokenizer(text, add_special_tokens=False)["input_ids"]
    offset = 0
    for prompt, read in zip(prompts, reads):
        body = prompt[len(prefix): len(prompt) - len(tail)]
        assert read[-1] == len(prefix) + len(body) - 1  # the segment's last text token
        for pos in read[:-1]:
            decoded = tokenizer.decode(whole[len(prefix): len(prefix) + offset + pos - len(prefix) + 1])
            assert any(decoded.endswith(line) for line in lines if line), pos
        offset += len(body)
    assert sum(len(r) for r in reads) >= 11  # every line end is read in the segment that holds it
    # the other scans read no chosen positions
    prompts, _, reads = Moderator.segments(SimpleNamespace(**{**vars(scanner(4096)), "scan": "max_token"}), text, 0)
    assert reads == [[]]


# The token scans (moderator.json "scoring": "max_token", then "max_line") on a second server each, started last so
# that each runs next to the first one as briefly as possible (two engines share 2 CPU cores).

def test_token_scan_scores_the_most_insulting_position(scan_server, scan_model):
    """/v1/moderations with a token scan returns the highest P(insult) over the scanned positions (max_token: every
    text position; max_line: the last token of each line) and the prompt's last token, as a separate transformers
    computation of the same checkpoint gives it; vLLM's /classify (last position) is one of those positions, so it
    is never above."""
    import json

    from transformers import AutoTokenizer

    from vllm_restkv.moderator import line_ends, template_parts

    scan = json.loads((scan_model / "moderator.json").read_text())["scoring"]
    tokenizer = AutoTokenizer.from_pretrained(str(scan_model))
    prefix, tail = template_parts(tokenizer)
    other = []  # what the other scan would answer: the test must tell the two apart
    for text in (BENIGN[1], "Great match.\n" + INSULTS[0] + "\nAnyway, see you all on Sunday at the park."):
        mod = httpx.post(scan_server.url + "/v1/moderations", json={"input": text}, headers=headers(),
                         timeout=60).json()
        score = mod["results"][0]["category_scores"]["harassment"]
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = prefix + enc["input_ids"] + tail
        ref = reference_token_scores(scan_model, ids)
        every = max(ref[len(prefix): len(ids) - len(tail)] + ref[-1:])
        ends = [len(prefix) + e for e in line_ends(enc["offset_mapping"], text)]
        lines = max([ref[p] for p in ends] + ref[-1:])
        expected = every if scan == "max_token" else lines
        other.append(abs(score - (lines if scan == "max_token" else every)))
        assert abs(score - expected) < 0.03, (scan, score, expected)
        cls = httpx.post(scan_server.url + "/classify", json={"model": "m", "input": PROMPT_TEMPLATE.format(text=text)},
                         headers=headers(), timeout=60).json()
        assert cls["data"][0]["probs"][1] <= score + 0.01
        assert mod["restkv"]["policy"] == "restkv" and mod["restkv"]["scoring"] == scan
        assert mod["restkv"]["inputs"][0]["segments"] == 1
    assert max(other) > 0.05, other


def test_token_scan_takes_per_request_eviction_settings(scan_server):
    """The token scan builds its own PoolingParams: `vllm_xargs` reaches the engine there too."""
    thread = long_thread(1200, INSULTS[0])
    for xargs, evicts in (({"kv_eviction": "none"}, False), (None, True)):
        before = eviction_totals(scan_server.url)
        r = httpx.post(scan_server.url + "/v1/moderations", json={"input": thread, "vllm_xargs": xargs},
                       headers=headers(), timeout=300)
        assert r.status_code == 200, r.text
        events = eviction_totals(scan_server.url)[0] - before[0]
        assert (events > 0) == evicts, (xargs, events)
        assert r.json()["restkv"]["policy"] == ("restkv" if evicts else "none")


def test_client_that_disconnects_cancels_a_token_scan(scan_server):
    test_client_that_disconnects_cancels_its_moderation(scan_server)


def test_threads_longer_than_the_whole_kv_cache(server, moderator_model, tmp_path):
    """A moderation server whose KV cache holds 896 tokens (7 usable blocks; vLLM alone refuses it with
    --max-model-len 4096) scores 3,000-token threads: each request holds at most budget + one chunk. The scores
    equal those of the server above, whose cache holds everything: eviction happens at the same chunk boundaries."""
    args = [*SERVER_ARGS, "--num-gpu-blocks-override", "8", "--kv-eviction-shadow-rate", "1"]
    threads = [long_thread(3000, INSULTS[0]), long_thread(3000, None)]
    full = [httpx.post(server.url + "/v1/moderations", json={"input": t}, headers=headers(), timeout=300)
            for t in threads]
    with running_server(moderator_model, args, tmp_path / "serve.log", env=server_env(VLLM_PLUGINS=PLUGINS)) as s:
        assert "fewer than --max-model-len 4096; served anyway" in s.output()
        small = [httpx.post(s.url + "/v1/moderations", json={"input": t}, headers=headers(), timeout=600)
                 for t in threads]
        # a request that would hold its whole prompt cannot be served here: refused before it reaches the engine
        for xargs, needle in (({"kv_eviction": "none"}, "cannot turn eviction off"),
                              ({"kv_eviction_during_prefill": False}, "holds its whole prompt")):
            r = httpx.post(s.url + "/v1/moderations", json={"input": threads[1], "vllm_xargs": xargs},
                           headers=headers(), timeout=60)
            assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
        # every request is shadow-checked here, but no input fits without eviction: all of them skipped
        shadow = metric_values(wait_for_metric(s.url, "restkv_moderation_shadow_checks_total", 2),
                               "restkv_moderation_shadow_checks_total")
        assert {k.split('outcome="')[1].split('"')[0]: v for k, v in shadow.items()} == {"skipped": 2.0}, shadow
    for one, reference in zip(small, full):
        assert one.status_code == 200 and reference.status_code == 200, (one.text, reference.text)
        assert one.json()["restkv"]["inputs"][0]["prompt_tokens"] > 2 * 896
        score = one.json()["results"][0]["category_scores"]["harassment"]
        expected = reference.json()["results"][0]["category_scores"]["harassment"]
        assert abs(score - expected) < 1e-3, (score, expected)


def test_offline_pooling_requests_take_per_request_settings(moderator_model):
    """Offline `LLM` with the pooling runner, engine in its own process: PoolingParams.extra_kwargs carry the
    per-request keys. Bad ones are refused by the client with the reason; if a request gets past that check, the
    engine core serves it with the server's settings (vLLM cannot finish a pooling request with an error; it
    logs the refusal) and the request beside it is unharmed. With eviction off for one request its probabilities
    are the full cache's, computed apart from vLLM."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, str(REPO / "tests" / "offline_pooling_driver.py"), str(moderator_model)],
                          capture_output=True, text=True, timeout=300, env=server_env())
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert "unknown policy 'bogus'" in result.get("raised", ""), result
    assert "are ignored" in done.stdout + done.stderr and "it runs with the server's" in done.stdout + done.stderr
    on, off = result["on"], result["off"]
    assert all(abs(a - b) < 1e-5 for row in result["unchecked_batch"] for a, b in zip(row, on)), result
    reference = reference_token_scores(moderator_model, result["prompt_ids"])[-1]
    assert abs(off[1] - reference) < 1e-3, (off, reference)
    assert abs(on[1] - reference) > 5e-3, (on, reference)  # eviction moved it: the full-cache match is not luck


def wait_for_metric(url: str, name: str, at_least: float, timeout: float = 120) -> str:
    """/metrics once the total of `name` reaches `at_least` (shadow checks finish after the answer)."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(url + "/metrics", timeout=30).text
        if total(text, name) >= at_least or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def test_shadow_checks_compare_answered_verdicts_with_the_full_cache(moderator_model, tmp_path):
    """--kv-eviction-shadow-rate 1: every /v1/moderations request is scored again with eviction off, after the
    answer; per input the verdicts are compared and |score difference| observed. The differences equal those
    between the answered scores and the same inputs scored with `vllm_xargs` kv_eviction none."""
    args = [*SERVER_ARGS, "--kv-eviction-shadow-rate", "1"]
    inputs = [long_thread(1500, INSULTS[2]), long_thread(1500, None), BENIGN[0]]
    with running_server(moderator_model, args, tmp_path / "serve.log", env=server_env(VLLM_PLUGINS=PLUGINS)) as s:
        answered = httpx.post(s.url + "/v1/moderations", json={"input": inputs}, headers=headers(), timeout=300)
        assert answered.status_code == 200, answered.text
        text = wait_for_metric(s.url, "restkv_moderation_shadow_checks_total", len(inputs))
        full = httpx.post(s.url + "/v1/moderations", json={"input": inputs, "vllm_xargs": {"kv_eviction": "none"}},
                          headers=headers(), timeout=300)
        assert full.status_code == 200, full.text
        deferred = httpx.post(s.url + "/v1/moderations", headers=headers(), timeout=300,
                              json={"input": inputs[0], "vllm_xargs": {"kv_eviction_during_prefill": False}})
        assert deferred.status_code == 200, deferred.text
        time.sleep(1)
        after = httpx.get(s.url + "/metrics", timeout=30).text
    scores = [r["category_scores"]["harassment"] for r in answered.json()["results"]]
    reference = [r["category_scores"]["harassment"] for r in full.json()["results"]]
    checks = metric_values(text, "restkv_moderation_shadow_checks_total")
    outcomes = {k.split('outcome="')[1].split('"')[0]: v for k, v in checks.items()}
    disagree = sum((a >= 0.5) != (b >= 0.5) for a, b in zip(scores, reference))
    assert outcomes.get("agree", 0) == len(inputs) - disagree and outcomes.get("disagree", 0) == disagree, outcomes
    assert total(text, "restkv_moderation_shadow_score_diff_count") == len(inputs)
    diffs = [abs(a - b) for a, b in zip(scores, reference)]
    assert abs(total(text, "restkv_moderation_shadow_score_diff_sum") - sum(diffs)) < 0.01, (text, diffs)
    assert max(diffs[:2]) > 1e-3 and diffs[2] < 1e-3, diffs  # the long inputs were evicted, the short one not
    # a request with eviction off for itself, or none before its end (where the verdict is read), has nothing to
    # compare: no shadow check
    assert total(after, "restkv_moderation_shadow_checks_total") == len(inputs)


def test_at_most_one_shadow_check_runs_at_a_time():
    """A request sampled for a shadow check while another check is still running is not checked but counted as
    `busy`: checks hold whole prompts' KV blocks and must not pile up under a burst."""
    import asyncio
    import types

    import prometheus_client as prom

    from vllm_restkv.serving import moderations

    moderator = types.SimpleNamespace(served_names=["shadow-gate-test"])  # what the counters read of it

    async def scenario():
        release, ran = asyncio.Event(), []

        async def check():
            ran.append(1)
            await release.wait()

        first = moderations.start_shadow_check(moderator, check, 2)
        second = moderations.start_shadow_check(moderator, check, 3)
        await asyncio.sleep(0)
        release.set()
        await first
        await asyncio.sleep(0)
        third = moderations.start_shadow_check(moderator, check, 1)
        await third
        return first, second, third, len(ran)

    first, second, third, ran = asyncio.run(scenario())
    assert first is not None and second is None and third is not None and ran == 2
    busy = prom.REGISTRY.get_sample_value("restkv_moderation_shadow_checks_total",
                                          {"model_name": "shadow-gate-test", "outcome": "busy"})
    assert busy == 3
