"""Eviction settings: parsing, defaults and the errors users see for bad values."""

import argparse
import dataclasses
import logging
import os
import re

import pytest

from vllm_restkv import cli_args
from vllm_restkv.config import KVEvictionConfig, KVEvictionConfigError, available_policies, evicts_during_prefill


def test_defaults_mean_no_eviction():
    config = KVEvictionConfig.from_value(None)
    assert config.policy == "none" and not config.enabled
    assert config.window == 32 and config.alpha == 0.3 and config.beta == 2000.0 and config.kernel_size == 5
    assert config.chunk_alpha == 1.0 and config.chunk_kernel_size == 1  # inside the prompt: newest query, no smoothing


@pytest.mark.parametrize("value", ["restkv", " restkv ", {"policy": "restkv"}, '{"policy": "restkv"}', "RestKV"])
def test_policy_forms(value):
    assert KVEvictionConfig.from_value(value).policy == "restkv"


def test_all_documented_policies_are_available():
    assert {"none", "restkv", "snapkv", "h2o", "tova", "streamingllm", "random"} <= set(available_policies())


def test_full_settings_roundtrip():
    config = KVEvictionConfig.from_value(
        {"policy": "snapkv", "budget": 128, "window": 16, "decode_interval": 0, "kernel_size": 21, "alpha": 0.5}
    )
    assert KVEvictionConfig.from_value(config.to_dict()) == config
    assert config.budget == 128 and config.decode_interval == 0 and config.kernel_size == 21


@pytest.mark.parametrize(
    "value, fragment",
    [
        ({"policy": "bogus"}, "unknown policy 'bogus'; allowed policies:"),
        ({"policy": "restkv", "budget": 16}, "budget 16 is smaller than the observation window 32"),
        ({"policy": "restkv", "budget": 0}, "smaller than the observation window"),
        ({"policy": "restkv", "budget": -5}, "smaller than the observation window"),
        ({"policy": "restkv", "budget": 100.5}, "budget must be an integer"),
        ({"policy": "restkv", "budget": "many"}, "budget must be an integer"),
        ({"policy": "restkv", "budget": True}, "budget must be an integer"),
        ({"policy": "restkv", "window": 0}, "window must be >= 1"),
        ({"policy": "restkv", "decode_interval": -1}, "decode_interval must be >= 0"),
        ({"policy": "restkv", "alpha": 0}, "alpha must be in (0, 1]"),
        ({"policy": "restkv", "kernel_size": 4}, "kernel_size must be an odd integer"),
        ({"policy": "restkv", "chunk_alpha": 1.5}, "chunk_alpha must be in (0, 1], got 1.5"),
        ({"policy": "restkv", "chunk_kernel_size": 0}, "chunk_kernel_size must be an odd integer >= 1, got 0"),
        ({"policy": "restkv", "chunk_kernel_size": 2.5}, "chunk_kernel_size must be an integer"),
        ({"policy": "restkv", "gqa_agg": "median"}, "unknown gqa_agg 'median'"),
        ({"policy": "restkv", "projection_dtype": "fp16"}, "unknown projection_dtype 'fp16'; allowed: auto, float32"),
        ({"policy": "restkv", "kernels": "cuda"}, "unknown kernels 'cuda'; allowed: auto, torch, triton"),
        ({"policy": "restkv", "budgt": 64}, "unknown setting(s) ['budgt']"),
        ({"policy": "restkv", "shadow_rate": 1.5}, "shadow_rate must be in [0, 1]"),
        ({"policy": "restkv", "carry": 1.0}, "carry must be in [0, 1)"),
        ({"policy": "restkv", "shadow_rate": "nan"}, "shadow_rate must be in [0, 1]"),
        ({"policy": "restkv", "shadow_rate": 0.1, "allow_request_override": False}, "shadow_rate needs allow_request"),
        ("{not json", "invalid JSON"),
        (42, "must be a policy name or a mapping"),
    ],
)
def test_bad_values_name_the_value_and_the_allowed_ones(value, fragment):
    with pytest.raises(KVEvictionConfigError) as err:
        KVEvictionConfig.from_value(value)
    assert fragment in str(err.value)
    if "unknown policy" in fragment:
        for name in available_policies():
            assert name in str(err.value)


def _parser():
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--additional-config", default=None)
    cli_args.add_kv_eviction_args(parser)
    cli_args.add_kv_eviction_args(parser)  # idempotent
    return parser


class _EngineArgs:
    def __init__(self, additional_config=None):
        self.additional_config = additional_config or {}


def test_flags_reach_additional_config():
    args = _parser().parse_args(
        ["--kv-eviction", "restkv", "--kv-eviction-budget", "256", "--kv-eviction-decode-interval", "0",
         "--kv-eviction-shadow-rate", "0.25", "--kv-eviction-config", '{"kernel_size": 21}']
    )
    engine_args = _EngineArgs({"other": 1})
    cli_args.merge_cli_args_into(engine_args, args)
    kv = engine_args.additional_config["kv_eviction"]
    assert engine_args.additional_config["other"] == 1
    assert kv["policy"] == "restkv" and kv["budget"] == 256 and kv["decode_interval"] == 0 and kv["kernel_size"] == 21
    assert kv["shadow_rate"] == 0.25


def test_flags_override_additional_config_and_keep_its_other_settings():
    args = _parser().parse_args(["--kv-eviction-budget", "300"])
    engine_args = _EngineArgs({"kv_eviction": {"policy": "snapkv", "budget": 100, "window": 8}})
    cli_args.merge_cli_args_into(engine_args, args)
    kv = engine_args.additional_config["kv_eviction"]
    assert (kv["policy"], kv["budget"], kv["window"]) == ("snapkv", 300, 8)


def test_no_flags_leave_additional_config_alone():
    engine_args = _EngineArgs({"x": 1})
    cli_args.merge_cli_args_into(engine_args, _parser().parse_args([]))
    assert engine_args.additional_config == {"x": 1}


@pytest.mark.parametrize("argv", [["--kv-eviction", "bogus"], ["--kv-eviction-budget", "-3"],
                                  ["--kv-eviction-budget", "1.5"], ["--kv-eviction-config", "[1]"],
                                  ["--kv-eviction-shadow-rate", "2"], ["--kv-eviction-shadow-rate", "some"]])
def test_bad_flags_are_argparse_errors(argv):
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        _parser().parse_args(argv)


def test_cross_field_error_exits_with_message():
    args = _parser().parse_args(["--kv-eviction", "restkv", "--kv-eviction-budget", "8"])
    with pytest.raises(SystemExit) as err:
        cli_args.merge_cli_args_into(_EngineArgs(), args)
    assert "budget 8 is smaller than the observation window 32" in str(err.value)


def test_triton_kernels_without_cuda_or_the_interpreter_are_refused_at_start_up(monkeypatch):
    """kernels=triton on this CPU machine (no CUDA) cannot run; the flag stops start-up and says what to use, while
    auto and torch start (auto: torch here) and the interpreter (the CPU tests' way of running Triton) is accepted."""
    import torch

    assert not torch.cuda.is_available()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = _parser().parse_args(["--kv-eviction", "restkv", "--kv-eviction-config", '{"kernels": "triton"}'])
    with pytest.raises(SystemExit) as err:
        cli_args.merge_cli_args_into(_EngineArgs(), args)
    assert "kernels=triton needs a CUDA device" in str(err.value) and "kernels=auto" in str(err.value)
    for setting in ("auto", "torch"):
        assert KVEvictionConfig.from_value({"policy": "restkv", "kernels": setting}).kernels == setting
    assert KVEvictionConfig.from_value({"kernels": "triton"}).kernels == "triton"  # eviction off: nothing runs
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert KVEvictionConfig.from_value({"policy": "restkv", "kernels": "triton"}).kernels == "triton"


def test_engine_args_made_safe_for_eviction_and_unsupported_features_refused():
    from types import SimpleNamespace

    from vllm_restkv.config import KVEvictionConfig, KVEvictionConfigError
    from vllm_restkv.engine.compatibility import prepare_engine_args

    config = KVEvictionConfig.from_value({"policy": "restkv", "budget": 256})
    args = SimpleNamespace(enforce_eager=False, enable_prefix_caching=None, async_scheduling=None,
                           pipeline_parallel_size=1, kv_cache_dtype="auto", speculative_config=None)
    prepare_engine_args(args, config, cpu=False)
    assert args.enforce_eager is True and args.enable_prefix_caching is False and args.async_scheduling is False
    # on the CPU torch.compile stays as asked (no CUDA graphs; attention runs outside the compiled graph)
    cpu_args = SimpleNamespace(**{**vars(args), "enforce_eager": False})
    prepare_engine_args(cpu_args, config)  # this machine: vLLM's platform is the CPU
    assert cpu_args.enforce_eager is False
    # on a GPU, CUDA graph modes that keep the attention outside the graphs are kept (the capture runs there);
    # a mode whose graphs contain the attention is refused; vLLM's CompilationConfig or a plain dict alike
    from vllm.config import CompilationConfig

    for compilation in (CompilationConfig(cudagraph_mode="PIECEWISE"), {"cudagraph_mode": "NONE"}):
        piecewise = SimpleNamespace(**{**vars(args), "enforce_eager": False, "compilation_config": compilation})
        prepare_engine_args(piecewise, config, cpu=False)
        assert piecewise.enforce_eager is False
    for mode in ("FULL_AND_PIECEWISE", "FULL", "FULL_DECODE_ONLY"):
        full = SimpleNamespace(**{**vars(args), "enforce_eager": False,
                                  "compilation_config": CompilationConfig(cudagraph_mode=mode)})
        with pytest.raises(KVEvictionConfigError, match=f"cudagraph_mode {mode} .*PIECEWISE.* or --enforce-eager"):
            prepare_engine_args(full, config, cpu=False)
    unset = SimpleNamespace(**{**vars(args), "enforce_eager": False, "compilation_config": CompilationConfig()})
    prepare_engine_args(unset, config, cpu=False)
    assert unset.enforce_eager is True  # vLLM would pick FULL_AND_PIECEWISE
    asked = SimpleNamespace(**{**vars(args), "enable_prefix_caching": True})
    prepare_engine_args(asked, config)
    assert asked.enable_prefix_caching is True  # honoured: requests that may be compacted bypass the cache
    for field, value, fragment in (("async_scheduling", True, "--async-scheduling"),
                                   ("pipeline_parallel_size", 2, "tensor parallelism"),
                                   ("kv_cache_dtype", "fp8_e4m3", "--kv-cache-dtype auto")):
        bad = SimpleNamespace(**{**vars(args), "enable_prefix_caching": None, field: value})
        with pytest.raises(KVEvictionConfigError, match=re.escape(fragment)):
            prepare_engine_args(bad, config)


@pytest.mark.parametrize("xargs, fragment", [
    ({"kv_eviction_budget": -1}, "smaller than the observation window"),
    ({"kv_eviction_budget": 10**30}, "larger than"),
    ({"kv_eviction_budget": "abc"}, "must be an integer"),
    ({"kv_eviction_budget": True}, "must be an integer"),
    ({"kv_eviction": "bogus"}, "unknown policy"),
    ({"kv_eviction": None}, "unknown policy"),
    ({"kv_eviction_bugdet": 64}, "unknown key 'kv_eviction_bugdet'"),
    ({"kv_eviction_during_prefill": "later"}, "kv_eviction_during_prefill must be true or false, got 'later'"),
    ({"kv_eviction_during_prefill": 2}, "must be true or false"),
    ({"kv_eviction_during_prefill": 0.0}, "must be true or false"),
])
def test_bad_request_settings_are_refused(xargs, fragment):
    from vllm_restkv.config import validate_request_args

    server = KVEvictionConfig.from_value({"policy": "restkv", "budget": 256})
    with pytest.raises(KVEvictionConfigError, match=re.escape(fragment)):
        validate_request_args(xargs, server)


def test_a_server_without_request_overrides_refuses_every_per_request_key():
    from vllm_restkv.config import validate_request_args

    server = KVEvictionConfig.from_value({"policy": "restkv", "budget": 256, "allow_request_override": False})
    validate_request_args({"kv_eviction": "restkv"}, server)  # its own policy: no override
    for xargs in ({"kv_eviction": "tova"}, {"kv_eviction_budget": 128}, {"kv_eviction_during_prefill": False}):
        with pytest.raises(KVEvictionConfigError, match="does not allow per-request eviction settings"):
            validate_request_args(xargs, server)


def test_good_and_foreign_request_settings_pass():
    from vllm_restkv.config import validate_request_args

    server = KVEvictionConfig.from_value({"policy": "restkv", "budget": 256})
    for xargs in ({"kv_eviction_budget": 64}, {"kv_eviction": "none"}, {"kv_eviction": " SnapKV "},
                  {"kv_eviction_during_prefill": False}, {"other_plugin_key": 1}, None):
        validate_request_args(xargs, server)
    # vLLM's schema for vllm_xargs has no booleans: JSON false reaches the plugin as 0
    for value, during in ((False, False), (0, False), ("false", False), (" False ", False), (True, True), (1, True),
                          ("true", True)):
        validate_request_args({"kv_eviction_during_prefill": value}, server)
        assert evicts_during_prefill({"kv_eviction_during_prefill": value}, server) is during
    assert evicts_during_prefill(None, server) is True
    no_overrides = dataclasses.replace(server, allow_request_override=False)
    assert evicts_during_prefill({"kv_eviction_during_prefill": False}, no_overrides) is True


def test_onednn_primitive_cache_is_turned_off_on_cpu_unless_the_user_set_it(monkeypatch, caplog):
    from vllm_restkv import plugin

    for name in (plugin.ONEDNN_CACHE_ENV, "DNNL_PRIMITIVE_CACHE_CAPACITY", plugin._ONEDNN_MARKER):
        # set, then deleted: monkeypatch then restores the variable as it was, absent included (a bare delenv of an
        # absent variable records nothing, and what the plugin set here leaked into every later test's servers)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    plugin._bound_onednn_primitive_cache()
    assert os.environ[plugin.ONEDNN_CACHE_ENV] == "0" and os.environ[plugin._ONEDNN_MARKER] == "1"
    logger = logging.getLogger("vllm.restkv")  # vLLM's loggers may not propagate to caplog's root handler
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="vllm.restkv"):
            plugin._bound_onednn_primitive_cache()  # as in a child process: it says so
    finally:
        logger.removeHandler(caplog.handler)
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY=0" in caplog.text
    for name in (plugin.ONEDNN_CACHE_ENV, plugin._ONEDNN_MARKER):
        monkeypatch.delenv(name)
    monkeypatch.setenv(plugin.ONEDNN_CACHE_ENV, "1024")  # the user's choice stands
    plugin._bound_onednn_primitive_cache()
    assert os.environ[plugin.ONEDNN_CACHE_ENV] == "1024" and plugin._ONEDNN_MARKER not in os.environ


# A value other than the default for every policy setting (config.POLICY_SETTINGS)
NON_DEFAULT_SETTINGS = {"window": 16, "alpha": 0.5, "beta": 100.0, "kernel_size": 3, "chunk_alpha": 0.3,
                        "chunk_kernel_size": 5, "gqa_agg": "max", "carry": 0.5, "projection_dtype": "float32"}


def test_every_policy_setting_reaches_the_policies():
    """What the engine builds its policies with (WorkerEviction._policy): every hyperparameter of the config, set to
    a non-default value, ends up on the policy; and every config field is either handed over or steers the engine, so
    a new setting cannot be silently dropped on the way."""
    from vllm_restkv.config import POLICY_SETTINGS
    from vllm_restkv.policies import get_policy

    engine_fields = {"policy", "budget", "evict_after_prefill", "evict_during_prefill", "decode_interval",
                     "allow_request_override", "shadow_rate",  # (shadow_rate steers /v1/moderations)
                     "kernels"}  # (which code scores and compacts: the worker hands it to every policy it builds)
    assert set(KVEvictionConfig.field_names()) == engine_fields | set(POLICY_SETTINGS)
    changed = NON_DEFAULT_SETTINGS
    assert set(changed) == set(POLICY_SETTINGS)
    config = KVEvictionConfig.from_value({"policy": "restkv", "budget": 64, **changed})
    policy = get_policy("restkv", **config.policy_settings())
    assert {name: getattr(policy, name) for name in changed} == changed
    for name in ("snapkv", "h2o", "tova", "streamingllm", "random", "pyramidkv"):  # the baselines take the same call
        assert get_policy(name, **config.policy_settings()).window == 16


def test_policies_declare_the_settings_they_use_and_ignore_the_others():
    """`settings` of each policy: the ones it stores, and changing any other one leaves its selection unchanged
    (so the start-up warning about an ignored setting and report.py's run names tell the truth)."""
    import torch

    from vllm_restkv.config import POLICY_SETTINGS
    from vllm_restkv.policies import POLICIES, LayerKV, get_policy

    changed = NON_DEFAULT_SETTINGS
    defaults = KVEvictionConfig().policy_settings()
    torch.manual_seed(0)
    h, h_kv, d, length = 4, 2, 8, 96
    weight = torch.randn(32, h * d)
    kv = LayerKV(query=torch.randn(h, 16, d), key=torch.randn(h_kv, length, d), value=torch.randn(h_kv, length, d),
                 positions=torch.arange(length).expand(h_kv, length), o_proj_weight=weight)
    mid_prompt = dataclasses.replace(kv, mid_prompt=True)  # an eviction at a chunk boundary inside the prompt
    for name, cls in POLICIES.items():
        assert set(cls.settings) <= set(POLICY_SETTINGS), name
        policy = get_policy(name, **changed)
        assert all(getattr(policy, s) == changed[s] for s in cls.settings), name
        base = {s: changed[s] for s in cls.settings}
        for view in (kv, mid_prompt):
            reference = get_policy(name, **base).select(view, 40)
            for setting in set(POLICY_SETTINGS) - set(cls.settings):
                other = get_policy(name, **{**defaults, **base, setting: changed[setting]}).select(view, 40)
                assert torch.equal(other, reference), (name, setting, view.mid_prompt)
    # the settings ReST-KV declares do change its choice (beta and the projection's dtype are too small to matter
    # here), each where it applies: chunk_* inside the prompt, alpha / kernel_size elsewhere
    for view, settings in ((kv, ("alpha", "kernel_size", "gqa_agg")), (mid_prompt, ("chunk_alpha", "chunk_kernel_size"))):
        restkv = get_policy("restkv", window=16).select(view, 40)
        for setting in settings:
            chosen = get_policy("restkv", window=16, **{setting: changed[setting]}).select(view, 40)
            assert not torch.equal(chosen, restkv), setting


def test_a_setting_the_policy_ignores_is_warned_about_once():
    import logging

    from vllm_restkv import config as config_module

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    logger, collect = logging.getLogger("vllm.restkv"), Collect()
    logger.addHandler(collect)  # its own handler: vLLM's logging setup may stop propagation to the root logger
    try:
        config_module._warned.clear()
        value = {"policy": "snapkv", "alpha": 1.0, "kernel_size": 1, "gqa_agg": "max"}
        config = KVEvictionConfig.from_value(value)
        assert config.ignored_settings() == ["alpha", "kernel_size"]
        KVEvictionConfig.from_value(value)  # every process parses the config several times: one warning
        assert collect.messages == [
            "kv_eviction: policy 'snapkv' does not use alpha=1.0, kernel_size=1 (it uses: window, gqa_agg); only "
            "requests that pick a policy using them through vllm_xargs are affected"]
        assert KVEvictionConfig.from_value({"policy": "restkv", "alpha": 1.0}).ignored_settings() == []
        assert KVEvictionConfig.from_value({"policy": "none", "window": 16}).ignored_settings() == ["window"]
        assert collect.messages[-1] == "kv_eviction: window=16 not used: eviction is off (policy 'none')"
        assert KVEvictionConfig.from_value({"shadow_rate": 0.5}).ignored_settings() == ["shadow_rate"]
        assert collect.messages[-1] == "kv_eviction: shadow_rate=0.5 not used: eviction is off (policy 'none')"
        assert KVEvictionConfig.from_value({"policy": "snapkv", "shadow_rate": 0.5}).ignored_settings() == []
        # defaults are not "changed", even when given explicitly (the CLI hands on full dicts)
        assert KVEvictionConfig.from_value({"policy": "tova", "alpha": 0.3}).ignored_settings() == []
        # through the `vllm serve` flags
        args = _parser().parse_args(["--kv-eviction", "tova", "--kv-eviction-config", '{"kernel_size": 1}'])
        cli_args.merge_cli_args_into(_EngineArgs(), args)
        assert collect.messages[-1].startswith("kv_eviction: policy 'tova' does not use kernel_size=1 (it uses: window)")
    finally:
        logger.removeHandler(collect)
