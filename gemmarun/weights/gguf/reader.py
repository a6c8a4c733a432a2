"""GGUF (llama.cpp) files: reader, metadata -> GemmaConfig, llama.cpp -> Hugging Face names, dequantisation.

`load_gguf(path)` is the entry point: (config, HF-named state dict, metadata). Norm weights come back in
Hugging Face form (`w`, used as `1 + w`): llama.cpp's converter bakes the `+1` into the file and we undo it.
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from ...config import GLOBAL, SLIDING, GemmaConfig
from ...errors import CheckpointError, ConfigError, ModelNotFoundError

ARCHITECTURES = ("gemma2", "gemma3")
_MAGIC = b"GGUF"

# ---------------------------------------------------------------------------------------------- reader

# GGUF metadata value types (gguf-py GGUFValueType): scalar struct formats and numpy array dtypes.
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_DTYPE = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}


@dataclass(frozen=True)
class GGUFTensor:
    name: str  # llama.cpp name, e.g. "blk.0.attn_q.weight"
    ggml_type: int  # gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # torch order: ggml's ne reversed, so a linear weight is (out, in)
    data: torch.Tensor  # uint8 bytes, memory-mapped from the file
    offset: int | None = None  # where `data` starts in the file

    @property
    def type_name(self) -> str:
        return QT(self.ggml_type).name


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    metadata: dict  # plain Python values; float32 scalars as their shortest decimal (1e-06, not 9.99...e-07)
    tensors: dict[str, GGUFTensor]  # in file order
    buf: mmap.mmap | None = None  # the map the tensors' bytes live in

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def drop_pages(self, t: GGUFTensor) -> None:
        """Give a tensor's pages back to the OS once it is decoded or repacked: read pages of the map
        otherwise count in RSS until it closes, a second copy of the weights at the peak (the 270M's
        load: peak 835 -> 664 MB). Touching them again re-reads the file; the map is never written."""
        if self.buf is None or t.offset is None or not t.data.numel() or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = t.offset - t.offset % mmap.PAGESIZE
        self.buf.madvise(mmap.MADV_DONTNEED, start, t.offset + t.data.numel() - start)


class _Cursor:
    """Sequential little-endian reads from the mapped file; reading past the end is a truncated file."""

    def __init__(self, buf: mmap.mmap, path: Path, pos: int):
        self.buf, self.path, self.pos, self.size = buf, path, pos, len(buf)

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise CheckpointError(f"{self.path} is truncated: its header ends early; re-download the file")
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        start = self.take(n)
        return self.buf[start : start + n].decode("utf-8", errors="replace")

    def _strings(self, n: int) -> list[str]:
        """An array of n strings (a vocabulary: 262144 of them) in one tight loop."""
        buf, pos, end, out = self.buf, self.pos, self.size, []
        for _ in range(n):
            if pos + 8 > end:
                break
            k = struct.unpack_from("<Q", buf, pos)[0]
            pos += 8 + k
            if pos > end:
                break
            out.append(buf[pos - k : pos].decode("utf-8", errors="replace"))
        else:
            self.pos = pos
            return out
        raise CheckpointError(f"{self.path} is truncated: its header ends early; re-download the file")

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.unpack("<I"), self.unpack("<Q")
            if etype in _ARRAY_DTYPE:  # numeric arrays (token scores, types) in one read
                dt = np.dtype(_ARRAY_DTYPE[etype])
                return np.frombuffer(self.buf, dt, n, self.take(n * dt.itemsize)).tolist()
            if etype == _STRING:
                return self._strings(n)
            return [self.value(etype) for _ in range(n)]
        if vtype not in _SCALAR:
            raise CheckpointError(f"{self.path} has a metadata value of unknown type {vtype}; the file is corrupt")
        v = self.unpack(_SCALAR[vtype])
        return float(str(np.float32(v))) if vtype == _FLOAT32 else v


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header; tensor bytes stay memory-mapped (nothing is copied)."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise CheckpointError(f"{path} is not a GGUF file (no GGUF magic at its start); give a .gguf file from llama.cpp")
        # A private copy-on-write map: writable (so torch shares it without a warning), never written back.
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    cur = _Cursor(buf, path, 4)
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise CheckpointError(f"{path} is GGUF version {version}; gemmarun reads little-endian GGUF v2 and v3")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        if n_dims > 4:
            raise CheckpointError(f"{path}: tensor {name!r} claims {n_dims} dimensions; the file is corrupt")
        ne = [cur.unpack("<Q") for _ in range(n_dims)]
        infos.append((name, ne, cur.unpack("<I"), cur.unpack("<Q")))
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise CheckpointError(f"{path} has general.alignment {align!r}, not a power of two; the file is corrupt")
    data_start = -(-cur.pos // align) * align
    tensors = {}
    for name, ne, ggml_type, offset in infos:
        nbytes = _nbytes(path, name, ne, ggml_type)
        start = data_start + offset
        if start + nbytes > cur.size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name} needs bytes up to {start + nbytes} but the file has {cur.size}; "
                "re-download it"
            )
        if name in tensors:
            raise CheckpointError(f"{path} holds tensor {name} twice; the file is corrupt")
        data = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=start) if nbytes else torch.empty(0, dtype=torch.uint8)
        tensors[name] = GGUFTensor(name, ggml_type, tuple(reversed(ne)), data, start)
    return GGUFFile(path, version, metadata, tensors, buf)


def _nbytes(path: Path, name: str, ne: list[int], ggml_type: int) -> int:
    try:
        block, size = GGML_QUANT_SIZES[QT(ggml_type)]
    except (ValueError, KeyError):
        raise CheckpointError(f"{path}: tensor {name} has unknown ggml type id {ggml_type}; the file is corrupt or newer than gguf-py") from None
    if ne and ne[0] % block:
        raise CheckpointError(f"{path}: tensor {name} has rows of {ne[0]} values, not a multiple of its {block}-value blocks")
    return math.prod(ne) // block * size


# ------------------------------------------------------------------------------------------ config


def default_layer_types(arch: str, n_layers: int, pattern: int | list | None = None) -> tuple[str, ...]:
    """llama.cpp's layer kinds: `{arch}.attention.sliding_window_pattern` (a period or a per-layer list, true =
    sliding), else period 2 for gemma2 and 6 for gemma3. With period p, layer i slides iff i % p < p - 1."""
    if isinstance(pattern, list):
        if len(pattern) != n_layers:
            raise ConfigError(f"{arch}.attention.sliding_window_pattern has {len(pattern)} entries for {n_layers} layers")
        return tuple(SLIDING if p else GLOBAL for p in pattern)
    p = int(pattern) if pattern is not None else (2 if arch == "gemma2" else 6)
    return tuple(SLIDING if p == 0 or i % p < p - 1 else GLOBAL for i in range(n_layers))


def default_query_scalar(arch: str, n_layers: int, hidden: int, heads: int, head_dim: int) -> float:
    """llama.cpp picks the 27B query scale by layer count (46: Gemma 2, 62: Gemma 3): hidden // heads there,
    head_dim for every other size. GGUF has no key for it (gemma_pytorch's query_pre_attn_scalar)."""
    return float(hidden // heads) if n_layers == (46 if arch == "gemma2" else 62) else float(head_dim)


_REQUIRED = object()


def config_from_gguf(metadata: dict, *, vocab_size: int | None = None) -> GemmaConfig:
    """GemmaConfig from GGUF metadata, filling what the file leaves out as llama.cpp's loader does.
    vocab_size, when given (the embedding's row count), wins over the metadata."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"GGUF architecture {arch!r} is not supported; gemmarun runs 'gemma2' and 'gemma3' GGUF files")
    gemma2 = arch == "gemma2"

    def key(name: str, default=_REQUIRED):
        v = metadata.get(f"{arch}.{name}", default)
        if v is _REQUIRED:
            raise ConfigError(f"GGUF metadata lacks {arch}.{name}; re-convert the model with llama.cpp's convert_hf_to_gguf.py")
        if isinstance(v, list):  # llama.cpp allows per-layer arrays; Gemma's are uniform
            if len(set(v)) != 1:
                raise ConfigError(f"GGUF key {arch}.{name} varies per layer ({v}); gemmarun needs one value")
            v = v[0]
        return v

    n_layers = int(key("block_count"))
    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise ConfigError(f"GGUF {arch}.attention.value_length differs from key_length; Gemma uses one head_dim")
    context = int(key("context_length"))
    rope_theta = float(key("rope.freq_base", 10000.0))
    factor = _rope_factor(metadata, arch)
    if gemma2 and factor != 1.0:
        raise ConfigError("GGUF gemma2 file asks for RoPE scaling; gemmarun supports it on Gemma 3 global layers only")

    window = int(key("attention.sliding_window", 4096 if gemma2 else 0))
    pattern = metadata.get(f"{arch}.attention.sliding_window_pattern")
    if gemma2 or window > 0:
        layer_types = default_layer_types(arch, n_layers, pattern)
    else:  # a gemma3 file without a window: llama.cpp runs every layer global
        layer_types, window = (GLOBAL,) * n_layers, context

    if vocab_size is None:
        vocab_size = metadata.get(f"{arch}.vocab_size")
    if vocab_size is None and "tokenizer.ggml.tokens" in metadata:
        vocab_size = len(metadata["tokenizer.ggml.tokens"])
    if vocab_size is None:
        raise ConfigError(f"GGUF metadata gives no vocabulary size ({arch}.vocab_size or tokenizer.ggml.tokens)")

    eos = int(metadata.get("tokenizer.ggml.eos_token_id", 1))
    eot = metadata.get("tokenizer.ggml.eot_token_id")
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    if eot is None and "<end_of_turn>" in tokens:  # Gemma chat turns end with it; stop there too
        eot = tokens.index("<end_of_turn>")
    final_cap = key("final_logit_softcapping", 30.0 if gemma2 else None)
    return GemmaConfig(
        model_type="gemma2" if gemma2 else "gemma3_text",
        vocab_size=int(vocab_size),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        query_pre_attn_scalar=default_query_scalar(arch, n_layers, hidden, heads, head_dim),
        sliding_window=window,
        layer_types=layer_types,
        rope_theta=rope_theta,
        # llama.cpp: gemma2 sliding layers share the global base; gemma3 sliding layers use 10000
        rope_local_theta=float(key("rope.freq_base_swa", rope_theta if gemma2 else 10000.0)),
        rope_scaling_factor=factor,
        # llama.cpp defaults the gemma2 caps to 50 / 30 when the keys are missing; gemma3 has no attention cap
        attn_logit_softcapping=float(key("attn_logit_softcapping", 50.0)) if gemma2 else None,
        final_logit_softcapping=None if final_cap is None else float(final_cap),
        qk_norm=not gemma2,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=context,
        bos_token_id=int(metadata.get("tokenizer.ggml.bos_token_id", 2)),
        eos_token_id=eos,
        pad_token_id=int(metadata.get("tokenizer.ggml.padding_token_id", 0)),
        extra_eos_token_ids=(int(eot),) if eot is not None and int(eot) != eos else (),
    )


def _rope_factor(metadata: dict, arch: str) -> float:
    """llama.cpp: rope.scaling.factor, else the older rope.scale_linear; 0 or absent means none."""
    kind = metadata.get(f"{arch}.rope.scaling.type", "linear")
    factor = float(metadata.get(f"{arch}.rope.scaling.factor") or metadata.get(f"{arch}.rope.scale_linear") or 0.0)
    if factor in (0.0, 1.0):
        return 1.0
    if kind not in ("linear", "none"):
        raise ConfigError(f"GGUF asks for {kind!r} RoPE scaling; gemmarun supports linear scaling")
    return factor


# ---------------------------------------------------------------------------------------- name map

# llama.cpp name -> Hugging Face name (convert_hf_to_gguf / gguf-py tensor_mapping for GEMMA2 and GEMMA3).
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # never written for Gemma (tied head); tolerated if present
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",  # Gemma's pre-MLP norm takes llama.cpp's plain ffn_norm name
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_TOP_GGUF = {v: k for k, v in _TOP_NAMES.items()}
_BLOCK_GGUF = {v: k for k, v in _BLOCK_NAMES.items()}


def hf_name(name: str) -> str:
    """Hugging Face name of a llama.cpp tensor name."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.weight"
    raise CheckpointError(f"unexpected tensor {name!r} in a Gemma GGUF file; is it a text-only gemma2/gemma3 model?")


def gguf_name(name: str) -> str:
    """llama.cpp name of a Hugging Face tensor name."""
    if name in _TOP_GGUF:
        return _TOP_GGUF[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3].endswith(".weight"):
        module = parts[3][: -len(".weight")]
        if module in _BLOCK_GGUF:
            return f"blk.{parts[2]}.{_BLOCK_GGUF[module]}.weight"
    raise CheckpointError(f"tensor {name!r} is not part of a Gemma text model")


def is_norm(name: str) -> bool:
    """True for the RMSNorm weights (q/k norms included): the tensors convert_hf_to_gguf stores as 1 + w."""
    return name.endswith("norm.weight")


def expected_shapes(config: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> torch shape of every tensor a Gemma checkpoint holds (tied head: no lm_head)."""
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "pre_feedforward_layernorm.weight": (h,),
            p + "post_feedforward_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
        if config.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
    return shapes


# ------------------------------------------------------------------------------------ dequantisation
# Block layouts from ggml-common.h. Each decoder takes `b`, (n_blocks, type_size) uint8, and writes
# (n_blocks, block_size) float32 into `o`, with the same float32 operations as gguf-py's numpy
# reference (integers are exact; one rounding per multiply or add), so results match it bit for bit.
# The integer codes stay 8-bit until the one mixed-dtype multiply that writes `o`. QK_K = 256.



def _f16(b: torch.Tensor, at: int) -> torch.Tensor:  # the fp16 field at (even) byte `at` of each block -> (nb, 1)
    return b.view(torch.float16)[:, at // 2 : at // 2 + 1].float()


def _planes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) bytes -> (..., 8 // bits, n): each byte's `bits`-wide fields, lowest first.
    (Scalar shifts of a contiguous copy: several times faster in torch than one broadcast shift.)"""
    q, mask = q.contiguous(), (1 << bits) - 1
    return torch.stack([(q >> s) & mask if s else q & mask for s in range(0, 8, bits)], dim=-2)


def _nibbles(q: torch.Tensor) -> torch.Tensor:  # (nb, n) -> (nb, 2n): all low nibbles, then all high nibbles
    return _planes(q, 4).reshape(q.shape[0], -1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:  # (nb, 4) little-endian uint32 -> (nb, 32) bits, bit j first
    # Bit j of the uint32 is bit j % 8 of byte j // 8; numpy unpacks bytes without int32 temporaries.
    return torch.from_numpy(np.unpackbits(qh.contiguous().numpy(), axis=-1, bitorder="little"))


def _q4_0(b, o):  # d, 16 bytes of 4-bit q: x = d * (q - 8)
    torch.mul(_f16(b, 0), _nibbles(b[:, 2:]).view(torch.int8) - 8, out=o)


def _q4_1(b, o):  # d, m, 16 bytes of 4-bit q: x = d * q + m
    torch.mul(_f16(b, 0), _nibbles(b[:, 4:]), out=o).add_(_f16(b, 2))


def _q5_0(b, o):  # d, 32 high bits, 16 bytes of low nibbles: x = d * (q - 16)
    q = _nibbles(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4)
    torch.mul(_f16(b, 0), q.view(torch.int8) - 16, out=o)


def _q5_1(b, o):  # d, m, 32 high bits, 16 bytes of low nibbles: x = d * q + m
    q = _nibbles(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4)
    torch.mul(_f16(b, 0), q, out=o).add_(_f16(b, 2))


def _q8_0(b, o):  # d, 32 int8: x = q * d
    torch.mul(b[:, 2:].view(torch.int8), _f16(b, 0), out=o)


def _q2_k(b, o):  # scales[16] (low nibble scale, high nibble min), qs[64] (2-bit), d, dmin
    nb = b.shape[0]
    sc = b[:, :16]
    dl = (_f16(b, 80) * (sc & 0x0F)).view(nb, 16, 1)
    ml = (_f16(b, 82) * (sc >> 4)).view(nb, 16, 1)
    q = _planes(b[:, 16:80].reshape(nb, 2, 32), 2).reshape(nb, 16, 16)
    torch.mul(dl, q, out=o.view(nb, 16, 16)).sub_(ml)


def _q3_k(b, o):  # hmask[32], qs[64] (2-bit), scales[12] (16 x 6-bit, offset 32), d
    nb = b.shape[0]
    lo = _planes(b[:, 96:104], 4).reshape(nb, 16)
    hi = _planes(b[:, 104:108], 2).reshape(nb, 16)
    dl = (_f16(b, 108) * ((lo | (hi << 4)).view(torch.int8) - 32)).view(nb, 16, 1)
    ql = _planes(b[:, 32:96].reshape(nb, 2, 32), 2).reshape(nb, 16, 16)
    qh = _planes(b[:, :32], 1).reshape(nb, 16, 16)
    q = ql.view(torch.int8) - ((qh ^ 1) << 2).view(torch.int8)  # a clear hmask bit subtracts 4
    torch.mul(dl, q, out=o.view(nb, 16, 16))


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4)."""
    s = s.reshape(s.shape[0], 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _q4_k(b, o):  # d, dmin, scales[12], qs[128]: 8 sub-blocks of 32, x = d*sc*q - dmin*m
    nb = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc).view(nb, 8, 1)
    dm = (_f16(b, 2) * mn).view(nb, 8, 1)
    q = _planes(b[:, 16:].reshape(nb, 4, 32), 4).reshape(nb, 8, 32)
    torch.mul(d, q, out=o.view(nb, 8, 32)).sub_(dm)


def _q5_k(b, o):  # d, dmin, scales[12], qh[32], qs[128]
    nb = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc).view(nb, 8, 1)
    dm = (_f16(b, 2) * mn).view(nb, 8, 1)
    ql = _planes(b[:, 48:].reshape(nb, 4, 32), 4).reshape(nb, 8, 32)
    qh = _planes(b[:, 16:48], 1)
    torch.mul(d, ql | (qh << 4), out=o.view(nb, 8, 32)).sub_(dm)


def _q6_k(b, o):  # ql[128], qh[64], scales[16] (int8), d: x = d * sc * (q - 32)
    nb = b.shape[0]
    d = (_f16(b, 208) * b[:, 192:208].view(torch.int8)).view(nb, 16, 1)
    ql = _planes(b[:, :128].reshape(nb, 2, 64), 4).reshape(nb, 8, 32)
    qh = _planes(b[:, 128:192].reshape(nb, 2, 32), 2).reshape(nb, 8, 32)
    q = (ql | (qh << 4)).view(torch.int8) - 32
    torch.mul(d, q.reshape(nb, 16, 16), out=o.view(nb, 16, 16))


_FLOATS = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}
_BLOCKS = {
    QT.Q4_0: _q4_0, QT.Q4_1: _q4_1, QT.Q5_0: _q5_0, QT.Q5_1: _q5_1, QT.Q8_0: _q8_0,
    QT.Q2_K: _q2_k, QT.Q3_K: _q3_k, QT.Q4_K: _q4_k, QT.Q5_K: _q5_k, QT.Q6_K: _q6_k,
}
SUPPORTED_TYPES = tuple(t.name for t in (*_FLOATS, *_BLOCKS))
_CHUNK = 1 << 18  # values decoded per step: bounds the scratch memory to about a MiB


def resolve_type(t: int | str | QT, what: str = "tensor") -> QT:
    """The ggml type named by an id, a name ("Q4_K") or an enum member; unsupported ones raise."""
    try:
        qt = QT[t.upper()] if isinstance(t, str) else QT(int(t))
    except (KeyError, ValueError):
        qt = None
    if qt not in _FLOATS and qt not in _BLOCKS:
        name = qt.name if qt is not None else repr(t)
        raise CheckpointError(
            f"{what} has ggml type {name}, which gemmarun cannot dequantise; supported: {', '.join(SUPPORTED_TYPES)} "
            "(re-quantise the file with llama-quantize to one of them)"
        )
    return qt


def _decode_into(raw: torch.Tensor, qt: QT, out: torch.Tensor) -> None:
    """Decode flat uint8 `raw` into flat `out` (any float dtype), one chunk of blocks at a time."""
    if raw.data_ptr() % 4:  # fp16 fields and float data are read in place: realign a stray slice
        raw = raw.clone()
    if qt in _FLOATS:
        out.copy_(raw.view(_FLOATS[qt]))
        return
    block, size = GGML_QUANT_SIZES[qt]
    blocks, decode, step = raw.view(-1, size), _BLOCKS[qt], max(1, _CHUNK // block)
    scratch = None if out.dtype == torch.float32 else torch.empty(min(step, blocks.shape[0]), block)
    for i in range(0, blocks.shape[0], step):
        b = blocks[i : i + step]
        dst = out[i * block : (i + b.shape[0]) * block].view(-1, block)
        if scratch is None:
            decode(b, dst)
        else:  # decode in float32, then round once into the target dtype
            decode(b, scratch[: b.shape[0]])
            dst.copy_(scratch[: b.shape[0]])


def dequantize(raw: torch.Tensor, ggml_type: int | str | QT, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Tensor of `shape` (torch order) decoded from its GGUF bytes `raw` (uint8)."""
    qt = resolve_type(ggml_type)
    shape = tuple(int(s) for s in shape)
    block, size = GGML_QUANT_SIZES[qt]
    if shape and shape[-1] % block:
        raise CheckpointError(f"a {qt.name} tensor's rows must hold a multiple of {block} values; got shape {shape}")
    want = math.prod(shape) // block * size
    if raw.dtype != torch.uint8 or raw.numel() != want:
        raise CheckpointError(f"a {qt.name} tensor of shape {shape} needs {want} uint8 bytes; got {raw.numel()} {raw.dtype}")
    out = torch.empty(shape, dtype=dtype)
    _decode_into(raw.reshape(-1), qt, out.view(-1))
    return out


# ------------------------------------------------------------------------------------------ loading


def load_gguf(
    path: str | Path, dtype: torch.dtype = torch.float32, packer=None
) -> tuple[GemmaConfig, dict[str, torch.Tensor], dict]:
    """(config, Hugging Face-named state dict in `dtype`, metadata) from a gemma2/gemma3 GGUF file.
    Tensors are decoded one at a time straight into their outputs, so peak memory stays near the result.
    `packer(name, tensor)` may return a packed form to keep instead of decoding (None: decode)."""
    f = read_gguf(path)
    embed = f.tensors.get("token_embd.weight")
    config = config_from_gguf(f.metadata, vocab_size=embed.shape[0] if embed is not None else None)
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) > config.vocab_size:
        raise CheckpointError(f"{f.path}: the tokenizer has {len(tokens)} tokens but the embedding only {config.vocab_size} rows")
    shapes = expected_shapes(config)
    shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    state = {}
    head = f.tensors.get("output.weight")
    # a stored copy of the tied embedding (same type, same bytes) is dropped
    tied_copy = head is not None and embed is not None and head.ggml_type == embed.ggml_type and torch.equal(head.data, embed.data)
    for t in f.tensors.values():
        name = hf_name(t.name)
        if tied_copy and t.name == "output.weight":
            continue
        if name not in shapes:
            raise CheckpointError(f"{f.path}: unexpected tensor {t.name} for a {config.num_hidden_layers}-layer {f.architecture} model")
        if t.shape != shapes[name]:
            raise CheckpointError(f"{f.path}: tensor {t.name} has shape {t.shape}; this model's config needs {shapes[name]}")
        qt = resolve_type(t.ggml_type, f"{f.path}: tensor {t.name}")
        if is_norm(name):  # stored as 1 + w (convert_hf_to_gguf); undo it in float32
            w = torch.empty(t.shape, dtype=torch.float32)
            _decode_into(t.data, qt, w.view(-1))
            state[name] = (w - 1).to(dtype)
        elif packer is not None and (packed := packer(name, t)) is not None:
            state[name] = packed
        else:
            state[name] = torch.empty(t.shape, dtype=dtype)
            _decode_into(t.data, qt, state[name].view(-1))
        f.drop_pages(t)
    missing = [gguf_name(n) for n in shapes if n not in state and n != "lm_head.weight"]
    if missing:
        raise CheckpointError(f"{f.path} lacks {len(missing)} tensor(s) this config needs, e.g. {', '.join(missing[:3])}")
    if "lm_head.weight" in state:
        config = config.replace(tie_word_embeddings=False)
    return config, state, f.metadata
