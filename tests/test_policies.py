"""Scoring and policies against brute-force float64 references (plain loops, written here independently of the
implementation): oracles O1-O6 of shared/docs/restkv-algorithm.md section 10.1, GQA aggregation, every baseline's
rule, selection invariants, physical order, and incremental use (chunk boundaries, decode-time eviction)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from vllm_restkv import scoring
from vllm_restkv.policies import POLICIES, LayerKV, available_policies, get_policy, pyramid_budgets
from vllm_restkv.policies.base import top_k_latest

F64 = torch.float64


# ---------- brute-force references ----------

def brute_attention(q, k, qpos=None, kpos=None):
    """[H, w, L] softmax(q.k / sqrt(d)), key j masked for query t when its position is later."""
    H, w, d = q.shape
    Hkv, L, _ = k.shape
    G = H // Hkv
    qpos = list(range(L - w, L)) if qpos is None else [int(x) for x in qpos]
    out = torch.zeros(H, w, L, dtype=F64)
    for h in range(H):
        g = h // G
        kp = list(range(L)) if kpos is None else [int(x) for x in kpos[g]]
        for t in range(w):
            logits = [float(q[h, t].double() @ k[g, j].double()) / math.sqrt(d) if kp[j] <= qpos[t] else -math.inf
                      for j in range(L)]
            m = max(logits)
            e = [math.exp(x - m) for x in logits]
            s = sum(e)
            out[h, t] = torch.tensor([x / s for x in e], dtype=F64)
    return out


def brute_leave_one_out(p, values, W_h, j):
    """||W_h (o - o^(-j))|| by actually removing key j and renormalising."""
    o = sum(p[i] * values[i] for i in range(len(p)))
    rest = [i for i in range(len(p)) if i != j]
    o_minus = sum(p[i] * values[i] for i in rest) / sum(p[i] for i in rest)
    return float(torch.linalg.norm(W_h @ (o - o_minus)))


def brute_ema_weights(w, alpha):
    """Run the recurrence on unit vectors: weight t = the EMA of e_t."""
    weights = []
    for t in range(w):
        e = 1.0 if t == 0 else 0.0
        for u in range(1, w):
            e = alpha * (1.0 if u == t else 0.0) + (1 - alpha) * e
        weights.append(e)
    return weights


def brute_restkv_after(q, k, v, W, prefix, alpha, qpos=None, kpos=None):
    """[H, P] via oracle O2: leave-one-out of the virtual query (EMA attention on the prefix, rest on a zero value)."""
    H, w, d = q.shape
    G = H // k.shape[0]
    attn = brute_attention(q, k, qpos, kpos)
    weights = brute_ema_weights(w, alpha)
    out = torch.zeros(H, prefix, dtype=F64)
    for h in range(H):
        a_bar = [sum(weights[t] * float(attn[h, t, j]) for t in range(w)) for j in range(prefix)]
        p = a_bar + [1 - sum(a_bar)]
        values = [v[h // G, j].double() for j in range(prefix)] + [torch.zeros(d, dtype=F64)]
        W_h = W[:, h * d:(h + 1) * d].double()
        for j in range(prefix):
            out[h, j] = brute_leave_one_out(p, values, W_h, j)
    return out


def brute_drift(attn, n):
    H, w, L = attn.shape
    s = []
    for h in range(H):
        diffs = []
        for i in range(w // 2):
            early = sorted(range(L), key=lambda j: float(attn[h, i, j]))[-n:]
            late = sorted(range(L), key=lambda j: float(attn[h, i + w // 2, j]))[-n:]
            diffs += [a - b for a, b in zip(early, late)]
        s.append(sum(diffs) / len(diffs))
    return s


def brute_aws(scores, s, beta, k_min, official_zero_shift=False):
    """Box filter of width k centred on j + m with index clamping (replicate padding); m = trunc(s / beta), and +1 at
    s = 0 in the official code."""
    H, P = scores.shape
    out = torch.zeros(H, P, dtype=F64)
    for h in range(H):
        k = max(k_min, 2 * math.floor(abs(s[h]) / beta) + 1)
        m = 1 if s[h] == 0 and official_zero_shift else math.trunc(s[h] / beta)
        for j in range(P):
            idx = [min(max(j + m + u, 0), P - 1) for u in range(-(k // 2), k // 2 + 1)]
            out[h, j] = sum(float(scores[h, i]) for i in idx) / k
    return out


def brute_gqa(scores, Hkv, mode):
    H, N = scores.shape
    G = H // Hkv
    out = torch.zeros(Hkv, N, dtype=F64)
    for g in range(Hkv):
        for j in range(N):
            vals = []
            for h in (range(H) if mode == "layer" else range(g * G, (g + 1) * G)):
                total = sum(float(x) for x in scores[h])
                vals.append(float(scores[h, j]) if mode == "mean_raw" else float(scores[h, j]) / total)
            out[g, j] = max(vals) if mode == "max" else sum(vals) / len(vals)
    return out


def brute_avgpool_zero(row, k):
    P = len(row)
    return [sum(float(row[j + u]) for u in range(-(k // 2), k // 2 + 1) if 0 <= j + u < P) / k for j in range(P)]


def top_set(scores_row, n):
    return set(sorted(range(len(scores_row)), key=lambda j: float(scores_row[j]))[-n:])


def random_case(seed, H=4, Hkv=2, d=8, D=16, L=40, w=8, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(H, w, d, generator=g, dtype=F64)
    k = torch.randn(Hkv, L, d, generator=g, dtype=F64)
    v = torch.randn(Hkv, L, d, generator=g, dtype=F64)
    W = torch.randn(D, H * d, generator=g, dtype=F64)
    return [x.to(dtype) for x in (q, k, v, W)]


def random_kv(seed, L=64, w=8, H=4, Hkv=2, dtype=torch.float32, state=True):
    q, k, v, W = random_case(seed, H=H, Hkv=Hkv, L=L, w=w, dtype=dtype)
    return LayerKV(query=q, key=k, value=v, positions=torch.arange(L).expand(Hkv, L), o_proj_weight=W,
                   layer_idx=1, num_layers=4, state={} if state else None)


def rel_err(got, expect):
    return float(((got.double() - expect).abs() / expect.abs().clamp_min(1e-12)).max())


# ---------- oracles O1..O5 ----------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_o1_before_mode_is_the_exact_per_query_leave_one_out(seed):
    q, k, v, W = random_case(seed, L=14, w=4)
    H, w, d = q.shape
    G = H // k.shape[0]
    P = k.shape[1] - w
    attn = brute_attention(q, k)
    weights = brute_ema_weights(w, 0.3)
    got = scoring.restkv_scores_before(q, k, v, W, window=w, alpha=0.3)
    assert got.shape == (H, P) and got.dtype == F64
    for h in range(H):
        W_h = W[:, h * d:(h + 1) * d]
        for j in range(P):
            expect = sum(weights[t] * brute_leave_one_out(attn[h, t], v[h // G], W_h, j) for t in range(w))
            assert abs(float(got[h, j]) - expect) <= 1e-10 * max(1.0, expect)


def test_o1_float32_and_chunking(monkeypatch):
    q, k, v, W = random_case(3, L=30, w=6)
    ref = scoring.restkv_scores_before(q, k, v, W, window=6)
    monkeypatch.setattr(scoring, "BEFORE_CHUNK", 5)  # 24 prefix keys in 5 chunks
    assert torch.allclose(scoring.restkv_scores_before(q, k, v, W, window=6), ref, rtol=1e-13, atol=0)
    got = scoring.restkv_scores_before(*(x.float() for x in (q, k, v, W)), window=6)
    assert got.dtype == torch.float32 and rel_err(got, ref) < 1e-4


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_o2_after_mode_is_the_leave_one_out_of_the_virtual_query(seed):
    q, k, v, W = random_case(seed, L=16, w=4)
    got = scoring.restkv_scores(q, k, v, W, window=4, alpha=0.3)
    expect = brute_restkv_after(q, k, v, W, 12, 0.3)
    assert got.shape == (4, 12) and got.dtype == F64
    assert float((got - expect).abs().max()) <= 1e-10 * max(1.0, float(expect.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_o2_low_precision_inputs_compute_in_float32(dtype):
    q, k, v, W = random_case(7, L=48, w=8)
    q, k, v, W = (x.to(dtype) for x in (q, k, v, W))
    expect = brute_restkv_after(q.double(), k.double(), v.double(), W.double(), 40, 0.3)  # same rounded inputs
    got = scoring.restkv_scores(q, k, v, W, window=8)
    assert got.dtype == torch.float32 and rel_err(got, expect) < 1e-4


def test_restkv_scores_rejects_a_window_mismatch():
    q, k, v, W = random_case(8, L=16, w=4)
    with pytest.raises(ValueError):
        scoring.restkv_scores(q, k, v, W, window=8)


@pytest.mark.parametrize("w,alpha", [(1, 0.3), (4, 0.3), (32, 0.3), (7, 0.9)])
def test_o3_ema_closed_form(w, alpha):
    weights = scoring.ema_weights(w, alpha)
    assert torch.allclose(weights, torch.tensor(brute_ema_weights(w, alpha), dtype=F64), atol=1e-15)
    assert abs(float(weights.sum()) - 1) < 1e-12
    x = torch.randn(w, 3, 5, dtype=F64)
    e = x[0].clone()
    for t in range(1, w):
        e = alpha * x[t] + (1 - alpha) * e
    assert torch.allclose(scoring.ema(x, alpha, 0), e, atol=1e-12)
    assert torch.allclose(scoring.ema(x.transpose(0, 1), alpha, 1), e, atol=1e-12)


def test_o4_aws_with_no_shift_is_a_clamped_centred_moving_average():
    g = torch.Generator().manual_seed(9)
    attn = torch.softmax(torch.randn(3, 8, 30, generator=g, dtype=F64), -1)
    scores = torch.rand(3, 22, generator=g, dtype=F64)
    s = scoring.drift_score(attn, 6)
    assert torch.allclose(s, torch.tensor(brute_drift(attn, 6), dtype=F64))
    assert (s != 0).all()
    ks, ms = scoring.aws_kernel_and_shift(s, 1e6, 5)  # |s| << beta: k = k_min, m = 0
    assert ks == [5, 5, 5] and ms == [0, 0, 0]
    got = scoring.adaptive_window_pool(scores, attn, 6, 1e6, 5)
    expect = torch.stack([torch.tensor([float(scores[h, [min(max(j + u, 0), 21) for u in range(-2, 3)]].mean())
                                        for j in range(22)], dtype=F64) for h in range(3)])
    assert torch.allclose(got, expect, atol=1e-14)


@pytest.mark.parametrize("beta", [0.5, 1.5, 4.0])
def test_aws_with_kernel_growth_and_shift(beta):
    g = torch.Generator().manual_seed(10)
    attn = torch.softmax(3 * torch.randn(4, 8, 30, generator=g, dtype=F64), -1)
    scores = torch.rand(4, 22, generator=g, dtype=F64)
    s = brute_drift(attn, 6)
    assert torch.allclose(scoring.adaptive_window_pool(scores, attn, 6, beta, 3), brute_aws(scores, s, beta, 3),
                          atol=1e-14)


def test_aws_shift_at_zero_drift_official_quirk_and_ours():
    s = torch.tensor([0.0, -4.0, 4.0, -3.9])
    assert scoring.aws_kernel_and_shift(s, 2.0, 3, official_zero_shift=True) == ([3, 5, 5, 3], [1, -1, 2, -1])
    assert scoring.aws_kernel_and_shift(s, 2.0, 3) == ([3, 5, 5, 3], [0, -1, 2, -1])  # no drift, no shift


def drift_extreme_attention(h, w, length, n):
    """Attention whose drift is the largest possible, s = L - n: the early half of the window attends to the last n
    keys, the late half to the first n (the rest of each row gets less)."""
    attn = torch.full((h, w, length), 0.1, dtype=F64)
    attn[:, : w // 2, length - n:] = 1.0
    attn[:, w // 2:, :n] = 1.0
    return attn / attn.sum(-1, keepdim=True)


@pytest.mark.parametrize("seed", range(4))
def test_aws_skips_the_drift_only_where_no_drift_can_change_the_pool(seed):
    """Below beta = L - n + 1 the pool is k_min and m = 0 without computing the drift; it must equal the brute force
    on any attention, including the one with the largest drift; at beta = L - n that attention must shift."""
    g = torch.Generator().manual_seed(40 + seed)
    h, w, length, n = 3, 8, 30, 6
    scores = torch.rand(h, length - w, generator=g, dtype=F64)
    extreme = drift_extreme_attention(h, w, length, n)
    assert brute_drift(extreme, n) == [length - n] * h
    for attn in (torch.softmax(3 * torch.randn(h, w, length, generator=g, dtype=F64), -1), extreme):
        s = brute_drift(attn, n)
        for beta in (length - n + 1, length - n, 0.5 * (length - n), 3.0):
            for official in (False, True):
                got = scoring.adaptive_window_pool(scores, attn, n, beta, 3, official_zero_shift=official)
                assert torch.allclose(got, brute_aws(scores, s, beta, 3, official), atol=1e-14), (beta, official)
    shifted = scoring.adaptive_window_pool(scores, extreme, n, length - n, 3)
    assert not torch.allclose(shifted, scoring.adaptive_window_pool(scores, extreme, n, length - n + 1, 3))
    # with n >= L (every key in both top-n sets) s = 0: the official code shifts by one, ours does not
    uniform = torch.full((h, w, length), 1 / length, dtype=F64)
    assert torch.allclose(scoring.adaptive_window_pool(scores, uniform, length, 2000.0, 3),
                          brute_aws(scores, [0.0] * h, 2000.0, 3))
    assert torch.allclose(scoring.adaptive_window_pool(scores, uniform, length, 2000.0, 3, official_zero_shift=True),
                          brute_aws(scores, [0.0] * h, 2000.0, 3, official_zero_shift=True))


def test_aws_skip_does_not_run_the_drift(monkeypatch):
    calls = []
    real = scoring.drift_score
    monkeypatch.setattr(scoring, "drift_score", lambda attn, n: calls.append(n) or real(attn, n))
    attn = torch.softmax(torch.randn(2, 8, 40, dtype=F64), -1)
    scores = torch.rand(2, 32, dtype=F64)
    scoring.adaptive_window_pool(scores, attn, 10, 31.0, 5)  # L - n = 30 < beta
    assert calls == []
    scoring.adaptive_window_pool(scores, attn, 10, 30.0, 5)
    assert calls == [10]


@pytest.mark.parametrize("gaps", [False, True])
def test_windowed_drift_is_the_drift_of_the_whole_window_attention(gaps):
    """The GPU path's drift, one KV head at a time, equals drift_score of the whole [H, w, L] attention (GQA, and
    positions with gaps as after an eviction), and through adaptive_window_pool the same smoothing."""
    q, k, v, W = random_case(30, H=6, Hkv=2, L=300, w=16)
    g = torch.Generator().manual_seed(31)
    prefix = (torch.randperm(400, generator=g)[:284].sort().values if gaps else torch.arange(284))
    positions = torch.cat([prefix, torch.arange(400, 416) if gaps else torch.arange(284, 300)]).expand(2, 300)
    qpos = positions[0, -16:]
    attn = scoring.window_attention(q, k, query_positions=qpos, key_positions=positions)
    for n in (40, 200):
        whole = scoring.drift_score(attn, n)
        assert torch.allclose(scoring.windowed_drift(q, k, n, query_positions=qpos, key_positions=positions), whole,
                              rtol=0, atol=1e-12)
        scores = torch.rand(6, 284, generator=g, dtype=F64)
        beta = 1.0  # drift needed (L - n >= beta), and the heads get different widths and shifts
        assert torch.equal(scoring.adaptive_window_pool(scores, None, n, beta, 5, length=300,
                                                        drift=scoring.windowed_drift(q, k, n, query_positions=qpos,
                                                                                     key_positions=positions)),
                           scoring.adaptive_window_pool(scores, attn, n, beta, 5))
    with pytest.raises(ValueError, match="needs the window attention or the drift"):
        scoring.adaptive_window_pool(scores, None, 40, 5.0, 5, length=300)


def test_o5_qr_norm_equals_the_explicit_projection():
    _, _, _, W = random_case(11)
    R = scoring.wo_factors(W, 4)
    assert R.shape == (4, 8, 8) and torch.equal(R, R.triu())
    x = torch.randn(4, 10, 8, dtype=F64)
    explicit = torch.stack([(W[:, h * 8:(h + 1) * 8] @ x[h].T).norm(dim=0) for h in range(4)])
    assert torch.allclose(scoring.projected_norm(x, R), explicit, atol=1e-12)
    R32 = scoring.wo_factors(W.float(), 4)
    assert rel_err(scoring.projected_norm(x.float(), R32), explicit) < 1e-4


@pytest.mark.parametrize("chunk", [3, 10, 4096])
def test_projected_distance_by_group_and_chunk_equals_the_explicit_projection(chunk):
    """6 query heads on 2 KV heads, 10 tokens in chunks of 3 (the last one short), one chunk, a chunk beyond L."""
    g = torch.Generator().manual_seed(13)
    W = torch.randn(16, 6 * 8, generator=g, dtype=F64)
    R = scoring.wo_factors(W, 6)
    value = torch.randn(2, 10, 8, generator=g, dtype=F64)
    center = torch.randn(6, 8, generator=g, dtype=F64)
    explicit = torch.stack([(W[:, h * 8:(h + 1) * 8] @ (center[h][:, None] - value[h // 3].T)).norm(dim=0)
                            for h in range(6)])
    got = scoring.projected_distance(value, center, R, chunk=chunk)
    assert got.shape == (6, 10) and torch.allclose(got, explicit, atol=1e-12)


def test_projected_distance_reuses_its_buffers_safely(monkeypatch):
    """The CPU scratch buffers are reused across calls of other shapes and dtypes, capped in size (wide models take
    shorter chunks), and never alias a result."""
    g = torch.Generator().manual_seed(14)
    monkeypatch.setattr(scoring, "SCRATCH_ELEMENTS", 6 * 8 * 4)  # at most 4 tokens per chunk for 6 heads of 8
    results = []
    for length, dtype in [(10, F64), (3, F64), (0, F64), (17, torch.float32), (10, F64)]:
        W = torch.randn(16, 6 * 8, generator=g, dtype=F64)
        value = torch.randn(2, length, 8, generator=g, dtype=F64)
        center = torch.randn(6, 8, generator=g, dtype=F64)
        explicit = torch.stack([(W[:, h * 8:(h + 1) * 8] @ (center[h][:, None] - value[h // 3].T)).norm(dim=0)
                                for h in range(6)])
        got = scoring.projected_distance(value.to(dtype), center.to(dtype), scoring.wo_factors(W, 6).to(dtype))
        tolerance = 1e-12 if dtype == F64 else 1e-4 * float(explicit.abs().max())
        assert got.shape == (6, length) and torch.allclose(got.double(), explicit, atol=tolerance), (length, dtype)
        results.append((got.clone(), got))
    for kept, got in results:  # later calls did not overwrite earlier results
        assert torch.equal(kept, got)


def explicit_distance(W, value, center, heads):
    group = heads // value.shape[0]
    d = value.shape[-1]
    return torch.stack([(W[:, h * d:(h + 1) * d] @ (center[h][:, None] - value[h // group].T)).norm(dim=0)
                        for h in range(heads)])


def sink_case(seed, dtype):
    """Values, centers and R factors where tokens 3 and 17 of KV head 0 nearly equal the centers of its query
    heads (a sink with a_bar ~ 1 has o_bar ~ v_j): the expansion of the distance cancels there."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(48, 6 * 16, generator=g, dtype=F64)
    value = torch.randn(2, 40, 16, generator=g, dtype=F64)
    center = 0.3 * torch.randn(6, 16, generator=g, dtype=F64)
    value[0, 3] = center[0] + 1e-3 * torch.randn(16, generator=g, dtype=F64)
    value[0, 17] = center[1] + 1e-2 * torch.randn(16, generator=g, dtype=F64)
    return W, value.to(dtype), center.to(dtype), scoring.wo_factors(W, 6).to(dtype)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-4)])
def test_projected_distance_expanded_equals_the_explicit_projection(dtype, tol):
    """||R(o - v)|| from carried ||R v||^2 (ReST-KV's engine path): within float rounding of the explicit W_o
    projection everywhere, the near-sink tokens included (projected directly below the guard); without the guard
    the fp32 expansion would be far off there."""
    W, value, center, R = sink_case(40, dtype)
    expect = explicit_distance(W, value.double(), center.double(), 6)
    norms = scoring.projected_sq_norms(value, R)
    assert rel_err(norms, explicit_distance(W, value.double(), torch.zeros(6, 16, dtype=F64), 6) ** 2) < tol
    got = scoring.projected_distance_expanded(value, center, R, norms, scoring.EXPANSION_GUARD[dtype])
    assert got.dtype == dtype and rel_err(got, expect) < tol
    if dtype == torch.float32:
        unguarded = scoring.projected_distance_expanded(value, center, R, norms, 0.0)
        assert rel_err(unguarded[:2, [3, 17]], expect[:2, [3, 17]]) > 1e-3
        assert rel_err(unguarded[:, 20:], expect[:, 20:]) < tol  # elsewhere it needs no guard
    # most tokens of a head cancelling (near-identical values): the direct form for all
    same = center[4] + 1e-3 * torch.randn(value.shape[1], 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    value = torch.stack([value[0], same])
    expect = explicit_distance(W, value.double(), center.double(), 6)
    got = scoring.projected_distance_expanded(value, center, R, scoring.projected_sq_norms(value, R),
                                              scoring.EXPANSION_GUARD[dtype])
    assert rel_err(got, expect) < tol


def test_restkv_carried_value_norms_follow_their_tokens():
    """ReST-KV with a request's state over three evictions (chunk boundaries, then decode-like growth): the value
    norms are carried with the kept tokens and equal fresh ones; the scores equal stateless scoring of the same
    cache (fp64 to 1e-10, fp32 to 1e-4 relative) and the kept tokens are the same."""
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-4)):
        policy = get_policy("restkv", window=8, projection_dtype="float32")
        policy.carried_norms_min_budget = 0  # carry at this small budget (the default starts at 512 kept tokens)
        kv = random_kv(41, L=72, w=8, dtype=dtype)
        for step, new in enumerate((24, 40, 12)):
            kept = evict(policy, kv, 32)
            norms = kv.state["restkv_vnorm"]  # [H, kept], in physical order of the kept tokens
            factor = scoring.wo_factors(kv.o_proj_weight.to(dtype), 4)
            fresh = scoring.projected_sq_norms(kv.value.gather(1, kept[..., None].expand(-1, -1, 8)), factor)
            assert norms.shape == (4, 32)
            assert rel_err(norms, fresh.double()) < tol
            kv = next_step(kv, kept, 42 + step, new=new)
            stateless = dataclasses.replace(kv, state=None)
            scores, expect = policy.score(kv, budget=32), policy.score(stateless, budget=32)
            prefix = kv.length - 8
            assert rel_err(scores[:, :prefix], expect[:, :prefix].double()) < tol
            assert torch.equal(policy.select(kv, 32), policy.select(stateless, 32))


def test_restkv_carries_value_norms_only_from_its_minimum_budget():
    """The norms are carried where that pays (budget >= CARRIED_NORMS_MIN_BUDGET kept tokens) and not below; a call
    below it drops norms an earlier call left (they would not cover the cache afterwards), and either way the
    kept tokens equal stateless scoring's."""
    from vllm_restkv.policies.restkv import CARRIED_NORMS_MIN_BUDGET, VALUE_NORMS

    policy = get_policy("restkv", window=8, projection_dtype="float32")
    assert policy.carried_norms_min_budget == CARRIED_NORMS_MIN_BUDGET == 512
    small = random_kv(43, L=200, w=8)
    kept = evict(policy, small, 64)
    assert VALUE_NORMS not in small.state
    assert torch.equal(kept, policy.select(dataclasses.replace(small, state=None), 64))
    large = random_kv(44, L=700, w=8)
    kept = evict(policy, large, 512)
    assert large.state[VALUE_NORMS].shape == (4, 512)
    step = next_step(large, kept, 45, new=40)
    assert torch.equal(policy.select(step, 512), policy.select(dataclasses.replace(step, state=None), 512))
    kept = evict(policy, step, 300)  # a smaller budget for the same state: norms dropped, nothing raised
    assert VALUE_NORMS not in step.state and kept.shape == (2, 300)


def test_projected_distance_with_a_bf16_matmul_is_within_bf16_rounding():
    """The difference is taken in fp32 and only then rounded to bf16: per token the error stays at bf16's ~0.4%
    relative, also for a sink whose o_bar nearly equals its value (projecting first would cancel there)."""
    g = torch.Generator().manual_seed(15)
    W = torch.randn(48, 6 * 16, generator=g, dtype=F64)
    value = torch.randn(2, 300, 16, generator=g, dtype=F64)
    center = torch.randn(6, 16, generator=g, dtype=F64)
    center[0] = value[0, 7] + 1e-2 * torch.randn(16, generator=g, dtype=F64)  # a sink: o_bar ~ v_7
    explicit = explicit_distance(W, value, center, 6)
    R32 = scoring.wo_factors(W.float(), 6)
    got = scoring.projected_distance(value.float(), center.float(), R32, matmul_dtype=torch.bfloat16)
    assert got.dtype == torch.float32 and rel_err(got, explicit) < 2e-2
    assert rel_err(got[0, 7:8], explicit[0, 7:8]) < 2e-2  # the sink
    exact32 = scoring.projected_distance(value.float(), center.float(), R32)
    assert rel_err(exact32, explicit) < 1e-4 < rel_err(got, explicit)  # bf16 really ran, fp32 stays exact
    x = (center[:, None, None, :] - value.repeat_interleave(3, 0)[:, None, :3]).float()  # "before" mode's form
    assert rel_err(scoring.projected_norm(x, R32, torch.bfloat16), explicit[:, None, :3]) < 2e-2


def test_projection_matmul_dtype_rule(monkeypatch):
    from vllm_restkv import cpu

    x32, x64 = torch.zeros(1), torch.zeros(1, dtype=F64)
    for native, auto in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(cpu, "native_bf16", lambda native=native: native)
        assert scoring.projection_matmul_dtype("auto", x32) == auto
        # small projections stay fp32 where oneDNN's primitive cache is off (a bf16 primitive per call)
        few, many = scoring.BF16_MIN_ROWS_WITHOUT_PRIMITIVE_CACHE - 1, scoring.BF16_MIN_ROWS_WITHOUT_PRIMITIVE_CACHE
        for variable in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"):
            monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
            monkeypatch.delenv("DNNL_PRIMITIVE_CACHE_CAPACITY", raising=False)
            assert scoring.projection_matmul_dtype("auto", x32, rows=few) == auto
            monkeypatch.setenv(variable, "1024")
            assert scoring.projection_matmul_dtype("auto", x32, rows=few) == auto
            monkeypatch.setenv(variable, "0")
            assert scoring.projection_matmul_dtype("auto", x32, rows=few) == torch.float32
            assert scoring.projection_matmul_dtype("auto", x32, rows=many) == auto
            assert scoring.projection_matmul_dtype("auto", x32) == auto
            assert scoring.projection_matmul_dtype("bfloat16", x32, rows=few) == torch.bfloat16
    assert scoring.projection_matmul_dtype("float32", x32) == torch.float32
    assert scoring.projection_matmul_dtype("bfloat16", x32) == torch.bfloat16
    for setting in scoring.PROJECTION_DTYPES:  # the tests' float64 reference is never rounded
        assert scoring.projection_matmul_dtype(setting, x64) == F64
    with pytest.raises(ValueError, match="unknown projection_dtype 'half'; allowed: auto, float32, bfloat16"):
        scoring.projection_matmul_dtype("half", x32)
    with pytest.raises(ValueError, match="unknown projection_dtype 'fp8'"):
        get_policy("restkv", projection_dtype="fp8")


def test_projection_dtypes_are_the_configs():
    from vllm_restkv.config import PROJECTION_DTYPES

    assert PROJECTION_DTYPES == scoring.PROJECTION_DTYPES


@pytest.mark.parametrize("mode", ["after", "before"])
def test_restkv_bf16_projection_scores_close_and_float64_untouched(mode):
    """A bf16 projection moves the policy's scores by bf16 rounding only, and leaves float64 inputs exact."""
    # a fresh state per policy: the carried value norms belong to one request, which has one policy
    scores = {dt: get_policy("restkv", window=8, mode=mode, projection_dtype=dt).score(random_kv(16, L=96, w=8),
                                                                                       budget=40)
              for dt in ("float32", "bfloat16")}
    prefix = slice(0, 96 - 8)
    assert rel_err(scores["bfloat16"][:, prefix], scores["float32"][:, prefix].double()) < 3e-2
    assert not torch.equal(scores["bfloat16"], scores["float32"])
    kv64 = random_kv(16, L=96, w=8, dtype=F64)
    exact = [get_policy("restkv", window=8, mode=mode, projection_dtype=dt).score(kv64, budget=40)
             for dt in ("float32", "bfloat16")]
    assert torch.equal(exact[0], exact[1])


def test_window_attention_reuse_equals_fresh_and_reuses_its_buffers(monkeypatch):
    """`reuse=True` (the policies' selects): the same attention, in this thread's scratch buffers (a second call
    overwrites the first: the policies drop it before returning); above the size cap, fresh tensors."""
    q, k, _, _ = random_case(13, L=60, w=6, dtype=torch.float32)
    fresh = scoring.window_attention(q, k)
    first = scoring.window_attention(q, k, reuse=True)
    assert torch.equal(first, fresh)
    pointer = first.data_ptr()
    second = scoring.window_attention(q * 2, k, reuse=True)
    assert second.data_ptr() == pointer and torch.equal(first, second)  # the first was overwritten
    assert torch.equal(second, scoring.window_attention(q * 2, k))
    monkeypatch.setattr(scoring, "ATTENTION_SCRATCH_ELEMENTS", 10)
    assert scoring.window_attention(q, k, reuse=True).data_ptr() != pointer


def test_window_attention_against_brute_force():
    q, k, _, _ = random_case(12, L=20, w=5)
    assert torch.allclose(scoring.window_attention(q, k), brute_attention(q, k), atol=1e-14)
    full = scoring.window_attention(q, k, causal_window=False)
    assert (full > 0).all() and torch.allclose(full.sum(-1), torch.ones(4, 5, dtype=F64))
    kpos = torch.tensor([[0, 2, 3, 7, 9, 11, 12, 13, 15, 16, 17, 20, 21, 22, 23, 24, 25, 26, 27, 28]] * 2)
    kpos[1, :4] = torch.tensor([1, 4, 5, 6])  # heads keep different tokens
    qpos = torch.arange(24, 29)
    got = scoring.window_attention(q, k, query_positions=qpos, key_positions=kpos)
    assert torch.allclose(got, brute_attention(q, k, qpos, kpos), atol=1e-14)


# ---------- GQA aggregation ----------

@pytest.mark.parametrize("mode", ["mean", "max", "mean_raw", "layer"])
def test_gqa_aggregation(mode):
    s = torch.rand(6, 10, dtype=F64)
    assert torch.allclose(scoring.gqa_aggregate(s, 2, mode), brute_gqa(s, 2, mode), atol=1e-15)


def test_gqa_modes_are_the_configs():
    from vllm_restkv.config import GQA_AGGREGATIONS

    assert GQA_AGGREGATIONS == scoring.GQA_MODES


def test_layer_aggregation_keeps_the_same_tokens_for_every_kv_head():
    kv = random_kv(5)
    kept = get_policy("restkv", window=8, gqa_agg="layer").select(kv, 20)
    assert kept.shape == (2, 20) and torch.equal(kept[0], kept[1])
    assert not torch.equal(*get_policy("restkv", window=8).select(kv, 20))  # per group, they differ here


def test_gqa_unknown_mode():
    with pytest.raises(ValueError):
        scoring.gqa_aggregate(torch.rand(4, 3), 2, "median")
    with pytest.raises(ValueError):
        get_policy("restkv", gqa_agg="median")


# ---------- O6: selection invariants, every policy ----------

@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("budget", [8, 20, 63, 64, 100])
def test_o6_selection_invariants(name, budget):
    kv = random_kv(13)
    kept = get_policy(name, window=8).select(kv, budget)
    n = 64 if name == "none" else min(budget, 64)
    if name == "pyramidkv":
        n = min(pyramid_budgets(budget, 8, 4, 64)[1], 64)
    assert kept.shape == (2, n) and kept.dtype == torch.long
    for row in kept.tolist():
        assert row == sorted(set(row))  # unique, ascending
        assert set(range(56, 64)) <= set(row)  # the window is always kept
    if budget >= 64:
        assert kept.tolist() == [list(range(64))] * 2  # nothing evicted


@pytest.mark.parametrize("name", [p for p in sorted(POLICIES) if p != "none"])
def test_budget_below_the_window_is_an_error(name):
    with pytest.raises(ValueError):
        get_policy(name, window=8).select(random_kv(0), 4)


def test_available_policies():
    names = available_policies()
    assert names == sorted(names) and "none" in names and "restkv" in names
    assert "pyramidkv" not in names and "pyramidkv" in POLICIES  # per-layer budgets: not for the paged engine
    with pytest.raises(ValueError):
        get_policy("nope")


@pytest.mark.parametrize("name", [p for p in sorted(POLICIES) if p not in ("none", "pyramidkv")])
def test_score_is_physical_with_an_infinite_window(name):
    kv = random_kv(14, L=40)
    score = get_policy(name, window=8).score(kv, budget=20)
    assert score.shape == (2, 40) and torch.isinf(score[:, 32:]).all()


def test_top_k_latest_breaks_ties_towards_later_positions():
    scores = torch.tensor([[1.0, 3.0, 2.0, 2.0, 2.0, float("nan"), 0.0], [5.0, 5.0, 5.0, 5.0, 1.0, 1.0, 1.0]])
    assert top_k_latest(scores, 3).tolist() == [[1, 3, 4], [1, 2, 3]]
    assert top_k_latest(scores, 0).shape == (2, 0)


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
@pytest.mark.parametrize("pooled", [False, True])
def test_exact_selection_helpers_against_sorting(monkeypatch, dtype, pooled):
    """top_n_index_sums / kth_largest (numpy's introselect on the CPU, in row blocks on threads when large; topk for
    other dtypes) against a full sort, on random rows without ties."""
    if pooled:
        monkeypatch.setattr(scoring, "_PARALLEL_MIN_ELEMENTS", 1)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    g = torch.Generator().manual_seed(21)
    x = torch.randn(2, 7, 300, generator=g, dtype=F64).to(dtype)
    for n in (1, 37, 299, 300, 400):
        order = x.to(F64).argsort(dim=-1, descending=True)
        expect = order[..., :n].sum(dim=-1)
        assert torch.equal(scoring.top_n_index_sums(x, n), expect), n
        if n <= 300:
            kth = x.reshape(14, 300).to(F64).sort(dim=-1, descending=True).values[:, n - 1:n]
            got = scoring.kth_largest(x.reshape(14, 300), n)
            assert got.dtype == x.dtype and torch.equal(got.to(F64), kth), n


# ---------- ReST-KV and the baselines against brute-force rules ----------

def test_restkv_policy_against_brute_force():
    kv = random_kv(15, L=30, w=6, dtype=F64)
    policy = get_policy("restkv", window=6, beta=3.0, kernel_size=3)
    raw = brute_restkv_after(kv.query, kv.key, kv.value, kv.o_proj_weight, 24, 0.3)
    attn = brute_attention(kv.query, kv.key)
    smoothed = brute_aws(raw, brute_drift(attn, 8), 3.0, 3)
    expect = brute_gqa(smoothed, 2, "mean")
    assert torch.allclose(policy.score(kv, budget=14)[:, :24], expect, atol=1e-12)
    kept = policy.select(kv, 14)
    for g in range(2):
        assert set(kept[g].tolist()) == top_set(expect[g], 8) | set(range(24, 30))


@pytest.mark.parametrize("mode", ["after", "before"])
def test_restkv_inside_the_prompt_scores_with_its_chunk_settings(mode):
    """At an eviction inside the prompt (kv.mid_prompt) ReST-KV's EMA and smoothing use chunk_alpha /
    chunk_kernel_size (default 1 / 1: the newest query's score, unsmoothed, against the brute force); elsewhere
    alpha / kernel_size, whatever chunk_* are."""
    kv = random_kv(19, L=30, w=6, dtype=F64)
    inside = dataclasses.replace(kv, mid_prompt=True)
    policy = get_policy("restkv", window=6, beta=1e6, mode=mode)
    # the default inside the prompt: alpha 1 weighs only the newest query; k = 1 and |s| < beta leave the scores
    # unsmoothed (no zero-drift shift since the plugin's rule has none)
    newest = dataclasses.replace(kv, query=kv.query[:, -1:])
    if mode == "after":
        raw = brute_restkv_after(newest.query, kv.key, kv.value, kv.o_proj_weight, 24, 1.0)
    else:
        raw = scoring.restkv_scores_before(newest.query, kv.key, kv.value, kv.o_proj_weight, window=1)[:, :24]
    assert torch.allclose(policy.score(inside, budget=14)[:, :24], brute_gqa(raw, 2, "mean"), atol=1e-12)
    # chunk_* inside the prompt are what alpha / kernel_size are elsewhere, and leave the other evictions alone
    chunk = get_policy("restkv", window=6, beta=3.0, mode=mode, chunk_alpha=0.6, chunk_kernel_size=3)
    plain = get_policy("restkv", window=6, beta=3.0, mode=mode, alpha=0.6, kernel_size=3)
    assert torch.equal(chunk.score(inside, budget=14), plain.score(kv, budget=14))
    assert torch.equal(chunk.select(inside, 14), plain.select(kv, 14))
    paper = get_policy("restkv", window=6, beta=3.0, mode=mode)
    assert torch.equal(chunk.score(kv, budget=14), paper.score(kv, budget=14))
    assert not torch.equal(paper.score(inside, budget=14), paper.score(kv, budget=14))


@pytest.mark.parametrize("mode", ["after", "before"])
def test_restkv_attends_only_the_queries_its_ema_weighs(mode):
    """At alpha 1 (the default inside the prompt) every window query but the newest has EMA weight 0, so ReST-KV
    attends with the newest alone, with the same scores and choice as attending with all w; where the smoothing's
    drift reads every query's attention (L - n >= beta, or the official zero-drift rule) or alpha < 1, all w."""
    kv = random_kv(21, L=40, w=8, dtype=F64)
    inside = dataclasses.replace(kv, mid_prompt=True)
    budget, n = 20, 12
    policy = get_policy("restkv", window=8, mode=mode)
    raw, attn = policy.raw_scores(inside, n)
    attn = attn.clone()  # the window attention lives in scratch buffers until the next call
    full_raw, full_attn = policy.raw_scores(inside)  # n unknown: every query
    assert attn.shape[1] == 1 and full_attn.shape[1] == 8
    assert torch.allclose(raw, full_raw, rtol=1e-12, atol=0)
    assert torch.allclose(attn[:, 0], full_attn[:, -1], rtol=1e-12, atol=0)
    # the whole select equals one that attends with every query (the drift skipped either way)
    every_query = get_policy("restkv", window=8, mode=mode)
    every_query.first_weighted_query = lambda kv, n: 0
    assert torch.equal(policy.select(inside, budget), every_query.select(inside, budget))
    # the drift needs every query's attention: L - n >= beta, or the official rule's shift at zero drift
    for needs_all in (get_policy("restkv", window=8, mode=mode, beta=40 - n),
                      get_policy("restkv", window=8, mode=mode, official_zero_shift=True)):
        assert needs_all.raw_scores(inside, n)[1].shape[1] == 8
    assert get_policy("restkv", window=8, mode=mode, beta=40 - n + 1).raw_scores(inside, n)[1].shape[1] == 1
    # alpha < 1 weighs every query: after the prompt (alpha 0.3), or chunk_alpha < 1 inside it
    assert policy.raw_scores(kv, n)[1].shape[1] == 8
    assert get_policy("restkv", window=8, mode=mode, chunk_alpha=0.9).raw_scores(inside, n)[1].shape[1] == 8


def test_restkv_before_mode_policy():
    kv = random_kv(16, L=24, w=4, dtype=F64)
    policy = get_policy("restkv", window=4, mode="before", beta=1e6, kernel_size=1)
    raw = scoring.restkv_scores_before(kv.query, kv.key, kv.value, kv.o_proj_weight, window=4)
    # k = 1 and |s| < beta: the smoothing is the identity except the quirky shift m = +1 when s == 0
    assert torch.allclose(policy.score(kv)[:, :20], scoring.gqa_aggregate(raw, 2, "mean"), atol=1e-12)
    with pytest.raises(ValueError):
        get_policy("restkv", mode="sideways")


def test_restkv_uses_the_cached_factor():
    kv = random_kv(17, L=40)
    policy = get_policy("restkv", window=8)
    expect = policy.select(kv, 20)
    kv.wo_factor = scoring.wo_factors(kv.o_proj_weight, 4)
    kv.o_proj_weight = None
    assert torch.equal(policy.select(kv, 20), expect)


def test_snapkv_rule():
    kv = random_kv(18)
    attn = brute_attention(kv.query, kv.key)
    pooled = torch.stack([torch.tensor(brute_avgpool_zero(attn[h, :, :56].sum(0), 5), dtype=F64) for h in range(4)])
    expect = brute_gqa(pooled, 2, "mean")
    policy = get_policy("snapkv", window=8)
    assert torch.allclose(policy.score(kv)[:, :56].double(), expect, atol=1e-6)
    kept = policy.select(kv, 24)
    for g in range(2):
        assert set(kept[g].tolist()) == top_set(expect[g], 16) | set(range(56, 64))


def test_tova_rule():
    kv = random_kv(19)
    attn = brute_attention(kv.query, kv.key)
    expect = attn[:, -1, :56].mean(0)  # all heads of the layer, the newest query
    kept = get_policy("tova", window=8).select(kv, 24)
    assert set(kept[0].tolist()) == top_set(expect, 16) | set(range(56, 64))
    assert torch.equal(kept[0], kept[1])  # every head keeps the same tokens


def test_streamingllm_keeps_sinks_and_the_most_recent_logical_positions():
    kv = random_kv(20)
    assert get_policy("streamingllm", window=8).select(kv, 20)[0].tolist() == [0, 1, 2, 3] + list(range(48, 64))
    # after an earlier eviction positions are not contiguous and differ per head
    positions = torch.tensor([[0, 1, 2, 3, 10, 11, 30, 31, 40, 41, 42, 43, 44, 45, 46, 47],
                              [0, 1, 2, 3, 5, 6, 7, 9, 40, 41, 42, 43, 44, 45, 46, 47]])
    kv = LayerKV(query=None, key=torch.randn(2, 16, 4), value=torch.randn(2, 16, 4), positions=positions)
    kept = get_policy("streamingllm", window=8, sinks=2).select(kv, 11)
    assert positions.gather(1, kept).tolist() == [[0, 1, 31] + list(range(40, 48)), [0, 1, 9] + list(range(40, 48))]


def test_h2o_one_shot_sums_the_attention_of_all_prompt_queries():
    L = 30
    q, k, v, _ = random_case(21, L=L, w=L)  # every prompt query
    kv = LayerKV(query=q.float(), key=k.float(), value=v.float(), positions=torch.arange(L).expand(2, L))
    attn = brute_attention(q, k)
    expect = torch.stack([attn[2 * g: 2 * g + 2].sum(dim=(0, 1)) for g in range(2)])[:, : L - 8]
    policy = get_policy("h2o", window=8)
    assert torch.allclose(policy.score(kv)[:, : L - 8].double(), expect, atol=1e-5)
    kept = policy.select(kv, 16)
    for g in range(2):
        assert set(kept[g].tolist()) == top_set(expect[g], 8) | set(range(22, 30))


def test_h2o_recent_split():
    kv = random_kv(22)
    kept = get_policy("h2o", window=8, recent_ratio=0.5).select(kv, 32)  # 16 recent (window included), 16 heavy
    base = get_policy("h2o", window=8).score(random_kv(22))[:, :48]
    for g in range(2):
        assert set(range(48, 64)) <= set(kept[g].tolist())
        assert set(kept[g].tolist()) - set(range(48, 64)) == top_set(base[g], 16)
    with pytest.raises(ValueError):
        get_policy("h2o", recent_ratio=2.0)


def test_random_is_seeded():
    kv = random_kv(23)
    a = get_policy("random", window=8, seed=1).select(kv, 20)
    assert torch.equal(a, get_policy("random", window=8, seed=1).select(kv, 20))
    assert not torch.equal(a, get_policy("random", window=8, seed=2).select(kv, 20))


def brute_pyramid(C, w, N, L, beta=20):
    b = C - w
    if L < 2 * b or N == 1:
        return [C] * N
    lo = b // beta
    hi = 2 * b - lo
    if hi >= L - w:
        hi, lo = L - w, 2 * b - (L - w)
    return [hi - i * ((hi - lo) // (N - 1)) + w for i in range(N)]


def test_pyramid_budgets_schedule():
    assert pyramid_budgets(128, 32, 4, 4000) == [220, 159, 98, 37]  # b 96, min 4, max 188, step 61
    assert pyramid_budgets(128, 32, 4, 200) == [200, 152, 104, 56]  # max capped at L - w = 168, min 24
    assert pyramid_budgets(128, 32, 4, 150) == [128] * 4  # L < 2b: uniform, as in the reference code
    for C, w, N, L in [(64, 8, 6, 500), (512, 32, 32, 8000), (96, 32, 3, 140), (40, 8, 1, 900)]:
        assert pyramid_budgets(C, w, N, L) == brute_pyramid(C, w, N, L)


def test_pyramidkv_keeps_the_layer_budget_with_snapkv_scores():
    kv = random_kv(24, L=200)
    budgets = pyramid_budgets(40, 8, 4, 200)
    assert budgets[0] > 40 > budgets[-1]
    for layer in range(4):
        kv.layer_idx = layer
        kept = get_policy("pyramidkv", window=8).select(kv, 40)
        assert kept.shape == (2, budgets[layer])
        assert torch.equal(kept, get_policy("snapkv", window=8).select(kv, budgets[layer]))


# ---------- physical order ----------

@pytest.mark.parametrize("name", ["restkv", "snapkv", "h2o", "tova", "streamingllm", "random"])
def test_physical_order_does_not_matter(name):
    """Rows permuted differently per head give the same kept tokens and the same per-token scores (stateless: the
    engine's caches are always in ascending order, and ReST-KV carries its value norms only there)."""
    kv = random_kv(25, L=48, state=False)
    g = torch.Generator().manual_seed(0)
    perm = torch.stack([torch.randperm(48, generator=g) for _ in range(2)])
    rows = perm[..., None].expand(-1, -1, 8)
    shuffled = dataclasses.replace(kv, key=kv.key.gather(1, rows), value=kv.value.gather(1, rows),
                                   positions=kv.positions.gather(1, perm))
    policy = get_policy(name, window=8)
    kept = policy.select(kv, 20)
    kept_shuffled = policy.select(shuffled, 20)
    assert kept_shuffled.tolist() == kept_shuffled.sort(1).values.tolist()
    assert torch.equal(perm.gather(1, kept_shuffled).sort(1).values, kept)
    assert torch.allclose(policy.score(shuffled, budget=20), policy.score(kv, budget=20).gather(1, perm))


# ---------- incremental use ----------

def next_step(kv, kept, seed, new=16, H=4):
    """The cache after evicting to `kept` and appending `new` tokens, with fresh window queries."""
    g = torch.Generator().manual_seed(seed)
    d, Hkv = kv.key.shape[-1], kv.key.shape[0]
    newest = int(kv.positions.max()) + 1
    rows = kept[..., None].expand(-1, -1, d)
    key = torch.cat([kv.key.gather(1, rows), torch.randn(Hkv, new, d, generator=g, dtype=kv.key.dtype)], 1)
    value = torch.cat([kv.value.gather(1, rows), torch.randn(Hkv, new, d, generator=g, dtype=kv.key.dtype)], 1)
    positions = torch.cat([kv.positions.gather(1, kept), torch.arange(newest, newest + new).expand(Hkv, new)], 1)
    query = torch.randn(H, kv.query.shape[1], d, generator=g, dtype=kv.key.dtype)
    return LayerKV(query=query, key=key, value=value, positions=positions, o_proj_weight=kv.o_proj_weight,
                   layer_idx=kv.layer_idx, num_layers=kv.num_layers, state=kv.state)


def evict(policy, kv, budget):
    kept = policy.select(kv, budget)
    policy.after_select(kv, kept)
    return kept


def test_restkv_second_eviction_equals_one_shot_scoring_of_the_kept_set():
    """Evicting in two steps (carry = 0): the second call scores the kept tokens (non-contiguous positions, which
    differ per head) plus the new ones exactly as brute force does on that token set."""
    policy = get_policy("restkv", window=6, beta=3.0, kernel_size=3)
    kv = random_kv(26, L=40, w=6, dtype=F64)
    step2 = next_step(kv, evict(policy, kv, 20), 27, new=10)
    assert not torch.equal(step2.positions[0], step2.positions[1])
    qpos = step2.query_positions()
    assert qpos.tolist() == list(range(44, 50))
    raw = brute_restkv_after(step2.query, step2.key, step2.value, step2.o_proj_weight, 24, 0.3, qpos,
                             step2.positions)
    attn = brute_attention(step2.query, step2.key, qpos, step2.positions)
    expect = brute_gqa(brute_aws(raw, brute_drift(attn, 14), 3.0, 3), 2, "mean")
    assert torch.allclose(policy.score(step2, budget=20)[:, :24], expect, atol=1e-12)
    fresh = LayerKV(query=step2.query, key=step2.key, value=step2.value, positions=step2.positions,
                    o_proj_weight=step2.o_proj_weight)
    assert torch.equal(policy.select(step2, 20), policy.select(fresh, 20))


@pytest.mark.parametrize("name", ["snapkv", "tova", "streamingllm"])
def test_stateless_baselines_rescore_the_current_cache(name):
    policy = get_policy(name, window=8)
    kv = random_kv(28, L=80)
    step2 = next_step(kv, evict(policy, kv, 40), 29)
    kept2 = policy.select(step2, 40)
    fresh = LayerKV(query=step2.query, key=step2.key, value=step2.value, positions=step2.positions)
    assert torch.equal(kept2, policy.select(fresh, 40))
    assert (step2.positions.gather(1, kept2)[:, -8:] == torch.arange(88, 96)).all()  # the newest 8 stay


def test_restkv_carry_blends_with_the_scores_of_the_previous_call():
    policy = get_policy("restkv", window=8, carry=0.25)
    plain = get_policy("restkv", window=8)
    kv = random_kv(30, L=64)
    first = policy.score(kv, budget=32)
    assert "restkv_carry" not in kv.state  # scoring alone commits nothing
    kept = evict(policy, kv, 32)
    carried = kv.state["restkv_carry"]
    assert carried.shape == (2, 32)
    assert torch.equal(carried[:, :24], first.gather(1, kept)[:, :24]) and carried[:, 24:].isnan().all()
    step2 = next_step(kv, kept, 31)  # 48 tokens: 24 scored before, 8 previous window, 16 new
    new = plain.score(step2, budget=32)[:, :40]
    got = policy.score(step2, budget=32)[:, :40]
    assert torch.allclose(got[:, :24], 0.75 * new[:, :24] + 0.25 * carried[:, :24])
    assert torch.equal(got[:, 24:], new[:, 24:])
    with pytest.raises(ValueError):
        get_policy("restkv", carry=1.0)


def test_h2o_sums_accumulate_across_calls_and_survive_gather():
    L, w = 48, 8
    q_all, k, v, _ = random_case(32, L=L, w=L, dtype=torch.float32)
    policy = get_policy("h2o", window=w)
    state: dict = {}

    def layer(n, kv_key=k, kv_value=v, positions=None):
        positions = torch.arange(n).expand(2, n) if positions is None else positions
        newest = int(positions.max())
        return LayerKV(query=q_all[:, newest - w + 1: newest + 1], key=kv_key, value=kv_value, positions=positions,
                       state=state)

    # chunk 1 (tokens 0..23) and chunk 2 (0..31) evict nothing, yet both count their queries
    evict(policy, layer(24, k[:, :24], v[:, :24]), 64)
    evict(policy, layer(32, k[:, :32], v[:, :32]), 64)
    attn = brute_attention(q_all[:, 16:32].double(), k[:, :32].double())  # queries 16..31 (causal)
    expect = torch.stack([attn[2 * g: 2 * g + 2].sum(dim=(0, 1)) for g in range(2)])
    assert torch.allclose(state["h2o_acc"].double(), expect, atol=1e-5) and state["h2o_seen"] == 31
    # the same queries again count nothing
    again = policy.accumulate(layer(32, k[:, :32], v[:, :32]))
    assert torch.allclose(again.double(), expect, atol=1e-5)
    # chunk 3 (0..39) evicts to 24: the sums follow their tokens
    kv = layer(40, k[:, :40], v[:, :40])
    before = policy.accumulate(kv).clone()
    kept = evict(policy, kv, 24)
    assert torch.equal(state["h2o_acc"], before.gather(1, kept))
    # chunk 4 appends 40..47: old sums plus the new queries' attention over the compacted cache
    rows = kept[..., None].expand(-1, -1, 8)
    positions = torch.cat([kept, torch.arange(40, 48).expand(2, 8)], 1)
    kv = layer(32, torch.cat([k.gather(1, rows), k[:, 40:]], 1), torch.cat([v.gather(1, rows), v[:, 40:]], 1),
               positions)
    carried = state["h2o_acc"].clone()
    acc = policy.accumulate(kv)
    attn = brute_attention(q_all[:, 40:48].double(), kv.key.double(), torch.arange(40, 48), positions)
    add = torch.stack([attn[2 * g: 2 * g + 2].sum(dim=(0, 1)) for g in range(2)])
    assert torch.allclose(acc.double(), torch.cat([carried.double(), torch.zeros(2, 8, dtype=F64)], 1) + add,
                          atol=1e-5)


def test_after_select_gathers_state_and_rejects_stale_state():
    policy = get_policy("snapkv", window=8)
    kv = random_kv(33, L=40)
    kv.state["tag"] = kv.positions.clone().float()
    kv.state["count"] = 3
    kept = evict(policy, kv, 20)
    assert torch.equal(kv.state["tag"], kept.float()) and kv.state["count"] == 3
    kv = random_kv(34, L=40)
    kv.state["tag"] = torch.zeros(2, 30)
    with pytest.raises(RuntimeError):
        evict(policy, kv, 20)


@pytest.mark.parametrize("seed", range(5))
def test_restkv_keeps_what_the_official_zero_shift_keeps_where_the_drift_is_not_zero(seed):
    """The skipped drift (L - n < beta) and the computed one give the same selection unless s is exactly 0."""
    kv = random_kv(60 + seed, L=96, w=8, dtype=torch.float64)
    ours, official = get_policy("restkv", window=8), get_policy("restkv", window=8, official_zero_shift=True)
    for budget in (16, 40, 72):
        attn = scoring.window_attention(kv.query, kv.key)
        assert (scoring.drift_score(attn, budget - 8) != 0).all()
        assert torch.equal(ours.select(kv, budget), official.select(kv, budget))
        assert torch.allclose(ours.score(kv, budget=budget), official.score(kv, budget=budget), atol=0, rtol=0)


def test_restkv_projection_dtype_counts_the_rows_each_mode_projects(monkeypatch):
    """With oneDNN's primitive cache off, "after" mode projects H x P rows (fp32 below the threshold) and "before"
    mode H x w x P rows (bf16 from a w-times smaller prompt)."""
    from vllm_restkv import cpu

    monkeypatch.setattr(cpu, "native_bf16", lambda: True)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
    seen = []
    real = scoring.projection_matmul_dtype
    monkeypatch.setattr(scoring, "projection_matmul_dtype",
                        lambda setting, like, rows=None: seen.append((rows, real(setting, like, rows))) or seen[-1][1])
    kv = random_kv(7, L=96, w=8, H=4, Hkv=2, state=False)
    for mode in ("after", "before"):
        get_policy("restkv", window=8, mode=mode).select(kv, 40)
    assert seen == [(4 * 88, torch.float32), (4 * 8 * 88, torch.float32)]
    kv = random_kv(7, L=160, w=8, H=4, Hkv=2, state=False)
    get_policy("restkv", window=8, mode="before").select(kv, 40)
    assert seen[-1] == (4 * 8 * 152, torch.bfloat16)
    # with a request's state ("after" mode) the value norms of every cached token, then of the new ones only, in
    # fp32 (`auto`: bf16 norms would send many tokens to the expansion's direct fallback)
    seen.clear()
    projected = []
    real_norms = scoring.projected_sq_norms
    monkeypatch.setattr(scoring, "projected_sq_norms", lambda value, factor, matmul_dtype=None: projected.append(
        (value.shape[1], matmul_dtype)) or real_norms(value, factor, matmul_dtype))
    policy, kv = get_policy("restkv", window=8), random_kv(7, L=96, w=8, H=4, Hkv=2)
    policy.carried_norms_min_budget = 0  # carried at this small budget too
    step2 = next_step(kv, evict(policy, kv, 40), 8, new=16)
    policy.select(step2, 40)
    assert seen == [] and projected == [(96, torch.float32), (16, torch.float32)]
