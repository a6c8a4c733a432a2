"""Hostile and careless input: underflowing sampling values, out-of-range seeds, and request bodies that
parse into something no model can take (huge integers, deep nesting, lone surrogates) get a clear error
or a defined meaning, never noise or a 500."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from gemmarun import InvalidParameterError, SamplingParams
from gemmarun.generation.sampling import MIN_TEMPERATURE, candidates, sample_one
from gemmarun.server.requests import json_body
from gemmarun.server.responses import APIError


def _logits(v: int = 1000, seed: int = 0) -> torch.Tensor:
    return torch.randn(v, generator=torch.Generator().manual_seed(seed)) * 5


@pytest.mark.parametrize("t", [1e-38, 5e-324, MIN_TEMPERATURE / 2])
def test_a_temperature_too_small_for_float32_decodes_greedily(t):
    logits = _logits()
    empty = torch.tensor([], dtype=torch.long)
    picks = {
        sample_one(logits, SamplingParams(temperature=t, seed=s), empty, [], SamplingParams(seed=s).make_generator()) for s in range(8)
    }
    assert picks == {int(logits.argmax())}


def test_the_smallest_temperature_that_samples_stays_finite():
    probs, _ = candidates(_logits() * 6, SamplingParams(temperature=MIN_TEMPERATURE))  # logits ~ +-30, as soft-capped
    assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-5


@pytest.mark.parametrize("top_p", [1e-46, 1e-300, 5e-324])
def test_a_top_p_below_float32_keeps_the_most_likely_token(top_p):
    logits = _logits()
    probs, ids = candidates(logits, SamplingParams(temperature=1.0, top_p=top_p))
    kept = ids[probs > 0] if ids is not None else torch.nonzero(probs).flatten()
    assert kept.tolist() == [int(logits.argmax())]
    assert torch.isfinite(probs).all()


@pytest.mark.parametrize("penalty", [1e-320, 1e-4, 1e4, float("inf")])
def test_repetition_penalties_that_overflow_are_refused(penalty):
    with pytest.raises(InvalidParameterError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=penalty)


@pytest.mark.parametrize("seed", [2**64, 2**70, -(2**63) - 1, 10**5000], ids=["2**64", "2**70", "-2**63-1", "10**5000"])
def test_seeds_beyond_64_bits_are_refused_in_one_line(seed):
    with pytest.raises(InvalidParameterError, match="64-bit") as e:
        SamplingParams(seed=seed)
    assert len(str(e.value)) < 200 and "\n" not in str(e.value)


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63), -1])
def test_seeds_at_the_64_bit_edges_sample_with_every_choice_offset(seed):
    p = SamplingParams(temperature=1.0, seed=seed)
    draws = [torch.rand((), generator=p.make_generator(i)).item() for i in range(3)]  # n = 3 choices
    assert len(set(draws)) == 3
    assert draws[0] == torch.rand((), generator=p.make_generator(0)).item()  # reproducible


class _Body:
    def __init__(self, raw: bytes):
        self.raw = raw
        self.headers = {"content-length": str(len(raw))}

    async def stream(self):
        yield self.raw


def _parse(raw: bytes):
    return asyncio.run(json_body(_Body(raw)))


@pytest.mark.parametrize(
    "raw, message",
    [
        (b'{"seed": ' + b"9" * 5000 + b"}", "not valid JSON"),  # more digits than int() takes
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"prompt": "\\ud800"}', "surrogate"),
        (b'{"messages": [{"role": "user", "content": "a\\udfffb"}]}', "surrogate"),
        (b'{"model": "\\udfff"}', "surrogate"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_bodies_that_parse_into_nonsense_are_400(raw, message):
    with pytest.raises(APIError) as e:
        _parse(raw)
    assert e.value.status == 400 and message in e.value.message


def test_a_real_surrogate_pair_is_text():
    assert _parse(json.dumps({"prompt": "\U0001f600"}).encode()) == {"prompt": "\U0001f600"}
