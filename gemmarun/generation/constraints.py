"""Structured output: a grammar (JSON schema, any JSON object, a regex, a Lark grammar) that every
sampled token must keep satisfiable, through llguidance.

- `Constraint` is what `SamplingParams.constraint` holds: the kind and its source, checked by the
  library when the parameters are made, so a bad schema is an InvalidParameterError carrying the
  library's reason (the server's 400).
- `GrammarState` is one sequence's matcher. `new_sequence` makes it; `sample_one` calls `mask()`
  first, before penalties, temperature and the top-k / top-p / min-p filters; `SequenceState.add`
  calls `advance()` with the sampled token. The stop ids are allowed exactly when the grammar
  accepts, and a grammar that admits nothing more ends the sequence ("stop") without waiting for
  an end-of-turn token.
- The next mask is computed on a small thread pool as soon as a token is consumed (llguidance drops
  the GIL), so it overlaps the model's next forward; the row that samples waits only if the mask is
  not ready yet, and the engine's other rows never wait for it.
- The token table (every id's bytes, llguidance's tokenizer) is built once per tokenizer and logits
  width: a few seconds for Gemma 3's 262k vocabulary, on the first constrained request.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from ..errors import InvalidParameterError

KINDS = ("json_schema", "json_object", "regex", "lark", "gbnf")
_WHAT = {"json_schema": "JSON schema", "json_object": "JSON object", "regex": "regex", "lark": "Lark grammar", "gbnf": "GBNF grammar"}
# Any JSON object (OpenAI's json_object): an object schema with no other restriction.
_ANY_OBJECT = '{"type": "object"}'
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Constraint:
    """What the output must match. Build with json_schema / json_object / regex / lark / gbnf."""

    kind: str
    source: str  # the schema as JSON text, the regex, or the Lark grammar

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InvalidParameterError(f"constraint kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.source, str) or not self.source:
            raise InvalidParameterError(f"the {_WHAT[self.kind]} must be a non-empty string")

    @classmethod
    def json_schema(cls, schema: dict | str) -> Constraint:
        if isinstance(schema, dict):
            schema = json.dumps(schema)
        elif isinstance(schema, str):
            try:
                if not isinstance(json.loads(schema), dict):
                    raise ValueError("not an object")
            except ValueError as e:
                raise InvalidParameterError(f"the JSON schema must be a JSON object ({e})") from None
        else:
            raise InvalidParameterError(f"the JSON schema must be a dict or its JSON text, got {type(schema).__name__}")
        return cls("json_schema", schema)

    @classmethod
    def json_object(cls) -> Constraint:
        return cls("json_object", _ANY_OBJECT)

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern)

    @classmethod
    def lark(cls, grammar: str) -> Constraint:
        return cls("lark", grammar)

    @classmethod
    def gbnf(cls, grammar: str) -> Constraint:
        """A llama.cpp GBNF grammar, translated to Lark by llguidance's converter."""
        return cls("gbnf", grammar)

    @cached_property
    def grammar(self) -> str:
        """The llguidance grammar (its JSON form)."""
        import llguidance

        m = llguidance.LLMatcher
        if self.kind == "regex":
            return m.grammar_from_regex(self.source)
        if self.kind == "lark":
            return m.grammar_from_lark(self.source)
        if self.kind == "gbnf":
            from llguidance.gbnf_to_lark import gbnf_to_lark

            try:
                return m.grammar_from_lark(gbnf_to_lark(self.source))
            except Exception as e:  # the converter raises its own error types (and ValueError, KeyError)
                raise InvalidParameterError(f"invalid GBNF grammar: {_first_lines(str(e))}") from None
        # Compact JSON with OpenAI's ", " and ": ": free whitespace lets a model pad its reply with
        # newlines to the length limit (a random test model did, every time). A schema's own
        # "x-guidance" options override these.
        return m.grammar_from_json_schema(self.source, defaults=_JSON_OPTIONS)

    def check(self) -> None:
        """The library's own verdict on the grammar: InvalidParameterError with its reason."""
        import llguidance

        reason = llguidance.LLMatcher.validate_grammar(self.grammar)
        if reason:
            raise InvalidParameterError(f"invalid {_WHAT[self.kind]}: {_first_lines(reason)}")


def _first_lines(reason: str) -> str:
    """llguidance's message on one line: its lines joined, less the source excerpts and carets it
    draws under a regex or Lark error."""
    lines = [line.strip() for line in reason.strip().splitlines()]
    kept = [line for line in lines if line and not re.fullmatch(r"\^+|\d+ \|.*", line)]
    return "; ".join(kept)[:400]


# -- the token table ---------------------------------------------------------------------------

_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {width: LLTokenizer}
_TABLES_LOCK = threading.Lock()  # two first requests on two threads build the table once


class _Vocabulary:
    """What llguidance.TokenizerWrapper reads: every id's bytes, eos, and a text -> ids callable."""

    def __init__(self, tokenizer, width: int):
        tokens = tokenizer.token_bytes()[:width]
        # Ids the logits have but the tokenizer does not (a padded embedding): empty, never allowed.
        self.tokens = tokens + [b""] * (width - len(tokens))
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = []
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return [i for i in self._tokenizer.encode(text, add_bos=False) if i < len(self.tokens)]


def token_table(tokenizer, width: int):
    """llguidance's tokenizer over `width` ids (the logits' width), built once per tokenizer."""
    import llguidance

    with _TABLES_LOCK:
        tables = _TABLES.setdefault(tokenizer, {})
        if width not in tables:
            eos = sorted(i for i in tokenizer.stop_ids if i < width)
            tables[width] = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tokenizer, width)), eos_token=eos)
        return tables[width]


# Masks are computed here, off the thread that samples, while the model runs its next forward.
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gemmarun-grammar")


class GrammarState:
    """One sequence's place in its grammar: the mask of its next token and the tokens consumed."""

    def __init__(self, constraint: Constraint, tokenizer, width: int, stop_ids):
        import llguidance

        self.width = width  # the logits' width; the tokenizer may hold fewer ids (or more)
        self.stop_ids = np.array(sorted(i for i in stop_ids if i < width), dtype=np.int64)
        self.eos_ids = np.array(sorted(i for i in tokenizer.stop_ids if i < width), dtype=np.int64)
        self.matcher = llguidance.LLMatcher(token_table(tokenizer, width), constraint.grammar, log_level=0)
        if self.matcher.is_error():
            raise InvalidParameterError(f"invalid {_WHAT[constraint.kind]}: {_first_lines(self.matcher.get_error())}")
        self._bits = np.zeros((width + 31) // 32, dtype=np.int32)  # one bit per id, llguidance's layout
        self._next: Future = _POOL.submit(self._compute)

    def _compute(self) -> None:
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)

    def allowed(self) -> torch.Tensor:
        """Which ids (width,) may come next: the grammar's, with the stop ids exactly when it accepts."""
        return torch.from_numpy(self._allowed())

    def _allowed(self) -> np.ndarray:
        self._next.result()
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.width].view(bool)  # (width,)
        allowed[self.eos_ids] = False  # llguidance's end of text is ours only through the stop ids
        allowed[self.stop_ids] = self.matcher.is_accepting()
        if not allowed.any():  # a grammar that accepts but admits nothing with ignore_eos: end it anyway
            allowed[self.eos_ids] = True
        return allowed

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (V,) with every id the grammar forbids at -inf (a new tensor)."""
        allowed = self._allowed()
        if logits.device.type != "cpu":
            return logits.masked_fill(~torch.from_numpy(allowed).to(logits.device), float("-inf"))
        # numpy, single-threaded: torch's masked_fill, ~ and any() over 262k ids each went through
        # its intra-op pool and cost 20-55 ms on a loaded 2-core machine (numpy: 6 ms there)
        out = logits.numpy().copy()
        np.putmask(out, ~allowed, -np.inf)
        return torch.from_numpy(out)

    def advance(self, token: int) -> bool:
        """Consume a sampled token; True when the grammar admits nothing more (the sequence is done)."""
        if not self.matcher.consume_token(int(token)):
            raise InvalidParameterError(f"token {token} does not fit the grammar ({self.matcher.get_error()})")
        if self.matcher.is_stopped():
            return True
        self._next = _POOL.submit(self._compute)
        return False
