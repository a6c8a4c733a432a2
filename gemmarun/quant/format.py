"""Weight-only quantisation: int8 / int4 linear and embedding layers, swapped in for nn.Linear.

One storage format serves our own quantisation and GGUF blocks kept packed:
    w[n, k] = scale[n, g] * (q[n, k] - zero) + min[n, g],  g = k // group
q8: int8 q (N, K). q4: 4-bit q packed 16 bytes per 32 values, value j in the low nibble of byte j
and value j + 16 in its high nibble (ggml's Q4_0 order). q6: signed 6-bit q (-32..31), 24 bytes per
32 values: the low four bits of q + 32 as q4, then their top two bits in the 64-bit order that
kernels/qlinear.cpp unpacks (see HIGH_BITS). Scales/mins float16 or float32 (N, K // group).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidParameterError
from ..kernels import int4_search_kernel, qlinear_kernel

# Up to this many rows (a whole default prefill chunk) the kernel runs: on a 9216x2304 matrix (2
# threads) it reaches 75-110 GFLOP/s from 4 rows up, float32 F.linear 54 at 64 rows and 99 at 512
# before paying for dequantised tiles. A 512-token int8 2B prefill: 16.1 -> 20.5 tok/s and peak
# RSS 3267 -> 3044 MB against a limit of 256 rows (int4: 15.1 -> 14.1 tok/s, 2624 -> 2292 MB).
KERNEL_MAX_ROWS = 512
DENSE_TILE = 4096  # output rows dequantised at a time on the GEMM path: bounds the scratch memory


@dataclass(frozen=True)
class Packed:
    """One quantised weight matrix in the format above."""

    q: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    group: int
    zero: float
    bits: int  # 8, 6 or 4

    @property
    def in_features(self) -> int:
        return self.q.shape[1] * 8 // self.bits

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scales, self.mins) if t is not None)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K // 2) bytes in the split-nibble order."""
    n, k = q.shape
    blocks = q.to(torch.uint8).view(n, k // 32, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    n, half = b.shape
    blocks = b.view(n, half // 16, 16)
    return torch.stack([blocks & 0x0F, blocks >> 4], dim=2).reshape(n, half * 2)


def _high_bit_positions() -> torch.Tensor:
    """Bit of a q6 block's 64-bit word holding value v's top two bits, for v in 0..31. The kernel
    widens values to int16 words in four 64-bit quarters per register (quarters 0-1: values 2j of
    the first half block, 2-3: of the second; the second register the odd values) and takes each
    quarter's top bits with one shift (see load_block in kernels/qlinear.cpp): each 16-bit field of
    the word holds them at bit 4 + 2 Q for quarter Q of the first register, 12, 14, 0, 2 for the second."""
    slots = ((4, 6, 8, 10), (12, 14, 0, 2))
    pos = torch.empty(32, dtype=torch.int64)
    for r in range(2):
        for quarter in range(4):
            for i in range(4):
                j = 4 * (quarter % 2) + i  # the 16-bit word within its 128-bit lane
                pos[2 * j + 16 * (quarter // 2) + r] = 16 * i + slots[r][quarter]
    return pos


HIGH_BITS = _high_bit_positions()
HIGH_BYTE, HIGH_SHIFT = HIGH_BITS // 8, (HIGH_BITS % 8).to(torch.uint8)  # the same as byte, bit


def pack_q6(q: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """(N, K) values -32..31 -> (N, K // 32 * 24) bytes in the q6 layout, `rows` at a time (a
    256k-row embedding's temporaries would take gigabytes at once)."""
    n, k = q.shape
    out = torch.empty(n, k // 32 * 24, dtype=torch.uint8)
    for r in range(0, n, rows):
        u = ((q[r : r + rows].to(torch.int8).view(torch.uint8) & 63) ^ 32).view(-1, k // 32, 32)  # q + 32: bit 5 flipped
        m = u.shape[0]
        low = pack_nibbles((u & 15).view(m, k)).view(m, k // 32, 16)
        # HIGH_BITS by slices, not a gather (3x faster at load): value v = 16 lane + 8 h + 2 i + r has
        # its bits in byte 2 i + (r xor lane), at bit 2 h + 4 (1 - lane).
        t = (u >> 4).view(m, k // 32, 2, 2, 4, 2)  # (lane, h, i, r)
        first = (t[:, :, 0, 0] << 4) | (t[:, :, 0, 1] << 6)  # (m, nb, i, r): lane 0 lands in byte 2 i + r
        second = (t[:, :, 1, 0] | (t[:, :, 1, 1] << 2)).flip(-1)  # lane 1 in byte 2 i + 1 - r
        out[r : r + m] = torch.cat([low, (first | second).view(m, k // 32, 8)], dim=-1).view(m, k // 32 * 24)
    return out


def unpack_q6(b: torch.Tensor) -> torch.Tensor:
    """(N, K // 32 * 24) bytes -> (N, K) int8 values -32..31."""
    n = b.shape[0]
    blocks = b.reshape(n, -1, 24)
    nb = blocks.shape[1]
    low = unpack_nibbles(blocks[:, :, :16].reshape(n, nb * 16)).view(n, nb, 32)
    high = (blocks[:, :, 16:][:, :, HIGH_BYTE.to(b.device)] >> HIGH_SHIFT.to(b.device)) & 3  # (n, nb, 32)
    return ((low | (high << 4)).view(torch.int8) - 32).view(n, nb * 32)


def quantize_int8(w: torch.Tensor) -> Packed:
    """Symmetric int8, one float32 scale per output channel."""
    w = w.float()
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    q = torch.round(w / torch.where(scale == 0, 1.0, scale)).clamp_(-127, 127).to(torch.int8)
    return Packed(q=q, scales=scale.contiguous(), mins=None, group=w.shape[1], zero=0.0, bits=8)


def quantize_int6(w: torch.Tensor, group: int = 32) -> Packed:
    """Symmetric 6-bit in groups of 32, a float16 scale each (6.5 bits a weight): int4's tied
    embedding / LM head, where on the 270M it matched int8 per channel (perplexity 20.40 vs 20.44
    on 8000 characters) and 4 bits cost +4 points."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n, k // group, dtype=torch.float16)
    for r in range(0, n, 4096):  # float32 copies of a 256k-row embedding would take gigabytes
        rows = slice(r, r + 4096)
        g = w[rows].float().reshape(-1, k // group, group)
        scale[rows] = (g.abs().amax(-1) / 31).half()
        s = scale[rows].float().unsqueeze(-1)
        q[rows] = torch.round(g / torch.where(s == 0, 1.0, s)).clamp_(-32, 31).view(-1, k)
    return Packed(q=pack_q6(q), scales=scale, mins=None, group=group, zero=0.0, bits=6)


def quantize_int4(w: torch.Tensor, group: int = 32, importance: torch.Tensor | None = None) -> Packed:
    """Asymmetric int4 in groups (scale and min in float16, as ggml's Q4_1): 4 + 32 / group bits a weight.

    Each group's scale and min come from a search minimising the weighted rounding error (see
    kernels/quantize.cpp); `importance` (K,), the mean squared input of each column over calibration
    text, weights the error by what the inputs carry.
    """
    n, k = w.shape
    if group % 32 or k % group:
        raise InvalidParameterError(f"int4 group size must be a multiple of 32 dividing {k}; got {group}")
    w = w.float().contiguous()
    importance = None if importance is None else importance.float().contiguous()
    search = int4_search_kernel() or int4_search
    scale, lo = search(w, importance, group)
    scale, mins = scale.half(), lo.half()
    s = scale.float().unsqueeze(-1)
    # Round against the float16 scale and min that will be stored, not the exact ones.
    g = w.view(n, k // group, group)
    q = torch.round((g - mins.float().unsqueeze(-1)) / torch.where(s == 0, 1.0, s)).clamp_(0, 15)
    return Packed(q=pack_nibbles(q.view(n, k)), scales=scale, mins=mins, group=group, zero=0.0, bits=4)


def int4_search(w: torch.Tensor, importance: torch.Tensor | None, group: int, rows: int = 4096):
    """The search of kernels/quantize.cpp in torch, in w's dtype: (scales, mins) (N, K // group).
    The portable path (~20x slower than the kernel on 2 threads) and the kernel's reference in the tests."""
    n, k = w.shape
    scales, mins = [], []
    for r in range(0, n, rows):
        x = w[r : r + rows].reshape(-1, group)  # (G, group)
        wt = (x.pow(2).mean(-1, keepdim=True) + x.pow(2)).sqrt()
        if importance is not None:
            wt = wt * importance.to(w.dtype).view(-1, group).repeat(x.shape[0] * group // k, 1)
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        span = torch.where(hi > lo, hi - lo, 1)  # a constant group keeps scale 0 and its value as min
        best_s, best_m = torch.where(hi > lo, span / 15, 0), lo

        def error(s, m, levels):
            return (wt * (s * levels + m - x).pow(2)).sum(-1, keepdim=True)

        best_e = error(best_s, best_m, torch.round((x - lo) / span * 15))
        sw, sx = wt.sum(-1, keepdim=True), (wt * x).sum(-1, keepdim=True)
        for i in range(21):  # kSteps + 1 candidates of (14 + 0.1 i) / (max - min)
            levels = torch.round((x - lo) * ((14 + 0.1 * i) / span)).clamp(0, 15)
            wl = wt * levels
            sl, sl2, sxl = wl.sum(-1, keepdim=True), (wl * levels).sum(-1, keepdim=True), (wl * x).sum(-1, keepdim=True)
            det = sw * sl2 - sl * sl
            ok = det > 0
            det = torch.where(ok, det, 1)
            s, m = (sw * sxl - sx * sl) / det, (sl2 * sx - sl * sxl) / det
            e = error(s, m, levels)
            better = ok & (s > 0) & (e < best_e) & (hi > lo)
            best_s, best_m, best_e = torch.where(better, s, best_s), torch.where(better, m, best_m), torch.where(better, e, best_e)
        scales.append(best_s.view(-1, k // group))
        mins.append(best_m.view(-1, k // group))
    return torch.cat(scales), torch.cat(mins)


def dequantize(p: Packed, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
    """float32 weights (n, K) of the selected output rows."""
    q = p.q[rows]
    q = (unpack_nibbles(q) if p.bits == 4 else unpack_q6(q) if p.bits == 6 else q).float()
    n, k = q.shape
    q = q.view(n, k // p.group, p.group)
    if p.zero:
        q = q - p.zero
    w = q * p.scales[rows].float().unsqueeze(-1)
    if p.mins is not None:
        w = w + p.mins[rows].float().unsqueeze(-1)
    return w.view(n, k)


def kernel_fits(p: Packed) -> bool:
    """The kernel works in blocks of 32 inputs, each under one scale (or two, for plain 8- or 6-bit groups of 16)."""
    if p.in_features % 32:
        return False
    return p.group % 32 == 0 or (p.group == 16 and p.bits != 4 and p.mins is None and not p.zero)


def matmul(x: torch.Tensor, p: Packed) -> torch.Tensor:
    """x (..., K) @ W.T -> (..., N), float32 accumulation, result in x's dtype."""
    return _matmul(x, p.q, p.scales, p.mins, p.group, p.zero, p.bits, kernel_fits(p))


def _matmul(x, q, scales, mins, group: int, zero: float, bits: int, fits: bool) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    kernel = qlinear_kernel() if fits and x2.shape[0] <= KERNEL_MAX_ROWS and x2.device.type == "cpu" else None
    if kernel is not None:
        out = kernel(x2, [q], [scales], [mins], [group], [zero], [bits])[0]
    else:
        p = Packed(q, scales, mins, group, zero, bits)
        n = q.shape[0]
        out = torch.empty(x2.shape[0], n, device=x.device)
        for r in range(0, n, DENSE_TILE):
            out[:, r : r + DENSE_TILE] = F.linear(x2, dequantize(p, slice(r, r + DENSE_TILE)))
    out = out.view(*shape[:-1], -1)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def linears(x: torch.Tensor, layers) -> list[torch.Tensor]:
    """x through several linear layers that share it (q, k, v; gate, up).

    When all are quantised and the kernel takes them, one call rounds x once and runs every
    matrix in one parallel region; otherwise each layer runs on its own."""
    kernel = qlinear_kernel()
    if (kernel is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() > KERNEL_MAX_ROWS * x.shape[-1]
            or not all(on_kernel(m) for m in layers)):  # fmt: skip
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
        return Packed(self.qweight, self.scales, self.mins, self.group, self.zero, self.bits)

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


SCHEMES = ("int8", "int4")


def quantize_weight(w: torch.Tensor, scheme: str, group: int = 32, importance: torch.Tensor | None = None) -> Packed:
    if scheme == "int8":
        return quantize_int8(w)
    if scheme == "int4":
        return quantize_int4(w, group, importance)
    if scheme == "int6":  # int4's embedding only, not offered on its own
        return quantize_int6(w)
    raise InvalidParameterError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}")


def scheme_for(name: str, scheme: str) -> str:
    """The scheme a matrix gets when the model is quantised to `scheme`. The tied embedding is also
    the LM head: at 4 bits it cost the 270M a third of its perplexity (+4 points with the search), so
    int4 keeps it at 6 bits, as llama-quantize's 4-bit files keep it at Q6_K."""
    if name == "model.embed_tokens.weight" and scheme == "int4":
        return "int6"
    return scheme


def is_quantizable(name: str) -> bool:
    """Every matrix: the attention and MLP projections and the tied embedding / LM head."""
    return name.endswith("_proj.weight") or name == "model.embed_tokens.weight"


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


# ------------------------------------------------------------------ saved quantised checkpoints
# A folder like any Hugging Face checkpoint, whose model.safetensors holds `<module>.qweight`,
# `.scales` and (asymmetric schemes) `.mins` beside the dense norms, and names each module's
# scheme in the safetensors metadata: readable by any safetensors reader, on any torch version.

METADATA_KEY = "gemmarun.quantization"


def quantized_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(tensors to save, {module name: scheme}) of a model with quantised layers."""
    tensors, schemes = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, _QuantWeight):
            schemes[name] = module.scheme()
    for name, t in model.state_dict().items():
        if t is not None:
            tensors[name] = t.contiguous()
    return tensors, schemes


def regroup(tensors, schemes: dict[str, dict]):
    """Turn a flat (name, tensor) stream of a saved quantised checkpoint back into (name.weight, Packed)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors:
        module, _, leaf = name.rpartition(".")
        if module not in schemes:
            yield name, t
            continue
        got = parts.setdefault(module, {})
        got[leaf] = t
        s = schemes[module]
        if "qweight" in got and "scales" in got and ("mins" in got or not s["mins"]):
            del parts[module]
            yield module + ".weight", Packed(got["qweight"], got["scales"], got.get("mins"), int(s["group"]),
                                             float(s["zero"]), int(s["bits"]))  # fmt: skip
    if parts:
        from ..errors import CheckpointError

        raise CheckpointError(f"quantised tensors of {', '.join(sorted(parts))} are incomplete; re-run gemmarun quantize")


def save_quantized(lm, folder) -> "Path":
    """Write a quantised model as a checkpoint folder: config.json, tokenizer files, model.safetensors."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    from ..errors import CheckpointError

    folder = Path(folder)
    source = Path(lm.source)
    if not source.is_dir():
        raise CheckpointError(f"{source} is not a checkpoint folder; quantised copies are made from folders")
    tensors, schemes = quantized_state(lm.model)
    if not schemes:
        raise CheckpointError("the model has no quantised layers; load it with quantize='int8' or 'int4'")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt", METADATA_KEY: json.dumps(schemes)})
    (folder / "config.json").write_text(json.dumps(lm.config.to_hf(), indent=1))
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "generation_config.json"):  # fmt: skip
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    return folder
