"""The Gemma 2 / Gemma 3 text decoder: config (config.py), the nn modules (gemma.py), the KV cache
(cache.py) and the kernel dispatch chosen once per placement (backend.py)."""
