"""Prometheus metrics for KV eviction, on vLLM's own `/metrics`.

Path of the numbers: the worker reports each eviction to the scheduler (engine-core process); the scheduler drains
what happened since the last step into `SchedulerStats.restkv` (a field `engine/patches.py` adds, since
`SchedulerStats` is the one message vLLM already sends from every engine core to every API server); in the API
server vLLM hands `SchedulerStats` to its stat loggers, and `RestKVStatLogger` (entry point group
`vllm.stat_logger_plugins`) turns it into Prometheus metrics. It uses `prometheus_client` the way vLLM's own logger
does, so with several API servers (`PROMETHEUS_MULTIPROC_DIR`, set by vLLM) the values are summed across them.

Names follow https://prometheus.io/docs/practices/naming (base units, `_total` counters, `_ratio` for 0..1) with a
`restkv_` prefix; `model_name` and `engine` labels match vLLM's so both can be joined in PromQL. vLLM's own
`vllm:kv_block_*evict*` metrics are about prefix-cache block reuse, not this.
"""

from __future__ import annotations

from typing import Any

from vllm_restkv.config import KVEvictionConfig

try:  # keeps this module importable for the version guard's message
    from vllm.v1.metrics.loggers import AggregateStatLoggerBase
except ImportError:  # pragma: no cover
    AggregateStatLoggerBase = object

STATS_FIELD = "restkv"  # the field added to vllm.v1.metrics.stats.SchedulerStats
KEPT_RATIO_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DURATION_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# one record per eviction of one request: what the worker measured (see worker_state.WorkerEviction._evict)
RECORD_FIELDS = ("policy", "phase", "evicted_tokens", "freed_blocks", "scoring_seconds", "compaction_seconds",
                 "kept_ratio")


def drain_payload(records: list[tuple], physical_tokens: int, logical_tokens: int, evicting_requests: int) -> dict:
    """What one engine core sends with one SchedulerStats (records since the last one, gauges now)."""
    return {"records": records, "physical_tokens": physical_tokens, "logical_tokens": logical_tokens,
            "evicting_requests": evicting_requests}


def _collectors():
    """Module-level singletons: prometheus_client refuses to register a name twice in one process."""
    global _COLLECTORS
    if _COLLECTORS is None:
        import prometheus_client as prom

        labels = ["model_name", "engine"]
        _COLLECTORS = {
            "evicted_tokens": prom.Counter(
                "restkv_evicted_tokens", "KV cache token slots removed by eviction (per layer and KV head alike)",
                labels + ["policy"]),
            "freed_blocks": prom.Counter(
                "restkv_freed_blocks", "KV cache blocks returned to vLLM's block pool by eviction",
                labels + ["policy"]),
            "events": prom.Counter(
                "restkv_eviction_events", "Evictions of one request (scoring + compaction), by phase",
                labels + ["policy", "phase"]),
            "scoring": prom.Histogram(
                "restkv_scoring_duration_seconds", "Time to score and select kept tokens, all layers, per eviction",
                labels + ["policy"], buckets=DURATION_BUCKETS),
            "compaction": prom.Histogram(
                "restkv_compaction_duration_seconds", "Time to gather kept KV into the first blocks, per eviction",
                labels + ["policy"], buckets=DURATION_BUCKETS),
            "kept_ratio": prom.Histogram(
                "restkv_kept_token_ratio", "Kept / logical tokens of a request after an eviction",
                labels + ["policy"], buckets=KEPT_RATIO_BUCKETS),
            "physical": prom.Gauge(
                "restkv_physical_tokens", "KV tokens held in the cache by running requests (after eviction)",
                labels, multiprocess_mode="mostrecent"),
            "logical": prom.Gauge(
                "restkv_logical_tokens", "Tokens the running requests have processed (what the cache would hold "
                "without eviction)", labels, multiprocess_mode="mostrecent"),
            "evicting": prom.Gauge(
                "restkv_evicting_requests", "Running requests whose cache has been evicted at least once",
                labels, multiprocess_mode="mostrecent"),
            "info": prom.Gauge(
                "restkv_build_info", "vllm-restkv build and configuration (value 1)",
                ["model_name", "version", "vllm_version", "policy", "budget", "window", "decode_interval"],
                multiprocess_mode="mostrecent"),
        }
    return _COLLECTORS


_COLLECTORS: dict[str, Any] | None = None


class RestKVStatLogger(AggregateStatLoggerBase):
    """vLLM stat logger (group `vllm.stat_logger_plugins`): eviction metrics of every engine core."""

    def __init__(self, vllm_config, engine_indexes: list[int] | None = None):
        from vllm_restkv import __version__
        from vllm_restkv.version import installed_vllm_version

        self.engine_indexes = engine_indexes or [0]
        self.model_name = vllm_config.model_config.served_model_name
        self.config = KVEvictionConfig.from_vllm_config(vllm_config)
        c = _collectors()
        self.c = c
        c["info"].labels(model_name=self.model_name, version=__version__, vllm_version=installed_vllm_version(),
                         policy=self.config.policy, budget=str(self.config.budget), window=str(self.config.window),
                         decode_interval=str(self.config.decode_interval)).set(1)
        for engine in self.engine_indexes:  # so that dashboards see zeros before the first eviction
            labels = dict(model_name=self.model_name, engine=str(engine))
            for name in ("physical", "logical", "evicting"):
                c[name].labels(**labels).set(0)
            if self.config.enabled:
                c["evicted_tokens"].labels(**labels, policy=self.config.policy)
                c["freed_blocks"].labels(**labels, policy=self.config.policy)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        payload = getattr(scheduler_stats, STATS_FIELD, None) if scheduler_stats is not None else None
        if not payload:
            return
        c = self.c
        labels = dict(model_name=self.model_name, engine=str(engine_idx))
        for record in payload["records"]:
            r = dict(zip(RECORD_FIELDS, record))
            pl = dict(labels, policy=r["policy"])
            c["evicted_tokens"].labels(**pl).inc(r["evicted_tokens"])
            c["freed_blocks"].labels(**pl).inc(r["freed_blocks"])
            c["events"].labels(**pl, phase=r["phase"]).inc()
            c["scoring"].labels(**pl).observe(r["scoring_seconds"])
            c["compaction"].labels(**pl).observe(r["compaction_seconds"])
            c["kept_ratio"].labels(**pl).observe(r["kept_ratio"])
        c["physical"].labels(**labels).set(payload["physical_tokens"])
        c["logical"].labels(**labels).set(payload["logical_tokens"])
        c["evicting"].labels(**labels).set(payload["evicting_requests"])

    def log_engine_initialized(self):
        pass

    def log(self):
        pass
