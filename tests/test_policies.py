"""Policies and scoring against brute-force float64 oracles, the deterministic test vector of the algorithm
reference (shared/docs/restkv-algorithm.md, section 10), selection invariants and incremental use."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_restkv import scoring
from vllm_restkv.policies import LayerKV, available_policies, get_policy, pyramid_budgets

F64 = torch.float64


# ---------- brute-force references (plain loops, float64) ----------

def brute_window_attention(q, k):
    H, w, d = q.shape
    Hkv, L, _ = k.shape
    G = H // Hkv
    out = torch.zeros(H, w, L, dtype=F64)
    for h in range(H):
        for t in range(w):
            pos = L - w + t
            logits = [float(q[h, t] @ k[h // G, j]) / math.sqrt(d) if j <= pos else -math.inf for j in range(L)]
            m = max(logits)
            e = [math.exp(x - m) if x != -math.inf else 0.0 for x in logits]
            s = sum(e)
            out[h, t] = torch.tensor([x / s for x in e], dtype=F64)
    return out


def brute_leave_one_out(p, values, W_h, j):
    """||W_h (o - o^(-j))|| by actually removing key j and renormalising."""
    o = sum(p[i] * values[i] for i in range(len(p)))
    rest = [i for i in range(len(p)) if i != j]
    z = sum(p[i] for i in rest)
    o_minus = sum(p[i] * values[i] for i in rest) / z
    return float(torch.linalg.norm(W_h @ (o - o_minus)))


def random_case(seed, H=4, Hkv=2, d=8, D=16, L=40, w=8, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(H, w, d, generator=g, dtype=F64)
    k = torch.randn(Hkv, L, d, generator=g, dtype=F64)
    v = torch.randn(Hkv, L, d, generator=g, dtype=F64)
    W = torch.randn(D, H * d, generator=g, dtype=F64)
    return [x.to(dtype) for x in (q, k, v, W)]


# ---------- oracles O1..O5 ----------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_o1_before_mode_is_exact_leave_one_out(seed):
    q, k, v, W = random_case(seed, L=14, w=4)
    H, w, d = q.shape
    G = H // k.shape[0]
    attn = brute_window_attention(q, k)
    got = scoring.restkv_scores_before(q, k, v, W, window=w, alpha=0.3)
    weights = scoring.ema_weights(w, 0.3)
    P = k.shape[1] - w
    for h in range(H):
        W_h = W[:, h * d:(h + 1) * d]
        for j in range(P):
            per_query = [brute_leave_one_out(attn[h, t], v[h // G], W_h, j) for t in range(w)]
            expect = sum(float(weights[t]) * per_query[t] for t in range(w))
            assert abs(float(got[h, j]) - expect) <= 1e-10 * max(1.0, abs(expect))


@pytest.mark.parametrize("seed", [3, 4])
def test_o2_after_mode_is_leave_one_out_of_the_virtual_query(seed):
    q, k, v, W = random_case(seed, L=16, w=4)
    H, w, d = q.shape
    G = H // k.shape[0]
    P = k.shape[1] - w
    attn = brute_window_attention(q, k)
    weights = scoring.ema_weights(w, 0.3)
    got = scoring.restkv_scores(q, k, v, W, window=w, alpha=0.3)
    assert got.shape == (H, P) and got.dtype == F64
    for h in range(H):
        a_bar = [sum(float(weights[t]) * float(attn[h, t, j]) for t in range(w)) for j in range(P)]
        p = a_bar + [1 - sum(a_bar)]
        values = [v[h // G, j] for j in range(P)] + [torch.zeros(d, dtype=F64)]
        W_h = W[:, h * d:(h + 1) * d]
        for j in range(P):
            expect = brute_leave_one_out(p, values, W_h, j)
            assert abs(float(got[h, j]) - expect) <= 1e-10 * max(1.0, expect)


def test_o2_float32_within_1e4_relative():
    q, k, v, W = random_case(5)
    ref = scoring.restkv_scores(q, k, v, W, window=8)
    got = scoring.restkv_scores(q.float(), k.float(), v.float(), W.float(), window=8)
    assert got.dtype == torch.float32
    assert ((got.double() - ref).abs() / ref.abs().clamp_min(1e-6)).max() < 1e-4


def test_o3_ema_closed_form():
    for w, alpha in [(4, 0.3), (32, 0.3), (7, 0.9)]:
        x = torch.randn(w, 3, dtype=F64)
        e = x[0].clone()
        for t in range(1, w):
            e = alpha * x[t] + (1 - alpha) * e
        assert torch.allclose(scoring.ema(x, alpha, 0), e, atol=1e-12)
        assert abs(float(scoring.ema_weights(w, alpha).sum()) - 1) < 1e-12


def test_o4_aws_with_zero_shift_is_a_clamped_moving_average():
    scores = torch.rand(3, 20, dtype=F64)
    attn = torch.zeros(3, 8, 28, dtype=F64)
    attn[..., 0] = 1.0  # no drift: s = 0 -> but the official quirk gives m = +1; use a large beta and check k only
    s = scoring.drift_score(attn, 5)
    k, m = scoring.aws_kernel_and_shift(s, 2000.0, 5)
    assert k == [5, 5, 5]
    got = scoring.adaptive_window_pool(scores, attn, 5, 2000.0, 5)
    for h in range(3):
        for j in range(20):
            idx = [min(max(j + m[h] + u, 0), 19) for u in range(-2, 3)]
            assert abs(float(got[h, j]) - float(scores[h, idx].mean())) < 1e-12


def test_o5_qr_norm_equals_explicit_projection():
    _, _, _, W = random_case(6)
    R = scoring.wo_factors(W, 4)
    x = torch.randn(4, 10, 8, dtype=F64)
    explicit = torch.stack([(W[:, h * 8:(h + 1) * 8] @ x[h].T).norm(dim=0) for h in range(4)])
    assert torch.allclose(scoring._projected_norm(x, R), explicit, atol=1e-12)


# ---------- the deterministic vector of section 10.2 ----------

@pytest.fixture(scope="module")
def vector():
    H, d, D, L = 2, 4, 8, 12
    Q = torch.tensor([[[math.sin(0.7 * (t + 1) + 1.3 * (i + 1) + 2.1 * h) for i in range(d)] for t in range(L)]
                      for h in range(H)], dtype=F64)
    K = torch.tensor([[[math.cos(0.9 * (t + 1) - 0.4 * (i + 1)) for i in range(d)] for t in range(L)]], dtype=F64)
    V = torch.tensor([[[math.sin(0.37 * (t + 1) * (i + 2)) for i in range(d)] for t in range(L)]], dtype=F64)
    W = torch.tensor([[math.cos(0.11 * (c + 1) * (j + 1)) for j in range(H * d)] for c in range(D)], dtype=F64)
    return Q[:, 8:], K, V, W


def close(got, expect, tol=1e-6):
    assert torch.allclose(torch.as_tensor(got, dtype=F64), torch.tensor(expect, dtype=F64), atol=tol), got


def test_vector_every_step(vector):
    q, K, V, W = vector
    close(scoring.ema_weights(4, 0.3), [0.343, 0.147, 0.21, 0.3])
    attn = scoring.window_attention(q, K)
    close(attn[0, -1], [0.048304, 0.074484, 0.1132, 0.123529, 0.0906, 0.05647, 0.042777, 0.048594, 0.075168,
                        0.11381, 0.123225, 0.089839])
    a_bar = scoring.ema(attn[:, :, :8], 0.3, 1)
    close(a_bar[0], [0.074439, 0.066571, 0.083291, 0.109013, 0.130051, 0.133876, 0.106318, 0.074027])
    close(a_bar[1], [0.087923, 0.120317, 0.135172, 0.116637, 0.081304, 0.060039, 0.063433, 0.088527])
    o_bar = torch.einsum("hp,pd->hd", a_bar, V[0, :8])
    close(o_bar, [[-0.116525, 0.105642, 0.018742, 0.066127], [0.118867, 0.113706, -0.067995, 0.083079]])
    S = scoring.restkv_scores(q, K, V, W, window=4, alpha=0.3)
    close(S, [[0.425981, 0.28985, 0.3486, 0.17666, 0.317609, 0.237273, 0.12082, 0.068157],
              [0.515834, 0.40376, 0.542742, 0.243215, 0.186409, 0.101893, 0.081426, 0.1054]])
    before = scoring.restkv_scores_before(q, K, V, W, window=4, alpha=0.3)
    close(before, [[0.423977, 0.27045, 0.328697, 0.215012, 0.344727, 0.26318, 0.135998, 0.076997],
                   [0.514924, 0.379023, 0.522504, 0.256313, 0.203317, 0.103739, 0.095974, 0.130888]])
    s = scoring.drift_score(attn, 4)
    close(s, [-1.625, 0.375])
    assert scoring.aws_kernel_and_shift(s, 2.0, 3) == ([3, 3], [0, 0])
    close(scoring.adaptive_window_pool(S, attn, 4, 2.0, 3),
          [[0.380604, 0.35481, 0.271703, 0.280956, 0.243847, 0.225234, 0.142083, 0.085712],
           [0.478476, 0.487445, 0.396572, 0.324122, 0.177172, 0.123243, 0.096239, 0.097408]])
    assert scoring.aws_kernel_and_shift(s, 0.5, 3) == ([7, 3], [-3, 0])
    close(scoring.adaptive_window_pool(S, attn, 4, 0.5, 3)[0],
          [0.425981, 0.406533, 0.395479, 0.359862, 0.34438, 0.317422, 0.273828, 0.22271])


def vector_kv(vector):
    q, K, V, W = vector
    return LayerKV(query=q, key=K, value=V, positions=torch.arange(12)[None], o_proj_weight=W)


def test_vector_selection_restkv_and_snapkv(vector):
    # Per query head (the reference code's GQA-free setting): each head keeps {0,1,2,3} + window.
    q, K, V, W = vector
    attn = scoring.window_attention(q, K)
    smoothed = scoring.adaptive_window_pool(scoring.restkv_scores(q, K, V, W, window=4), attn, 4, 2.0, 3)
    assert [sorted(r.topk(4).indices.tolist()) for r in smoothed] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    snap = scoring.avg_pool_zero_pad(attn[:, :, :8].sum(1), 5)
    assert [sorted(r.topk(4).indices.tolist()) for r in snap] == [[2, 3, 4, 5], [1, 2, 3, 4]]
    kept = get_policy("restkv", window=4, kernel_size=3, beta=2.0).select(vector_kv(vector), 8)
    assert kept.tolist() == [[0, 1, 2, 3, 8, 9, 10, 11]]


# ---------- selection invariants, every policy ----------

def random_kv(seed, L=64, w=8, H=4, Hkv=2):
    q, k, v, W = random_case(seed, H=H, Hkv=Hkv, L=L, w=w, dtype=torch.float32)
    return LayerKV(query=q, key=k, value=v, positions=torch.arange(L).expand(Hkv, L), o_proj_weight=W,
                   layer_idx=1, num_layers=4, state={})


@pytest.mark.parametrize("name", [p for p in available_policies() if p != "none"])
@pytest.mark.parametrize("budget", [8, 20, 63, 64, 100])
def test_selection_invariants(name, budget):
    kv = random_kv(7)
    kept = get_policy(name, window=8).select(kv, budget)
    n = min(budget, 64)
    assert kept.shape == (2, n)
    for row in kept.tolist():
        assert row == sorted(set(row)) and len(row) == n  # unique, sorted
        assert set(range(56, 64)) <= set(row)  # the window is always kept
    if budget >= 64:
        assert kept.tolist() == [list(range(64))] * 2  # nothing evicted


def test_budget_below_window_is_an_error():
    with pytest.raises(ValueError):
        get_policy("snapkv", window=8).select(random_kv(0), 4)


# ---------- baselines against their rules ----------

def test_gqa_aggregation_rules():
    s = torch.rand(6, 10, dtype=F64)
    mean = scoring.gqa_aggregate(s, 2, "mean")
    for g in range(2):
        expect = sum(s[h] / s[h].sum() for h in range(3 * g, 3 * g + 3)) / 3
        assert torch.allclose(mean[g], expect)
    assert torch.allclose(scoring.gqa_aggregate(s, 2, "mean_raw")[1], s[3:].mean(0))
    assert torch.allclose(scoring.gqa_aggregate(s, 2, "max")[0], (s[:3] / s[:3].sum(1, keepdim=True)).max(0).values)


def test_snapkv_rule():
    kv = random_kv(8)
    attn = brute_window_attention(kv.query.double(), kv.key.double())
    summed = attn[:, :, :56].sum(1)
    pooled = torch.stack([torch.tensor([sum(float(r[j + u]) for u in range(-2, 3) if 0 <= j + u < 56) / 5
                                        for j in range(56)], dtype=F64) for r in summed])
    expect = torch.stack([(pooled[h] / pooled[h].sum()) for h in range(4)]).view(2, 2, 56).mean(1)
    assert torch.allclose(get_policy("snapkv", window=8).score(kv).double(), expect, atol=1e-6)


def test_tova_rule():
    kv = random_kv(9)
    attn = brute_window_attention(kv.query.double(), kv.key.double())
    expect = attn[:, -1, :56].mean(0)
    got = get_policy("tova", window=8).score(kv)
    assert torch.allclose(got[0].double(), expect, atol=1e-6) and torch.equal(got[0], got[1])


def test_streamingllm_keeps_sinks_and_recent():
    kv = random_kv(10)
    kept = get_policy("streamingllm", window=8).select(kv, 20)
    assert kept[0].tolist() == [0, 1, 2, 3] + list(range(48, 64))


def test_h2o_one_shot_sums_attention_of_all_queries():
    L = 30
    q, k, v, W = random_case(11, L=L, w=L)  # every prompt query
    kv = LayerKV(query=q.float(), key=k.float(), value=v.float(), positions=torch.arange(L).expand(2, L), state={})
    attn = brute_window_attention(q, k)  # causal over all L queries
    expect = attn.sum(1).view(2, 2, L).sum(1)[:, : L - 8]
    assert torch.allclose(get_policy("h2o", window=8).score(kv).double(), expect, atol=1e-5)


def test_h2o_accumulates_across_calls_and_follows_kept_tokens():
    policy = get_policy("h2o", window=8)
    kv = random_kv(12)
    first = policy.accumulated(kv).clone()
    again = policy.accumulated(kv)  # same queries again: nothing new is counted
    assert torch.allclose(first, again)
    kept = policy.select(kv, 32)
    policy.after_select(kv, kept)
    assert torch.allclose(kv.state["h2o_acc"], first.gather(1, kept))


def test_random_is_seeded():
    kv = random_kv(13)
    a = get_policy("random", window=8, seed=1).select(kv, 20)
    assert torch.equal(a, get_policy("random", window=8, seed=1).select(kv, 20))
    assert not torch.equal(a, get_policy("random", window=8, seed=2).select(kv, 20))


def test_pyramid_budgets_schedule():
    budgets = pyramid_budgets(128, 32, 4, 4000)
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > 128 > budgets[-1]
    assert abs(sum(budgets) / 4 - 128) <= 4
    kv = random_kv(14, L=200)
    assert get_policy("pyramidkv", window=8).select(kv, 40).shape[1] == pyramid_budgets(40, 8, 4, 200)[1]


# ---------- incremental use ----------

@pytest.mark.parametrize("name", ["restkv", "snapkv", "tova"])
def test_repeated_eviction_equals_one_shot_scoring_of_the_kept_set(name):
    """Evicting in two steps: the second call sees the kept tokens (non-contiguous positions) plus new ones, and
    scores them exactly as a one-shot call on that token set would."""
    policy = get_policy(name, window=8)
    kv = random_kv(15, L=80)
    kept = policy.select(kv, 40)
    g = torch.Generator().manual_seed(99)
    new_k = torch.randn(2, 16, 8, generator=g)
    new_v = torch.randn(2, 16, 8, generator=g)
    positions = torch.cat([kv.positions.gather(1, kept), torch.arange(80, 96).expand(2, 16)], 1)
    key = torch.cat([kv.key.gather(1, kept[..., None].expand(-1, -1, 8)), new_k], 1)
    value = torch.cat([kv.value.gather(1, kept[..., None].expand(-1, -1, 8)), new_v], 1)
    query = torch.randn(4, 8, 8, generator=g)
    step2 = LayerKV(query=query, key=key, value=value, positions=positions, o_proj_weight=kv.o_proj_weight)
    kept2 = policy.select(step2, 40)
    assert kept2.shape == (2, 40) and (positions.gather(1, kept2)[:, -8:] == torch.arange(88, 96)).all()
    # masking honours logical positions: queries at 88..95 see every cached token except later window tokens
    attn = scoring.window_attention(query, key, step2.query_positions(), positions)
    assert attn[0, 0, :-7].min() > 0 and (attn[0, 0, -7:] == 0).all()
