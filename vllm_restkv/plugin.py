"""Entry point of the `vllm.general_plugins` group.

vLLM calls `register()` in every process it starts (API server, engine core, each worker, the model-registry
inspection subprocess, even `vllm --help`), so it must be idempotent and cheap. An exception raised here is not
swallowed by vLLM: that is how an unsupported vLLM version stops start-up loudly.
"""

from __future__ import annotations

import logging
import os

from vllm_restkv.cpu import ONEDNN_CACHE_ENVS

logger = logging.getLogger("vllm.restkv")
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm_restkv.version import check_vllm_version

    vllm_version = check_vllm_version()
    from vllm_restkv.engine import patches

    patches.apply_all()
    _bound_onednn_primitive_cache()
    _registered = True
    from vllm_restkv import __version__

    logger.info(
        "vllm-restkv %s registered in process %s (pid %d, vLLM %s)",
        __version__, _process_name(), os.getpid(), vllm_version,
    )


ONEDNN_CACHE_ENV = ONEDNN_CACHE_ENVS[0]
_ONEDNN_MARKER = "VLLM_RESTKV_SET_ONEDNN_CACHE"


def _bound_onednn_primitive_cache() -> None:
    """On CPU, turn oneDNN's global primitive cache off unless the user set its size.

    vLLM's CPU linear layers build one oneDNN matmul primitive per distinct number of batched tokens and keep the
    32 most recent per layer themselves. oneDNN's global cache (1,024 primitives by default) keeps others on top,
    and with them the worker's memory grew by 4-8 MiB per round of mixed traffic, with or without eviction
    (loadtest/soak.py; one layer fed 1,500 distinct token counts grew by 3 GiB). Without the global cache memory
    stays flat and the matmuls ran as fast (docs/benchmarks.md, "Worker memory"). Set the variable to keep oneDNN's
    default. Runs in every process before any primitive exists; child processes inherit it.
    """
    if os.environ.get(_ONEDNN_MARKER) == "1":  # set by this plugin in the parent process: say so where logs show
        logger.info("vllm-restkv: %s=0 (oneDNN's global primitive cache off, set by vllm-restkv for flat CPU "
                    "worker memory; set the variable yourself to override)", ONEDNN_CACHE_ENV)
        return
    if any(name in os.environ for name in ONEDNN_CACHE_ENVS):
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    os.environ[ONEDNN_CACHE_ENV] = "0"
    os.environ[_ONEDNN_MARKER] = "1"


def _process_name() -> str:
    import multiprocessing

    name = multiprocessing.current_process().name
    return name if name != "MainProcess" else "main"
