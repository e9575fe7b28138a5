"""Kernels against their torch references: the references and CPU dispatchers in-process, the Triton kernels under
the Triton interpreter (`TRITON_INTERPRET=1`, CPU tensors) in one subprocess, because the variable must be set
before triton is imported and must not leak into other test modules. Sizes are tiny: the interpreter is slow.

Running this file as a script (`TRITON_INTERPRET=1 python tests/test_kernels.py`) runs the interpreted cases and
prints their results as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import compact_gather, compact_gather_torch, restkv_score, restkv_score_torch
from vllm_restkv import scoring

REPO = Path(__file__).resolve().parent.parent
F64 = torch.float64


def score_inputs(seed, H=4, Hkv=2, w=8, d=16, D=32, L=70, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=g, dtype=F64) for shape in ((H, w, d), (Hkv, L, d), (Hkv, L, d)))
    W = torch.randn(D, H * d, generator=g, dtype=F64)
    return [x.to(dtype) for x in (q, k, v, W)]


def brute_compact(key_cache, value_cache, src, dst, kept):
    """Expected caches after compaction, one row at a time from the untouched originals."""
    out_k, out_v = key_cache.clone(), value_cache.clone()
    bs = key_cache.shape[2]
    for g in range(kept.shape[0]):
        for s, t in enumerate(kept[g].tolist()):
            out_k[dst[s // bs], g, s % bs] = key_cache[src[t // bs], g, t % bs]
            out_v[dst[s // bs], g, s % bs] = value_cache[src[t // bs], g, t % bs]
    return out_k, out_v


def compact_inputs(seed, num_blocks=12, Hkv=2, bs=4, d=16, n=23, B=9, dtype=torch.float32, token_major=False):
    g = torch.Generator().manual_seed(seed)
    if token_major:  # a [nb, bs, H, d] buffer seen as [nb, H, bs, d]: strides are not contiguous
        k = torch.randn(num_blocks, bs, Hkv, d, generator=g).to(dtype).permute(0, 2, 1, 3)
        v = torch.randn(num_blocks, bs, Hkv, d, generator=g).to(dtype).permute(0, 2, 1, 3)
    else:
        k = torch.randn(num_blocks, Hkv, bs, d, generator=g).to(dtype)
        v = torch.randn(num_blocks, Hkv, bs, d, generator=g).to(dtype)
    src = torch.randperm(num_blocks, generator=g)[: -(-n // bs)]
    kept = torch.stack([torch.randperm(n, generator=g)[:B].sort().values for _ in range(Hkv)])
    return k, v, src, kept


def destination(kind, cache, src, kept):
    """dst blocks: the request's first blocks (in place), unused blocks, or its blocks in another order."""
    need = -(-kept.shape[1] // cache.shape[2])
    if kind == "in_place":
        return src[:need]
    if kind == "disjoint":
        return torch.tensor([b for b in range(cache.shape[0]) if b not in src.tolist()][:need])
    return src.flip(0)[:need]


# ---------- references and dispatchers (in-process, CPU) ----------

def test_restkv_score_reference_equals_scoring():
    q, k, v, W = score_inputs(0, dtype=F64)
    R = scoring.wo_factors(W, 4)
    expect = scoring.restkv_scores(q, k, v, W, window=8, alpha=0.3)
    assert torch.allclose(restkv_score_torch(q, k, v, R, alpha=0.3), expect, rtol=1e-12, atol=0)
    got32 = restkv_score(q.float(), k.float(), v.float(), R.float(), alpha=0.3)  # CPU: the torch path
    assert got32.dtype == torch.float32 and float(((got32.double() - expect).abs() / expect).max()) < 1e-4


@pytest.mark.parametrize("case", ["in_place", "disjoint", "overlapping"])
def test_compact_gather_reference_against_loops(case):
    k, v, src, kept = compact_inputs(1, dtype=torch.bfloat16)
    dst = destination(case, k, src, kept)
    expect_k, expect_v = brute_compact(k, v, src, dst, kept)
    compact_gather(k, v, src, dst, kept)  # CPU: the torch path
    assert torch.equal(k, expect_k) and torch.equal(v, expect_v)


def test_compact_gather_rejects_bad_shapes():
    k, v, src, kept = compact_inputs(2)
    with pytest.raises(ValueError):
        compact_gather_torch(k, v[:, :1], src, src, kept)
    with pytest.raises(ValueError):
        compact_gather_torch(k, v, src, src[:2], kept)  # 9 tokens need 3 blocks of 4
    with pytest.raises(ValueError):
        compact_gather_torch(k, v, src, src, kept[:1])


def test_restkv_takes_the_kernel_only_where_it_applies(monkeypatch):
    """RestKV's kernel choice without running Triton: torch and auto (on this CPU) never take it; triton takes it
    only for views the kernel computes exactly ("after" mode, logical order, a full window, no float64), and on a
    CPU without the interpreter it stops at the kernel check with the message, before scoring anything."""
    from vllm_restkv import kernel_choice
    from vllm_restkv.policies import LayerKV, RestKV

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, W = score_inputs(20)
    kv = LayerKV(query=q, key=k, value=v, positions=torch.arange(70).expand(2, 70), o_proj_weight=W)
    assert not RestKV(window=8, kernels="torch").uses_triton(kv)
    assert not RestKV(window=8, kernels="auto").uses_triton(kv)  # CPU tensors
    triton = RestKV(window=8, kernels="triton")
    assert not RestKV(window=8, kernels="triton", mode="before").uses_triton(kv)
    assert not RestKV(window=16, kernels="triton").uses_triton(kv)  # 8 window queries of 16: the start of a prompt
    shuffled = dataclasses.replace(kv, positions=torch.randperm(70).expand(2, 70))
    assert not triton.uses_triton(shuffled.logical())  # rows reordered for the policy: physical != logical
    assert not triton.uses_triton(LayerKV(query=q.double(), key=k.double(), value=v.double(),
                                          positions=kv.positions, o_proj_weight=W.double()))
    with pytest.raises(kernel_choice.KernelCheckError, match="kernels=triton needs a CUDA device"):
        triton.select(kv, 30)
    with pytest.raises(ValueError, match="unknown kernels 'gpu'"):
        RestKV(kernels="gpu")


# ---------- Triton kernels under the interpreter (subprocess) ----------

def _score_case(seed, tol=1e-4, block_l=16, split=32, dtype=torch.float32, key_view=False, sink=False, **shape):
    from kernels import restkv_score_triton

    q, k, v, W = score_inputs(seed, dtype=dtype, **shape)
    if key_view:  # the engine reads K as a transposed [L, H_kv, d] view
        k = k.transpose(0, 1).contiguous().transpose(0, 1)
    if sink:  # every query looks at key 0 (a_bar > 1 - 1e-6): the odds ratio is clamped
        u = torch.nn.functional.normalize(torch.ones(q.shape[-1]), dim=0)
        q = (0.1 * q + 2 * u).to(q.dtype)
        k[:, 0] = 50 * u
    R = scoring.wo_factors(W.float(), q.shape[0])
    got = restkv_score_triton(q, k, v, R, alpha=0.3, block_l=block_l, split=split)
    ref = restkv_score_torch(q, k, v, R, alpha=0.3)
    err = ((got - ref).abs() / ref.abs().clamp_min(1e-6))
    if sink:
        err = err[:, 1:]
        ok = bool(torch.isfinite(got).all()) and torch.equal(got.argmax(1), ref.argmax(1))
    else:
        ok = True
    max_err = float(err.max())
    return {"ok": ok and max_err < tol and got.shape == ref.shape, "max_rel_err": max_err}


def _compact_case(seed, dst_kind, block_b=4, **kwargs):
    from kernels import compact_gather_triton

    k, v, src, kept = compact_inputs(seed, **kwargs)
    dst = destination(dst_kind, k, src, kept)
    expect_k, expect_v = k.clone(), v.clone()
    compact_gather_torch(expect_k, expect_v, src, dst, kept)
    compact_gather_triton(k, v, src, dst, kept, block_b=block_b)
    return {"ok": torch.equal(k, expect_k) and torch.equal(v, expect_v)}


def _policy_case(seed, mid_prompt=False, beta=2000.0, compacted=False, state=False):
    """The engine's wiring of the score kernel: RestKV(kernels="triton") against RestKV(kernels="torch") on the same
    view (scores to 1e-4 relative, the same kept tokens), and the drift (scoring.windowed_drift) only where the
    smoothing needs it (twice then: score and select). `compacted`: positions with gaps, as after an earlier
    eviction; `state`: a request's state dict (on the CPU the torch path then expands around carried value norms).
    The torch path projects in float32 as the kernel does (`auto` would pick bf16 on a CPU with native bf16)."""
    from vllm_restkv.policies import LayerKV, RestKV

    h, h_kv, w, d, hidden, length, budget = 4, 2, 8, 16, 32, 70, 30
    q, k, v, W = score_inputs(seed, H=h, Hkv=h_kv, w=w, d=d, D=hidden, L=length)
    g = torch.Generator().manual_seed(seed)
    if compacted:
        prefix = torch.randperm(150, generator=g)[: length - w].sort().values
        positions = torch.cat([prefix, torch.arange(150, 150 + w)])
    else:
        positions = torch.arange(length)
    kv = LayerKV(query=q, key=k, value=v, positions=positions.expand(h_kv, length), o_proj_weight=W,
                 mid_prompt=mid_prompt, state={} if state else None)
    fast, ref = (RestKV(window=w, beta=beta, kernels=name, projection_dtype="float32") for name in ("triton", "torch"))
    ref.carried_norms_min_budget = 0  # with `state`, carried at this small budget too
    if not fast.uses_triton(kv):
        return {"ok": False, "error": "the Triton path was not taken"}
    drifts, real_drift = [], scoring.windowed_drift
    scoring.windowed_drift = lambda *a, **kw: drifts.append(real_drift(*a, **kw)) or drifts[-1]
    try:
        got, expect = fast.score(kv, budget), ref.score(kv, budget)
        same_kept = torch.equal(fast.select(kv, budget), ref.select(kv, budget))
    finally:
        scoring.windowed_drift = real_drift
    err = float(((got - expect).abs() / expect.abs().clamp_min(1e-6))[:, : length - w].max())
    needed = beta <= length - (budget - w)
    return {"ok": err < 1e-4 and same_kept and len(drifts) == (2 if needed else 0), "max_rel_err": err,
            "same_kept": same_kept, "drift_computed": len(drifts)}


def _flash_compact_case(seed):
    """The engine's wiring of the compaction kernel: kv_layout.compact(triton=True) on FlashAttention's
    [2, nb, bs, H, d] cache equals the torch path, bit for bit, including the blocks it must not touch."""
    from vllm_restkv.engine.kv_layout import FlashKVLayout, compact

    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, 10, 4, 2, 16, generator=g).to(torch.bfloat16)
    blocks = torch.tensor([7, 2, 9, 0, 5, 3])
    n, budget = 23, 9
    kept = torch.stack([torch.randperm(n, generator=g)[:budget].sort().values for _ in range(2)])
    expect = cache.clone()
    k, v = FlashKVLayout.read(expect, blocks, n)
    compact(FlashKVLayout, expect, blocks, k.clone(), v.clone(), kept)
    k, v = FlashKVLayout.read(cache, blocks, n)
    compact(FlashKVLayout, cache, blocks, k, v, kept, triton=True)
    return {"ok": torch.equal(cache, expect)}


def _verify_case():
    """kernel_choice.verify passes the real kernels, and a kernel that returns wrong scores is caught with a
    message that names kernels=torch."""
    import kernels
    from vllm_restkv import kernel_choice

    kernel_choice.verify("cpu")
    passed = "cpu" in kernel_choice._verified
    kernel_choice._verified.clear()
    real = kernels.restkv_score_triton
    kernels.restkv_score_triton = lambda *a, **kw: real(*a, **kw) * 1.001
    try:
        kernel_choice.verify("cpu")
        message = ""
    except kernel_choice.KernelCheckError as e:
        message = str(e)
    finally:
        kernels.restkv_score_triton = real
    return {"ok": passed and "restkv_score" in message and '"kernels": "torch"' in message
            and "cpu" not in kernel_choice._verified, "message": message}


INTERPRETED = {
    "engine_restkv_scores_by_the_kernel": lambda: _policy_case(10),
    "engine_restkv_inside_the_prompt": lambda: _policy_case(11, mid_prompt=True),
    "engine_restkv_drift_needed": lambda: _policy_case(12, beta=1.0),  # widths and shifts differ per head
    "engine_restkv_compacted_positions_with_state": lambda: _policy_case(13, compacted=True, state=True),
    "engine_flash_compaction_by_the_kernel": lambda: _flash_compact_case(14),
    "kernel_check_catches_a_wrong_kernel": _verify_case,
    "score_gqa_several_splits": lambda: _score_case(3),
    "score_mha_padded_dims": lambda: _score_case(4, H=2, Hkv=2, w=5, d=8, D=16, L=23, split=16),
    "score_group3_bf16_key_view": lambda: _score_case(5, H=6, Hkv=2, w=4, d=16, D=24, L=40, dtype=torch.bfloat16,
                                                      key_view=True),
    "score_sink_clamped": lambda: _score_case(6, L=40, sink=True),
    "compact_in_place_bf16": lambda: _compact_case(7, "in_place", dtype=torch.bfloat16),
    "compact_disjoint_odd_head_size": lambda: _compact_case(8, "disjoint", d=12, B=11, bs=8, n=30, num_blocks=9),
    "compact_overlapping_token_major": lambda: _compact_case(9, "overlapping", token_major=True, block_b=16),
}


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("case", sorted(INTERPRETED))
def test_triton_kernel_matches_reference_under_the_interpreter(interpreted, case):
    assert interpreted[case]["ok"], interpreted[case]


def _run_interpreted() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (before triton is imported) to run the kernels on the CPU")
    results = {}
    for name, case in INTERPRETED.items():
        try:
            results[name] = case()
        except Exception as e:  # reported per case, so one failure does not hide the others
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    _run_interpreted()
