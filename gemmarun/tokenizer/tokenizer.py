"""Gemma tokenizer over tokenizer.json, tokenizer.model or a GGUF vocabulary; chat; streaming decode.

Two engines do the actual splitting, and each is the reference for its format:
`tokenizers` for a tokenizer.json, `sentencepiece` for a tokenizer.model and for a GGUF vocabulary
(rebuilt in memory as the SentencePiece model it was converted from). This module adds what both
need around them: special-token text in the input mapped to single ids, BOS exactly once (DESIGN
pitfall 8), Gemma's turn format (pitfall 9) and a streaming decoder that never splits a character.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece as spm
import tokenizers

from gemmarun.errors import CheckpointError, ConfigError, InvalidParameterError, ModelNotFoundError

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"

# SentencePiece piece types; GGUF's tokenizer.ggml.token_type uses the same numbers.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _one_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------------------------------------
# engines: each turns text without special tokens into ids and ids back into text


class _SentencePieceEngine:
    def __init__(self, sp: spm.SentencePieceProcessor, specials: dict[str, int] | None = None):
        self.sp = sp
        self.size = sp.get_piece_size()
        # SentencePiece never produces control pieces from text, but Gemma's other tokenizers
        # (tokenizer.json, llama.cpp) match their text whole, so we split them out ourselves.
        if specials is None:
            specials = {sp.id_to_piece(i): i for i in range(self.size) if sp.is_control(i) or sp.is_unknown(i)}
        self.matched_specials = specials

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text) if text else []

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        # piece_to_id answers unk_id for any unknown piece
        return i if self.sp.id_to_piece(i) == piece else None


class _HFTokenizersEngine:
    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok
        self.size = tok.get_vocab_size(with_added_tokens=True)
        self.matched_specials = {}  # the tokenizer.json lists its added tokens; `tokenizers` matches them
        self.added_special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def piece(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def piece_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)


# ---------------------------------------------------------------------------------------------
# GGUF vocabulary -> in-memory SentencePiece model


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _field_int(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _pieces_any(raw: list[bytes], scores, types) -> bytes:
    """ModelProto.pieces (field 1), one SentencePiece message (piece=1, score=2, type=3) each."""
    out = []
    for r, score, kind in zip(raw, scores, types):
        body = b"\x0a" + _varint(len(r)) + r + b"\x15" + struct.pack("<f", score) + b"\x18" + _varint(kind)
        out.append(b"\x0a" + _varint(len(body)) + body)
    return b"".join(out)


def _pieces_short(raw: list[bytes], n: np.ndarray, scores, types) -> bytes:
    """_pieces_any for pieces under 119 bytes (n: their lengths), whose lengths all fit one-byte
    varints, laid out with numpy: 0a (L+9) 0a L piece 15 score(4) 18 type, L + 11 bytes a piece. A
    Gemma vocabulary has 262144 pieces; the per-piece loop took 0.24 s of every load, this 0.12."""
    start = np.cumsum(n + 11) - (n + 11)  # (P,) where each record begins
    out = np.empty(int((n + 11).sum()), np.uint8)
    out[start], out[start + 1], out[start + 2], out[start + 3] = 0x0A, n + 9, 0x0A, n
    # each piece's bytes go to its record's start + 4, in order
    text = np.frombuffer(b"".join(raw), np.uint8)
    out[np.repeat(start + 4 - (np.cumsum(n) - n), n) + np.arange(len(text))] = text
    tail = start + 4 + n
    out[tail] = 0x15
    out[tail[:, None] + np.arange(1, 5)] = np.asarray(scores, "<f4").view(np.uint8).reshape(-1, 4)
    out[tail + 5], out[tail + 6] = 0x18, np.asarray(types, np.uint8)
    return out.tobytes()


def _sentencepiece_proto(
    pieces: list[str], scores, types, unk_id: int, add_dummy_prefix: bool,
    charsmap: bytes = b"",
) -> bytes:
    """Serialise a sentencepiece ModelProto (BPE, byte fallback, identity normaliser).

    Written by hand from sentencepiece_model.proto (field numbers below) so the runtime needs no
    protobuf package; tests parse the result with sentencepiece_model_pb2 to check it.
    scores and types: sequences or numpy arrays (float32, integer) of one value per piece.
    """
    raw = [p.encode("utf-8") for p in pieces]
    n = np.fromiter(map(len, raw), np.int64, len(raw))  # (P,)
    out = [_pieces_short(raw, n, scores, types) if n.max(initial=0) < 119 else _pieces_any(raw, scores, types)]
    trainer = (
        _field_int(3, 2)  # model_type = BPE
        + _field_int(4, len(pieces))  # vocab_size
        + _field_int(35, 1)  # byte_fallback
        + _field_int(40, unk_id)  # unk_id
    )
    normalizer = (
        _field_bytes(1, b"identity")  # name
        + (_field_bytes(2, charsmap) if charsmap else b"")  # precompiled_charsmap
        + _field_int(3, int(add_dummy_prefix))  # add_dummy_prefix
        + _field_int(4, 0)  # remove_extra_whitespaces
        + _field_int(5, 1)  # escape_whitespaces
    )
    out += [_field_bytes(2, trainer), _field_bytes(3, normalizer)]
    return b"".join(out)


# ---------------------------------------------------------------------------------------------


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

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, folder) -> "Tokenizer":
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
    def from_file(cls, path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: no such file")
        return cls._from_path(path, {}, None)

    @classmethod
    def _from_path(cls, path: Path, config: dict, template: str | None) -> "Tokenizer":
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
            except Exception as e:  # RuntimeError or OSError, depending on how the parse fails
                raise CheckpointError(f"{path}: not a readable SentencePiece model ({_one_line(e)})") from None
            engine = _SentencePieceEngine(sp)
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
        return cls(engine, bos_id=bos, eos_id=eos, pad_id=special("pad"), chat_template=template,
                   extra_special_ids=extra)

    @classmethod
    def from_gguf_fields(cls, fields: dict) -> "Tokenizer":
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
        except (TypeError, ValueError):
            raise CheckpointError("GGUF tokenizer tokens, scores and token_type must be arrays of strings, "
                                  "floats and integers; the file is corrupt") from None
        types[types == 0] = _NORMAL  # 0 is llama.cpp's "undefined"
        if not (len(pieces) == len(scores) == len(types)):
            raise CheckpointError(
                f"GGUF tokenizer arrays differ in length: "
                f"{len(pieces)} tokens, {len(scores)} scores, {len(types)} types"
            )
        unknown = types[(types < 0) | (types > _BYTE)]
        if len(unknown):
            raise CheckpointError(f"GGUF token_type holds unknown type {unknown[0]}")

        def special_id(key: str) -> int | None:
            i = fields.get(f"tokenizer.ggml.{key}_token_id")
            if i is None:
                return None
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
        proto = _sentencepiece_proto(
            pieces, scores, types, unk,
            add_dummy_prefix=bool(fields.get("tokenizer.ggml.add_space_prefix", False)),
            charsmap=bytes(charsmap) if charsmap else b"",
        )
        try:
            sp = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as e:
            raise CheckpointError(f"GGUF tokenizer is not a valid SentencePiece vocabulary ({_one_line(e)})") from None
        template = fields.get("tokenizer.chat_template")
        specials = {pieces[i]: int(i) for i in np.flatnonzero((types == _CONTROL) | (types == _UNKNOWN))}
        return cls(_SentencePieceEngine(sp, specials), bos_id=bos, eos_id=eos, pad_id=pad,
                   chat_template=template if isinstance(template, str) else None)

    # -- lookups -------------------------------------------------------------------------------

    def token_to_id(self, piece: str) -> int | None:
        return self._engine.piece_id(piece)

    def id_to_piece(self, i: int) -> str:
        return self._engine.piece(self._check_id(i))

    def _check_id(self, i) -> int:
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise InvalidParameterError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return i

    # -- encode / decode -----------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids: list[int] = []
        for part in self._splitter.split(text):
            ids.extend([part] if isinstance(part, int) else self._engine.encode(part))
        # Exactly one BOS (pitfall 8): a prompt rendered from a chat template already starts with it.
        if add_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

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

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
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


def _as_ids(ids) -> list[int]:
    """One id or many (a list, a numpy array, a torch tensor) as a list of ints."""
    if hasattr(ids, "tolist"):  # numpy / torch, 0-d or 1-d
        ids = ids.tolist()
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


def _content(message: dict, index: int, trim: bool) -> str:
    """A message's text. Gemma's template trims user and model text (each part of a list)."""
    content = message.get("content")
    if isinstance(content, str):
        return content.strip() if trim else content
    # OpenAI-style parts: [{"type": "text", "text": "..."}]
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"].strip() if trim else p["text"] for p in content)
    raise InvalidParameterError(f"message {index}: 'content' must be a string or a list of text parts")


def _chat_turns(messages: list[dict]) -> list[tuple[str, str]]:
    """(gemma_role, content) pairs: system folded in, roles checked to alternate."""
    if not isinstance(messages, list) or not messages:
        raise InvalidParameterError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidParameterError(f"message {i} must be a dict with a 'role' and a 'content'")
    prefix, first = "", 0
    if messages[0]["role"] == "system":
        prefix, first = _content(messages[0], 0, trim=False) + "\n\n", 1
        if len(messages) == 1:  # Gemma's template would drop it; let it reach the model as a user turn
            return [("user", prefix.strip())]
    turns = []
    for i, m in enumerate(messages[first:], start=first):
        role = {"user": "user", "assistant": "model", "model": "model"}.get(m["role"])
        if role is None:
            where = "allowed only as the first message" if m["role"] == "system" else "unknown"
            raise InvalidParameterError(f"message {i}: role {m['role']!r} is {where}; use system, user, assistant")
        if role != ("user" if (i - first) % 2 == 0 else "model"):
            raise InvalidParameterError("conversation roles must alternate user/assistant/user/..., starting with user")
        turns.append((role, (prefix if i == first else "") + _content(m, i, trim=True)))
    return turns


class _SpecialSplitter:
    """Cuts text into plain strings and special-token ids, leftmost-longest like `tokenizers`."""

    def __init__(self, specials: dict[str, int]):
        self.specials = specials
        lengths: dict[str, set[int]] = {}
        for piece in specials:
            if piece:
                lengths.setdefault(piece[0], set()).add(len(piece))
        self.lengths = {c: sorted(ls, reverse=True) for c, ls in lengths.items()}

    def split(self, text: str) -> list[str | int]:
        if not self.lengths or not any(c in text for c in self.lengths):
            return [text]
        parts: list[str | int] = []
        start = i = 0
        while i < len(text):
            for n in self.lengths.get(text[i], ()):
                special = self.specials.get(text[i : i + n])
                if special is not None:
                    parts += [text[start:i], special]
                    i = start = i + n
                    break
            else:
                i += 1
        parts.append(text[start:])
        return [p for p in parts if p != ""]


@dataclass
class StreamDecoder:
    """Incremental detokenizer: push ids, get the text they add.

    Decodes the recent tokens with and without the new ones and emits the difference, so a
    piece's leading space comes out right, and holds text back while it ends in U+FFFD: a
    multi-byte character whose byte-fallback tokens have not all arrived.
    """

    tokenizer: Tokenizer
    skip_special_tokens: bool = True
    _ids: list[int] = field(default_factory=list, init=False)  # context tokens, then pending ones
    _read: int = field(default=0, init=False)  # how many of _ids are context (already emitted)

    def push(self, token_ids: int | list[int]) -> str:
        self._ids += _as_ids(token_ids)
        before, after = self._texts()
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        # What was just emitted becomes the context for the next push; older tokens are dropped.
        del self._ids[: self._read]
        self._read = len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is held back (an unfinished character comes out as U+FFFD)."""
        before, after = self._texts()
        self._ids.clear()
        self._read = 0
        return after[len(before) :]

    def _texts(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        return decode(self._ids[: self._read], self.skip_special_tokens), decode(self._ids, self.skip_special_tokens)
