"""Weight-only quantisation (int8 / int4, GGUF blocks kept packed): see format.py for the storage format."""
from .format import (
    DENSE_TILE, HIGH_BITS, KERNEL_MAX_ROWS, METADATA_KEY, SCHEMES, Packed, QuantEmbedding, QuantLinear, dequantize,
    install, int4_search, is_quantizable, kernel_fits, linears, matmul, on_kernel, pack_nibbles, pack_q6,
    packed_bytes, quantize_int4, quantize_int6, quantize_int8, quantize_weight, quantized_state, regroup,
    save_quantized, scheme_for, unpack_nibbles, unpack_q6,
)  # fmt: skip
