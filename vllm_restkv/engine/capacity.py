"""Serving inputs longer than the KV cache holds.

vLLM refuses to start when one request of `--max-model-len` tokens does not fit in the KV cache (vLLM 0.32:
`kv_cache_utils._check_enough_kv_cache_memory`, "To serve at least one request with the model's max seq len ...").
With eviction on, a request never holds its whole sequence: at most budget + one prefill chunk, or budget + the
decode growth between two decode evictions. So the check this plugin applies is that *this* bound fits (computed
with vLLM's own memory estimate); a server whose KV cache holds 2,048 tokens can then read 32k-token inputs.

The bound holds only for requests that evict. On such a server a request may not turn eviction off or raise its
budget beyond what the cache holds (`check_request_fits`, answered with 400 by the API server), else it would wait
for blocks that never free. The engine core checks again (`SchedulerEviction.refuse_if_it_cannot_fit`) for requests
that never met an API server's check: offline `LLM` users build SamplingParams before the engine knows its cache.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_restkv.config import NO_EVICTION, KVEvictionConfig, KVEvictionConfigError
from vllm_restkv.engine.worker_state import decode_slack, prefill_stride

logger = logging.getLogger("vllm.restkv")


def held_tokens_bound(config: KVEvictionConfig, policy: str, budget: int, chunk: int, block_size: int,
                      pooling: bool) -> int | None:
    """The most KV tokens one request holds at once, whatever its length; None when nothing bounds it (eviction
    off for it, no eviction during prefill, or a generating request that is never evicted after prefill)."""
    if policy == NO_EVICTION or not config.evict_during_prefill:
        return None
    if pooling:  # a pooling request ends with its prompt
        return budget + chunk
    if not config.evict_after_prefill or config.decode_interval <= 0:
        return None
    return budget + max(chunk, decode_slack(budget, config.decode_interval, block_size))


def server_bound(vllm_config: Any, config: KVEvictionConfig, policy: str | None = None,
                 budget: int | None = None) -> int | None:
    return held_tokens_bound(
        config, config.policy if policy is None else policy, config.budget if budget is None else budget,
        prefill_stride(vllm_config.scheduler_config), int(vllm_config.cache_config.block_size),
        getattr(vllm_config.model_config, "runner_type", "generate") == "pooling")


def check_enough_kv_cache_memory(original, vllm_config: Any, available_memory: int, get_needed_memory,
                                 max_model_len: int, estimate_max_model_len) -> None:
    """vLLM's start-up check, with eviction on: the cache must hold what one evicting request holds at most."""
    config = KVEvictionConfig.from_vllm_config(vllm_config)
    bound = server_bound(vllm_config, config) if config.enabled else None
    if bound is not None and bound >= max_model_len and available_memory > 0:
        try:
            return original(available_memory, get_needed_memory, max_model_len, estimate_max_model_len)
        except ValueError as e:  # eviction could have helped: say how
            raise ValueError(
                f"{e} vllm-restkv: with --kv-eviction {config.policy} a request holds at most {bound} tokens (budget "
                f"{config.budget} + one prefill chunk of --max-num-batched-tokens "
                f"{vllm_config.scheduler_config.max_num_batched_tokens}, or the decode growth), which is not less "
                f"than --max-model-len {max_model_len}; lower --max-num-batched-tokens and the KV cache need only "
                f"hold that bound.") from None
    if (bound is None or bound >= max_model_len or available_memory <= 0
            or vllm_config.model_config.original_max_model_len == -1 or get_needed_memory() <= available_memory):
        return original(available_memory, get_needed_memory, max_model_len, estimate_max_model_len)
    holds = estimate_max_model_len(available_memory)  # vLLM's own estimate: tokens of one request that fit
    if holds < bound:
        raise KVEvictionConfigError(
            f"vllm-restkv: the KV cache holds {holds} tokens, but with --kv-eviction {config.policy} and budget "
            f"{config.budget} a request holds up to {bound} (budget + one prefill chunk of "
            f"--max-num-batched-tokens {vllm_config.scheduler_config.max_num_batched_tokens}, or the decode growth "
            f"between evictions). Give the KV cache more memory, or lower --kv-eviction-budget or "
            f"--max-num-batched-tokens.")
    logger.info("vllm-restkv: the KV cache holds %d tokens, fewer than --max-model-len %d; served anyway because "
                "with --kv-eviction %s (budget %d) a request holds at most %d tokens. Requests may not turn "
                "eviction off or raise their budget above what the cache holds.", holds, max_model_len,
                config.policy, config.budget, bound)


def kv_capacity_tokens(vllm_config: Any) -> int | None:
    """Tokens one engine's KV cache holds (usable blocks x block size), once the engine has reported its blocks."""
    blocks = getattr(vllm_config.cache_config, "num_gpu_blocks", None)
    if not blocks:
        return None
    # the client sums the blocks of all data-parallel engines; one block per engine is vLLM's null block
    engines = max(int(getattr(vllm_config.parallel_config, "data_parallel_size", 1) or 1), 1)
    return usable_tokens(blocks // engines, int(vllm_config.cache_config.block_size))


def usable_tokens(num_blocks: int, block_size: int) -> int:
    """Tokens a KV cache of num_blocks blocks holds for requests: one block is vLLM's null block."""
    return (num_blocks - 1) * block_size


def check_request_fits(vllm_config: Any, server: KVEvictionConfig, policy: str, budget: int,
                       capacity: int | None = None) -> None:
    """Refuse per-request settings a server with a KV cache smaller than --max-model-len cannot hold. `capacity`:
    the tokens one engine's cache holds (default: from the config, once the engine has reported its blocks)."""
    capacity = kv_capacity_tokens(vllm_config) if capacity is None else capacity
    max_model_len = int(vllm_config.model_config.max_model_len)
    if capacity is None or capacity >= max_model_len:
        return
    bound = server_bound(vllm_config, server, policy, budget)
    if bound is None and policy != NO_EVICTION and not server.evict_during_prefill:
        # (a server that does not evict during prefill starts only with a cache of --max-model-len: the request's)
        raise KVEvictionConfigError(
            f"vllm_xargs.kv_eviction_during_prefill false: this server's KV cache holds {capacity} tokens, fewer "
            f"than --max-model-len {max_model_len}, and a request that is not evicted during prefill holds its "
            "whole prompt")
    if bound is None:
        raise KVEvictionConfigError(
            f"vllm_xargs: this server's KV cache holds {capacity} tokens, fewer than --max-model-len "
            f"{max_model_len}, so a request cannot turn eviction off (kv_eviction {policy!r})")
    if bound > capacity:
        raise KVEvictionConfigError(
            f"vllm_xargs.kv_eviction_budget {budget}: a request would hold up to {bound} tokens, but this server's "
            f"KV cache holds {capacity} (the server's budget {server.budget} fits)")
