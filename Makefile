# The two commands a new user needs (both set everything up first, if needed):
#   make serve   serve the default moderator (SmolLM2-135M + insult head) with ReST-KV on 127.0.0.1:$(PORT):
#                OpenAI-compatible POST /v1/moderations, vLLM's /classify, /metrics with our eviction metrics
#   make test    run the whole test suite
# Also: make serve-generate (SmolLM2-135M-Instruct, generate runner: /v1/completions, /v1/chat/completions and
# /v1/moderations through a Yes/No prompt).
VENV ?= .venv
PORT ?= 8000
POLICY ?= restkv
BUDGET ?= 512
CHUNK ?= 512
KV_CACHE_GIB ?= 2
MAX_MODEL_LEN ?= 8192
# empty: the dtype this CPU runs natively (bf16 with AVX512-BF16/AMX, else float32; vllm_restkv/cpu.py)
DTYPE ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# vLLM loads endpoint plugins only when VLLM_PLUGINS names them; once set it filters every plugin group
PLUGINS ?= restkv,restkv_metrics,restkv_moderations

.PHONY: setup test-tools models serve serve-generate test bench clean-venv

setup:
	@./deploy/setup_env.sh

# Debian's prometheus package (a real Prometheus server and promtool are part of the tests)
test-tools:
	@./deploy/install_test_tools.sh

models: setup
	@$(VENV)/bin/vllm-restkv model prepare --name moderator >/dev/null

FAST_DTYPE = $(if $(DTYPE),$(DTYPE),$$($(VENV)/bin/python -c 'from vllm_restkv.cpu import fast_cpu_dtype; print(fast_cpu_dtype())'))

serve: setup
	MODEL_DIR=$$($(VENV)/bin/vllm-restkv model prepare --name moderator) && DTYPE=$(FAST_DTYPE) && \
	VLLM_PLUGINS=$(PLUGINS) VLLM_CPU_KVCACHE_SPACE=$(KV_CACHE_GIB) exec $(VENV)/bin/vllm serve "$$MODEL_DIR" --runner pooling \
	  --served-model-name restkv-moderator --host 127.0.0.1 --port $(PORT) \
	  --max-model-len $(MAX_MODEL_LEN) --max-num-batched-tokens $(CHUNK) --enforce-eager --dtype "$$DTYPE" \
	  --kv-eviction $(POLICY) --kv-eviction-budget $(BUDGET)

serve-generate: setup
	MODEL_DIR=$$($(VENV)/bin/vllm-restkv model prepare --name smollm2) && DTYPE=$(FAST_DTYPE) && \
	VLLM_PLUGINS=$(PLUGINS) VLLM_CPU_KVCACHE_SPACE=$(KV_CACHE_GIB) exec $(VENV)/bin/vllm serve "$$MODEL_DIR" \
	  --served-model-name SmolLM2-135M-Instruct --host 127.0.0.1 --port $(PORT) \
	  --max-model-len $(MAX_MODEL_LEN) --enforce-eager --dtype "$$DTYPE" \
	  --kv-eviction $(POLICY) --kv-eviction-budget $(BUDGET)

test: setup test-tools
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The long-context moderation benchmark (issue #5): data set, accuracy, load tests, docs/benchmarks.md + plots
# (about 80 min on 2 CPU cores; BENCH_ARGS="--preset ci" for a few minutes)
bench: setup
	$(VENV)/bin/python loadtest/run_benchmark.py $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
