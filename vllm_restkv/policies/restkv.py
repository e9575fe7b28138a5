"""ReST-KV (An et al., ICLR 2026): layer-wise output reconstruction, EMA over the window queries, adaptive
window-based smoothing, GQA aggregation; paper defaults ("after" mode, alpha 0.3, beta 2000, k_min 5). The W_o
projection's matmul runs in bfloat16 where that is native ("auto"; "float32" keeps it in fp32).

Repeated use (chunk boundaries, decode): each call scores the current cache afresh from the newest window queries
(attention is causal by logical position, so kept old tokens and new ones are treated alike). With `carry` = 0 (the
default) nothing is carried over, so eviction at step t on the kept set equals one-shot scoring of that set. With
`carry` = c > 0 the final scores of the previous call follow their tokens (state "restkv_carry") and a token scored
before gets (1 - c) * new + c * old; tokens not scored before (new ones, the previous window) get the new score.

Inside the prompt (`kv.mid_prompt`: a chunk boundary before the prompt's last chunk) the window queries are the
prompt's own text, not the question at its end, and the EMA and smoothing use `chunk_alpha` / `chunk_kernel_size`
(default 1 / 1: the newest query alone, no smoothing; measured closer to the full cache there than the paper's
0.3 / 5, which stay for the eviction after the prompt and during decode; docs/benchmarks.md).

Cost across calls (CPU, with a request's state): ||W_o^h v_j||^2 depends on the token alone, so it is computed once
per token and carried (state "restkv_vnorm"); each call expands the distance around it and projects only the new
tokens (`value_sq_norms`, scoring.projected_distance_expanded). Same scores within float rounding. Only for budgets of
at least CARRIED_NORMS_MIN_BUDGET kept tokens: below that the expansion's extra steps cost more than the projection of
the few kept tokens saves (5-12% slower at budget 256, break-even at 512; docs/benchmarks.md).

On CUDA (`kernels` auto, vllm_restkv/kernel_choice.py) the raw scores of the "after" mode come from the Triton kernel
kernels/restkv_score.py: window attention, EMA, odds and the W_o projection in three launches without the [H, w, L]
attention in memory; the torch window attention then runs only where the smoothing's drift needs it (L - n >= beta),
one KV head at a time (scoring.windowed_drift).
"""

from __future__ import annotations

import torch

from vllm_restkv import kernel_choice, scoring
from vllm_restkv.policies.base import EvictionPolicy, LayerKV

MODES = ("after", "before")
VALUE_NORMS = "restkv_vnorm"  # state: ||R_h v_j||^2 [H, L]
# Carry the value norms only for budgets (kept tokens, window included) of at least this many: measured break-even at
# 512 on the tiny model's heads (`bench_scoring.py --carried`: 0.97-0.98x there, 1.05-1.12x at 256, 0.64-0.87x at 768+)
CARRIED_NORMS_MIN_BUDGET = 512


class RestKV(EvictionPolicy):
    name = "restkv"
    needs_o_proj = True
    carried_norms_min_budget = CARRIED_NORMS_MIN_BUDGET  # tests set 0 to carry at small sizes
    settings = ("window", "alpha", "beta", "kernel_size", "chunk_alpha", "chunk_kernel_size", "gqa_agg", "carry",
                "projection_dtype")

    def __init__(self, window: int = 32, alpha: float = 0.3, beta: float = 2000.0, kernel_size: int = 5,
                 gqa_agg: str = "mean", mode: str = "after", carry: float = 0.0, projection_dtype: str = "auto",
                 official_zero_shift: bool = False, chunk_alpha: float = 1.0, chunk_kernel_size: int = 1,
                 kernels: str = "auto", **_):
        super().__init__(window=window, gqa_agg=gqa_agg)
        if mode not in MODES:
            raise ValueError(f"unknown ReST-KV mode {mode!r}; allowed: {', '.join(MODES)}")
        if not 0.0 <= carry < 1.0:
            raise ValueError(f"carry must be in [0, 1), got {carry}")
        if projection_dtype not in scoring.PROJECTION_DTYPES:
            raise ValueError(f"unknown projection_dtype {projection_dtype!r}; "
                             f"allowed: {', '.join(scoring.PROJECTION_DTYPES)}")
        if kernels not in kernel_choice.KERNEL_CHOICES:
            raise ValueError(f"unknown kernels {kernels!r}; allowed: {', '.join(kernel_choice.KERNEL_CHOICES)}")
        self.kernels = kernels  # an engine setting (config.kernels), not one of `settings`
        self.alpha, self.beta, self.kernel_size, self.mode, self.carry = alpha, beta, kernel_size, mode, carry
        self.chunk_alpha, self.chunk_kernel_size = chunk_alpha, chunk_kernel_size  # at kv.mid_prompt evictions
        self.projection_dtype = projection_dtype  # the W_o projection's matmul: scoring.projection_matmul_dtype
        # True: the official code's shift by +1 at zero drift, which also means computing the drift on every call
        # (scoring.adaptive_window_pool); for comparisons with the official code, not a server setting
        self.official_zero_shift = official_zero_shift

    def smoothing(self, kv: LayerKV) -> tuple[float, int]:
        """(EMA alpha, smoothing k_min) of this eviction: chunk_* inside the prompt, alpha / kernel_size elsewhere."""
        return (self.chunk_alpha, self.chunk_kernel_size) if kv.mid_prompt else (self.alpha, self.kernel_size)

    def raw_scores(self, kv: LayerKV, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([H, P] raw per-query-head scores, [H, w', L] window attention) of a logical view, for `n` kept prefix
        tokens (None: unknown, every window query is attended). The attention is None where the Triton kernel
        scored (it keeps none)."""
        h = kv.query.shape[0]
        alpha, _ = self.smoothing(kv)
        if kv.wo_factor is not None:
            factor = kv.wo_factor
        elif kv.o_proj_weight is not None:
            factor = scoring.wo_factors(kv.o_proj_weight.to(scoring.compute_dtype(kv.query, kv.key, kv.value)), h)
        else:
            raise ValueError("restkv needs o_proj_weight or wo_factor")
        if self.uses_triton(kv):  # the smoothing's drift, where needed, is computed by prefix_scores
            from kernels import restkv_score_triton

            return restkv_score_triton(kv.query, kv.key, kv.value, factor.float(), alpha=alpha), None
        first = self.first_weighted_query(kv, n)
        attn = scoring.window_attention(kv.query[:, first:], kv.key, query_positions=kv.query_positions()[first:],
                                        key_positions=kv.positions, reuse=True)  # dropped by prefix_scores
        factor = factor.to(attn.dtype)
        prefix = kv.length - self.window
        score_fn = (scoring.restkv_scores_from_attention if self.mode == "after"
                    else scoring.restkv_scores_before_from_attention)
        # Carried value norms on the CPU only: there the projection is compute-bound and host memory plentiful; on
        # a GPU it is cheap, and the norms ([H, L] fp32 per layer, G/d of the kept KV's size: 3% for GQA with 4
        # query heads per KV head and d = 128) would sit outside vLLM's KV memory budget.
        if self.carries_norms(kv, n):
            norms_dtype = self.norms_matmul_dtype(attn.dtype)
            return scoring.restkv_scores_from_attention(attn, kv.value, factor, prefix, alpha,
                                                        value_sq_norms=self.value_sq_norms(kv, factor, attn.dtype),
                                                        norms_dtype=norms_dtype), attn
        rows = h * prefix * (attn.shape[1] if self.mode == "before" else 1)  # "before" projects every window query
        matmul_dtype = scoring.projection_matmul_dtype(self.projection_dtype, attn, rows=rows)
        return score_fn(attn, kv.value, factor, prefix, alpha, matmul_dtype), attn

    def carries_norms(self, kv: LayerKV, n: int | None) -> bool:
        """Whether this call scores from carried value norms (keeping them in kv.state for the next one). Where it
        does not, norms an earlier call left are dropped: they would no longer cover the cache after this one."""
        carries = (self.mode == "after" and kv.state is not None and kv.order is None
                   and kv.value.device.type == "cpu"
                   and (n is None or n + self.window >= self.carried_norms_min_budget))
        if not carries and kv.state is not None:
            kv.state.pop(VALUE_NORMS, None)
        return carries

    def uses_triton(self, kv: LayerKV) -> bool:
        """Whether the Triton kernel scores this view: `kernels` asks for it (auto: a CUDA cache) and the view is
        what the kernel assumes: "after" mode, rows in logical order (compaction keeps them so), a full window of
        queries (its window is the last w keys, o_bar sums the rest), no float64 (the oracles' precision)."""
        return (self.mode == "after" and kv.order is None
                and kv.query.shape[1] == self.window
                and torch.float64 not in (kv.query.dtype, kv.key.dtype, kv.value.dtype)
                and kernel_choice.use_triton(self.kernels, kv.key))

    def first_weighted_query(self, kv: LayerKV, n: int | None) -> int:
        """The oldest window query this eviction needs. A query whose EMA weight is 0 (all but the newest at alpha
        1, the default inside the prompt) adds nothing to either mode's score; only the smoothing's drift reads
        every query's attention, and it is skipped below beta (scoring.adaptive_window_pool). So at alpha 1 the
        window attention shrinks from w rows per head to one, with the same scores."""
        alpha, _ = self.smoothing(kv)
        w = kv.query.shape[1]
        if n is None or alpha < 1.0 or w <= 1 or scoring.drift_needed(kv.length, n, self.beta,
                                                                      self.official_zero_shift):
            return 0
        return w - 1

    def norms_matmul_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The carried norms' matmul dtype: `dtype` (fp32) unless bf16 is asked for. With fp32 norms the expansion's
        guard projects ~0.01% of the tokens again, with bf16 ones 0.4-23% (scoring.EXPANSION_GUARD)."""
        return torch.bfloat16 if self.projection_dtype == "bfloat16" and dtype != torch.float64 else dtype

    def value_sq_norms(self, kv: LayerKV, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """||R_h v_j||^2 of every cached token, [H, L].

        They depend on the token alone, so they are carried in the request's state ("restkv_vnorm", [H, L] in
        physical order, gathered with the kept tokens by `after_select`) and computed only for tokens new since the
        last eviction: the tail of the physical order, which compaction keeps ascending. At a chunk boundary that
        projects one chunk instead of budget + chunk tokens, during decode a few dozen instead of the budget."""
        cached = kv.state.get(VALUE_NORMS)
        start = 0 if cached is None else cached.shape[1]
        if start > kv.length:
            raise RuntimeError(f"restkv: carried value norms cover {start} of {kv.length} tokens")
        if start < kv.length:
            new = scoring.projected_sq_norms(kv.value[:, start:].to(dtype), factor, self.norms_matmul_dtype(dtype))
            cached = new if cached is None else torch.cat([cached.to(dtype), new], dim=1)
            kv.state[VALUE_NORMS] = cached
        return cached

    def prefix_scores(self, kv: LayerKV, n: int) -> torch.Tensor:
        raw, attn = self.raw_scores(kv, n)
        _, kernel_size = self.smoothing(kv)
        drift = None
        if attn is None and scoring.drift_needed(kv.length, n, self.beta, self.official_zero_shift):
            drift = scoring.windowed_drift(kv.query, kv.key, n, query_positions=kv.query_positions(),
                                           key_positions=kv.positions)
        smoothed = scoring.adaptive_window_pool(raw, attn, n, self.beta, kernel_size, self.official_zero_shift,
                                                length=kv.length, drift=drift)
        scores = scoring.gqa_aggregate(smoothed, kv.num_kv_heads, self.gqa_agg)
        if self.carry > 0:
            old = kv.carried("restkv_carry", float("nan"))
            if old is not None:
                old = old[:, : scores.shape[1]].to(scores.dtype)
                scores = torch.where(old.isnan(), scores, (1 - self.carry) * scores + self.carry * old)
            window = scores.new_full((kv.num_kv_heads, self.window), float("nan"))  # not scored this time
            kv.store("restkv_pending", torch.cat([scores, window], dim=1))
        return scores

    def after_select(self, kv: LayerKV, kept: torch.Tensor) -> None:
        """The scores of this call become the carried ones (only the call that selected commits them)."""
        if kv.state and "restkv_pending" in kv.state:
            kv.state["restkv_carry"] = kv.state.pop("restkv_pending")
        super().after_select(kv, kept)
