"""GGUF (llama.cpp) files."""
from .reader import (SUPPORTED_TYPES, GGUFFile, GGUFTensor, config_from_gguf, dequantize, expected_shapes, gguf_name,
                     hf_name, is_norm, load_gguf, read_gguf)  # fmt: skip
