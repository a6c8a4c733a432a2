"""Perplexity of a text with a sliding window, on the same forward and logits as generation.

The text is tokenised once. Windows of up to `window` tokens (BOS first, then text) advance by
`stride` text tokens; each window scores only the tokens the previous ones did not, so every
token is scored once, with at least `window - 1 - stride` tokens of context after the first
window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InvalidParameterError


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per token (nats)
    tokens: int  # text tokens scored (BOS is context, never scored)
    bits_per_byte: float  # total NLL in bits over the text's UTF-8 bytes
    windows: int
    window: int
    stride: int


def window_count(n_tokens: int, window: int, stride: int) -> int:
    """How many windows perplexity() runs over n_tokens text tokens."""
    span = window - 1
    return 1 if n_tokens <= span else 1 + math.ceil((n_tokens - span) / stride)


def perplexity(lm, text: str, window: int = 1024, stride: int = 512, progress=None) -> PerplexityResult:
    from .scorer import Scorer

    if not text:
        raise InvalidParameterError("the text is empty")
    window = min(window, lm.context)
    if window < 2 or not 1 <= stride <= window - 1:
        raise InvalidParameterError(f"need window >= 2 and 1 <= stride <= window - 1, got window={window} stride={stride}")
    ids = lm.tokenizer.encode(text, add_bos=False)
    if not ids:
        raise InvalidParameterError("the text has no tokens")
    total, windows = Scorer(lm).rolling(ids, window, stride, progress)
    nll = -total / len(ids)
    return PerplexityResult(
        perplexity=math.exp(nll), nll=nll, tokens=len(ids), bits_per_byte=-total / math.log(2) / len(text.encode("utf-8")),
        windows=windows, window=window, stride=stride,
    )  # fmt: skip
