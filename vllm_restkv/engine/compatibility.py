"""Start-up checks: vLLM features that eviction does not support are refused with a message saying what to
change; defaults that would be unsafe with eviction are switched off (and logged)."""

from __future__ import annotations

import logging
import os
from typing import Any

from vllm_restkv.config import KVEvictionConfig, KVEvictionConfigError

logger = logging.getLogger("vllm.restkv")


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# CUDA graph modes (vLLM's CompilationConfig.cudagraph_mode) under which the attention runs outside the graphs, as
# Python, so that the query capture runs: NONE, and PIECEWISE (the graphs hold the layers between attentions).
CAPTURE_SAFE_CUDAGRAPH_MODES = ("NONE", "PIECEWISE")


def requested_cudagraph_mode(args: Any) -> str | None:
    """The cudagraph_mode given with --compilation-config / -cc (or EngineArgs(compilation_config=...)), by name;
    None where it was not given (vLLM then picks FULL_AND_PIECEWISE on most GPUs)."""
    compilation = getattr(args, "compilation_config", None)
    mode = compilation.get("cudagraph_mode") if isinstance(compilation, dict) else getattr(compilation,
                                                                                          "cudagraph_mode", None)
    return None if mode is None else str(getattr(mode, "name", mode)).upper()


def prepare_engine_args(args: Any, config: KVEvictionConfig, cpu: bool | None = None) -> None:
    """Refuse what eviction does not support, switch off unsafe defaults. `cpu`: the platform (None: vLLM's)."""
    policy = config.policy

    def refuse(what: str, fix: str) -> None:
        raise KVEvictionConfigError(f"--kv-eviction {policy}: {what} is not supported with KV eviction; {fix}.")

    if getattr(args, "speculative_config", None):
        refuse("speculative decoding (--speculative-config)", "remove --speculative-config or use --kv-eviction none")
    # Prefix caching: requests that may be compacted bypass it (SchedulerEviction.bypasses_prefix_cache), so it
    # only pays off for requests that never evict; off unless asked for, to spare every request the block hashing.
    if getattr(args, "enable_prefix_caching", None) is None:
        logger.info("vllm-restkv: prefix caching is turned off because KV eviction (%s) is on; pass "
                    "--enable-prefix-caching to cache requests that never evict (eviction off or sequence within "
                    "the budget)", policy)
        args.enable_prefix_caching = False
    if getattr(args, "async_scheduling", None) is True:
        refuse("--async-scheduling", "drop --async-scheduling (eviction frees blocks at step boundaries)")
    args.async_scheduling = False
    if not getattr(args, "enforce_eager", False) and not (on_cpu() if cpu is None else cpu):
        # The query capture runs as Python in the attention backend's forward. On the CPU (no graphs) vLLM's
        # torch.compile keeps attention out of the compiled graph (a custom op), so the capture runs: verified
        # against eager (tests/test_engine_eviction.py). On a GPU, vLLM's default CUDA graphs (FULL_AND_PIECEWISE)
        # would replay the attention of decode steps without it; PIECEWISE graphs keep attention outside, as the
        # CPU's compiled graph does (not yet run on a GPU: opt-in; the capture check stops a server where it fails).
        mode = requested_cudagraph_mode(args)
        if mode is None:
            logger.info("vllm-restkv: --enforce-eager is turned on because KV eviction (%s) is on (CUDA graphs would "
                        "replay attention without the query capture; -cc '{\"cudagraph_mode\": \"PIECEWISE\"}' "
                        "keeps CUDA graphs around the attention instead)", policy)
            args.enforce_eager = True
        elif mode not in CAPTURE_SAFE_CUDAGRAPH_MODES:
            refuse(f"--compilation-config cudagraph_mode {mode} (CUDA graphs that contain the attention, which "
                   f"would run without the query capture)",
                   'use -cc \'{"cudagraph_mode": "PIECEWISE"}\' or --enforce-eager')
        else:
            logger.info("vllm-restkv: CUDA graph mode %s kept with KV eviction (%s): attention runs outside the "
                        "graphs, so the window queries are captured (checked in every step)", mode, policy)
    if int(getattr(args, "pipeline_parallel_size", 1) or 1) > 1:
        refuse("pipeline parallelism (--pipeline-parallel-size > 1)", "use tensor parallelism instead")
    kv_dtype = str(getattr(args, "kv_cache_dtype", "auto") or "auto")
    if kv_dtype.startswith("fp8"):
        refuse(f"--kv-cache-dtype {kv_dtype}", "use --kv-cache-dtype auto")
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip() in ("1", "true", "True"):
        refuse("Model Runner V2 (VLLM_USE_V2_MODEL_RUNNER=1)", "unset VLLM_USE_V2_MODEL_RUNNER")
    # GPU installs default to Model Runner V2; the eviction hooks live in the V1 runner. Child processes inherit it.
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
