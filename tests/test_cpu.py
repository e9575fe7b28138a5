"""vllm_restkv.cpu: the native-bf16 check behind the start-up warning and the tests' and benchmarks' dtype."""

from __future__ import annotations

import pytest
import torch

from vllm_restkv import cpu


@pytest.fixture
def x86(monkeypatch):
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")

    def with_flags(*flags):
        monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))

    return with_flags


@pytest.mark.parametrize("flags, native", [
    (("avx2", "fma"), False),  # AMD EPYC before Zen 4, Intel before Cooper Lake
    (("avx2", "avx512f", "avx512bw"), False),  # AVX-512 without its BF16 extension (Skylake-SP)
    (("avx2", "avx512f", "avx512_bf16"), True),  # Cooper Lake, Zen 4
    (("avx2", "avx512f", "amx_bf16", "amx_tile"), True),  # Sapphire Rapids
    ((), True),  # flags unreadable: no warning rather than a wrong one
])
def test_native_bf16_from_flags(x86, flags, native):
    x86(*flags)
    assert cpu.native_bf16() is native
    assert cpu.fast_cpu_dtype() == ("bfloat16" if native else "float32")


def test_warning_only_for_bf16_on_a_cpu_that_emulates_it(x86):
    x86("avx2", "fma")
    message = cpu.emulated_bf16_warning(torch.bfloat16, is_cpu=True)
    assert message is not None and "--dtype float32" in message
    assert cpu.emulated_bf16_warning(torch.float32, is_cpu=True) is None
    assert cpu.emulated_bf16_warning(torch.float16, is_cpu=True) is None
    assert cpu.emulated_bf16_warning(torch.bfloat16, is_cpu=False) is None  # a GPU
    x86("avx2", "avx512f", "amx_bf16")
    assert cpu.emulated_bf16_warning(torch.bfloat16, is_cpu=True) is None


def test_other_architectures_are_not_warned(monkeypatch):
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset())
    assert cpu.native_bf16() and cpu.emulated_bf16_warning(torch.bfloat16, is_cpu=True) is None


def test_this_machine_reads_its_flags():
    flags = cpu.cpu_flags()
    if cpu.platform.machine() == "x86_64":
        assert "sse2" in flags  # every x86-64 CPU has it; an empty set would mean /proc/cpuinfo was not parsed
