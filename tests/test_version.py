"""The plugin supports exactly one vLLM version and refuses any other one loudly."""

import subprocess
import sys

import pytest

from vllm_restkv.version import SUPPORTED_VLLM_VERSION, UnsupportedVLLMVersion, check_vllm_version


def test_installed_version_is_supported():
    assert check_vllm_version().split("+")[0] == SUPPORTED_VLLM_VERSION


@pytest.mark.parametrize("version", [SUPPORTED_VLLM_VERSION, SUPPORTED_VLLM_VERSION + "+cpu"])
def test_supported(version):
    assert check_vllm_version(version) == version


@pytest.mark.parametrize("version", ["0.31.0", "0.33.0", "0.32.1", "0.32.0rc1", "1.0.0+cpu"])
def test_refused_with_fix(version):
    with pytest.raises(UnsupportedVLLMVersion) as err:
        check_vllm_version(version)
    message = str(err.value)
    assert version in message and SUPPORTED_VLLM_VERSION in message and "Install" in message


def test_vllm_cli_refuses_to_start_on_another_version(tiny_model):
    """The real `vllm serve` entry point, with vLLM reporting another version: start-up stops with our message."""
    code = (
        "import sys, vllm; vllm.__version__ = '0.33.0';"
        "from vllm.entrypoints.cli.main import main;"
        f"sys.argv = ['vllm', 'serve', {str(tiny_model)!r}, '--kv-eviction', 'none'];"
        "main()"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "supports only vLLM 0.32.0, found vLLM 0.33.0" in result.stderr
