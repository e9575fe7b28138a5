"""Everything that touches vLLM internals. All patches are applied from `patches.apply_all()`."""
