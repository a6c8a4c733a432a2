"""Weight-only quantisation: int8 / int4 linear and embedding layers, swapped in for nn.Linear.

format.py: the packed storage (Packed), shared with GGUF blocks kept packed; schemes.py: weights ->
Packed and which matrix gets which scheme; modules.py: QuantLinear / QuantEmbedding and the matmul
that runs them; checkpoint.py: saved quantised checkpoints.
"""
from .checkpoint import METADATA_KEY, quantized_state, regroup, save_quantized
from .format import HIGH_BITS, Packed, dequantize, kernel_fits, pack_nibbles, pack_q6, unpack_nibbles, unpack_q6
from .modules import DENSE_TILE, KERNEL_MAX_ROWS, QuantEmbedding, QuantLinear, install, linears, matmul, on_kernel, packed_bytes
from .schemes import (SCHEMES, int4_search, is_quantizable, quantize_int4, quantize_int6, quantize_int8, quantize_weight,
                      scheme_for)  # fmt: skip

__all__ = [
    "METADATA_KEY", "quantized_state", "regroup", "save_quantized",
    "HIGH_BITS", "Packed", "dequantize", "kernel_fits", "pack_nibbles", "pack_q6", "unpack_nibbles", "unpack_q6",
    "DENSE_TILE", "KERNEL_MAX_ROWS", "QuantEmbedding", "QuantLinear", "install", "linears", "matmul", "on_kernel",
    "packed_bytes", "SCHEMES", "int4_search", "is_quantizable", "quantize_int4", "quantize_int6", "quantize_int8",
    "quantize_weight", "scheme_for",
]  # fmt: skip
