"""Our attention-weight baselines against NVIDIA kvpress's own presses (kvpress 0.5.5, the research tool users
compare us with), on the same random queries, keys and attention.

kvpress's presses score one layer from the eager attention matrix [1, H, L, L] (`attentions`) and keep the top
`int(L * (1 - compression_ratio))` tokens per KV head (`ScorerPress.compress`). We feed them the causal softmax of
the same post-RoPE queries and keys that our policies get, in float64, and compare what is kept (or, where the rules
differ on purpose, the scores up to the documented difference):

* SnapKV: the same kept tokens with `gqa_agg="mean_raw"` (kvpress averages the group's raw scores), and with our
  default `mean` too when there is no GQA (per-head normalisation is then a positive scale).
* TOVA: the same kept tokens with `window=1` (kvpress protects only the newest token).
* StreamingLLM: the same kept tokens (4 sinks plus the newest).
* H2O: kvpress's `ObservedAttentionPress` ("related to H2O") divides each key's summed attention by the number of
  queries that see it (L - j) and averages the group; H2O's own rule, ours, sums. Checked: ours = kvpress x (L - j)
  x G exactly.
PyramidKV is not compared: kvpress derives its per-layer budgets from the compression ratio with float rounding,
ours follow KVCache-Factory's integer schedule (the one ReST-KV's code uses); both are tested against their rule.

kvpress's package `__init__` imports its pipeline and evaluation stack (`datasets`, ...), which this project does
not install; it is installed with --no-deps (deploy/requirements-nodeps.txt) and only its press modules are loaded,
under a package stub that skips that `__init__`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types

import pytest
import torch

from vllm_restkv.policies import LayerKV, get_policy

F64 = torch.float64


@pytest.fixture(scope="module")
def kvpress():
    spec = importlib.util.find_spec("kvpress")
    assert spec is not None, "kvpress is not installed: run `make setup` (deploy/requirements-nodeps.txt)"
    saved = {name: module for name, module in sys.modules.items() if name == "kvpress" or name.startswith("kvpress.")}
    stub = types.ModuleType("kvpress")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["kvpress"] = stub
    try:
        presses = types.SimpleNamespace(
            SnapKV=importlib.import_module("kvpress.presses.snapkv_press").SnapKVPress,
            TOVA=importlib.import_module("kvpress.presses.tova_press").TOVAPress,
            StreamingLLM=importlib.import_module("kvpress.presses.streaming_llm_press").StreamingLLMPress,
            ObservedAttention=importlib.import_module("kvpress.presses.observed_attention_press")
            .ObservedAttentionPress,
            compute_n_kept=importlib.import_module("kvpress.utils").compute_n_kept,
        )
        yield presses
    finally:
        for name in [n for n in sys.modules if n == "kvpress" or n.startswith("kvpress.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def random_layer(seed: int, heads: int, kv_heads: int, length: int, d: int = 16):
    """(all L post-RoPE queries [H, L, d], keys [H_kv, L, d], causal attention [1, H, L, L]) in float64; queries
    scaled up so that the attention is peaked, as a trained model's is, rather than near uniform."""
    g = torch.Generator().manual_seed(seed)
    query = 3 * torch.randn(heads, length, d, generator=g, dtype=F64)
    key = torch.randn(kv_heads, length, d, generator=g, dtype=F64)
    logits = query @ key.repeat_interleave(heads // kv_heads, 0).transpose(1, 2) / math.sqrt(d)
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    attention = torch.softmax(logits.masked_fill(causal, float("-inf")), dim=-1)
    return query, key, attention[None]


def module_stub(heads: int, kv_heads: int, d: int, layer_idx: int = 0, num_layers: int = 1):
    """What kvpress's presses read from a transformers attention layer."""
    config = types.SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   num_hidden_layers=num_layers)
    return types.SimpleNamespace(config=config, head_dim=d, layer_idx=layer_idx)


def kvpress_kept(kvpress, press, key: torch.Tensor, attention: torch.Tensor, heads: int, budget: int) -> list:
    """The token indices kvpress keeps, per KV head (sorted): the values carry their own index, so the values it
    gathers name the kept tokens (these presses score from `attentions` and never read the values)."""
    kv_heads, length, d = key.shape
    press.compression_ratio = 1 - (budget + 0.5) / length
    assert kvpress.compute_n_kept(length, press.compression_ratio) == budget
    values = torch.arange(length, dtype=F64).view(1, 1, length, 1).expand(1, kv_heads, length, d).contiguous()
    hidden = torch.zeros(1, length, heads * d, dtype=F64)  # only its length is read when attentions are given
    _, kept_values = press.compress(module_stub(heads, kv_heads, d), hidden, key[None], values, attention, {})
    return [sorted(int(x) for x in kept_values[0, h, :, 0]) for h in range(kv_heads)]


def our_kept(policy, query_rows: torch.Tensor, key: torch.Tensor, budget: int) -> list:
    length = key.shape[1]
    kv = LayerKV(query=query_rows, key=key, value=key.clone(), positions=torch.arange(length).expand(key.shape[0], -1))
    return [sorted(int(x) for x in row) for row in policy.select(kv, budget)]


CASES = [(seed, heads, kv_heads, length, budget)
         for seed, (heads, kv_heads) in enumerate([(4, 2), (9, 3), (4, 4)])
         for length, budget in [(96, 40), (160, 48), (160, 120)]]


@pytest.mark.parametrize("seed,heads,kv_heads,length,budget", CASES)
def test_snapkv_keeps_what_kvpress_keeps(kvpress, seed, heads, kv_heads, length, budget):
    window = 16
    query, key, attention = random_layer(seed, heads, kv_heads, length)
    theirs = kvpress_kept(kvpress, kvpress.SnapKV(window_size=window, kernel_size=5), key, attention, heads, budget)
    ours = our_kept(get_policy("snapkv", window=window, gqa_agg="mean_raw"), query[:, -window:], key, budget)
    assert ours == theirs
    if heads == kv_heads:  # our default normalises each head first: the same order without GQA
        assert our_kept(get_policy("snapkv", window=window), query[:, -window:], key, budget) == theirs


@pytest.mark.parametrize("seed,heads,kv_heads,length,budget", CASES)
def test_tova_keeps_what_kvpress_keeps(kvpress, seed, heads, kv_heads, length, budget):
    query, key, attention = random_layer(100 + seed, heads, kv_heads, length)
    theirs = kvpress_kept(kvpress, kvpress.TOVA(), key, attention, heads, budget)
    ours = our_kept(get_policy("tova", window=1), query[:, -1:], key, budget)
    assert ours == theirs
    assert all(row == theirs[0] for row in theirs)  # one token set per layer


@pytest.mark.parametrize("seed,heads,kv_heads,length,budget", CASES)
def test_streamingllm_keeps_what_kvpress_keeps(kvpress, seed, heads, kv_heads, length, budget):
    query, key, attention = random_layer(200 + seed, heads, kv_heads, length)
    theirs = kvpress_kept(kvpress, kvpress.StreamingLLM(n_sink=4), key, attention, heads, budget)
    ours = our_kept(get_policy("streamingllm", window=16, sinks=4), None, key, budget)
    assert ours == theirs == [list(range(4)) + list(range(length - budget + 4, length))] * kv_heads


@pytest.mark.parametrize("seed,heads,kv_heads,length", [(0, 4, 2, 64), (1, 9, 3, 96), (2, 4, 4, 80)])
def test_h2o_is_kvpress_observed_attention_times_the_queries_that_see_each_key(kvpress, seed, heads, kv_heads,
                                                                               length):
    query, key, attention = random_layer(300 + seed, heads, kv_heads, length)
    window = 8
    press = kvpress.ObservedAttention()
    hidden = torch.zeros(1, length, heads * key.shape[-1], dtype=F64)
    theirs = press.score(module_stub(heads, kv_heads, key.shape[-1]), hidden, key[None], key[None], attention, {})[0]
    kv = LayerKV(query=query, key=key, value=key.clone(), positions=torch.arange(length).expand(kv_heads, -1))
    ours = get_policy("h2o", window=window).score(kv)  # every prompt query: H2O's one-shot form
    queries_seeing = torch.arange(length, 0, -1, dtype=F64)
    expected = theirs * queries_seeing * (heads // kv_heads)
    prefix = length - window
    torch.testing.assert_close(ours[:, :prefix].to(F64), expected[:, :prefix], rtol=1e-10, atol=1e-12)
    assert bool(torch.isinf(ours[:, prefix:]).all())  # our window is protected; kvpress's press has none
