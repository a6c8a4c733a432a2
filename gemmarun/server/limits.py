"""Bounds on what one request may cost the server before the engine sees it: the body's size (413),
a prompt too long for the context told from its byte length before it is tokenised, and the fields
accepted but ignored (logged, as vLLM does, rather than refused)."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from .responses import APIError

if TYPE_CHECKING:
    from fastapi import Request as HTTPRequest

log = logging.getLogger("gemmarun.server")

# A 128k-token context is ~0.5 MB of text, or ~1 MB as token ids in JSON; 16 prompts of it fit. A
# body past this is refused before it is read, so parsing one never holds the event loop for long.
MAX_BODY_BYTES = 16 << 20


async def read_body(request: HTTPRequest, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused with a 413 as soon as it is known to exceed `limit`: from its
    Content-Length when it declares one, else as it arrives."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body is {size} bytes or more; this server takes at most {limit}", code="request_too_large")


def check_text_fits(text: str, tokenizer, context: int | None, param: str) -> None:
    """Refuse a text that cannot fit `context` whatever its tokens, before tokenising it: a token
    covers at most the longest piece's bytes, so bytes / that is a lower bound on its tokens."""
    if context is None or len(text) <= context:  # a character is at least a byte: it may fit
        return
    size = len(text.encode("utf-8", "surrogatepass"))
    at_least = math.ceil(size / tokenizer.max_piece_bytes)
    if at_least >= context:  # one position at least for the reply
        raise APIError(
            400,
            f"the {param} is {size} bytes, so at least {at_least} tokens (a token spans at most {tokenizer.max_piece_bytes} "
            f"bytes); the context holds {context}",
            param=param,
            code="context_length_exceeded",
        )


def note_ignored(body: dict, chat: bool, vocab_size: int) -> None:
    """Log what a body asks for that has no effect here, so a caller's mistake is visible somewhere."""
    if chat and "echo" in body:
        log.warning("chat request: 'echo' applies to /v1/completions only; ignored")
    if body.get("stream_options") is not None and not body.get("stream"):
        log.warning("request: 'stream_options' without 'stream': true; ignored")
    ids = body.get("stop_token_ids")
    if isinstance(ids, list):
        outside = [i for i in ids if isinstance(i, int) and not 0 <= i < vocab_size]
        if outside:
            log.warning("request: stop_token_ids %s are outside the vocabulary (0..%d) and can never match", outside[:5], vocab_size - 1)
