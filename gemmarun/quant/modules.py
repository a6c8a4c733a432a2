"""Quantised layers: QuantLinear / QuantEmbedding holding a Packed matrix, the matmul that runs it
(the C++ kernel, or a PyTorch GEMM on dequantised tiles: quant/prefill.py chooses, quant/gemm.py
runs), and swapping them into a model."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import qlinear_kernel
from . import gemm, prefill
from .format import Packed, dequantize, kernel_fits

# The kernel takes up to this many rows (a whole default prefill chunk); past it a PyTorch path
# runs. On a 9216x2304 matrix (2 threads, EPYC) the kernel reaches 75-110 GFLOP/s from 4 rows up,
# float32 F.linear 54 at 64 rows and 99 at 512 before paying for dequantised tiles. A 512-token
# int8 2B prefill: 16.1 -> 20.5 tok/s and peak RSS 3267 -> 3044 MB against a limit of 256 rows
# (int4: 15.1 -> 14.1 tok/s, 2624 -> 2292 MB).
KERNEL_MAX_ROWS = 512
DENSE_TILE = gemm.DENSE_TILE


def matmul(x: torch.Tensor, p: Packed) -> torch.Tensor:
    """x (..., K) @ W.T -> (..., N), float32 accumulation, result in x's dtype."""
    return _matmul(x, p.q, p.scales, p.mins, p.group, p.zero, p.bits, kernel_fits(p))


def _path(rows: int, q, scales, mins, group: int, zero: float, bits: int, fits: bool) -> str:
    """The path of one call (quant/prefill.py decides), the matrix given as its fields."""
    kernel = fits and rows <= KERNEL_MAX_ROWS and qlinear_kernel() is not None
    return prefill.path(prefill.kind_of(bits), rows, kernel, bits == 8 and group == q.shape[1] and mins is None and not zero)


def _matmul(x, q, scales, mins, group: int, zero: float, bits: int, fits: bool) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    how = _path(x2.shape[0], q, scales, mins, group, zero, bits, fits) if x2.device.type == "cpu" else "torch-fp32"
    if how == "kernel":
        out = qlinear_kernel()(x2, [q], [scales], [mins], [group], [zero], [bits])[0]
    else:
        out = gemm.run(how, x2, Packed(q, scales, mins, group, zero, bits))
    out = out.view(*shape[:-1], -1)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def linears(x: torch.Tensor, layers) -> list[torch.Tensor]:
    """x through several linear layers that share it (q, k, v; gate, up).

    When all are quantised and the kernel runs them all, one call rounds x once and runs every
    matrix in one parallel region; otherwise each layer runs on its own."""
    kernel = qlinear_kernel()
    rows = x.numel() // x.shape[-1]
    if (kernel is None or x.dtype != torch.float32 or x.device.type != "cpu" or rows > KERNEL_MAX_ROWS
            or not all(on_kernel(m) and _path(rows, *m.kernel_args, m.fits) == "kernel" for m in layers)):  # fmt: skip
        return [m(x) for m in layers]
    return kernel(x.contiguous(), *zip(*(m.kernel_args for m in layers)))


def on_kernel(layer: nn.Module) -> bool:
    """Whether a linear layer's products can run in the kernel (a packed matrix it takes)."""
    return isinstance(layer, QuantLinear) and layer.fits


class _QuantWeight(nn.Module):
    """Holds a Packed matrix as buffers, so state_dict / .to() / safetensors see plain tensors."""

    def __init__(self, p: Packed):
        super().__init__()
        self.register_buffer("qweight", p.q)
        self.register_buffer("scales", p.scales)
        self.register_buffer("mins", p.mins)
        self.group, self.zero, self.bits = p.group, p.zero, p.bits
        self.fits = kernel_fits(p)
        self._args = None

    def _apply(self, fn, recurse=True):
        self._args = None  # .to() and friends replace the buffers
        return super()._apply(fn, recurse)

    @property
    def kernel_args(self) -> tuple:
        """(q, scales, mins, group, zero, bits) as the kernel takes them, kept in a plain attribute:
        reading buffers goes through nn.Module.__getattr__, ~1 us each, ~700 reads a decoded token."""
        if self._args is None:
            self._args = (self.qweight, self.scales, self.mins, self.group, self.zero, self.bits)
        return self._args

    @property
    def packed(self) -> Packed:
        return Packed(*self.kernel_args)  # the same fields, without the buffer lookups

    def scheme(self) -> dict:
        return {"bits": self.bits, "group": self.group, "zero": self.zero, "mins": self.mins is not None,
                "scale_dtype": str(self.scales.dtype).removeprefix("torch.")}  # fmt: skip

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return _matmul(x, *self.kernel_args, self.fits)


class QuantLinear(_QuantWeight):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


class QuantEmbedding(_QuantWeight):
    """A quantised tied embedding: rows for lookup, the whole matrix for the LM head."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        return dequantize(self.packed, flat).view(*ids.shape, -1)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


def install(model: nn.Module, name: str, p: Packed) -> None:
    """Replace the module owning parameter `name` by its quantised form."""
    module_name = name.rsplit(".", 1)[0]
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    cls = QuantEmbedding if child == "embed_tokens" else QuantLinear
    setattr(parent, child, cls(p))


def packed_bytes(model: nn.Module) -> int:
    """Bytes of all weights as stored (packed or dense)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
