"""Runs the real vLLM engine in one process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and prints a JSON result.

Used by the engine tests as a subprocess: `python tests/engine_driver.py '<json spec>'`. In-process mode gives
access to the scheduler's block pool, so tests can check the allocator's own free-block count per step.
Spec keys: model, kv_eviction (dict or None), llm (extra LLM kwargs), prompts (list of token-id lists or strings),
max_tokens, extra_args (list, per prompt, or None), logprobs (int), abort_after_steps (optional), one_at_a_time
(run the prompts one after another instead of as one batch), params (list, per prompt: SamplingParams keyword
arguments over the defaults), top_logprobs (return every position's top-`logprobs` distribution as [id, logprob] pairs),
count_triton_scores (report how often the engine scored with the Triton kernel, `triton_score_calls`), env (variables
set before vLLM is imported, e.g. TRITON_INTERPRET), skip_query_capture (the attention layers run without capturing
their queries, as a replayed graph would: the worker must refuse to evict).
Engines run eager (`enforce_eager`, overridable through the spec's `llm`); VLLM_RESTKV_TEST_COMPILE=1 makes vLLM's
default compilation the default instead (`VLLM_RESTKV_TEST_COMPILE=1 pytest tests/test_engine_eviction.py`:
every engine test with a compiled model, 15 min here).
"""

from __future__ import annotations

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def main(spec: dict) -> dict:
    os.environ.update(spec.get("env", {}))
    from vllm import LLM, SamplingParams

    triton_calls = [0]
    if spec.get("count_triton_scores"):
        import kernels

        real_score = kernels.restkv_score_triton

        def counted_score(*args, **kwargs):  # RestKV imports it from the package at each call
            triton_calls[0] += 1
            return real_score(*args, **kwargs)

        kernels.restkv_score_triton = counted_score
    if spec.get("skip_query_capture"):
        from vllm_restkv.engine import worker_state

        worker_state.WorkerEviction.capture_queries = lambda self, layer_name, query: None

    llm_kwargs = dict(model=spec["model"], enforce_eager=os.environ.get("VLLM_RESTKV_TEST_COMPILE") != "1",
                      dtype=spec.get("dtype", "float32"), seed=0, max_model_len=spec.get("max_model_len", 4096))
    llm_kwargs.update(spec.get("llm", {}))
    if spec.get("kv_eviction") is not None:
        llm_kwargs["additional_config"] = {"kv_eviction": spec["kv_eviction"]}
    llm = LLM(**llm_kwargs)
    core = llm.llm_engine.engine_core.engine_core
    scheduler = core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    idle_free = pool.get_num_free_blocks()
    trace = {"free_blocks": [], "running": [], "req_blocks": []}
    original_step = core.step_fn

    def traced_step(*args, **kwargs):
        result = original_step(*args, **kwargs)
        trace["free_blocks"].append(pool.get_num_free_blocks())
        trace["running"].append(len(scheduler.running))
        mgr = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
        trace["req_blocks"].append({rid: len(b) for rid, b in mgr.req_to_blocks.items()})
        return result

    core.step_fn = traced_step
    preemptions = [0]
    original_preempt = scheduler._preempt_request

    def counting_preempt(*args, **kwargs):
        preemptions[0] += 1
        return original_preempt(*args, **kwargs)

    scheduler._preempt_request = counting_preempt
    prompts = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in spec["prompts"]]
    extra = spec.get("extra_args") or [None] * len(prompts)
    per_prompt = spec.get("params") or [{}] * len(prompts)
    params = [
        SamplingParams(**{"temperature": 0.0, "max_tokens": spec.get("max_tokens", 16),
                          "logprobs": spec.get("logprobs", 1), "ignore_eos": spec.get("ignore_eos", True),
                          "extra_args": e, **p})
        for e, p in zip(extra, per_prompt)
    ]
    import time

    started = time.perf_counter()
    if spec.get("one_at_a_time"):
        outputs = [llm.generate([p], [sp], use_tqdm=False)[0] for p, sp in zip(prompts, params)]
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    generate_seconds = time.perf_counter() - started
    restkv = getattr(scheduler, "restkv", None)
    result = {
        "tokens": [o.outputs[0].token_ids for o in outputs],
        "texts": [o.outputs[0].text for o in outputs],
        "logprobs": [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outputs],
        "top_logprobs": [[[[t, lp.logprob] for t, lp in pos.items()] for pos in o.outputs[0].logprobs]
                         for o in outputs] if spec.get("top_logprobs") else None,
        "idle_free_blocks": idle_free,
        "final_free_blocks": pool.get_num_free_blocks(),
        "num_gpu_blocks": scheduler.kv_cache_config.num_blocks,
        "block_size": scheduler.block_size,
        "trace": trace,
        "evicted_left": dict(restkv.evicted) if restkv else None,
        "stats": restkv.stats.__dict__ if restkv else None,
        "max_running": max(trace["running"] or [0]),
        "generate_seconds": generate_seconds,
        "captured_query_tokens": worker_eviction(core).captured_tokens if restkv else None,
        "preemptions": preemptions[0],
        "triton_score_calls": triton_calls[0],
        "enforce_eager": llm.llm_engine.vllm_config.model_config.enforce_eager,
        "compilation_mode": int(llm.llm_engine.vllm_config.compilation_config.mode),
        "cudagraph_mode": str(getattr(llm.llm_engine.vllm_config.compilation_config.cudagraph_mode, "name", None)),
    }
    return result


def worker_eviction(core):
    """The worker's eviction state (vllm_restkv.engine.worker_state) of an in-process engine on one worker."""
    runner = core.model_executor.driver_worker.worker.model_runner
    return runner.restkv


if __name__ == "__main__":
    arg = sys.argv[1]
    spec = json.loads(open(arg[1:]).read() if arg.startswith("@") else arg)  # "@file" for large specs
    result = main(spec)
    print("RESULT_JSON " + json.dumps(result))
