"""OpenAI response shapes: errors, completion and chat bodies, logprobs, and server-sent event streams."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse

from ..chat.tools import CallReader
from ..generation.engine import EngineClosedError, Event, Handle, TokenLogprob

if TYPE_CHECKING:
    from .requests import Parsed


class APIError(Exception):
    """A request that fails with OpenAI's error body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def engine_failure(error: Exception) -> APIError:
    if isinstance(error, EngineClosedError):
        return APIError(503, str(error), type="server_error", code="server_shutting_down")
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error")


class ResponseWriter:
    """OpenAI's response bodies (completions and chat, whole or as server-sent events) from engine events."""

    def __init__(self, tokenizer, model_id: str):
        self.tokenizer, self.model_id = tokenizer, model_id

    # -- logprob formats -----------------------------------------------------------------------

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _token_bytes(self, token_id: int) -> list[int]:
        byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", self.tokenizer.id_to_piece(token_id))
        return [int(byte.group(1), 16)] if byte else list(self._token_text(token_id).encode("utf-8"))

    def completion_logprobs(self, items: list[TokenLogprob], offset: int, first_token: int | None = None) -> tuple[dict, int]:
        """OpenAI's legacy completions shape. With echo, `first_token` is the prompt's first token,
        which has nothing before it to be scored against (its logprob is null, as in OpenAI's)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        rows = ([(first_token, None, None)] if first_token is not None else []) + [
            (t.token_id, t.logprob, {self._token_text(i): lp for i, lp in t.top} if t.top else None) for t in items
        ]
        for token_id, logprob, top in rows:
            out["tokens"].append(self._token_text(token_id))
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            # Offsets index the returned text, where special tokens (<bos>, <end_of_turn>) do not show.
            offset += len(self.tokenizer.decode([token_id]))
        return out, offset

    def _echo_logprobs(self, parsed: Parsed, i: int, first: Event, lps: list[TokenLogprob], offset: int) -> tuple[dict, int]:
        """Completion logprobs of choice i's first event: the scored prompt first when echoing."""
        if not parsed.echo:
            return self.completion_logprobs(lps, offset)
        prompt_items = [t for t in (first.prompt_logprobs or []) if t is not None]
        return self.completion_logprobs(prompt_items + lps, offset, first_token=parsed.prompts[i // parsed.n][0])

    def chat_logprobs(self, items: list[TokenLogprob]) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            return {"token": self._token_text(token_id), "logprob": logprob, "bytes": self._token_bytes(token_id)}

        return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in items]}

    # -- whole responses and streams ---------------------------------------------------------

    def full_response(self, parsed: Parsed, handles: list[Handle], finals: dict[int, list[Event]], rid: str, chat: bool) -> dict:
        """The whole (non-streamed) body from every choice's events."""
        choices, completion_tokens = [], 0
        for i, evs in finals.items():
            result = evs[-1].result
            completion_tokens += result.completion_tokens
            lps = [lp for e in evs for lp in self._visible_logprobs(e, handles[i])]
            if chat:
                choice = {"index": i, "message": {"role": "assistant", "content": result.text},
                          "logprobs": self.chat_logprobs(lps) if parsed.logprobs is not None else None,
                          "finish_reason": result.finish_reason}  # fmt: skip
                if parsed.tools is not None and parsed.tools.calls:
                    _tool_message(choice, result.text)
            else:
                prompt_text = parsed.prompt_texts[i // parsed.n]
                text = (prompt_text if parsed.echo else "") + result.text
                logprobs = self._echo_logprobs(parsed, i, evs[0], lps, 0)[0] if parsed.logprobs is not None else None
                choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": result.finish_reason}
            choices.append(choice)
        prompt_tokens = sum(len(p) for p in parsed.prompts)
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    @staticmethod
    def _visible_logprobs(event: Event, handle: Handle) -> list[TokenLogprob]:
        """The event's token logprob, unless it is the final stop token, which shows no text."""
        lp = event.logprob
        if lp is None or (event.finish_reason == "stop" and lp.token_id in handle.seq.stop_ids):
            return []
        return [lp]

    async def stream(self, parsed: Parsed, handles: list[Handle], events: asyncio.Queue, rid: str, chat: bool):
        """Server-sent events as the engine's events arrive; the rows are freed however it ends."""
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            body = {"id": rid, "object": obj, "created": created, "model": self.model_id, "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        offsets = [0] * len(handles)
        started = [False] * len(handles)
        readers = [CallReader() for _ in handles] if chat and parsed.tools is not None and parsed.tools.calls else None
        try:
            for i in range(len(handles)):
                if chat:
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            remaining, completion_tokens = len(handles), 0
            while remaining:
                i, handle, event = await events.get()
                if event.error is not None:
                    yield f"data: {json.dumps(engine_failure(event.error).body())}\n\n"
                    return
                remaining -= event.last
                if event.finish_reason == "cancelled":
                    continue
                lps = self._visible_logprobs(event, handle)
                first, started[i] = not started[i], True
                text = event.text
                if first and parsed.echo:
                    text = parsed.prompt_texts[i // parsed.n] + text
                if not text and not lps and not event.last:
                    continue
                finish = event.result.finish_reason if event.result is not None else None
                if event.last:
                    completion_tokens += event.result.completion_tokens
                if chat and readers is not None:
                    text, calls = readers[i].feed(text)
                    if not text and not calls and not lps and not event.last:
                        continue
                    if finish == "stop" and readers[i].finished_calls():
                        finish = "tool_calls"
                if chat:
                    delta = {"content": text} if text else {}
                    if readers is not None and calls:
                        delta["tool_calls"] = calls
                    logprobs = self.chat_logprobs(lps) if parsed.logprobs is not None else None
                    yield chunk([{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
                else:
                    logprobs = None
                    if parsed.logprobs is not None:
                        if first:
                            logprobs, offsets[i] = self._echo_logprobs(parsed, i, event, lps, 0)
                        else:
                            logprobs, offsets[i] = self.completion_logprobs(lps, offsets[i])
                    yield chunk([{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}])
            if parsed.include_usage:
                prompt_tokens = sum(len(p) for p in parsed.prompts)
                yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens})  # fmt: skip
            yield "data: [DONE]\n\n"
        finally:
            # Also reached when the client disconnects mid-stream: free the rows at once.
            for h in handles:
                h.cancel()


def _tool_message(choice: dict, text: str) -> None:
    """A chat choice whose reply is one or more tool calls: message.tool_calls, finish_reason tool_calls."""
    reader = CallReader()
    reader.feed(text)
    calls = reader.finished_calls()
    if calls and choice["finish_reason"] == "stop":
        choice["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
        choice["finish_reason"] = "tool_calls"
