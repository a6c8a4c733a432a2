"""Tokenizer tests, each against a reference: sentencepiece itself, `tokenizers`, transformers'
tokenizer built from the real Gemma 3 270M GGUF, and Gemma 3's published chat template."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest

from gemmarun.errors import CheckpointError, GemmarunError, InvalidParameterError
from gemmarun.tokenizer import StreamDecoder, Tokenizer

from tokenizer_cases import CHATS, HARD, STREAM_TEXT, _one_line_error, _random_strings, _stream

# --------------------------------------------------------------------------------------------
# tiny SentencePiece model (tiny_spm: trained once a session, in conftest.py)


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
