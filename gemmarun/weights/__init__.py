"""Checkpoint readers: each yields Hugging Face-named tensors (safetensors.py, gguf.py)."""
