"""Entry point of the `vllm.general_plugins` group.

vLLM calls `register()` in every process it starts (API server, engine core, each worker, the model-registry
inspection subprocess, even `vllm --help`), so it must be idempotent and cheap. An exception raised here is not
swallowed by vLLM: that is how an unsupported vLLM version stops start-up loudly.
"""

from __future__ import annotations

import logging
import os

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
    _registered = True
    from vllm_restkv import __version__

    logger.info(
        "vllm-restkv %s registered in process %s (pid %d, vLLM %s)",
        __version__, _process_name(), os.getpid(), vllm_version,
    )


def _process_name() -> str:
    import multiprocessing

    name = multiprocessing.current_process().name
    return name if name != "MainProcess" else "main"
