# The two commands a new user needs (both set everything up first, if needed):
#   make serve   serve SmolLM2-135M-Instruct with ReST-KV eviction on 127.0.0.1:$(PORT)
#   make test    run the whole test suite
VENV ?= .venv
PORT ?= 8000
POLICY ?= restkv
BUDGET ?= 512
KV_CACHE_GIB ?= 2
MAX_MODEL_LEN ?= 8192
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup models serve test clean-venv

setup:
	@./deploy/setup_env.sh

models: setup
	@$(VENV)/bin/vllm-restkv model prepare --name smollm2 >/dev/null

serve: setup
	MODEL_DIR=$$($(VENV)/bin/vllm-restkv model prepare --name smollm2) && \
	VLLM_CPU_KVCACHE_SPACE=$(KV_CACHE_GIB) exec $(VENV)/bin/vllm serve "$$MODEL_DIR" \
	  --served-model-name SmolLM2-135M-Instruct --host 127.0.0.1 --port $(PORT) \
	  --max-model-len $(MAX_MODEL_LEN) --enforce-eager \
	  --kv-eviction $(POLICY) --kv-eviction-budget $(BUDGET)

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
