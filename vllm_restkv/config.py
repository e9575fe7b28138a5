"""KV-eviction settings: one frozen dataclass, parsed and validated from `additional_config["kv_eviction"]`.

`additional_config` is vLLM's channel that reaches the API server, the engine core and every worker, so it is the
single source of truth. The `--kv-eviction*` flags of `vllm serve` and the offline API
(`LLM(..., additional_config={"kv_eviction": {...}})`) both end up here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

CONFIG_KEY = "kv_eviction"
NO_EVICTION = "none"
logger = logging.getLogger("vllm.restkv")


class KVEvictionConfigError(ValueError):
    """A bad eviction setting. The message names the bad value and what is allowed."""


def available_policies() -> list[str]:
    from vllm_restkv.policies import available_policies as names

    return names()


@dataclasses.dataclass(frozen=True)
class KVEvictionConfig:
    policy: str = NO_EVICTION
    # Tokens kept per request, per layer and per KV head, observation window included.
    budget: int = 512
    # Observation window: the newest tokens, always kept; their queries score the rest.
    window: int = 32
    # Where eviction runs: (a) when prefill ends, (b) at chunk boundaries of chunked prefill, (c) every
    # `decode_interval` decode steps, rounded up to fill the request's last KV block (0 = never during decode).
    evict_after_prefill: bool = True
    evict_during_prefill: bool = True
    decode_interval: int = 64
    # Policy hyperparameters (ReST-KV paper defaults; baselines ignore what they do not use).
    alpha: float = 0.3
    beta: float = 2000.0
    kernel_size: int = 5
    # ReST-KV at evictions inside the prompt (chunk boundaries before its last chunk), where the window holds the
    # prompt's own text and not yet the question at its end: the newest query alone (alpha 1) and no smoothing
    # (kernel 1) kept closer to the full cache than the paper's EMA + smoothing there, as close as TOVA
    # (docs/benchmarks.md); the eviction after the prompt and those during decode use alpha / kernel_size.
    chunk_alpha: float = 1.0
    chunk_kernel_size: int = 1
    gqa_agg: str = "mean"
    # ReST-KV across repeated evictions (chunk boundaries, decode): 0 scores the cache afresh each time; c > 0 blends
    # a token's new score with its previous one, (1 - c) new + c old (policies/restkv.py).
    carry: float = 0.0
    # ReST-KV's W_o projection matmul: auto (bfloat16 on a GPU or a CPU with native bf16, else float32), float32,
    # bfloat16 (vllm_restkv.scoring.projection_matmul_dtype).
    projection_dtype: str = "auto"
    # Who computes ReST-KV's raw scores and the compaction: auto (the Triton kernels of kernels/ where the KV cache is
    # on CUDA, torch elsewhere), torch, triton (on a CPU only under TRITON_INTERPRET=1, for tests);
    # vllm_restkv/kernel_choice.py. An engine setting: compaction is the same for every policy.
    kernels: str = "auto"
    # Whether requests may override policy settings through `vllm_xargs` (budget, or turning eviction off).
    allow_request_override: bool = True
    # Fidelity checks in production: this fraction of /v1/moderations requests is scored a second time with eviction
    # off for it, in the background after the answer, and the two scores are compared (restkv_moderation_shadow_*
    # metrics). 0 = off. Costs one full-cache run per sampled request.
    shadow_rate: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.policy != NO_EVICTION

    def policy_settings(self) -> dict[str, Any]:
        """The hyperparameters every policy is built with (`get_policy(name, **settings)`; each takes what it uses)."""
        return {name: getattr(self, name) for name in POLICY_SETTINGS}

    def ignored_settings(self) -> list[str]:
        """Policy settings changed from their defaults that the server's policy does not use (a request that picks
        another policy through vllm_xargs may still use them), and shadow_rate without eviction (nothing to check).
        Changed, not given: the CLI hands on full dicts."""
        from vllm_restkv.policies import POLICIES

        used, defaults = POLICIES[self.policy].settings, KVEvictionConfig()
        names = [name for name in POLICY_SETTINGS if name not in used and getattr(self, name) != getattr(defaults, name)]
        return names + (["shadow_rate"] if not self.enabled and self.shadow_rate > 0 else [])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_value(cls, value: Any) -> KVEvictionConfig:
        """Parse `additional_config["kv_eviction"]`: a policy name, a dict, a JSON string of either, or None."""
        if value is None:
            return cls()
        if isinstance(value, KVEvictionConfig):
            return value
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as e:
                    raise KVEvictionConfigError(f"kv_eviction: invalid JSON {text!r}: {e}") from None
            else:
                value = {"policy": text}
        if not isinstance(value, Mapping):
            raise KVEvictionConfigError(
                f"kv_eviction must be a policy name or a mapping of settings, got {type(value).__name__}: {value!r}"
            )
        unknown = sorted(set(value) - set(cls.field_names()))
        if unknown:
            raise KVEvictionConfigError(
                f"kv_eviction: unknown setting(s) {unknown}; allowed settings: {cls.field_names()}"
            )
        defaults = cls()
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in value and value[f.name] is not None:
                kwargs[f.name] = _coerce(f.name, value[f.name], type(getattr(defaults, f.name)))
        config = cls(**kwargs)
        config.validate()
        _warn_ignored_settings(config)
        return config

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> KVEvictionConfig:
        additional = getattr(vllm_config, "additional_config", None) or {}
        return cls.from_value(additional.get(CONFIG_KEY))

    def validate(self) -> None:
        policies = available_policies()
        if self.policy not in policies:
            raise KVEvictionConfigError(
                f"kv_eviction: unknown policy {self.policy!r}; allowed policies: {', '.join(policies)}"
            )
        if self.window < 1:
            raise KVEvictionConfigError(f"kv_eviction: window must be >= 1, got {self.window}")
        if self.budget < self.window:
            raise KVEvictionConfigError(
                f"kv_eviction: budget {self.budget} is smaller than the observation window {self.window}; "
                f"the window is always kept, so the budget must be at least {self.window} tokens "
                f"(or lower the window with window=<n>)"
            )
        if self.budget > MAX_BUDGET:
            raise KVEvictionConfigError(f"kv_eviction: budget {self.budget} is larger than {MAX_BUDGET}")
        if self.decode_interval < 0:
            raise KVEvictionConfigError(
                f"kv_eviction: decode_interval must be >= 0 (0 = no eviction during decode), got {self.decode_interval}"
            )
        for name in ("alpha", "chunk_alpha"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise KVEvictionConfigError(f"kv_eviction: {name} must be in (0, 1], got {getattr(self, name)}")
        if self.beta <= 0:
            raise KVEvictionConfigError(f"kv_eviction: beta must be > 0, got {self.beta}")
        for name in ("kernel_size", "chunk_kernel_size"):
            if getattr(self, name) < 1 or getattr(self, name) % 2 == 0:
                raise KVEvictionConfigError(
                    f"kv_eviction: {name} must be an odd integer >= 1, got {getattr(self, name)}")
        if self.gqa_agg not in GQA_AGGREGATIONS:
            raise KVEvictionConfigError(
                f"kv_eviction: unknown gqa_agg {self.gqa_agg!r}; allowed: {', '.join(GQA_AGGREGATIONS)}"
            )
        if not 0.0 <= self.shadow_rate <= 1.0:
            raise KVEvictionConfigError(f"kv_eviction: shadow_rate must be in [0, 1], got {self.shadow_rate}")
        if self.shadow_rate > 0 and not self.allow_request_override:
            raise KVEvictionConfigError(
                "kv_eviction: shadow_rate needs allow_request_override (a shadow check turns eviction off for its "
                "own requests)")
        if not 0.0 <= self.carry < 1.0:
            raise KVEvictionConfigError(f"kv_eviction: carry must be in [0, 1), got {self.carry}")
        if self.projection_dtype not in PROJECTION_DTYPES:
            raise KVEvictionConfigError(
                f"kv_eviction: unknown projection_dtype {self.projection_dtype!r}; "
                f"allowed: {', '.join(PROJECTION_DTYPES)}"
            )
        from vllm_restkv.kernel_choice import KERNEL_CHOICES, unavailable_reason

        if self.kernels not in KERNEL_CHOICES:
            raise KVEvictionConfigError(
                f"kv_eviction: unknown kernels {self.kernels!r}; allowed: {', '.join(KERNEL_CHOICES)}")
        reason = unavailable_reason(self.kernels) if self.enabled else None
        if reason:
            raise KVEvictionConfigError(f"kv_eviction: {reason}")


GQA_AGGREGATIONS = ("mean", "max", "mean_raw", "layer")  # vllm_restkv.scoring.GQA_MODES
PROJECTION_DTYPES = ("auto", "float32", "bfloat16")  # vllm_restkv.scoring.PROJECTION_DTYPES
# Fields handed to the policies; the others (policy, budget, where eviction runs, overrides) steer the engine.
POLICY_SETTINGS = ("window", "alpha", "beta", "kernel_size", "chunk_alpha", "chunk_kernel_size", "gqa_agg", "carry",
                   "projection_dtype")


_warned: set[str] = set()


def _warn_ignored_settings(config: KVEvictionConfig) -> None:
    """A setting the policy ignores is most likely a mistake (e.g. alpha with --kv-eviction snapkv), but requests
    may switch policies, so it is a warning (once per process), not an error."""
    ignored = config.ignored_settings()
    if not ignored:
        return
    from vllm_restkv.policies import POLICIES

    values = ", ".join(f"{name}={getattr(config, name)!r}" for name in ignored)
    if config.enabled:
        message = (f"kv_eviction: policy {config.policy!r} does not use {values} (it uses: "
                   f"{', '.join(POLICIES[config.policy].settings)}); only requests that pick a policy using "
                   f"{'them' if len(ignored) > 1 else 'it'} through vllm_xargs are affected")
    else:
        message = f"kv_eviction: {values} not used: eviction is off (policy 'none')"
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _coerce(name: str, value: Any, kind: type) -> Any:
    """Strict conversion: no silent truncation of 3.5 to 3, no 'yes' for True."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise KVEvictionConfigError(f"kv_eviction: {name} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise KVEvictionConfigError(f"kv_eviction: {name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise KVEvictionConfigError(f"kv_eviction: {name} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool):
            raise KVEvictionConfigError(f"kv_eviction: {name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise KVEvictionConfigError(f"kv_eviction: {name} must be a number, got {value!r}") from None
    if not isinstance(value, str):
        raise KVEvictionConfigError(f"kv_eviction: {name} must be a string, got {value!r}")
    return value.strip().lower() if name == "policy" else value


REQUEST_KEYS = ("kv_eviction", "kv_eviction_budget", "kv_eviction_during_prefill")
MAX_BUDGET = 2**31 - 1  # token counts are int32 in vLLM's tensors; anything larger is a mistake
# Set in each process that builds an engine config (the API server, `LLM(...)`), so requests can be checked there.
_server_config: KVEvictionConfig | None = None
# The engine config of this process's server (API server or `LLM`): its KV cache size, once the engine reports it,
# bounds what a request may ask for (vllm_restkv.engine.capacity.check_request_fits).
_server_vllm_config: Any = None


_server_pid: int | None = None  # the process that set _server_vllm_config


def set_server_config(config: KVEvictionConfig, vllm_config: Any = None) -> None:
    global _server_config, _server_vllm_config, _server_pid
    _server_config = config
    _server_vllm_config = vllm_config
    _server_pid = os.getpid() if vllm_config is not None else None


def set_engine_side_config(config: KVEvictionConfig) -> None:
    """For the engine core and the workers, which decode every request's SamplingParams again and so re-run the
    request check: the capacity check stays off there (a refusal raised while decoding kills the engine's input
    thread; the client has checked), except in the process that built the engine config itself (offline `LLM` with
    VLLM_ENABLE_V1_MULTIPROCESSING=0: client and engine in one process, where the client's check must stay on). A
    forked engine process inherits the globals but has its own pid."""
    same_process = _server_vllm_config is not None and _server_pid == os.getpid()
    set_server_config(config, _server_vllm_config if same_process else None)


def request_config(extra_args: Mapping[str, Any] | None, server: KVEvictionConfig) -> KVEvictionConfig:
    """The server's settings with the request's evict_during_prefill (policy and budget are passed on separately)."""
    during = evicts_during_prefill(extra_args, server)
    return server if during == server.evict_during_prefill else dataclasses.replace(server, evict_during_prefill=during)


def evicts_during_prefill(extra_args: Mapping[str, Any] | None, config: KVEvictionConfig) -> bool:
    """Whether a request's prompt is evicted at chunk boundaries: its `vllm_xargs.kv_eviction_during_prefill` where
    the server allows per-request settings, else the server's evict_during_prefill. False: one eviction after the
    whole prompt (the paper's setting; the request holds its whole prompt until then)."""
    if extra_args and config.allow_request_override and "kv_eviction_during_prefill" in extra_args:
        return request_bool(extra_args["kv_eviction_during_prefill"])
    return config.evict_during_prefill


_BOOLS = {"true": True, "1": True, "false": False, "0": False}


def request_bool(value: Any) -> bool:
    """A yes/no from `vllm_xargs`: vLLM's schema for it has no booleans, so JSON true/false arrive as 1/0; strings
    true/false/1/0 are taken too. Anything else raises KVEvictionConfigError."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _BOOLS:
        return _BOOLS[value.strip().lower()]
    raise KVEvictionConfigError(f"vllm_xargs.kv_eviction_during_prefill must be true or false, got {value!r}")


def validate_request_args(extra_args: Mapping[str, Any] | None, server: KVEvictionConfig | None = None) -> None:
    """Per-request settings from `vllm_xargs` (`extra_args`): raise KVEvictionConfigError (answered with 400)."""
    if not extra_args:
        return
    # vllm_xargs is shared with other extensions, so only keys in our namespace are checked; a misspelt one of
    # ours must not be ignored silently
    for key in extra_args:
        if isinstance(key, str) and key.startswith("kv_evict") and key not in REQUEST_KEYS:
            raise KVEvictionConfigError(
                f"vllm_xargs: unknown key {key!r}; the per-request eviction keys are {', '.join(REQUEST_KEYS)}")
    if not any(k in extra_args for k in REQUEST_KEYS):
        return
    server = server or _server_config or KVEvictionConfig()
    policy = extra_args.get("kv_eviction", server.policy)
    if not isinstance(policy, str) or policy.strip().lower() not in available_policies():
        raise KVEvictionConfigError(
            f"vllm_xargs.kv_eviction: unknown policy {policy!r}; allowed policies: {', '.join(available_policies())}"
        )
    policy = policy.strip().lower()
    if not server.enabled and policy != NO_EVICTION:
        raise KVEvictionConfigError(
            "vllm_xargs.kv_eviction: KV eviction is off on this server (started without --kv-eviction), "
            "so requests cannot turn it on"
        )
    if not server.allow_request_override and (policy != server.policy or "kv_eviction_budget" in extra_args
                                              or "kv_eviction_during_prefill" in extra_args):
        raise KVEvictionConfigError("vllm_xargs: this server does not allow per-request eviction settings")
    if "kv_eviction_during_prefill" in extra_args:
        request_bool(extra_args["kv_eviction_during_prefill"])
    if "kv_eviction_budget" in extra_args:
        budget = extra_args["kv_eviction_budget"]
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise KVEvictionConfigError(f"vllm_xargs.kv_eviction_budget must be an integer, got {budget!r}")
        if budget < server.window:
            raise KVEvictionConfigError(
                f"vllm_xargs.kv_eviction_budget {budget} is smaller than the observation window {server.window}"
            )
        if budget > MAX_BUDGET:
            raise KVEvictionConfigError(f"vllm_xargs.kv_eviction_budget {budget} is larger than {MAX_BUDGET}")
    if _server_vllm_config is not None and server.enabled:
        from vllm_restkv.engine.capacity import check_request_fits

        check_request_fits(_server_vllm_config, request_config(extra_args, server), policy,
                           extra_args.get("kv_eviction_budget", server.budget))
