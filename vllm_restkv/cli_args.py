"""The `--kv-eviction*` flags of `vllm serve`, and their translation into `additional_config["kv_eviction"]`."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from vllm_restkv.config import CONFIG_KEY, KVEvictionConfig, KVEvictionConfigError, available_policies

# flag -> KVEvictionConfig field
FLAG_FIELDS = {
    "kv_eviction": "policy",
    "kv_eviction_budget": "budget",
    "kv_eviction_window": "window",
    "kv_eviction_decode_interval": "decode_interval",
    "kv_eviction_shadow_rate": "shadow_rate",
}


def _in_range(kind: type, low: float, high: float, what: str):
    """An argparse type: `kind(text)` within [low, high] (NaN is not), else an error saying `what` was expected."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _in_range(int, 1, math.inf, "a positive integer")
_non_negative_int = _in_range(int, 0, math.inf, "an integer >= 0")
_fraction = _in_range(float, 0.0, 1.0, "a number in [0, 1]")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_kv_eviction_args(parser: argparse.ArgumentParser) -> None:
    if any(a.dest == "kv_eviction" for a in parser._actions):  # idempotent
        return
    defaults = KVEvictionConfig()
    group = parser.add_argument_group(
        "KVEvictionConfig",
        description="KV-cache eviction by vllm-restkv: frees KV blocks of running requests back to the allocator. "
        "Same settings as --additional-config '{\"kv_eviction\": {...}}'.",
    )
    group.add_argument(
        "--kv-eviction",
        choices=available_policies(),
        default=None,
        help=f"Eviction policy (default: {defaults.policy}, no eviction). 'restkv' is ReST-KV; the others are the "
        "attention-weight baselines.",
    )
    group.add_argument(
        "--kv-eviction-budget",
        type=_positive_int,
        default=None,
        help=f"Tokens kept per request, per layer and KV head, observation window included (default: {defaults.budget}).",
    )
    group.add_argument(
        "--kv-eviction-window",
        type=_positive_int,
        default=None,
        help=f"Observation window: newest tokens always kept, whose queries score the rest (default: {defaults.window}).",
    )
    group.add_argument(
        "--kv-eviction-decode-interval",
        type=_non_negative_int,
        default=None,
        help=f"Evict back to the budget every N decode steps, rounded up so that a request's last KV block fills "
        f"(an earlier eviction frees no block); 0 = never during decode (default: {defaults.decode_interval}).",
    )
    group.add_argument(
        "--kv-eviction-shadow-rate",
        type=_fraction,
        default=None,
        help="Fraction of /v1/moderations requests scored again with eviction off, in the background after the "
        "answer, to measure agreement with the full cache live (metrics restkv_moderation_shadow_*; default: "
        f"{defaults.shadow_rate}, off).",
    )
    group.add_argument(
        "--kv-eviction-config",
        type=_json_object,
        default=None,
        help="Other settings as JSON, e.g. '{\"alpha\": 0.3, \"kernel_size\": 21}'. Allowed keys: "
        + ", ".join(KVEvictionConfig.field_names()),
    )


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = dict(getattr(args, "kv_eviction_config", None) or {})
    for dest, field in FLAG_FIELDS.items():
        value = getattr(args, dest, None)
        if value is not None:
            settings[field] = value
    return settings


def merge_cli_args_into(engine_args: Any, args: argparse.Namespace) -> None:
    """Put the parsed flags into engine_args.additional_config; flags win over --additional-config."""
    settings = settings_from_args(args)
    if not settings:
        return
    additional = dict(engine_args.additional_config or {})
    existing = additional.get(CONFIG_KEY)
    merged = dict(KVEvictionConfig.from_value(existing).to_dict()) if existing is not None else {}
    merged.update(settings)
    try:
        additional[CONFIG_KEY] = KVEvictionConfig.from_value(merged).to_dict()
    except KVEvictionConfigError as e:
        raise SystemExit(f"vllm serve: error: {e}") from None
    engine_args.additional_config = additional
    # Written back into the parsed flags too: with --api-server-count > 1 each API server process rebuilds its
    # engine args from this namespace before vLLM has loaded our plugin there (so without our from_cli_args), and
    # would otherwise see eviction off (per-request settings refused, request checks skipped).
    if hasattr(args, "additional_config"):
        args.additional_config = dict(additional)


def normalize_additional_config(engine_args: Any) -> KVEvictionConfig:
    """Validate and store the complete settings, so the engine core and workers read one canonical dict."""
    additional = dict(engine_args.additional_config or {})
    config = KVEvictionConfig.from_value(additional.get(CONFIG_KEY))
    additional[CONFIG_KEY] = config.to_dict()
    engine_args.additional_config = additional
    return config
