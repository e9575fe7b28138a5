"""vllm-restkv: ReST-KV KV-cache eviction for vLLM's V1 engine."""

__version__ = "0.1.0"
