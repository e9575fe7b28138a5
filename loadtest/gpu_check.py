"""One-command GPU check (CUDA machine with `vllm==0.32.0` and this package installed; under 10 minutes on one H200):

    python loadtest/gpu_check.py [--out gpu_check.json]

1. FlashAttention cache layout: vllm-restkv's token-major read/compact agrees with vLLM's own
   `reshape_and_cache_flash` write (bf16, the layout the GPU backends use), compaction by torch and by the Triton
   kernel (what the engine runs on CUDA, `kernels` auto), and the start-up kernel check passes.
2. Scoring time on the GPU: ReST-KV (Triton kernel, and `kernels` torch) vs SnapKV selection for L in {4k, 16k, 32k,
   128k} (Llama-3-8B layer shapes), and the two ReST-KV paths' kept sets compared.
3. The engine end to end on the GPU (V1 runner forced, FlashAttention): StreamingLLM eviction with chunked
   prefill and decode-time eviction against the masked fp32 transformers oracle (as tests/test_engine_eviction.py;
   the engine runs bf16 here since FlashAttention has no fp32, so the tolerance is 0.15 in log-prob),
   and a restkv run whose free-block trace must return to idle; the same restkv run with PIECEWISE CUDA graphs
   (`-cc '{"cudagraph_mode": "PIECEWISE"}'`, which the plugin keeps) must run, free blocks and return them.
Prints a table and writes JSON. Refuses clearly without CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def check_layout() -> dict:
    from vllm import _custom_ops as ops

    from vllm_restkv import kernel_choice
    from vllm_restkv.engine.kv_layout import FlashKVLayout, compact

    kernel_choice.verify("cuda")  # raises with its message if a kernel is wrong on this GPU

    nb, bs, h, d, n = 6, 16, 8, 128, 70
    cache = torch.zeros(2, nb, bs, h, d, dtype=torch.bfloat16, device="cuda")
    key = torch.randn(n, h, d, dtype=torch.bfloat16, device="cuda")
    value = torch.randn(n, h, d, dtype=torch.bfloat16, device="cuda")
    blocks = torch.tensor([4, 1, 5, 0, 2], device="cuda")
    slots = (blocks[torch.arange(n, device="cuda") // bs] * bs + torch.arange(n, device="cuda") % bs).long()
    one = torch.ones((), device="cuda")
    ops.reshape_and_cache_flash(key, value, cache[0], cache[1], slots, "auto", one, one)
    k, v = FlashKVLayout.read(cache, blocks, n)
    read_ok = torch.equal(k, key.transpose(0, 1)) and torch.equal(v, value.transpose(0, 1))
    kept = torch.stack([torch.randperm(n, device="cuda")[:40].sort().values for _ in range(h)])
    compact(FlashKVLayout, cache, blocks, k, v, kept)
    k2, v2 = FlashKVLayout.read(cache, blocks, 40)
    idx = kept[..., None].expand(-1, -1, d)
    compact_ok = torch.equal(k2, k.gather(1, idx)) and torch.equal(v2, v.gather(1, idx))
    # the same compaction by the Triton kernel, in place on a second copy of the written cache
    cache2 = torch.zeros_like(cache)
    ops.reshape_and_cache_flash(key, value, cache2[0], cache2[1], slots, "auto", one, one)
    compact(FlashKVLayout, cache2, blocks, *FlashKVLayout.read(cache2, blocks, n), kept, triton=True)
    triton_ok = torch.equal(cache2, cache)
    return {"layout_read_ok": read_ok, "layout_compact_ok": compact_ok, "layout_compact_triton_ok": triton_ok}


def time_scoring(lengths: list[int]) -> list[dict]:
    from vllm_restkv.policies import LayerKV, get_policy
    from vllm_restkv.scoring import wo_factors

    H, H_KV, D_HEAD, D_MODEL = 32, 8, 128, 4096
    weight = torch.randn(D_MODEL, H * D_HEAD, device="cuda") / 64
    factor = wo_factors(weight, H)
    rows = []
    for L in lengths:
        k = torch.randn(H_KV, L, D_HEAD, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(H, 32, D_HEAD, device="cuda", dtype=torch.bfloat16)
        kv = LayerKV(query=q, key=k, value=v, positions=torch.arange(L, device="cuda").expand(H_KV, L),
                     o_proj_weight=weight, wo_factor=factor)
        row = {"L": L}
        kept = {}
        for label, name, settings in (("restkv", "restkv", {}),  # kernels auto: the Triton kernel on CUDA
                                      ("restkv_torch", "restkv", {"kernels": "torch"}),  # projection in bf16
                                      ("restkv_torch_fp32proj", "restkv",
                                       {"kernels": "torch", "projection_dtype": "float32"}),
                                      ("snapkv", "snapkv", {})):
            policy = get_policy(name, **settings)
            kept[label] = policy.select(kv, 1024)
            times = []
            for _ in range(5):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                policy.select(kv, 1024)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            row[label + "_ms"] = 1e3 * statistics.median(times)
        # Triton kernel vs torch with an fp32 projection: kept sets may differ only at near-ties
        row["restkv_triton_vs_torch_kept_overlap"] = float(
            sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(kept["restkv"], kept["restkv_torch_fp32proj"]))
            / kept["restkv"].numel())
        rows.append(row)
        print(f"  L={L}: restkv {row['restkv_ms']:.2f} ms (Triton), torch {row['restkv_torch_ms']:.2f} "
              f"(fp32 projection {row['restkv_torch_fp32proj_ms']:.2f}), snapkv {row['snapkv_ms']:.2f} ms, "
              f"kept overlap {row['restkv_triton_vs_torch_kept_overlap']:.4f}", flush=True)
    return rows


def check_engine() -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from test_engine_eviction import oracle_logprobs, prompt_ids, run_engine, streaming_mask

    from vllm_restkv.models import prepare_tiny

    model = prepare_tiny()
    prompt_len, budget, interval, new, chunk = 1000, 160, 32, 70, 256
    prompt = prompt_ids(prompt_len, seed=1)
    result = run_engine({"model": str(model), "kv_eviction": {"policy": "streamingllm", "budget": budget,
                                                              "decode_interval": interval},
                         "llm": {"max_num_batched_tokens": chunk, "block_size": 16}, "prompts": [prompt],
                         "dtype": "bfloat16",
                         "max_tokens": new})
    generated = result["tokens"][0]
    tokens = prompt + generated
    logprobs = oracle_logprobs(model, tokens, streaming_mask(prompt_len, len(tokens), budget, interval, chunk))
    oracle = torch.tensor([logprobs[prompt_len - 1 + i, t].item() for i, t in enumerate(generated)])
    err = float((torch.tensor(result["logprobs"][0]) - oracle).abs().max())
    restkv_spec = {"model": str(model), "kv_eviction": {"policy": "restkv", "budget": 160},
                   "llm": {"block_size": 16}, "prompts": [prompt_ids(1500, seed=s) for s in range(4)],
                   "dtype": "bfloat16", "max_tokens": 40}
    restkv = run_engine(restkv_spec)
    report = {"streaming_oracle_max_abs_logprob_err": err,
              "streaming_oracle_ok": err < 0.15,  # bf16 engine (FlashAttention) vs fp32 oracle
              "restkv_blocks_returned": restkv["final_free_blocks"] == restkv["idle_free_blocks"],
              "restkv_freed_blocks": restkv["stats"]["freed_blocks"]}
    # The same restkv run with PIECEWISE CUDA graphs (attention outside the graphs, so the query capture runs; the
    # plugin keeps this mode when asked for): it must run (the capture check stops it otherwise), evict and return
    # every block; greedy tokens against eager's are reported (bf16 kernels may differ slightly).
    try:
        graphs = run_engine({**restkv_spec, "llm": {"block_size": 16, "enforce_eager": False,
                                                    "compilation_config": {"cudagraph_mode": "PIECEWISE"}}})
        pairs = [(a, b) for x, y in zip(graphs["tokens"], restkv["tokens"]) for a, b in zip(x, y)]
        report.update({
            "piecewise_cudagraph_mode": graphs["cudagraph_mode"], "piecewise_enforce_eager": graphs["enforce_eager"],
            "piecewise_ok": (graphs["cudagraph_mode"] == "PIECEWISE" and graphs["enforce_eager"] is False
                             and graphs["final_free_blocks"] == graphs["idle_free_blocks"]
                             and graphs["stats"]["freed_blocks"] > 0),
            "piecewise_freed_blocks": graphs["stats"]["freed_blocks"],
            "piecewise_same_tokens_as_eager": sum(a == b for a, b in pairs) / max(1, len(pairs))})
    except AssertionError as error:  # the driver failed: keep its output in the report
        report.update({"piecewise_ok": False, "piecewise_error": str(error)[-3000:]})
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768, 131072])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run this on a GPU machine with vllm==0.32.0 installed.", file=sys.stderr)
        return 2
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    print("[1/3] cache layout", flush=True)
    report.update(check_layout())
    print("[2/3] scoring time", flush=True)
    report["scoring"] = time_scoring(args.lengths)
    print("[3/3] engine", flush=True)
    report.update(check_engine())
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    ok = report["layout_read_ok"] and report["layout_compact_ok"] and report["layout_compact_triton_ok"] and \
        report["streaming_oracle_ok"] and report["restkv_blocks_returned"] and report["piecewise_ok"] and \
        all(r["restkv_triton_vs_torch_kept_overlap"] > 0.99 for r in report["scoring"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
