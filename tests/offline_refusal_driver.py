"""Offline `LLM` on a KV cache smaller than --max-model-len, with a request whose own settings (extra_args) the cache
cannot hold, its SamplingParams built before the engine existed (so before any capacity was known). Prints one JSON
line: what generate did with [that request, a good one] in one batch, then with a good one alone.

    python tests/offline_refusal_driver.py MODEL MULTIPROCESSING(0|1) [--skip-client-check]

--skip-client-check drops the client's capacity check first, so the refusal must come from the engine core.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = sys.argv[2]
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def main() -> None:
    from vllm import LLM, SamplingParams

    bad = SamplingParams(max_tokens=4, temperature=0, extra_args={"kv_eviction": "none"})
    good = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm = LLM(model=sys.argv[1], enforce_eager=True, dtype="float32", seed=0, max_model_len=4096,
              num_gpu_blocks_override=8, max_num_batched_tokens=256,
              additional_config={"kv_eviction": {"policy": "restkv", "budget": 256}})
    if "--skip-client-check" in sys.argv:
        import vllm_restkv.config

        vllm_restkv.config._server_vllm_config = None
    prompt = " ".join(f"item{i % 97} is fine." for i in range(450))  # about 2,700 tokens, 3x the cache
    result = {}
    try:
        outputs = llm.generate([prompt, prompt], [bad, good], use_tqdm=False)
        result["batch"] = [[o.outputs[0].finish_reason, len(o.outputs[0].token_ids)] for o in outputs]
    except Exception as e:  # noqa: BLE001 (reported to the test)
        result["raised"] = f"{type(e).__name__}: {e}"
    after = llm.generate([prompt], [good], use_tqdm=False)[0]
    result["after"] = [after.outputs[0].finish_reason, len(after.outputs[0].token_ids), len(after.prompt_token_ids)]
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
