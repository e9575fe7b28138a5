"""The deterministic end-to-end vector of shared/docs/restkv-algorithm.md, section 10.2, checked at every step.

H = 2, H_kv = 1, d = 4, D = 8, L = 12, w = 4, C = 8 (n = 4, P = 8), alpha = 0.3, k_min = 3, float64. The expected
numbers are the document's, printed with six decimals, hence the 1e-6 tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_restkv import scoring
from vllm_restkv.policies import LayerKV, get_policy

F64 = torch.float64
H, D_HEAD, D_MODEL, L, W, P, N_KEEP = 2, 4, 8, 12, 4, 8, 4


@pytest.fixture(scope="module")
def vector():
    q = torch.tensor([[[math.sin(0.7 * (t + 1) + 1.3 * (i + 1) + 2.1 * h) for i in range(D_HEAD)]
                       for t in range(L)] for h in range(H)], dtype=F64)
    k = torch.tensor([[[math.cos(0.9 * (t + 1) - 0.4 * (i + 1)) for i in range(D_HEAD)] for t in range(L)]],
                     dtype=F64)
    v = torch.tensor([[[math.sin(0.37 * (t + 1) * (i + 2)) for i in range(D_HEAD)] for t in range(L)]], dtype=F64)
    wo = torch.tensor([[math.cos(0.11 * (c + 1) * (j + 1)) for j in range(H * D_HEAD)] for c in range(D_MODEL)],
                      dtype=F64)
    return q[:, L - W:], k, v, wo  # window queries t = 8..11


def close(got, expect, tol=1e-6):
    got = torch.as_tensor(got, dtype=F64)
    expect = torch.tensor(expect, dtype=F64)
    assert got.shape == expect.shape and torch.allclose(got, expect, atol=tol, rtol=0), (got, expect)


def test_ema_weights():
    close(scoring.ema_weights(W, 0.3), [0.343, 0.147, 0.21, 0.3])


def test_window_attention_row(vector):
    q, k, _, _ = vector
    attn = scoring.window_attention(q, k)
    close(attn[0, -1], [0.048304, 0.074484, 0.1132, 0.123529, 0.0906, 0.05647, 0.042777, 0.048594, 0.075168,
                        0.11381, 0.123225, 0.089839])
    assert (attn[:, 0, P + 1:] == 0).all()  # causal inside the window


def test_a_bar_and_o_bar(vector):
    q, k, v, _ = vector
    a_bar = scoring.ema(scoring.window_attention(q, k)[:, :, :P], 0.3, dim=1)
    close(a_bar[0], [0.074439, 0.066571, 0.083291, 0.109013, 0.130051, 0.133876, 0.106318, 0.074027])
    close(a_bar[1], [0.087923, 0.120317, 0.135172, 0.116637, 0.081304, 0.060039, 0.063433, 0.088527])
    close(a_bar.sum(1), [0.777587, 0.753353])
    o_bar = torch.einsum("hp,pd->hd", a_bar, v[0, :P])
    close(o_bar, [[-0.116525, 0.105642, 0.018742, 0.066127], [0.118867, 0.113706, -0.067995, 0.083079]])


def test_raw_scores_after_and_before(vector):
    q, k, v, wo = vector
    close(scoring.restkv_scores(q, k, v, wo, window=W, alpha=0.3),
          [[0.425981, 0.28985, 0.3486, 0.17666, 0.317609, 0.237273, 0.12082, 0.068157],
           [0.515834, 0.40376, 0.542742, 0.243215, 0.186409, 0.101893, 0.081426, 0.1054]])
    close(scoring.restkv_scores_before(q, k, v, wo, window=W, alpha=0.3),
          [[0.423977, 0.27045, 0.328697, 0.215012, 0.344727, 0.26318, 0.135998, 0.076997],
           [0.514924, 0.379023, 0.522504, 0.256313, 0.203317, 0.103739, 0.095974, 0.130888]])


def test_aws_beta_2(vector):
    q, k, v, wo = vector
    attn = scoring.window_attention(q, k)
    s = scoring.drift_score(attn, N_KEEP)
    close(s, [-1.625, 0.375])
    assert scoring.aws_kernel_and_shift(s, 2.0, 3) == ([3, 3], [0, 0])
    smoothed = scoring.adaptive_window_pool(scoring.restkv_scores(q, k, v, wo, window=W), attn, N_KEEP, 2.0, 3)
    close(smoothed, [[0.380604, 0.35481, 0.271703, 0.280956, 0.243847, 0.225234, 0.142083, 0.085712],
                     [0.478476, 0.487445, 0.396572, 0.324122, 0.177172, 0.123243, 0.096239, 0.097408]])
    # kept per query head (the reference code's per-head selection): top n of the prefix plus the window
    assert [sorted(row.topk(N_KEEP).indices.tolist()) for row in smoothed] == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_aws_beta_half_exercises_the_shift(vector):
    q, k, v, wo = vector
    attn = scoring.window_attention(q, k)
    s = scoring.drift_score(attn, N_KEEP)
    ks, ms = scoring.aws_kernel_and_shift(s, 0.5, 3)
    assert (ks, ms) == ([7, 3], [-3, 0])
    assert (ks[0] // 2 - ms[0], ks[0] // 2 + ms[0]) == (6, 0)  # left and right padding of head 0
    raw = scoring.restkv_scores(q, k, v, wo, window=W)
    smoothed = scoring.adaptive_window_pool(raw, attn, N_KEEP, 0.5, 3)
    close(smoothed[0], [0.425981, 0.406533, 0.395479, 0.359862, 0.34438, 0.317422, 0.273828, 0.22271])
    close(smoothed[1], scoring.adaptive_window_pool(raw, attn, N_KEEP, 2.0, 3)[1].tolist())  # h1 unchanged


def test_snapkv_contrast(vector):
    q, k, _, _ = vector
    snap = scoring.avg_pool_zero_pad(scoring.window_attention(q, k)[:, :, :P].sum(1), 5)
    assert [sorted(row.topk(N_KEEP).indices.tolist()) for row in snap] == [[2, 3, 4, 5], [1, 2, 3, 4]]


def test_policies_on_the_vector(vector):
    """Through the policy API (GQA: both query heads share the KV head; mean aggregation)."""
    q, k, v, wo = vector
    kv = LayerKV(query=q, key=k, value=v, positions=torch.arange(L)[None], o_proj_weight=wo)
    assert get_policy("restkv", window=W, kernel_size=3, beta=2.0).select(kv, 8).tolist() == [[0, 1, 2, 3, 8, 9,
                                                                                                 10, 11]]
    score = get_policy("restkv", window=W, kernel_size=3, beta=2.0).score(kv, budget=8)
    assert score.shape == (1, L) and torch.isinf(score[0, P:]).all()
