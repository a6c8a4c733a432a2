"""The generation core: the only code that turns token lists into KV-cache state and logits.

Every decoder and scorer goes through these functions (Generator, Engine, ChatSession, the eval
Scorer and perplexity, LanguageModel.logits, calibration), so padding, chunking, the context check
and the lm-head selection exist once:

- forward: one model call over several rows, each a list of tokens from its own start position,
  right-padded into one batch (padding has position -1: written to the cache's trash slot, never
  seen);
- prefill: rows of any length fed chunk by chunk through `forward`; logits at each row's last token;
- decode: one token for every row, each at its own position;
- score: the logits of every position, chunk by chunk, and token_logprobs of given tokens;
- check_prompt: a prompt against the context.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from ..errors import ContextLengthError, InvalidParameterError

# A forward: Gemma.forward or a torch.compile'd one, (tokens, positions, cache, select=) -> logits.
Step = Callable[..., torch.Tensor]

# Positions whose logits the engine keeps at once while scoring a prompt (echo with logprobs):
# every position's float32 logits, (T, V), are held, and at Gemma's 256k vocabulary 64 of them
# are 64 MiB a row (a server may score several prompts' worth between decoding steps).
SCORED_POSITIONS = 64


def prefill_chunk_for(model) -> int:
    """Prompt tokens per prefill forward: the one chunk policy, by weights, dtype and device.
    128 rows keep the packed kernels and the bfloat16 path as fast as 512 did (2B shape: int8, int4,
    bf16; the 270M) and hold a quarter of the activations (2B int8 peak RSS at a 512-token prompt:
    3042 -> 2934 MB). Dense float32 products run PyTorch's GEMM, which reads every weight once per
    chunk: 512 (23 tok/s on the 2B, 20 at 128)."""
    dense32 = any(isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32 for m in model.modules())
    return 512 if dense32 else 128


def score_chunk_for(model) -> int:
    """Positions per forward when every position's logits are kept for a server's request: the
    prefill policy, bounded by SCORED_POSITIONS for the (T, V) logits' memory."""
    return min(prefill_chunk_for(model), SCORED_POSITIONS)


def check_prompt(n: int, context: int, limit: int, room: int = 1) -> None:
    """The one prompt-against-context check. Generation needs `room` for one new token at least
    (n < context); scoring needs the tokens themselves to fit (room=0)."""
    if n == 0:
        raise InvalidParameterError("the prompt is empty; give at least one token (BOS counts)")
    if n + room > context:
        have = f"the prompt has {n} tokens but the context holds {context}"
        if room == 0:
            have = f"{n} tokens do not fit the context of {context}"
        raise ContextLengthError(f"{have}; shorten the prompt or load with a larger context (the model allows {limit})")


def pad_rows(rows: Sequence[Sequence[int]], starts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one right-padded batch: tokens (B, T) with 0 as padding, positions (B, T) from each row's
    start with -1 as padding, and each row's last index (B,) (0 for an empty row, which idles)."""
    t = max(len(r) for r in rows)
    tokens = [list(r) + [0] * (t - len(r)) for r in rows]
    positions = [list(range(s, s + len(r))) + [-1] * (t - len(r)) for r, s in zip(rows, starts)]
    last = [max(len(r) - 1, 0) for r in rows]
    return torch.tensor(tokens, dtype=torch.long), torch.tensor(positions, dtype=torch.long), torch.tensor(last)


def forward(model, cache, rows: Sequence[Sequence[int]], starts: Sequence[int], last: bool = True,
            step: Step | None = None) -> torch.Tensor:  # fmt: skip
    """One forward over right-padded rows, row i's tokens at positions starts[i]...; float32 logits
    (B, V) at each row's last token when `last` (an empty row's are meaningless), else (B, T, V).
    cache None: the rows are self-contained (no cache is read or written)."""
    tokens, positions, select = pad_rows(rows, starts)
    dev = model.device
    step = step or model
    if not last:
        return step(tokens.to(dev), positions.to(dev), cache)
    return step(tokens.to(dev), positions.to(dev), cache, select=select.to(dev))


def prefill(model, cache, rows: Sequence[Sequence[int]], starts: Sequence[int] | None = None, chunk: int | None = None) -> torch.Tensor:
    """Feed every row's tokens (row i from position starts[i], 0 by default), `chunk` tokens of
    each per forward (prefill_chunk_for by default); float32 logits (B, V) after each row's last
    token. Rows of different lengths share the forwards; a row already done idles as padding."""
    starts = [0] * len(rows) if starts is None else list(starts)
    chunk = chunk or prefill_chunk_for(model)
    if any(len(r) == 0 for r in rows):
        raise InvalidParameterError("prefill() needs at least one token per row")
    longest = max(len(r) for r in rows)
    if cache is None and longest > chunk:
        raise InvalidParameterError(f"{longest} tokens take several chunks of {chunk}, which need a cache")
    out: list[torch.Tensor | None] = [None] * len(rows)
    for s in range(0, longest, chunk):
        logits = forward(model, cache, [r[s : s + chunk] for r in rows], [a + s for a in starts])  # (B, V)
        for i, r in enumerate(rows):
            if s < len(r) <= s + chunk:  # this chunk holds the row's last token
                out[i] = logits[i]
    return torch.stack(out)  # type: ignore[arg-type]


def decode(model, cache, tokens: Sequence[int | None], positions: Sequence[int], step: Step | None = None) -> torch.Tensor:
    """One decoding step: row i feeds tokens[i] at positions[i], or idles as padding when its token
    is None; float32 logits (B, V)."""
    rows = [[] if t is None else [t] for t in tokens]
    if all(not r for r in rows):
        raise InvalidParameterError("decode() needs at least one row with a token")
    return forward(model, cache, rows, positions, step=step)


def score(model, cache, ids: Sequence[int], start: int = 0, chunk: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """The logits of every position, chunk by chunk: (offset into ids, float32 logits (T, V)) where
    row j predicts ids[offset + j + 1]. cache None: ids go in one forward without a cache."""
    chunk = chunk or prefill_chunk_for(model)
    if cache is None and len(ids) > chunk:
        raise InvalidParameterError(f"{len(ids)} tokens take several chunks of {chunk}, which need a cache")
    for s in range(0, len(ids), chunk):
        yield s, forward(model, cache, [ids[s : s + chunk]], [start + s], last=False)[0]


def token_logprobs(logits: torch.Tensor, targets: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (float32) of targets (T,) under logits (T, V), and whether each was the argmax."""
    lp = torch.log_softmax(logits.float(), -1)
    target = torch.as_tensor(targets, device=lp.device)
    return lp.gather(1, target[:, None])[:, 0], lp.argmax(-1) == target
