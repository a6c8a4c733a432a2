"""The Tokenizer: text <-> token ids for one Gemma vocabulary, read from tokenizer.json, tokenizer.model
or a GGUF vocabulary; special-token text mapped to single ids, BOS exactly once (pitfall 8).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
import tokenizers

from gemmarun.errors import CheckpointError, ConfigError, InvalidParameterError, ModelNotFoundError

from .backends import _HFTokenizersEngine, _SentencePieceEngine
from .chat_turns import END_OF_TURN, START_OF_TURN, _chat_turns
from .splitter import _SpecialSplitter
from .spm_proto import _sentencepiece_proto
from .stream import StreamDecoder, _as_ids

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # byte fallback
_TAG_PIECE = re.compile(r"<[^<>\s]+>")  # <start_of_image>, <unused3>, <mask>: never text a grammar should spell with them

# SentencePiece piece types; GGUF's tokenizer.ggml.token_type uses the same numbers.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _one_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _config_token(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # {"content": "<bos>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _chat_template_of(config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # older files: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


class Tokenizer:
    """Text <-> token ids for one Gemma vocabulary. Build with from_dir / from_file / from_gguf_fields."""

    def __init__(
        self,
        engine: _SentencePieceEngine | _HFTokenizersEngine,
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int | None,
        chat_template: str | None = None,
        extra_special_ids: frozenset[int] = frozenset(),
    ):
        self._engine = engine
        self.vocab_size: int = engine.size
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.chat_template = chat_template
        end_of_turn = engine.piece_id(END_OF_TURN)
        # Gemma's instruction-tuned models end a reply with <end_of_turn>, not <eos> (pitfall 9).
        self.stop_ids: frozenset[int] = frozenset({eos_id} | ({end_of_turn} if end_of_turn is not None else set()))
        turn_ids = {engine.piece_id(p) for p in (START_OF_TURN, END_OF_TURN)} - {None}
        named = {bos_id, eos_id} | ({pad_id} if pad_id is not None else set())
        # Ids dropped by decode(skip_special_tokens=True): whatever the format marks special, plus
        # the ones Gemma always treats as such (a small test vocab may list turns as user-defined).
        self._special_ids = frozenset(set(engine.matched_specials.values()) | extra_special_ids | turn_ids | named)
        self._splitter = _SpecialSplitter(engine.matched_specials)
        self._guard_splitter: _SpecialSplitter | None = None  # built on first use (it encodes each special)
        self._max_piece_bytes: int | None = None  # computed on first use (a pass over the vocabulary)

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, folder) -> Tokenizer:
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelNotFoundError(f"{folder}: no such folder")
        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        template = _chat_template_of(config)
        jinja = folder / "chat_template.jinja"  # newer transformers saves the template here instead
        if template is None and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        for name in ("tokenizer.json", "tokenizer.model"):
            if (folder / name).is_file():
                return cls._from_path(folder / name, config, template)
        raise CheckpointError(f"{folder}: no tokenizer.json or tokenizer.model")

    @classmethod
    def from_file(cls, path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: no such file")
        return cls._from_path(path, {}, None)

    @classmethod
    def _from_path(cls, path: Path, config: dict, template: str | None) -> Tokenizer:
        if path.suffix == ".json":
            try:
                engine = _HFTokenizersEngine(tokenizers.Tokenizer.from_file(str(path)))
            except Exception as e:  # `tokenizers` raises plain Exception on a bad file
                raise CheckpointError(f"{path}: not a readable tokenizer.json ({_one_line(e)})") from None
            fallback = {}
            extra = frozenset(engine.added_special_ids)
        elif path.suffix == ".model":
            try:
                sp = spm.SentencePieceProcessor(model_file=str(path))
                engine = _SentencePieceEngine(sp)  # reads every piece: one that is not UTF-8 fails here
            except Exception as e:  # RuntimeError or OSError, depending on how the parse fails
                raise CheckpointError(f"{path}: not a readable SentencePiece model ({_one_line(e)})") from None
            fallback = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
            extra = frozenset()
        else:
            raise CheckpointError(f"{path}: expected a .json or .model tokenizer file")

        def special(name: str) -> int | None:
            for piece in (_config_token(config, f"{name}_token"), f"<{name}>"):
                i = engine.piece_id(piece) if piece is not None else None
                if i is not None:
                    return i
            i = fallback.get(name, -1)
            return i if i >= 0 else None

        bos, eos = special("bos"), special("eos")
        if bos is None or eos is None:
            raise CheckpointError(f"{path}: the vocabulary has no {'<bos>' if bos is None else '<eos>'} token")
        return cls(engine, bos_id=bos, eos_id=eos, pad_id=special("pad"), chat_template=template, extra_special_ids=extra)

    @classmethod
    def from_gguf_fields(cls, fields: dict) -> Tokenizer:
        """Build from GGUF metadata already read into plain Python values."""

        def need(key: str):
            if key not in fields:
                raise CheckpointError(f"GGUF metadata has no {key}")
            return fields[key]

        model = need("tokenizer.ggml.model")
        if model != "llama":  # llama.cpp's name for a SentencePiece vocabulary, which Gemma uses
            raise ConfigError(f"GGUF tokenizer model {model!r} is not supported (Gemma uses 'llama')")
        # numpy over the arrays: a Gemma vocabulary has 262144 pieces, and loops over them cost
        # tenths of a second at every load.
        arrays = [need(f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type")]
        try:
            if not all(isinstance(a, (list, tuple)) for a in arrays):
                raise TypeError("not arrays")
            pieces = list(map(str, arrays[0]))
            scores, types = np.asarray(arrays[1], np.float32), np.asarray(arrays[2], np.int64)
            if scores.ndim != 1 or types.ndim != 1:
                raise TypeError("nested arrays")
        except (TypeError, ValueError, OverflowError):  # OverflowError: a type id past 64 bits
            raise CheckpointError(
                "GGUF tokenizer tokens, scores and token_type must be arrays of strings, floats and integers; the file is corrupt"
            ) from None
        types[types == 0] = _NORMAL  # 0 is llama.cpp's "undefined"
        if not (len(pieces) == len(scores) == len(types)):
            raise CheckpointError(f"GGUF tokenizer arrays differ in length: {len(pieces)} tokens, {len(scores)} scores, {len(types)} types")
        unknown = types[(types < 0) | (types > _BYTE)]
        if len(unknown):
            raise CheckpointError(f"GGUF token_type holds unknown type {unknown[0]}")

        def special_id(key: str) -> int | None:
            i = fields.get(f"tokenizer.ggml.{key}_token_id")
            if i is None:
                return None
            if not isinstance(i, int) or isinstance(i, bool):
                raise CheckpointError(f"GGUF {key}_token_id must be an integer, got {type(i).__name__}; the file is corrupt")
            if not 0 <= int(i) < len(pieces):
                raise CheckpointError(f"GGUF {key}_token_id {i} is outside the vocabulary ({len(pieces)})")
            return int(i)

        bos, eos, unk, pad = (special_id(k) for k in ("bos", "eos", "unknown", "padding"))
        if unk is None:
            unk = pieces.index("<unk>") if "<unk>" in pieces else None
        if bos is None or eos is None or unk is None:
            raise CheckpointError("GGUF metadata lacks the bos, eos or unknown token id")
        # Gemma's GGUF marks <unk> as control; SentencePiece needs exactly one piece typed unknown.
        types[types == _UNKNOWN] = _CONTROL
        types[unk] = _UNKNOWN
        # llama.cpp's converter writes user-defined pieces with real spaces where SentencePiece
        # spells "▁" (Gemma's runs of spaces); spell them back or they never match (pitfall 10).
        for i in np.flatnonzero(types == _USER_DEFINED):
            pieces[i] = pieces[i].replace(" ", "\u2581")
        charsmap = fields.get("tokenizer.ggml.precompiled_charsmap")
        try:
            charsmap = bytes(charsmap) if charsmap else b""
        except (TypeError, ValueError):
            raise CheckpointError("GGUF tokenizer.ggml.precompiled_charsmap must be an array of bytes; the file is corrupt") from None
        proto = _sentencepiece_proto(
            pieces,
            scores,
            types,
            unk,
            add_dummy_prefix=bool(fields.get("tokenizer.ggml.add_space_prefix", False)),
            charsmap=charsmap,
        )
        try:
            sp = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as e:
            raise CheckpointError(f"GGUF tokenizer is not a valid SentencePiece vocabulary ({_one_line(e)})") from None
        template = fields.get("tokenizer.chat_template")
        specials = {pieces[i]: int(i) for i in np.flatnonzero((types == _CONTROL) | (types == _UNKNOWN))}
        return cls(
            _SentencePieceEngine(sp, specials),
            bos_id=bos,
            eos_id=eos,
            pad_id=pad,
            chat_template=template if isinstance(template, str) else None,
        )

    # -- lookups -------------------------------------------------------------------------------

    def token_to_id(self, piece: str) -> int | None:
        return self._engine.piece_id(piece)

    def id_to_piece(self, i: int) -> str:
        return self._engine.piece(self._check_id(i))

    def token_bytes(self) -> list[bytes]:
        """Every id's bytes as decoding writes them (what a grammar over bytes needs): "▁" as a
        space, a byte-fallback piece as its byte, and special pieces, or any other `<tag>` piece, as
        b"\\xff" + the piece, which no text contains (llguidance's mark of a special token)."""
        out = []
        for i, piece in enumerate(self._engine.pieces()):
            if (byte := _BYTE_PIECE.fullmatch(piece)) is not None:
                out.append(bytes([int(byte.group(1), 16)]))
            elif i in self._special_ids or _TAG_PIECE.fullmatch(piece):
                out.append(b"\xff" + piece.encode("utf-8"))
            else:
                out.append(piece.replace("\u2581", " ").encode("utf-8"))
        return out

    @property
    def max_piece_bytes(self) -> int:
        """The most UTF-8 bytes one token's piece is spelt with (pieces' "▁" counted as 3, an overcount):
        text of B bytes has at least B / this many tokens (the server refuses long prompts with it)."""
        if self._max_piece_bytes is None:
            self._max_piece_bytes = max(len(self._engine.piece(i).encode("utf-8", "surrogatepass")) for i in range(self.vocab_size))
        return self._max_piece_bytes

    def _check_id(self, i) -> int:
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise InvalidParameterError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return i

    # -- encode / decode -----------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True, literal: Sequence[tuple[int, int]] = ()) -> list[int]:
        """Token ids of `text`; special-token text is a control token except inside the `literal`
        (start, end) character spans, where it stays text (chat message content cannot forge turns)."""
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # the engines take UTF-8; a lone surrogate has none
                raise InvalidParameterError(
                    f"the text holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start})"
                ) from None
        ids: list[int] = []
        for part in self._parts(text, literal) if literal else self._splitter.split(text):
            ids.extend([part] if isinstance(part, int) else self._engine.encode(part))
        # Exactly one BOS (pitfall 8): a prompt rendered from a chat template already starts with it.
        if add_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def _parts(self, text: str, literal: Sequence[tuple[int, int]]) -> list[str | int]:
        """The splitter's parts, with special-token text inside `literal` spans kept as text: its
        first character is cut from the rest, so neither the splitter nor the engine (SentencePiece's
        user-defined pieces, `tokenizers`' added tokens) can match it whole. Text elsewhere is joined
        across span edges exactly as without spans, so content free of such text encodes the same."""
        parts: list[str | int] = []

        def add(part: str | int, join: bool = True) -> None:
            if part == "":
                return
            if join and isinstance(part, str) and parts and isinstance(parts[-1], str):
                parts[-1] += part
            else:
                parts.append(part)

        pos = 0
        for start, end in sorted(literal):
            for part in self._splitter.split(text[pos:start]):
                add(part)
            for part in self._guard().split(text[max(start, pos) : end]):
                if isinstance(part, int):
                    piece = self._engine.piece(part)
                    add(piece[:1])
                    add(piece[1:], join=False)
                else:
                    add(part)
            pos = max(pos, end)
        for part in self._splitter.split(text[pos:]):
            add(part)
        return parts

    def _guard(self) -> _SpecialSplitter:
        """The special tokens whose text would come out as the token itself: through the splitter or
        the engine's own matching."""
        if self._guard_splitter is None:
            pieces = {self._engine.piece(i): i for i in sorted(self._special_ids)}
            matched = {p: i for p, i in pieces.items() if p and (p in self._splitter.specials or i in self._engine.encode(p))}
            self._guard_splitter = _SpecialSplitter(matched)
        return self._guard_splitter

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [self._check_id(i) for i in _as_ids(ids)]
        if skip_special_tokens:
            return self._engine.decode([i for i in ids if i not in self._special_ids])
        # Special ids are written as their piece text; runs between them go to the engine whole,
        # since SentencePiece drops control pieces and shows <unk> as " ⁇ ".
        parts, run = [], []
        for i in ids:
            if i in self._special_ids:
                parts += [self._engine.decode(run), self._engine.piece(i)]
                run = []
            else:
                run.append(i)
        parts.append(self._engine.decode(run))
        return "".join(parts)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    # -- chat ----------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Gemma's turn format, as its own chat template writes it.

        Gemma has no system role: a leading system message becomes a prefix of the first user
        turn. The assistant speaks as `model`. Content is trimmed, as Gemma's template does.
        """
        turns = _chat_turns(messages)
        out = ["<bos>"]
        for role, content in turns:
            out.append(f"{START_OF_TURN}{role}\n{content}{END_OF_TURN}\n")
        if add_generation_prompt:
            out.append(f"{START_OF_TURN}model\n")
        return "".join(out)
