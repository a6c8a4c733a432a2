"""Checkpoints: resolving a source (source.py), reading its tensors (safetensors.py, gguf/), building the
model from them (loader.py), and what can be loaded on this machine (listing.py)."""
