"""Scheduler side of eviction (engine-core process): free the tail blocks the worker compacted away, and make
vLLM's block accounting use physical lengths.

For every request the scheduler keeps E = logical - physical tokens (`evicted`). `num_computed_tokens` stays
logical (positions, stop conditions, max_model_len); only the KV block arithmetic subtracts E, in the two methods
of the full-attention manager that turn token counts into block counts. Without that, vLLM would re-allocate the
freed tail at once.

Ordering: the worker compacts and truncates its own block-table row in step t, before this process frees the
tail in `update_from_output` of step t; the freed blocks can be handed to another request only in `schedule()`
of step t+1. So a freed block is never read by the request that gave it up.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from vllm_restkv.config import (NO_EVICTION, REQUEST_KEYS, KVEvictionConfig, KVEvictionConfigError,
                                evicts_during_prefill, request_config, validate_request_args)
from vllm_restkv.engine.worker_state import cdiv, decode_slack, extra_args, prefill_stride, request_overrides

logger = logging.getLogger("vllm.restkv")


@dataclasses.dataclass
class EvictionStats:
    """Cumulative counters for the metrics exporter (engine-core process)."""

    evicted_tokens: int = 0
    freed_blocks: int = 0
    events: dict[str, int] = dataclasses.field(default_factory=dict)
    scoring_seconds: float = 0.0
    compaction_seconds: float = 0.0
    requests_evicted: int = 0
    kept_ratios: list[float] = dataclasses.field(default_factory=list)
    pending: list[tuple] = dataclasses.field(default_factory=list)  # eviction records since the last drain


class SchedulerEviction:
    def __init__(self, scheduler: Any, config: KVEvictionConfig):
        self.scheduler = scheduler
        self.config = config
        self.evicted: dict[str, int] = {}
        self.stats = EvictionStats()
        coordinator = scheduler.kv_cache_manager.coordinator
        managers = coordinator.single_type_managers
        from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

        if len(managers) != 1 or type(managers[0]) is not FullAttentionManager:
            kinds = ", ".join(type(m).__name__ for m in managers)
            raise RuntimeError(
                f"vllm-restkv: KV eviction supports models whose layers all use full attention (one KV cache group); "
                f"this model has: {kinds}. Start with --kv-eviction none."
            )
        self.manager = managers[0]
        self.manager.restkv = self  # block counts and prefix-cache writes (patches._evicted_tokens, _wrap_cache_blocks)
        self.block_pool = scheduler.kv_cache_manager.block_pool
        self.prefill_stride = prefill_stride(scheduler.scheduler_config)
        logger.info("vllm-restkv: KV eviction on in the scheduler: %s", config.to_dict())

    def apply_report(self, report: dict) -> None:
        for req_id, (evicted, keep_blocks) in report["requests"].items():
            request = self.scheduler.requests.get(req_id)
            blocks = self.manager.req_to_blocks.get(req_id)
            if request is None or blocks is None:
                continue  # finished or aborted meanwhile: all its blocks are freed anyway
            if req_id not in self.evicted:
                self.stats.requests_evicted += 1
                if self.stats.requests_evicted == 1:
                    logger.info("vllm-restkv: first eviction: request %s keeps %d of %d KV blocks (E=%d tokens)",
                                req_id, keep_blocks, len(blocks), evicted)
            self.evicted[req_id] = evicted
            tail = blocks[keep_blocks:]
            if tail:
                del blocks[keep_blocks:]
                self.block_pool.free_blocks(reversed(tail))
            cached = self.manager.num_cached_block
            if req_id in cached:
                cached[req_id] = min(cached[req_id], keep_blocks)
        s = report["stats"]
        self.stats.evicted_tokens += s["evicted_tokens"]
        self.stats.freed_blocks += s["freed_blocks"]
        for phase, count in s["events"].items():
            self.stats.events[phase] = self.stats.events.get(phase, 0) + count
        self.stats.scoring_seconds += s["scoring_seconds"]
        self.stats.compaction_seconds += s["compaction_seconds"]
        self.stats.kept_ratios.extend(s["kept_ratio"])
        if self.scheduler.log_stats:  # else make_stats never drains them (--disable-log-stats)
            self.stats.pending.extend(s.get("records", ()))
        del self.stats.kept_ratios[:-10_000]  # bounded: only tests and the engine driver read these

    def drain_metrics(self) -> dict:
        """Eviction records since the last call plus current token gauges, for SchedulerStats (see metrics.py)."""
        from vllm_restkv.metrics import drain_payload

        records, self.stats.pending = self.stats.pending, []
        live = [(rid, r) for rid, r in self.scheduler.requests.items() if rid in self.manager.req_to_blocks]
        logical = sum(r.num_computed_tokens for _, r in live)
        physical = sum(max(r.num_computed_tokens - self.evicted.get(rid, 0), 0) for rid, r in live)
        evicting = sum(1 for rid, _ in live if self.evicted.get(rid, 0) > 0)
        return drain_payload(records, physical, logical, evicting)

    def align_chunk(self, request: Any, num_computed_tokens: int, num_new_tokens: int) -> int:
        """Cut an evicting request's prefill chunk at the next multiple of the stride (see prefill_stride)."""
        extra = extra_args(request)
        if not evicts_during_prefill(extra, self.config) or request_overrides(extra, self.config)[0] == NO_EVICTION:
            return num_new_tokens
        # a decode step (one token) never crosses a multiple; the last chunk of a prompt must not either
        boundary = (num_computed_tokens // self.prefill_stride + 1) * self.prefill_stride
        return min(num_new_tokens, boundary - num_computed_tokens)

    def refuse_if_it_cannot_fit(self, request: Any) -> None:
        """Raise KVEvictionConfigError for a request whose own settings (extra_args / vllm_xargs) this engine's KV
        cache cannot hold: it would wait at the head of the queue forever and hold up every request behind it. The
        API server refuses these with a 400 already; this catches the rest (offline LLM, SamplingParams built
        before the engine reported its cache). Raised in EngineCore.preprocess_add_request, vLLM answers the
        request with an error (or `generate` raises, in-process) and nothing else is touched. A pooling request
        (settings in PoolingParams.extra_kwargs, checked again here) is not refused but runs with the server's
        settings, logged as an error: vLLM cannot finish a pooling request with an error."""
        from vllm_restkv.engine.capacity import check_request_fits, usable_tokens

        extra = extra_args(request) or {}
        if not any(key in extra for key in REQUEST_KEYS):
            return  # the server's own settings: checked at start-up
        capacity = usable_tokens(self.block_pool.num_gpu_blocks, self.scheduler.block_size)
        try:
            if request.sampling_params is None:  # values only the client checked (SamplingParams check theirs)
                validate_request_args(extra, self.config)
            policy, budget = request_overrides(extra, self.config)
            check_request_fits(self.scheduler.vllm_config, request_config(extra, self.config), policy, budget,
                               capacity=capacity)
        except KVEvictionConfigError as e:
            if request.sampling_params is None:
                # vLLM 0.32 cannot finish a pooling request with an error (its output processor asserts that the
                # request has a detokenizer), which would take the client down with it. The client checks these
                # already (patches._wrap_validate_params), so this is a backstop: serve it with the server's
                # settings, which the cache holds, and say so.
                logger.error("vllm-restkv: request %s: its eviction settings %s are ignored (%s); it runs with the "
                             "server's", request.request_id, {k: extra[k] for k in REQUEST_KEYS if k in extra}, e)
                for key in REQUEST_KEYS:
                    extra.pop(key, None)
                return
            raise KVEvictionConfigError(f"vllm-restkv: request {request.request_id} refused: {e}") from None

    def admission_tokens(self, request: Any) -> int:
        """The most KV tokens this request will hold at once: its whole sequence without eviction (or with a budget
        it never reaches, or no eviction during prefill), else budget + one prefill chunk (generating requests: or
        the decode growth between decode evictions, if larger). Pooling requests too (they were sized by their
        whole prompt before 2026-12-02, so a moderation server admitted no more of them than vanilla vLLM)."""
        full = request.num_tokens
        extra = extra_args(request)
        policy, budget = request_overrides(extra, self.config)
        if policy == NO_EVICTION or budget >= full or not evicts_during_prefill(extra, self.config):
            return full
        if request.sampling_params is None:  # pooling: ends with its prompt
            return min(full, budget + self.prefill_stride)
        growth = max(self.prefill_stride, decode_slack(budget, self.config.decode_interval, self.scheduler.block_size))
        return min(full, budget + growth)

    def bypasses_prefix_cache(self, request: Any) -> bool:
        """Whether this request stays out of vLLM's prefix cache (reads and writes), with --enable-prefix-caching.

        Compaction rewrites a request's first blocks in place, so a request that may be compacted must neither
        share a cached block (it would corrupt it for every other reader) nor cache its own (their hashes would
        name content they no longer hold). A request that can never be compacted uses the cache as usual: eviction
        off for it, or its whole sequence (prompt + max_tokens) within its budget (the worker compacts only when a
        request's physical length exceeds its budget). Decided once per request.
        """
        bypass = getattr(request, "restkv_bypasses_prefix_cache", None)
        if bypass is None:
            policy, budget = request_overrides(extra_args(request), self.config)
            longest = request.num_prompt_tokens + max(int(request.max_tokens or 0), 1)
            bypass = policy != NO_EVICTION and longest > budget
            request.restkv_bypasses_prefix_cache = bypass
        return bypass

    def promised_blocks(self) -> int:
        """Blocks that running requests in prefill still need to reach their admission size (a request admitted
        while another is in chunked prefill must not take the blocks the first one was admitted with)."""
        held = self.manager.req_to_blocks
        return sum(max(0, cdiv(self.admission_tokens(r), self.scheduler.block_size) - len(held.get(r.request_id, ())))
                   for r in self.scheduler.running
                   # in prefill (a resumed request replays its output tokens too); decode growth is not
                   # reserved, as in vLLM
                   if r.num_computed_tokens < max(r.num_prompt_tokens, r.num_tokens - 1))

    def can_admit(self, tokens: int, reserved_blocks: int = 0) -> bool:
        free = self.block_pool.get_num_free_blocks() - reserved_blocks - self.promised_blocks()
        return free >= cdiv(tokens, self.scheduler.block_size)

    def forget(self, req_id: str) -> None:
        self.evicted.pop(req_id, None)
