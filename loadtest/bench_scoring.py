"""Micro-benchmark: ReST-KV scoring vs SnapKV scoring vs one layer's prefill (SmolLM2-135M shapes).

    .venv/bin/python loadtest/bench_scoring.py [--lengths 4096 16384 32768] [--repeats 3] [--quick]

Prints a markdown table with the median times (the policies' runs interleaved, so that bursts of noise on a shared
machine hit all of them) and the ratios the project tracks (ReST-KV / SnapKV, and scoring as a share of one layer's
prefill). A layer's prefill is timed twice: its causal attention alone (`scaled_dot_product_attention`, a lower
bound) and the whole decoder layer (transformers' Llama layer with SmolLM2-135M's shapes, random weights, sdpa: norms,
QKV/O projections, RoPE, attention and MLP). Both run in bf16 and in fp32 and the faster of the two counts (the
smaller denominator: CPUs without native bf16 run bf16 matmuls several times slower than fp32 ones); the table names
the dtype that won. Scoring is per layer and per request, on the torch path, timed through `policy.select` as the
engine calls it (scores, smoothing, GQA aggregation and top-k). ReST-KV runs twice: with its default
projection_dtype ("auto": the W_o projection in bfloat16 on a CPU with native bf16) and with it in float32.
`--quick` runs small sizes once, as a smoke test; `--engine-sizes` times every policy's select at the load test's
sizes instead, `--carried` ReST-KV's select in repeated evictions (value norms carried or not), and `--layout`
reading and compacting the CPU KV cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from vllm_restkv.policies import LayerKV, get_policy
from vllm_restkv.cpu import onednn_primitive_cache_off
from vllm_restkv.scoring import projection_matmul_dtype, wo_factors

H, H_KV, D_HEAD, D_MODEL, D_MLP, WINDOW = 9, 3, 64, 576, 1536, 32


def decoder_layer(dtype: torch.dtype):
    """One SmolLM2-135M decoder layer (random weights) and its rotary embedding, as transformers runs them."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=D_MODEL, intermediate_size=D_MLP, num_attention_heads=H, num_key_value_heads=H_KV,
                         head_dim=D_HEAD, num_hidden_layers=1, max_position_embeddings=1 << 17,
                         rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, layer_idx=0).to(dtype).eval()
    return layer, LlamaRotaryEmbedding(config)


def layer_prefill(layer, rotary, length: int):
    hidden = torch.randn(1, length, D_MODEL, dtype=next(layer.parameters()).dtype)
    positions = torch.arange(length)[None]
    with torch.inference_mode():
        cos_sin = rotary(hidden, positions)  # computed once per forward for all layers, so not part of one layer

    def run():
        with torch.inference_mode():
            layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)
    return run


DTYPES = (torch.bfloat16, torch.float32)


def attention_prefill(key: torch.Tensor, value: torch.Tensor, dtype: torch.dtype):
    """Causal prefill attention of all L tokens for the 9 query heads (keys and values shared per GQA group)."""
    length = key.shape[1]
    q_all = torch.randn(1, H, length, D_HEAD, dtype=dtype)
    k_all = key.repeat_interleave(H // H_KV, 0)[None].to(dtype)
    v_all = value.repeat_interleave(H // H_KV, 0)[None].to(dtype)
    return lambda: F.scaled_dot_product_attention(q_all, k_all, v_all, is_causal=True)


def fastest(runs: dict) -> tuple[float, str]:
    """(seconds, dtype name) of the fastest of one timed run per dtype, after a warm-up each."""
    times = {str(dtype).removeprefix("torch."): timed(run, 1) for dtype, run in runs.items()}
    name = min(times, key=times.get)
    return times[name], name


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_together(fns: list, repeats: int) -> list[float]:
    """Median seconds of each fn, their runs interleaved (a, b, c, a, b, c, ...) after a warm-up each, so that a
    burst of noise on a shared machine hits all of them rather than one."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="lengths 1024 2048, one repeat, budget 256")
    parser.add_argument("--engine-sizes", action="store_true",
                        help="instead: every policy's select at the engine benchmark's sizes (tiny model: 4 query / 2 "
                             "KV heads, 768 tokens = budget 256 + a chunk of 512), one thread, 400 calls")
    parser.add_argument("--carried", action="store_true",
                        help="instead: ReST-KV's select in the engine's repeated evictions (tiny model's heads, one "
                             "thread): stateless, with the value norms of the kept tokens carried from the previous "
                             "eviction, and a request's first eviction, at budget + chunk sizes; SnapKV alongside")
    parser.add_argument("--layout", action="store_true",
                        help="instead: reading and compacting one layer of the CPU KV cache (this CPU's layout, found "
                             "by vLLM's cache-write op), strided fast path vs the general per-element path")
    args = parser.parse_args()
    if args.engine_sizes:
        engine_sizes()
        return
    if args.layout:
        layout_paths()
        return
    if args.carried:
        carried_norms(calls=40 if args.quick else 200)
        return
    if args.quick:
        args.lengths, args.repeats, args.budget = [1024, 2048], 1, 256
    torch.manual_seed(0)
    weight = torch.randn(D_MODEL, H * D_HEAD) / D_MODEL**0.5
    factor = wo_factors(weight, H)
    restkv, snapkv = get_policy("restkv", window=WINDOW), get_policy("snapkv", window=WINDOW)
    restkv_fp32 = get_policy("restkv", window=WINDOW, projection_dtype="float32")
    projection = str(projection_matmul_dtype("auto", torch.zeros(1))).removeprefix("torch.")
    layers = {dtype: decoder_layer(dtype) for dtype in DTYPES}
    rows = []
    for i, L in enumerate(args.lengths):
        print(f"[{i + 1}/{len(args.lengths)}] L={L} ...", file=sys.stderr, flush=True)
        k = torch.randn(H_KV, L, D_HEAD)
        v = torch.randn(H_KV, L, D_HEAD)
        q = torch.randn(H, WINDOW, D_HEAD)
        kv = LayerKV(query=q, key=k, value=v, positions=torch.arange(L).expand(H_KV, L), o_proj_weight=weight,
                     wo_factor=factor)
        t_rest, t_rest32, t_snap = timed_together([lambda: restkv.select(kv, args.budget),
                                                   lambda: restkv_fp32.select(kv, args.budget),
                                                   lambda: snapkv.select(kv, args.budget)], args.repeats)
        t_attn = fastest({dtype: attention_prefill(k, v, dtype) for dtype in DTYPES})
        t_layer = fastest({dtype: layer_prefill(*layers[dtype], L) for dtype in DTYPES})
        rows.append((L, t_rest, t_rest32, t_snap, t_attn, t_layer))
    print(f"| L | ReST-KV select (ms), {projection} projection | same, float32 projection | SnapKV select (ms) "
          "| ReST-KV / SnapKV (float32 projection) | one layer attention (ms) | ReST-KV / attention "
          "| one whole layer (ms) | ReST-KV / layer |")
    print("|---|---|---|---|---|---|---|---|---|")
    for L, r, r32, s, (a, a_dtype), (y, y_dtype) in rows:
        print(f"| {L} | {r * 1e3:.1f} | {r32 * 1e3:.1f} | {s * 1e3:.1f} | {r / s:.2f}x ({r32 / s:.2f}x) "
              f"| {a * 1e3:.1f} {a_dtype} | {100 * r / a:.1f}% | {y * 1e3:.1f} {y_dtype} | {100 * r / y:.1f}% |")
    print(f"\ncommand: {' '.join(sys.argv)}; torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"ReST-KV's projection_dtype auto = {projection} on this machine")


def engine_sizes(length: int = 768, budget: int = 256, calls: int = 400) -> None:
    """Per-call select time of each policy at the load test's sizes, where dispatch and allocation weigh more than
    the arithmetic."""
    from vllm_restkv.models import TINY_SHAPE

    torch.set_num_threads(1)
    torch.manual_seed(0)
    h, h_kv = TINY_SHAPE["num_attention_heads"], TINY_SHAPE["num_key_value_heads"]
    d = TINY_SHAPE["head_dim"]
    weight = torch.randn(TINY_SHAPE["hidden_size"], h * d) / TINY_SHAPE["hidden_size"] ** 0.5
    kv = LayerKV(query=torch.randn(h, WINDOW, d), key=torch.randn(h_kv, length, d), value=torch.randn(h_kv, length, d),
                 positions=torch.arange(length).expand(h_kv, length), o_proj_weight=weight,
                 wo_factor=wo_factors(weight, h))
    print(f"| policy | select (ms), {h} query / {h_kv} KV heads, L={length}, budget {budget}, 1 thread |")
    print("|---|---|")
    projection = str(projection_matmul_dtype("auto", kv.key, rows=h * (length - WINDOW))).removeprefix("torch.")
    inside = dataclasses.replace(kv, mid_prompt=True)  # a chunk boundary before the prompt's last chunk
    runs = [(f"restkv (projection_dtype auto: {projection})", "restkv", {}, kv),
            ("restkv (projection_dtype float32)", "restkv", {"projection_dtype": "float32"}, kv),
            ("restkv (projection_dtype bfloat16)", "restkv", {"projection_dtype": "bfloat16"}, kv),
            (f"restkv (auto: {projection}, drift computed: official zero-drift shift)", "restkv",
             {"official_zero_shift": True}, kv),
            ("restkv inside the prompt (chunk_alpha 1: the newest query)", "restkv", {}, inside),
            ("restkv inside the prompt, chunk_alpha 0.3 (every window query)", "restkv", {"chunk_alpha": 0.3}, inside)]
    runs += [(name, name, {}, kv) for name in ("snapkv", "h2o", "tova", "streamingllm")]
    batch = 10  # calls per timed run; the policies' runs interleave (timed_together), 1 + calls / batch each

    def calls_of(policy, view):
        return lambda: [policy.select(view, budget) for _ in range(batch)]

    times = timed_together([calls_of(get_policy(name, window=WINDOW, **settings), view)
                            for _, name, settings, view in runs], calls // batch)
    for (label, *_), seconds in zip(runs, times):
        print(f"| {label} | {seconds / batch * 1e3:.2f} |")
    cache = "off, as in a CPU server" if onednn_primitive_cache_off() else "on"
    print(f"\ncommand: {' '.join(sys.argv)}; torch {torch.__version__}; median of {calls // batch} interleaved runs of "
          f"{batch} calls; oneDNN primitive cache {cache} (ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 is the plugin's default "
          f"in a CPU server)")


def carried_norms(calls: int = 200, sizes=((256, 128), (256, 512), (512, 512), (2048, 512), (4096, 512))) -> None:
    """ReST-KV's select where the engine calls it again and again: a cache of `budget` kept tokens plus `new` ones
    (a prefill chunk, or decode tokens). In a request's state the kept tokens' ||W_o^h v_j||^2 are carried from the
    previous eviction, so only the new tokens are projected; "first" is a request's first eviction (state, nothing
    carried yet), "stateless" the offline path (every token projected). Both carried columns force the carry; the
    last column says which the engine uses at that budget (RestKV.carried_norms_min_budget). Medians of interleaved
    runs."""
    from vllm_restkv.models import TINY_SHAPE

    torch.set_num_threads(1)
    torch.manual_seed(0)
    h, h_kv = TINY_SHAPE["num_attention_heads"], TINY_SHAPE["num_key_value_heads"]
    d = TINY_SHAPE["head_dim"]
    weight = torch.randn(TINY_SHAPE["hidden_size"], h * d) / TINY_SHAPE["hidden_size"] ** 0.5
    factor = wo_factors(weight, h)
    restkv, snapkv = get_policy("restkv", window=WINDOW), get_policy("snapkv", window=WINDOW)
    engine_min_budget = restkv.carried_norms_min_budget
    restkv.carried_norms_min_budget = 0  # the carried columns carry at every budget
    print(f"| budget + new tokens | restkv stateless (ms) | restkv, norms carried (ms) | restkv, first eviction (ms) "
          f"| snapkv (ms) | carried / stateless | the engine |  ({h} query / {h_kv} KV heads, 1 thread)")
    print("|---|---|---|---|---|---|---|")
    for budget, new in sizes:
        length = budget + new
        kv = LayerKV(query=torch.randn(h, WINDOW, d), key=torch.randn(h_kv, length, d),
                     value=torch.randn(h_kv, length, d), positions=torch.arange(length).expand(h_kv, length),
                     o_proj_weight=weight, wo_factor=factor)

        def with_state(carried: bool) -> LayerKV:
            state: dict = {}
            if carried:  # the kept tokens' norms, as the previous eviction left them
                kept = dataclasses.replace(kv, key=kv.key[:, :budget], value=kv.value[:, :budget],
                                           positions=kv.positions[:, :budget], state=state)
                restkv.value_sq_norms(kept, factor, torch.float32)
            return dataclasses.replace(kv, state=state)

        def timed_fresh(make) -> float:
            times = []
            for _ in range(10):
                inputs = [make() for _ in range(calls // 10)]
                start = time.perf_counter()
                for x in inputs:
                    restkv.select(x, budget)
                times.append((time.perf_counter() - start) / len(inputs))
            return statistics.median(times)

        stateless, snap = timed_together([lambda: restkv.select(kv, budget), lambda: snapkv.select(kv, budget)],
                                         calls)
        carried, first = timed_fresh(lambda: with_state(True)), timed_fresh(lambda: with_state(False))
        print(f"| {budget} + {new} | {stateless * 1e3:.2f} | {carried * 1e3:.2f} | {first * 1e3:.2f} "
              f"| {snap * 1e3:.2f} | {carried / stateless:.2f}x "
              f"| {'carried' if budget >= engine_min_budget else 'stateless'} |")
    cache = "off, as in a CPU server" if onednn_primitive_cache_off() else "on"
    print(f"\ncommand: {' '.join(sys.argv)}; torch {torch.__version__}; oneDNN primitive cache {cache}")


def layout_paths(length: int = 768, budget: int = 256, calls: int = 100) -> None:
    """Per-call time of reading one request's K/V out of a layer's CPU cache and compacting the kept rows back, at
    the engine benchmark's sizes (tiny model: 2 KV heads of 64, blocks of 128), both dtypes, both paths."""
    from vllm_restkv.engine import kv_layout
    from vllm_restkv.models import TINY_SHAPE

    torch.set_num_threads(1)
    h_kv, d, bs = TINY_SHAPE["num_key_value_heads"], TINY_SHAPE["head_dim"], 128
    blocks = torch.tensor([3, 9, 4, 20, 7, 1])
    print(f"| dtype | path | read (ms) | compact (ms) |  ({h_kv} KV heads of {d}, {length} tokens, keep {budget}, 1 thread)")
    print("|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        layout = kv_layout.probe_cpu_layout(dtype, h_kv, d, bs, "vec")
        cache = torch.randn(32, h_kv, bs, 2 * d).to(dtype)
        kept = torch.stack([torch.randperm(length)[:budget].sort().values for _ in range(h_kv)])
        fast = layout.k_transposed_v_rows
        for path in ("fast", "general") if fast else ("general",):
            layout.k_transposed_v_rows = path == "fast"
            k, v = layout.read(cache, blocks, length)
            t_read = timed(lambda: layout.read(cache, blocks, length), calls)
            target = cache.clone()
            t_compact = timed(lambda: kv_layout.compact(layout, target, blocks, k, v, kept), calls)
            print(f"| {str(dtype).removeprefix('torch.')} | {path} | {t_read * 1e3:.3f} | {t_compact * 1e3:.3f} |")
        layout.k_transposed_v_rows = fast
    print(f"\ncommand: {' '.join(sys.argv)}; torch {torch.__version__}")


if __name__ == "__main__":
    main()
