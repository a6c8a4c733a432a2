"""GGUF (llama.cpp) files: read them (reader), their metadata as a GemmaConfig (config), llama.cpp <->
Hugging Face tensor names (names), blocks decoded (dequant) or re-laid into gemmarun's packed format
(relay), and written back (writer, for tests and benchmarks; not imported here)."""

from .config import config_from_gguf
from .dequant import SUPPORTED_TYPES, dequantize
from .names import expected_shapes, gguf_name, hf_name, is_norm
from .reader import GGUFFile, GGUFTensor, load_gguf, read_gguf

__all__ = ["config_from_gguf", "SUPPORTED_TYPES", "dequantize", "expected_shapes", "gguf_name", "hf_name", "is_norm",
           "GGUFFile", "GGUFTensor", "load_gguf", "read_gguf"]  # fmt: skip
