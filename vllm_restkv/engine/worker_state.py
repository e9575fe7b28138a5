"""Worker side of eviction: decide, score, compact, truncate the block-table row, report to the scheduler.

One `WorkerEviction` lives in each worker process, next to its model runner. Per step:

1. `before_update_states`: forget requests that finished or were preempted (a preempted request recomputes from
   scratch, so its evicted count E goes back to 0 and it is evicted again at the same kinds of points).
2. `before_prepare_inputs`: per batch row, E (logical - physical length) for the slot mapping and `seq_lens`, the
   rows whose queries the attention layers must capture, and which requests reach an eviction point this step.
3. attention layers call `capture_queries` (see attention.py).
4. `after_step`: for each request at an eviction point, per layer: read K/V, let the policy pick `budget` tokens
   per KV head, gather them into the request's first blocks, then truncate the row to those blocks. The report
   (request -> E, blocks kept) rides on ModelRunnerOutput to the scheduler, which frees the tail blocks.

Positions stay logical (RoPE, sampling, `num_computed_tokens`); slot mapping and attention lengths use physical
lengths (logical - E). Physical order per KV head is always ascending logical position (kept indices are sorted and
new tokens append), so the newest `window` tokens are the last `window` slots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any

import numpy as np
import torch

from vllm_restkv import kernel_choice
from vllm_restkv.config import KVEvictionConfig, KVEvictionConfigError, evicts_during_prefill
from vllm_restkv.engine import kv_layout

logger = logging.getLogger("vllm.restkv")

REPORT_ATTR = "restkv_report"  # attribute set on ModelRunnerOutput
_current: WorkerEviction | None = None


def current() -> WorkerEviction | None:
    return _current


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def ends_this_step(cached: Any, end: int) -> bool:
    """Whether the token sampled in this step (after `end` computed tokens) is the request's last one by
    max_tokens: an eviction after it would only compact KV that the request is about to release (a one-token verdict
    after a long prompt, or a decode eviction that falls on the last step)."""
    max_tokens = getattr(cached.sampling_params, "max_tokens", None)
    return max_tokens is not None and end + 1 >= cached.num_prompt_tokens + max_tokens


@dataclasses.dataclass
class LayerInfo:
    name: str
    index: int
    kv_cache: torch.Tensor
    o_proj_weight: torch.Tensor | None
    wo_factor: torch.Tensor | None = None


@dataclasses.dataclass
class RequestState:
    slot: int  # row of the query ring buffer
    policy_name: str
    budget: int
    during_prefill: bool = True  # evicted at chunk boundaries (else once, after the whole prompt)
    evicted: int = 0  # E = logical length - physical length
    n_kept: int = 0  # physical slots that hold compacted tokens (their positions are in kept_positions)
    kept_positions: torch.Tensor | None = None  # [num_layers, H_kv, n_kept]
    layer_state: list[dict] = dataclasses.field(default_factory=list)
    evictions: int = 0

    @property
    def enabled(self) -> bool:
        return self.policy_name != "none"


@dataclasses.dataclass
class PlannedEviction:
    req_id: str
    row: int
    logical_end: int
    physical_end: int
    phase: str  # "prefill" (chunk boundary or end of prefill) or "decode"
    mid_prompt: bool = False  # a chunk boundary before the prompt's last chunk (LayerKV.mid_prompt)


def extra_args(request: Any) -> dict | None:
    """A request's per-request settings (a scheduler `Request` or a runner's cached request state): the
    `vllm_xargs` of a generating request (SamplingParams.extra_args), or PoolingParams.extra_kwargs of a pooling one
    (where /v1/moderations puts its `vllm_xargs`; vLLM's own pooling endpoints set none of our keys there)."""
    sampling_params = getattr(request, "sampling_params", None)
    if sampling_params is not None:
        return getattr(sampling_params, "extra_args", None)
    return getattr(getattr(request, "pooling_params", None), "extra_kwargs", None)


def request_overrides(extra: dict | None, config: KVEvictionConfig) -> tuple[str, int]:
    """Policy and budget for one request: server settings, overridden by its `extra_args(request)` when allowed.

    The API server validates these (and answers 400); here they are trusted but re-checked cheaply.
    """
    extra = extra or {}
    policy, budget = config.policy, config.budget
    if not config.allow_request_override:
        return policy, budget
    if "kv_eviction" in extra:
        policy = str(extra["kv_eviction"]).strip().lower()
    if "kv_eviction_budget" in extra:
        budget = int(extra["kv_eviction_budget"])
    return policy, budget


def prefill_stride(scheduler_config: Any) -> int:
    """Prompts are evicted at multiples of this many tokens (and at their end): the chunked-prefill chunk size.
    The scheduler never lets an evicting request's chunk cross such a multiple (scheduler_state.align_chunk), so
    under load a chunk may be shorter, but eviction points stay where they would be on an idle server."""
    return max(int(scheduler_config.max_num_batched_tokens), 1)


def decode_slack(budget: int, interval: int, block_size: int) -> int:
    """Decode steps between evictions back to `budget`: at least `interval` (0 = never), rounded up so that the
    request's last KV block fills first. Evicting earlier would free no block and only cost scoring; the most
    blocks a request holds, ceil((budget + interval) / block_size), is the same either way."""
    if interval <= 0:
        return 0
    return cdiv(budget + interval, block_size) * block_size - budget


class WorkerEviction:
    def __init__(self, runner: Any, config: KVEvictionConfig):
        self.runner = runner
        self.config = config
        self.window = config.window
        self.prefill_stride = prefill_stride(runner.scheduler_config)
        self.requests: dict[str, RequestState] = {}
        self.free_slots: list[int] = []
        self.next_slot = 0
        self.layers: dict[str, LayerInfo] | None = None
        self.layer_list: list[LayerInfo] = []
        self.layout = None
        self.triton_compaction = False  # compaction by kernels/compact_gather.py (set with the layout)
        self.ring: torch.Tensor | None = None  # [num_layers, slots * window, H, d]
        self.capture_token_idx: torch.Tensor | None = None
        self.capture_ring_idx: torch.Tensor | None = None
        self.plan: list[PlannedEviction] = []
        self.captured_tokens = 0  # tokens whose queries were captured, all steps (tests check requests that skip it)
        self.captured_layers = 0  # layers whose attention captured queries in this step (check_capture)
        self.policies: dict[str, Any] = {}
        self.block_size = runner.cache_config.block_size
        self.max_model_len = runner.max_model_len
        device = getattr(runner, "device", None)
        if device is not None and torch.device(device).type == "cuda" and config.kernels != "torch":
            kernel_choice.verify(device)  # at start-up: a kernel that fails here must not score the first request

    # ---------- lifecycle ----------
    def _policy(self, name: str):
        if name not in self.policies:
            from vllm_restkv.policies import get_policy

            self.policies[name] = get_policy(name, kernels=self.config.kernels, **self.config.policy_settings())
        return self.policies[name]

    def _slot(self) -> int:
        if self.free_slots:
            return self.free_slots.pop()
        self.next_slot += 1
        if self.ring is not None and self.next_slot * self.window > self.ring.shape[1]:
            self._grow_ring(self.next_slot)
        return self.next_slot - 1

    def _drop(self, req_id: str) -> None:
        state = self.requests.pop(req_id, None)
        if state is not None:
            self.free_slots.append(state.slot)

    def before_update_states(self, scheduler_output: Any) -> None:
        for req_id in scheduler_output.finished_req_ids:
            self._drop(req_id)
        for req_id in getattr(scheduler_output, "preempted_req_ids", None) or ():
            self._drop(req_id)
        for req_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
            self._drop(req_id)

    def _state_for(self, req_id: str) -> RequestState:
        state = self.requests.get(req_id)
        if state is None:
            req = self.runner.requests[req_id]
            extra = extra_args(req)
            policy, budget = request_overrides(extra, self.config)
            state = RequestState(slot=self._slot(), policy_name=policy, budget=budget,
                                 during_prefill=evicts_during_prefill(extra, self.config))
            self.requests[req_id] = state
        return state

    # ---------- per step, before the forward ----------
    def before_prepare_inputs(self, num_scheduled_tokens: np.ndarray) -> None:
        runner = self.runner
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        offsets = np.zeros(num_reqs, dtype=np.int64)
        token_idx: list[np.ndarray] = []
        ring_idx: list[np.ndarray] = []
        self.plan = []
        self.captured_layers = 0
        w = self.window
        start = 0
        cfg = self.config
        for row in range(num_reqs):
            req_id = batch.req_ids[row]
            sched = int(num_scheduled_tokens[row])
            state = self._state_for(req_id)
            computed = int(batch.num_computed_tokens_cpu[row])
            end = computed + sched
            offsets[row] = state.evicted
            if state.enabled and sched > 0 and self._may_exceed_budget(req_id, state):
                first = max(computed, end - w)
                pos = np.arange(first, end)
                token_idx.append(start + (pos - computed))
                ring_idx.append(state.slot * w + pos % w)
                physical_end = end - state.evicted
                if physical_end > state.budget:
                    cached = runner.requests[req_id]
                    num_prompt = cached.num_prompt_tokens
                    phase = None
                    if end < num_prompt:
                        # only at multiples of the chunk size (the scheduler aligns chunks to them), so that
                        # where a prompt is evicted never depends on what else was scheduled with it
                        aligned = end % self.prefill_stride == 0
                        phase = "prefill" if state.during_prefill and aligned else None
                    elif cached.pooling_params is not None:
                        phase = None  # a pooling request ends with its last chunk: nothing left to make room for
                    elif computed < num_prompt:
                        phase = "prefill" if cfg.evict_after_prefill else None
                    elif (cfg.decode_interval and physical_end - state.budget
                          >= decode_slack(state.budget, cfg.decode_interval, self.block_size)):
                        phase = "decode"
                    if phase is not None and not ends_this_step(cached, end):
                        self.plan.append(PlannedEviction(req_id, row, end, physical_end, phase,
                                                         mid_prompt=end < num_prompt))
            start += sched
        self.row_offsets = offsets
        if token_idx:
            self.capture_token_idx = torch.from_numpy(np.concatenate(token_idx))
            self.captured_tokens += len(self.capture_token_idx)
            self.capture_ring_idx = torch.from_numpy(np.concatenate(ring_idx))
        else:
            self.capture_token_idx = self.capture_ring_idx = None

    def _may_exceed_budget(self, req_id: str, state: RequestState) -> bool:
        """False for a request that can never outgrow its budget (prompt + max_tokens <= budget): it is never
        evicted, so its queries are not captured and a server with a budget above every request's length costs
        nothing per step. Checked every step: a streaming-input request's prompt may grow."""
        if state.evicted:
            return True
        cached = self.runner.requests[req_id]
        if cached.pooling_params is not None:
            most = cached.num_prompt_tokens
        else:
            max_tokens = getattr(cached.sampling_params, "max_tokens", None)
            most = cached.num_prompt_tokens + max_tokens if max_tokens is not None else self.max_model_len
        return min(most, self.max_model_len) > state.budget

    def token_offsets(self, query_start_loc: torch.Tensor, num_reqs: int, num_tokens: int) -> torch.Tensor | None:
        """E for every scheduled token (for the slot mapping), or None when nothing was evicted."""
        offsets = getattr(self, "row_offsets", None)
        if offsets is None or not offsets[:num_reqs].any():
            return None
        counts = (query_start_loc[1 : num_reqs + 1] - query_start_loc[:num_reqs]).cpu()
        per_token = torch.repeat_interleave(torch.from_numpy(offsets[:num_reqs]), counts)
        return per_token[:num_tokens].to(query_start_loc.device)

    def after_prepare_inputs(self) -> None:
        """Attention lengths are physical: subtract E from seq_lens (device and CPU copies)."""
        offsets = getattr(self, "row_offsets", None)
        if offsets is None or not offsets.any():
            return
        runner = self.runner
        n = len(offsets)
        e = torch.from_numpy(offsets).to(runner.seq_lens.dtype)
        runner.optimistic_seq_lens_cpu[:n] -= e.to(runner.optimistic_seq_lens_cpu.dtype)
        runner.seq_lens[:n] -= e.to(runner.seq_lens.device)

    @contextlib.contextmanager
    def logical_seq_lens(self):
        """`optimistic_seq_lens_cpu` holds logical lengths inside this block (the pooler compares them with the
        prompt lengths to decide which requests finished their prefill)."""
        offsets = getattr(self, "row_offsets", None)
        if offsets is None or not offsets.any():
            yield
            return
        lens = self.runner.optimistic_seq_lens_cpu
        e = torch.from_numpy(offsets).to(lens.dtype)
        lens[: len(offsets)] += e
        try:
            yield
        finally:
            lens[: len(offsets)] -= e

    # ---------- during the forward ----------
    def _init_layers(self) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        forward_context = self.runner.compilation_config.static_forward_context
        model = self.runner.get_model()
        infos = []
        for name, layer in forward_context.items():
            kv = getattr(layer, "kv_cache", None)
            if kv is None or not hasattr(layer, "impl"):
                continue
            cache = kv[0] if isinstance(kv, (list, tuple)) else kv
            if cache is None or cache.numel() == 0:
                continue
            if getattr(layer.impl, "sliding_window", None) not in (None, -1, (-1, -1)):
                raise KVEvictionConfigError(
                    f"vllm-restkv: layer {name} uses sliding-window attention, which eviction does not support "
                    f"yet; use --kv-eviction none for this model."
                )
            weight = factor = None
            try:
                o_proj = getattr(model.get_submodule(name.rsplit(".", 1)[0]), "o_proj", None)
            except AttributeError:
                o_proj = None
            if o_proj is not None:
                factor = getattr(o_proj, "restkv_wo_factor", None)
                w = getattr(o_proj, "weight", None)
                weight = w if w is not None and w.dim() == 2 and w.numel() > 0 else None
            infos.append(LayerInfo(name, extract_layer_index(name), cache, weight, factor))
        infos.sort(key=lambda i: i.index)
        self.layer_list = infos
        self.layers = {i.name: i for i in infos}
        self.ring_row = {i.name: row for row, i in enumerate(infos)}
        if not infos:
            raise RuntimeError("vllm-restkv: no attention layers with a KV cache found")
        if infos[0].kv_cache.device.type == "cpu":
            layer0 = forward_context[infos[0].name]
            _, h_kv, bs, two_d = infos[0].kv_cache.shape
            self.layout = kv_layout.probe_cpu_layout(infos[0].kv_cache.dtype, h_kv, two_d // 2, bs,
                                                     getattr(layer0, "isa", "vec"))
        else:
            self.layout = kv_layout.FlashKVLayout
        self.triton_compaction = (hasattr(self.layout, "compact_in_place")
                                  and kernel_choice.use_triton(self.config.kernels, infos[0].kv_cache))

    def _grow_ring(self, slots: int) -> None:
        old = self.ring
        num_layers, _, h, d = old.shape
        ring = old.new_zeros(num_layers, max(slots, 2 * old.shape[1] // self.window) * self.window, h, d)
        ring[:, : old.shape[1]] = old
        self.ring = ring

    def capture_queries(self, layer_name: str, query: torch.Tensor) -> None:
        if self.capture_token_idx is None:
            return
        if self.layers is None:
            self._init_layers()
        row = self.ring_row.get(layer_name)
        if row is None:
            return
        if self.ring is None:
            h, d = query.shape[-2], query.shape[-1]
            slots = max(self.next_slot, 8)
            self.ring = torch.zeros(len(self.layer_list), slots * self.window, h, d, dtype=query.dtype,
                                    device=query.device)
        if self.capture_token_idx.device != query.device:
            self.capture_token_idx = self.capture_token_idx.to(query.device)
            self.capture_ring_idx = self.capture_ring_idx.to(query.device)
        q = query.view(query.shape[0], self.ring.shape[2], self.ring.shape[3])
        self.ring[row].index_copy_(0, self.capture_ring_idx, q[self.capture_token_idx])
        self.captured_layers += 1

    # ---------- after the forward ----------
    def check_capture(self) -> None:
        """After each forward that should have captured queries (any step, not only evicting ones: a window spans
        decode steps): every attention layer must have. Where the attention ran without its Python wrapper (e.g. a
        replayed CUDA graph), a later eviction would score stale or zero queries and keep the wrong tokens: stop."""
        if self.capture_token_idx is None:
            return
        if self.layers is None:
            self._init_layers()
        if self.captured_layers < len(self.layer_list):
            raise RuntimeError(
                f"vllm-restkv: only {self.captured_layers} of {len(self.layer_list)} attention layers captured their "
                f"queries in this step, so eviction could not score them; the attention ran without its Python "
                f"wrapper (a captured graph?). Start the server with --enforce-eager.")

    def after_step(self, output: Any) -> None:
        if not self.plan:
            return
        if self.layers is None:
            self._init_layers()
        report: dict[str, tuple[int, int]] = {}
        stats = {"evicted_tokens": 0, "freed_blocks": 0, "events": {}, "scoring_seconds": 0.0,
                 "compaction_seconds": 0.0, "kept_ratio": [], "records": []}
        for item in self.plan:
            report[item.req_id] = self._evict(item, stats)
        self.plan = []
        setattr(output, REPORT_ATTR, {"requests": report, "stats": stats, "policy": self.config.policy})

    def _evict(self, item: PlannedEviction, stats: dict) -> tuple[int, int]:
        runner = self.runner
        state = self.requests[item.req_id]
        policy = self._policy(state.policy_name)
        from vllm_restkv.policies.base import LayerKV

        bs = self.block_size
        req_state = runner.requests[item.req_id]
        block_list = list(req_state.block_ids[0])
        n = item.physical_end
        device = self.layer_list[0].kv_cache.device
        blocks = torch.tensor(block_list[: cdiv(n, bs)], dtype=torch.int64, device=device)
        budget = state.budget
        w = self.window
        q_n = min(w, item.logical_end)
        q_pos = torch.arange(item.logical_end - q_n, item.logical_end, device=device)
        ring_rows = state.slot * w + q_pos % w
        num_layers = len(self.layer_list)
        if len(state.layer_state) != num_layers:
            state.layer_state = [{} for _ in range(num_layers)]
        new_positions = []
        t_score = t_compact = 0.0
        for li, info in enumerate(self.layer_list):
            t0 = time.perf_counter()
            k, v = self.layout.read(info.kv_cache, blocks, n)
            h_kv = k.shape[0]
            fresh = torch.arange(state.n_kept, n, device=device) + state.evicted
            fresh = fresh.unsqueeze(0).expand(h_kv, -1)
            positions = fresh if state.kept_positions is None else torch.cat([state.kept_positions[li], fresh], 1)
            query = self.ring[li, ring_rows].transpose(0, 1) if self.ring is not None else None
            if policy.needs_o_proj and info.wo_factor is None:
                if info.o_proj_weight is None:
                    raise RuntimeError(f"vllm-restkv: {state.policy_name} needs o_proj of {info.name}, not found")
                from vllm_restkv.scoring import wo_factors

                info.wo_factor = wo_factors(info.o_proj_weight.float(), query.shape[0])
            kv = LayerKV(query=query, key=k, value=v, positions=positions, o_proj_weight=info.o_proj_weight,
                         layer_idx=info.index, num_layers=num_layers, wo_factor=info.wo_factor,
                         state=state.layer_state[li], mid_prompt=item.mid_prompt)
            kept = policy.select(kv, budget)
            policy.after_select(kv, kept)
            t1 = time.perf_counter()
            kv_layout.compact(self.layout, info.kv_cache, blocks, k, v, kept, triton=self.triton_compaction)
            new_positions.append(positions.gather(1, kept))
            t_score += t1 - t0
            t_compact += time.perf_counter() - t1
        kept_n = new_positions[0].shape[1]
        state.kept_positions = torch.stack(new_positions)
        state.n_kept = kept_n
        state.evicted = item.logical_end - kept_n
        state.evictions += 1
        keep_blocks = cdiv(kept_n, bs)
        new_ids = block_list[:keep_blocks]
        req_state.block_ids = (new_ids,) + tuple(req_state.block_ids[1:])
        runner.input_batch.block_table.add_row(req_state.block_ids, item.row)
        stats["evicted_tokens"] += n - kept_n
        stats["freed_blocks"] += len(block_list) - keep_blocks
        stats["events"][item.phase] = stats["events"].get(item.phase, 0) + 1
        stats["scoring_seconds"] += t_score
        stats["compaction_seconds"] += t_compact
        stats["kept_ratio"].append(kept_n / max(item.logical_end, 1))
        # one record per eviction for the metrics (vllm_restkv.metrics.RECORD_FIELDS)
        stats["records"].append((state.policy_name, item.phase, n - kept_n, len(block_list) - keep_blocks,
                                 t_score, t_compact, kept_n / max(item.logical_end, 1)))
        return state.evicted, keep_blocks


def install(runner: Any) -> WorkerEviction | None:
    """Create the worker state for this runner if eviction is configured (called after the runner is built)."""
    global _current
    # (this process's request checks learnt the server's settings when the runner was built: patches._wrap_runner_init)
    config = KVEvictionConfig.from_vllm_config(runner.vllm_config)
    if not config.enabled:  # requests cannot switch eviction on when the server runs without it
        _current = runner.restkv = None
        return None
    _current = WorkerEviction(runner, config)
    logger.info("vllm-restkv: KV eviction on in the worker: policy=%s budget=%d", config.policy, config.budget)
    runner.restkv = _current
    return _current
