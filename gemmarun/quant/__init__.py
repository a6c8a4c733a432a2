"""Weight-only quantisation: int8 / int4 linear and embedding layers, swapped in for nn.Linear.

format.py: the packed storage (Packed), shared with GGUF blocks kept packed; schemes.py: weights ->
Packed and which matrix gets which scheme; modules.py: QuantLinear / QuantEmbedding and the matmul
that runs them; prefill.py: which GEMM a prefill chunk takes (the kernel or PyTorch's, timed on
this machine); gemm.py: PyTorch's paths; checkpoint.py: saved quantised checkpoints.

Every name below is importable from gemmarun.quant. A submodule loads when one of its names is first
used, so `import gemmarun` (whose model needs only modules.py and format.py) does not load the
schemes and checkpoint code: one module costs about a millisecond to import.
"""

from importlib import import_module

_WHERE = {
    **dict.fromkeys(("HIGH_BITS", "Packed", "dequantize", "kernel_fits", "pack_nibbles", "pack_q6", "q6_from_canonical",
                     "q6_to_canonical", "unpack_nibbles", "unpack_q6"), "format"),
    **dict.fromkeys(("SCHEMES", "int4_search", "is_quantizable", "quantize_int4", "quantize_int6", "quantize_int8",
                     "quantize_weight", "scheme_for"), "schemes"),
    **dict.fromkeys(("DENSE_TILE", "KERNEL_MAX_ROWS", "QuantEmbedding", "QuantLinear", "install", "linears", "matmul",
                     "on_kernel", "packed_bytes"), "modules"),
    **dict.fromkeys(("FORMAT_VERSION", "METADATA_KEY", "quantized_state", "regroup", "save_quantized"), "checkpoint"),
}  # fmt: skip

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
