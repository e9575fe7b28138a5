"""The one place where vllm-restkv patches vLLM. Every patch names the vLLM function it wraps.

All of them were written against vLLM 0.32.0 (`vllm_restkv.version.SUPPORTED_VLLM_VERSION`); `register()` checks
the version before `apply_all()` runs, and each patch checks that its target still exists, so a changed vLLM fails
at start-up with the name of the missing function instead of misbehaving later.

SERVE_PATCHES are applied only in the `vllm serve` process (when it builds its argument parser). Besides the
functions in PATCHES, two registrations: `add_scheduler_stats_field()` declares the field
`SchedulerStats.restkv` (metrics transport), and `attention_registry.register_backends()` wraps the attention
backends through vLLM's backend registry.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
import logging
import signal
from typing import Any

from vllm_restkv import cli_args
from vllm_restkv.config import (KVEvictionConfig, KVEvictionConfigError, set_engine_side_config, set_server_config,
                                validate_request_args)
from vllm_restkv.engine import capacity, compatibility, worker_state
from vllm_restkv.engine.scheduler_state import SchedulerEviction
from vllm_restkv.engine.worker_state import REPORT_ATTR
from vllm_restkv.metrics import STATS_FIELD

try:
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT
except ImportError:  # checked by the version guard; keeps this module importable for the error message
    EMPTY_MODEL_RUNNER_OUTPUT = None


logger = logging.getLogger("vllm.restkv")


@dataclasses.dataclass(frozen=True)
class Patch:
    target: str  # "module:Class.attribute" in vLLM
    make_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]
    why: str
    kind: str = "function"  # "function", "staticmethod" or "classmethod"


def _wrap_add_cli_args(original):
    @functools.wraps(original)
    def add_cli_args(parser, *args, **kwargs):
        parser = original(parser, *args, **kwargs)
        cli_args.add_kv_eviction_args(parser)
        # Only the CLI process builds a parser: apply the `vllm serve` patches here, so the engine processes never
        # import the HTTP stack for them.
        apply_all(SERVE_PATCHES)
        return parser

    return add_cli_args


# ---------- `vllm serve` process: exit status when the engine core dies ----------

_engine_died = False


def _wrap_client_shutdown(original):
    @functools.wraps(original)
    def shutdown(self, *args, **kwargs):
        global _engine_died
        # The first shutdown of a client whose engine is already marked dead: vLLM's monitor marks it when an engine
        # core process exits (then shuts the client down), and so does an engine core's fatal-error message. It is
        # a death unless every engine core exited cleanly (status 0, or SIGTERM/SIGINT: `systemctl stop` signals the
        # whole process group). A shutdown on request reaches here with the engine not yet marked; later calls are
        # no-ops.
        if self._finalizer.alive and self.resources.engine_dead:
            manager = self.resources.engine_manager
            processes = getattr(manager, "processes", None) or []
            clean = (0, -signal.SIGTERM, -signal.SIGINT)
            if not processes or any(p.exitcode not in clean for p in processes):
                _engine_died = True
        return original(self, *args, **kwargs)

    return shutdown


def _wrap_serve_cmd(original):
    @functools.wraps(original)
    def cmd(args):
        original(args)
        if _engine_died:
            logger.error("vllm-restkv: the engine core died; `vllm serve` exits with status 1 so that a supervisor "
                         "(Kubernetes, systemd) restarts it")
            raise SystemExit(1)

    return cmd


def _wrap_from_cli_args(original):
    @functools.wraps(original)
    def from_cli_args(cls, args):
        engine_args = original(cls, args)
        cli_args.merge_cli_args_into(engine_args, args)
        return engine_args

    return from_cli_args


def _wrap_create_engine_config(original):
    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        config = cli_args.normalize_additional_config(self)
        set_server_config(config)
        if config.enabled:
            compatibility.prepare_engine_args(self, config)
        vllm_config = original(self, *args, **kwargs)
        set_server_config(config, vllm_config)
        return vllm_config

    return create_engine_config


def _wrap_verify_extra_args(original):
    @functools.wraps(original)
    def _verify_extra_args(self):
        original(self)
        try:
            validate_request_args(self.extra_args)
        except KVEvictionConfigError as e:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(str(e), parameter="vllm_xargs") from None

    return _verify_extra_args


def _wrap_validate_params(original):
    @functools.wraps(original)
    def _validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        # PoolingParams carry a pooling request's per-request settings in extra_kwargs (/v1/moderations puts its
        # vllm_xargs there) and, unlike SamplingParams, check nothing when built: checked here, in the client
        extra = getattr(params, "extra_kwargs", None)
        if extra:
            try:
                validate_request_args(extra)
            except KVEvictionConfigError as e:
                from vllm.exceptions import VLLMValidationError

                raise VLLMValidationError(str(e), parameter="vllm_xargs") from None
        return result

    return _validate_params


def _wrap_linear_process_weights(original):
    @functools.wraps(original)
    def process_weights_after_loading(self, layer):
        stash_wo_factor(layer)
        return original(self, layer)

    return process_weights_after_loading


def stash_wo_factor(layer) -> None:
    """ReST-KV needs the per-head factors of o_proj; on CPU vLLM repacks the weight and drops the tensor, so compute
    them (fp32, [H_local, d, d], ~d*d per head) while the plain weight still exists."""
    if not str(getattr(layer, "prefix", "")).endswith(".o_proj"):
        return
    weight = getattr(layer, "weight", None)
    if weight is None or weight.dim() != 2:
        return
    from vllm.config import get_current_vllm_config

    try:
        vllm_config = get_current_vllm_config()
    except Exception:
        return
    config = KVEvictionConfig.from_vllm_config(vllm_config)
    if not config.enabled:
        return
    from vllm_restkv.scoring import wo_factors

    head_size = vllm_config.model_config.get_head_size()
    layer.restkv_wo_factor = wo_factors(weight.detach().float(), weight.shape[1] // head_size)


# ---------- engine core (scheduler) ----------

_kv_check_config: Any = None  # the VllmConfig of the get_kv_cache_configs call in progress (engine core)


def _wrap_get_kv_cache_configs(original):
    @functools.wraps(original)
    def get_kv_cache_configs(vllm_config, *args, **kwargs):
        global _kv_check_config
        _kv_check_config = vllm_config
        try:
            return original(vllm_config, *args, **kwargs)
        finally:
            _kv_check_config = None

    return get_kv_cache_configs


def _wrap_check_enough_kv_cache_memory(original):
    @functools.wraps(original)
    def _check_enough_kv_cache_memory(available_memory, get_needed_memory, max_model_len, estimate_max_model_len):
        if _kv_check_config is None:
            return original(available_memory, get_needed_memory, max_model_len, estimate_max_model_len)
        return capacity.check_enough_kv_cache_memory(original, _kv_check_config, available_memory, get_needed_memory,
                                                     max_model_len, estimate_max_model_len)

    return _check_enough_kv_cache_memory


def _wrap_scheduler_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        config = KVEvictionConfig.from_vllm_config(self.vllm_config)
        # The engine core decodes every request's SamplingParams again, which re-runs _verify_extra_args: it must
        # check against this server's settings here too (else a valid per-request policy kills the input thread)
        set_engine_side_config(config)
        self.restkv = SchedulerEviction(self, config) if config.enabled else None
        _warn_if_emulated_bf16(self.vllm_config)  # here: once per engine, at start-up
        # the admission gate (KVCacheManager.allocate_slots below) sizes each request by what it will hold
        self.kv_cache_manager.restkv = self.restkv

    return __init__


def _warn_if_emulated_bf16(vllm_config) -> None:
    from vllm.platforms import current_platform

    from vllm_restkv.cpu import emulated_bf16_warning

    message = emulated_bf16_warning(vllm_config.model_config.dtype, current_platform.is_cpu())
    if message:
        logger.warning(message)


def _wrap_preprocess_add_request(original):
    @functools.wraps(original)
    def preprocess_add_request(self, request):
        result = original(self, request)
        restkv = getattr(self.scheduler, "restkv", None)
        if restkv is not None:
            restkv.refuse_if_it_cannot_fit(result[0])
        return result

    return preprocess_add_request


def _wrap_update_from_output(original):
    @functools.wraps(original)
    def update_from_output(self, scheduler_output, model_runner_output):
        report = getattr(model_runner_output, REPORT_ATTR, None)
        if report is not None and getattr(self, "restkv", None) is not None:
            self.restkv.apply_report(report)
        return original(self, scheduler_output, model_runner_output)

    return update_from_output


def _wrap_make_stats(original):
    @functools.wraps(original)
    def make_stats(self, *args, **kwargs):
        stats = original(self, *args, **kwargs)
        if stats is not None and getattr(self, "restkv", None) is not None:
            setattr(stats, STATS_FIELD, self.restkv.drain_metrics())
        return stats

    return make_stats


def add_scheduler_stats_field() -> None:
    """Adds the optional field `restkv` (default None) to vllm.v1.metrics.stats.SchedulerStats.

    SchedulerStats is what every engine core already sends to every API server with each step's outputs (msgpack;
    the decoder builds dataclasses from their declared fields), so a declared field carries our metrics across
    processes with no channel of our own. Must run in every process before vLLM builds its encoders/decoders,
    which holds because vLLM loads general plugins first thing in each process.
    """
    from vllm.v1.metrics.stats import SchedulerStats

    if STATS_FIELD in SchedulerStats.__dataclass_fields__:
        return
    field = dataclasses.field(default=None)
    field.name, field.type, field._field_type = STATS_FIELD, "dict | None", dataclasses._FIELD
    SchedulerStats.__dataclass_fields__[STATS_FIELD] = field
    SchedulerStats.__annotations__[STATS_FIELD] = "dict | None"
    setattr(SchedulerStats, STATS_FIELD, None)


def _wrap_allocate_slots(original):
    @functools.wraps(original)
    def allocate_slots(self, request, *args, full_sequence_must_fit: bool = False, **kwargs):
        # vLLM admits a waiting request only when its whole sequence fits in the free blocks
        # (scheduler_reserve_full_isl). An evicting request never holds more than budget + one chunk, so it is
        # sized by that; every other request by its whole sequence, and vLLM's own check still runs for it.
        # Both also leave the blocks that running requests in chunked prefill were admitted with (vLLM counts
        # only blocks already held, which over-admits once chunks are cut short at eviction boundaries).
        eviction = getattr(self, "restkv", None)
        if full_sequence_must_fit and eviction is not None:
            tokens = eviction.admission_tokens(request)
            if not eviction.can_admit(tokens, kwargs.get("reserved_blocks", 0)):
                return None
            if tokens < request.num_tokens:
                full_sequence_must_fit = False
        return original(self, request, *args, full_sequence_must_fit=full_sequence_must_fit, **kwargs)

    return allocate_slots


def _wrap_reserve_prefill_lookahead(original):
    @functools.wraps(original)
    def _reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens):
        num_new_tokens = original(self, request, num_computed_tokens, num_new_tokens)
        if num_new_tokens > 0 and getattr(self, "restkv", None) is not None:
            num_new_tokens = self.restkv.align_chunk(request, num_computed_tokens, num_new_tokens)
        return num_new_tokens

    return _reserve_prefill_lookahead


def _wrap_free_request_blocks(original):
    @functools.wraps(original)
    def _free_request_blocks(self, request):
        original(self, request)
        if getattr(self, "restkv", None) is not None:
            self.restkv.forget(request.request_id)

    return _free_request_blocks


def _wrap_prefix_cache_lookup_enabled(original):
    @functools.wraps(original)
    def prefix_cache_lookup_enabled(self, request):
        eviction = getattr(self, "restkv", None)
        if eviction is not None and eviction.bypasses_prefix_cache(request):
            return False
        return original(self, request)

    return prefix_cache_lookup_enabled


def _wrap_cache_blocks(original):
    @functools.wraps(original)
    def cache_blocks(self, request, *args, **kwargs):
        eviction = getattr(self, "restkv", None)
        if eviction is not None and eviction.bypasses_prefix_cache(request):
            return None
        return original(self, request, *args, **kwargs)

    return cache_blocks


def _evicted_tokens(manager, request_id: str) -> int:
    """Token slots already evicted from this request (its blocks hold that many fewer than vLLM counts)."""
    eviction = getattr(manager, "restkv", None)
    return eviction.evicted.get(request_id, 0) if eviction is not None else 0


def _wrap_get_num_blocks_to_allocate(original):
    @functools.wraps(original)
    def get_num_blocks_to_allocate(self, request_id, num_tokens, *args, **kwargs):
        e = _evicted_tokens(self, request_id)
        if e:
            num_tokens -= e
            if "num_tokens_main_model" in kwargs:
                kwargs["num_tokens_main_model"] -= e
            elif len(args) >= 4:
                args = (*args[:3], args[3] - e, *args[4:])
        return original(self, request_id, num_tokens, *args, **kwargs)

    return get_num_blocks_to_allocate


def _wrap_allocate_new_blocks(original):
    @functools.wraps(original)
    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model, *args, **kwargs):
        e = _evicted_tokens(self, request_id)
        return original(self, request_id, num_tokens - e, num_tokens_main_model - e, *args, **kwargs)

    return allocate_new_blocks


# ---------- workers (model runner) ----------

def _wrap_runner_init(original):
    @functools.wraps(original)
    def __init__(self, vllm_config, *args, **kwargs):
        original(self, vllm_config, *args, **kwargs)
        # A worker decodes each scheduler output's SamplingParams, which re-checks vllm_xargs against this process's
        # server settings, before _update_states installs our worker state: without this, a first request that
        # sets its own policy was refused here and the refusal killed the worker (and with it the engine).
        set_engine_side_config(KVEvictionConfig.from_vllm_config(vllm_config))

    return __init__


def _wrap_update_states(original):
    @functools.wraps(original)
    def _update_states(self, scheduler_output):
        if not hasattr(self, "restkv"):
            worker_state.install(self)
        if self.restkv is not None:
            self.restkv.before_update_states(scheduler_output)
        return original(self, scheduler_output)

    return _update_states


def _wrap_prepare_inputs(original):
    @functools.wraps(original)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        state = getattr(self, "restkv", None)
        if state is not None:
            state.before_prepare_inputs(num_scheduled_tokens)
        result = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        if state is not None:
            state.after_prepare_inputs()
        return result

    return _prepare_inputs


def _wrap_compute_slot_mapping(original):
    @functools.wraps(original)
    def compute_slot_mapping(self, num_reqs, query_start_loc, positions, *args, **kwargs):
        state = worker_state.current()
        if state is not None:
            offsets = state.token_offsets(query_start_loc, num_reqs, positions.shape[0])
            if offsets is not None:
                positions = positions - offsets  # a new tensor: RoPE keeps reading the logical positions
        return original(self, num_reqs, query_start_loc, positions, *args, **kwargs)

    return compute_slot_mapping


def _wrap_pool(original):
    @functools.wraps(original)
    def _pool(self, *args, **kwargs):
        state = getattr(self, "restkv", None)
        if state is None:
            return original(self, *args, **kwargs)
        with state.logical_seq_lens():
            return original(self, *args, **kwargs)

    return _pool


def _wrap_step_output(original):
    @functools.wraps(original)
    def step(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        state = getattr(self, "restkv", None)
        if state is not None and output is not None and output is not EMPTY_MODEL_RUNNER_OUTPUT:
            state.check_capture()
            if state.plan:
                state.after_step(output)
        return output

    return step


PATCHES: list[Patch] = [
    Patch(
        "vllm.engine.arg_utils:EngineArgs.add_cli_args",
        _wrap_add_cli_args,
        "adds the --kv-eviction* flags to `vllm serve` (vLLM loads general plugins before it builds the parser)",
        kind="staticmethod",
    ),
    Patch(
        "vllm.engine.arg_utils:EngineArgs.from_cli_args",
        _wrap_from_cli_args,
        "copies the --kv-eviction* flags into additional_config['kv_eviction'] (vLLM copies only its own fields)",
        kind="classmethod",
    ),
    Patch(
        "vllm.engine.arg_utils:EngineArgs.create_engine_config",
        _wrap_create_engine_config,
        "validates additional_config['kv_eviction'] before any engine starts (`vllm serve` and `LLM(...)`), "
        "refuses unsupported features and turns prefix caching off unless asked for",
    ),
    Patch(
        "vllm.sampling_params:SamplingParams._verify_extra_args",
        _wrap_verify_extra_args,
        "validates per-request eviction settings (vllm_xargs) where the request is built, so bad values get a 400",
    ),
    Patch(
        "vllm.v1.engine.input_processor:InputProcessor._validate_params",
        _wrap_validate_params,
        "validates a pooling request's per-request eviction settings (PoolingParams.extra_kwargs) in the client, "
        "as the patch above does for SamplingParams",
    ),
    Patch(
        "vllm.model_executor.layers.linear:UnquantizedLinearMethod.process_weights_after_loading",
        _wrap_linear_process_weights,
        "keeps ReST-KV's per-head o_proj factors before the CPU backend repacks the weight and drops it",
    ),
    Patch(
        "vllm.v1.engine.core:get_kv_cache_configs",
        _wrap_get_kv_cache_configs,
        "(engine core start-up, the name core.py imported) makes the engine config known to the check below ...",
    ),
    Patch(
        "vllm.v1.core.kv_cache_utils:_check_enough_kv_cache_memory",
        _wrap_check_enough_kv_cache_memory,
        "... which, with eviction on, requires the KV cache to hold what one request holds at most (budget + one "
        "chunk) instead of --max-model-len: inputs longer than the cache are served (engine/capacity.py)",
    ),
    Patch(
        "vllm.v1.core.sched.scheduler:Scheduler.__init__",
        _wrap_scheduler_init,
        "creates the scheduler-side eviction state (E per request, stats) and hands it to the KV cache manager",
    ),
    Patch(
        "vllm.v1.engine.core:EngineCore.preprocess_add_request",
        _wrap_preprocess_add_request,
        "refuses a request whose own eviction settings the KV cache cannot hold (one the API server did not check: "
        "offline LLM); vLLM answers it with an error instead of it blocking the queue forever",
    ),
    Patch(
        "vllm.v1.core.kv_cache_manager:KVCacheManager.allocate_slots",
        _wrap_allocate_slots,
        "admission by what a request will hold: budget + one chunk for an evicting request instead of its whole "
        "prompt (vLLM's scheduler_reserve_full_isl check); unchanged for requests that never evict",
    ),
    Patch(
        "vllm.v1.core.kv_cache_manager:KVCacheManager.prefix_cache_lookup_enabled",
        _wrap_prefix_cache_lookup_enabled,
        "with --enable-prefix-caching, a request that may be compacted never reads the prefix cache (compaction "
        "rewrites its first blocks in place: they must not be shared); it is not counted in the hit-rate stats",
    ),
    Patch(
        "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.cache_blocks",
        _wrap_cache_blocks,
        "... and never writes it (a compacted block must never be found by its hash)",
    ),
    Patch(
        "vllm.v1.core.sched.scheduler:Scheduler.update_from_output",
        _wrap_update_from_output,
        "frees the tail blocks the worker compacted away, before vLLM processes the step's output",
    ),
    Patch(
        "vllm.v1.core.sched.scheduler:Scheduler.make_stats",
        _wrap_make_stats,
        "puts the evictions since the last step and the token gauges into SchedulerStats.restkv for the API "
        "server's stat logger (vllm_restkv.metrics); the field itself is added by add_scheduler_stats_field()",
    ),
    Patch(
        "vllm.v1.core.sched.scheduler:Scheduler._reserve_prefill_lookahead",
        _wrap_reserve_prefill_lookahead,
        "the last word on a prefill chunk's size before blocks are allocated (running and waiting requests): "
        "evicting requests' chunks end at multiples of the chunk size, so eviction points do not depend on load",
    ),
    Patch(
        "vllm.v1.core.sched.scheduler:Scheduler._free_request_blocks",
        _wrap_free_request_blocks,
        "forgets E when a request finishes, is aborted or preempted (preemption recomputes from scratch)",
    ),
    Patch(
        "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager.get_num_blocks_to_allocate",
        _wrap_get_num_blocks_to_allocate,
        "block counts use physical length (logical - E), else the freed tail would be re-allocated at once",
    ),
    Patch(
        "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager.allocate_new_blocks",
        _wrap_allocate_new_blocks,
        "same as get_num_blocks_to_allocate, for the allocation itself",
    ),
    Patch(
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner.__init__",
        _wrap_runner_init,
        "tells the worker process the server's eviction settings before it decodes any request's SamplingParams "
        "(the CPU runner subclasses this one)",
    ),
    Patch(
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner._update_states",
        _wrap_update_states,
        "creates the worker state; forgets finished/preempted/resumed requests before vLLM updates its batch",
    ),
    Patch(
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner._prepare_inputs",
        _wrap_prepare_inputs,
        "plans evictions and query capture; subtracts E from seq_lens after vLLM computed them",
    ),
    Patch(
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner._pool",
        _wrap_pool,
        "the pooler sees logical seq_lens: it marks a request finished when seq_len reaches the prompt length",
    ),
    Patch(
        "vllm.v1.worker.block_table:BlockTable.compute_slot_mapping",
        _wrap_compute_slot_mapping,
        "new tokens are written at physical slots (position - E); RoPE positions stay logical",
    ),
    Patch(
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner.sample_tokens",
        _wrap_step_output,
        "after the step's forward: check the query capture, score, compact, truncate the row and attach the report "
        "to ModelRunnerOutput",
    ),
    Patch(
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model",
        _wrap_step_output,
        "same, for steps whose output comes straight from execute_model (pooling models)",
    ),
]

# Applied in the `vllm serve` process only, when it builds its argument parser (see _wrap_add_cli_args).
SERVE_PATCHES: list[Patch] = [
    Patch(
        "vllm.v1.engine.core_client:MPClient.shutdown",
        _wrap_client_shutdown,
        "notes that the engine core died (its client is shut down with the engine already marked dead) ...",
    ),
    Patch(
        "vllm.entrypoints.cli.serve:ServeSubcommand.cmd",
        _wrap_serve_cmd,
        "... and then `vllm serve` exits with status 1 instead of vLLM 0.32's 0, so supervisors see a failure",
        kind="staticmethod",
    ),
]

_applied: set[str] = set()


def _resolve(target: str) -> tuple[Any, str, Any]:
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *owners, attr = path.split(".")
    for name in owners:
        owner = getattr(owner, name)
    if attr not in vars(owner):
        raise RuntimeError(
            f"vllm-restkv cannot patch {target}: it does not exist in this vLLM. "
            f"This plugin supports only the vLLM version named in vllm_restkv/version.py."
        )
    return owner, attr, vars(owner)[attr]


def apply_all(patches: list[Patch] | None = None) -> None:
    """Apply every patch (PATCHES, or the list given) once per process (idempotent)."""
    for patch in PATCHES if patches is None else patches:
        if patch.target in _applied:
            continue
        owner, attr, raw = _resolve(patch.target)
        if patch.kind == "staticmethod":
            setattr(owner, attr, staticmethod(patch.make_wrapper(raw.__func__)))
        elif patch.kind == "classmethod":
            setattr(owner, attr, classmethod(patch.make_wrapper(raw.__func__)))
        else:
            setattr(owner, attr, patch.make_wrapper(raw))
        _applied.add(patch.target)
    if patches is not None:
        return
    if "SchedulerStats.restkv" not in _applied:
        add_scheduler_stats_field()
        _applied.add("SchedulerStats.restkv")
    if "attention-backends" not in _applied:
        from vllm_restkv.engine import attention_registry

        attention_registry.register_backends()
        _applied.add("attention-backends")


def applied() -> list[str]:
    return sorted(_applied)
