"""A tiny Gemma-like SentencePiece model, trained in about a second, for tests.

Real Gemma tokenizers are SentencePiece BPE with byte fallback, no dummy prefix, no whitespace
folding, digits split one by one, pieces for runs of whitespace, and ids laid out as
0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>. This model has all of that in a vocabulary small enough
for random test checkpoints. `<start_of_turn>` and `<end_of_turn>` are user-defined symbols
and land at small ids, so code must look them up by piece, never assume 106/107.
"""

from __future__ import annotations

import functools
import io
import random
from pathlib import Path

import sentencepiece as spm

_WORDS = (
    "the of and to in is that it for was on are as with his they at be this from have or "
    "by one had not but what all were when we there can an your which their said if do will "
    "each about how up out them then she many some so these would other into has more her two "
    "like him see time could no make than first been its who now people my made over did down "
    "only way find use may water long little very after words called just where most know "
    "model token language small test gemma run fast text stream decode encode sample window"
).split()

_ACCENTED = "café naïve résumé façade jalapeño Zürich Ångström crème brûlée São Paulo Øresund".split()
_OTHER_SCRIPTS = ["日本語", "中文", "한국어", "русский", "ελληνικά", "😀", "👍🏽", "🇫🇷", "∑", "→", "€"]

_CODE = [
    "def add(a, b):\n    return a + b\n",
    "class Box:\n    def __init__(self, size):\n        self.size = size\n\n    def area(self):\n        return self.size * self.size\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i)\n",
    "int main(void) {\n    int x = 42;\n    return x;\n}\n",
    "if (a && b) {\n\t\tfoo();\n\t}\n",
    'print("hello, world")  # greet\n',
    "x = [1, 2, 3]\ny = {'k': 3.14159}\n",
]

# Gemma keeps runs of newlines, tabs and spaces as user-defined pieces: SentencePiece matches them
# whole before BPE. Spaces are spelled "\u2581" as in Gemma's file (a GGUF spells them " ").
# allow_whitespace_only_pieces keeps a lone space a piece of its own, as in Gemma.
_WHITESPACE_SYMBOLS = ["\n", "\n\n", "\n\n\n", "\t", "\t\t", "\t\t\t", "\u2581\u2581", "\u2581\u2581\u2581\u2581"]
_TURN_SYMBOLS = ["<start_of_turn>", "<end_of_turn>"]


def _corpus(rng: random.Random) -> list[str]:
    """A few KB of varied text: prose, code, numbers, whitespace runs and non-ASCII."""
    lines: list[str] = []
    for _ in range(160):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), rng.choice(_ACCENTED))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), rng.choice(_OTHER_SCRIPTS))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        sep = rng.choice([" ", " ", " ", "  ", "    ", "\t"])
        lines.append(sep.join(words).capitalize() + rng.choice([".", "!", "?", ",", ""]))
    # SentencePiece trains on one sentence per item; a sentence may hold newlines, which is how
    # code keeps its indentation runs in the training data.
    lines += _CODE * 4
    lines += [" " * n + "indented line" for n in (2, 4, 8, 12, 16)] * 3
    lines += ["Version 1.2.3 costs $4,567.89 on 2024-01-31 at 12:45.", "https://example.com/a/b?q=1&r=2"]
    return lines


def train_tiny_spm(out_dir: Path, vocab_size: int = 600) -> Path:
    """Write the model into out_dir/tokenizer.model and return that path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.model"
    path.write_bytes(_trained(vocab_size))
    return path


@functools.cache
def _trained(vocab_size: int) -> bytes:
    """The serialised model, trained once per process and vocabulary size: training is deterministic
    (a fixed corpus, one thread), so every checkpoint folder gets the same bytes a fresh run would."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(random.Random(0))),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=_TURN_SYMBOLS + _WHITESPACE_SYMBOLS,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()
