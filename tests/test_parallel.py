"""Tensor parallelism on CPU (2 ranks, one core each): every rank compacts its own KV heads to the same count, so
no cross-rank agreement is needed; the report comes from rank 0."""

from __future__ import annotations

import httpx
import pytest

from conftest import SERVE_DTYPE, running_server, server_env

pytestmark = pytest.mark.server
TEXTS: dict[bool, set[str]] = {}  # greedy answers by variant


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_tensor_parallel_serving_with_eviction(tiny_model, tmp_path, compiled):
    """Both ranks evict (and, compiled, both capture their queries inside torch.compile's model: the worker would
    stop otherwise); the eager and the compiled server answer alike (checked through the first tokens' text)."""
    args = ["--max-model-len", "2048", "--dtype", SERVE_DTYPE, "--tensor-parallel-size", "2", "--kv-eviction", "restkv",
            "--kv-eviction-budget", "64", "--kv-eviction-window", "16"]
    env = server_env(VLLM_CPU_OMP_THREADS_BIND="0|1")
    with running_server(tiny_model, args, tmp_path / "tp.log", env=env, eager=not compiled) as server:
        prompt = [100 + (i * 37) % 20000 for i in range(700)]
        for _ in range(2):
            r = httpx.post(server.url + "/v1/completions",
                           json={"model": "m", "prompt": prompt, "max_tokens": 80, "temperature": 0,
                                 "ignore_eos": True}, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 80
            TEXTS.setdefault(compiled, set()).add(r.json()["choices"][0]["text"])
        log = server.output()
    assert "first eviction: request" in log
    assert log.count("KV eviction on in the worker") == 2  # both ranks
    assert len(TEXTS[compiled]) == 1  # greedy: the same answer twice
    assert ("Enforce eager set" in log) != compiled
    if len(TEXTS) == 2:  # both variants ran (in this order): the same answer
        assert TEXTS[True] == TEXTS[False]
