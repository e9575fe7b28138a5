"""loadtest/profile_overhead.py: how engine time is attributed to the plugin."""

from __future__ import annotations


def test_profile_overhead_counts_plugin_entry_points_once():
    """loadtest/profile_overhead.plugin_share: a call into the plugin from outside counts with its whole cumulative
    time; the plugin's internal calls under it are not counted again."""
    import cProfile
    import pstats
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "loadtest"))
    import torch
    from profile_overhead import plugin_share

    from vllm_restkv.policies import get_policy
    from vllm_restkv.policies.base import LayerKV

    kv = LayerKV(torch.randn(4, 8, 16), torch.randn(2, 64, 16), torch.randn(2, 64, 16),
                 torch.arange(64).expand(2, 64).contiguous())
    policy = get_policy("snapkv", window=8)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(20):
        policy.select(kv, 24)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total, per_entry = plugin_share(stats)
    select = next(ct for f, (_cc, _nc, _tt, ct, _c) in stats.stats.items()
                  if f[2] == "select" and f[0].endswith("base.py"))
    assert list(per_entry) == ["base.select"]  # prefix_scores, scoring.* ... are internal: not entry points
    assert abs(total - select) < 1e-9 and total > 0
