"""gemmarun against transformers' eager Gemma 2 / Gemma 3 on saved random checkpoints."""

from __future__ import annotations

import pytest
import torch

import gemmarun
from gemmarun.model.cache import KVCache

SEQ = 40  # longer than the test window of 16


@pytest.fixture(scope="module", params=[("gemma2", 16), ("gemma2", 144), ("gemma3", 16)], ids=["g2-256style", "g2-27bstyle", "g3"])
def pair(request, checkpoint):
    kind, scalar = request.param
    ref = checkpoint.reference(kind, seed=1, query_pre_attn_scalar=scalar)
    return ref, gemmarun.load(checkpoint(kind, seed=1, query_pre_attn_scalar=scalar))


def test_config_read_exactly(pair):
    ref, lm = pair
    rc, c = ref.config, lm.config
    assert c.query_pre_attn_scalar == rc.query_pre_attn_scalar
    assert c.sliding_window == rc.sliding_window
    assert list(c.layer_types) == list(rc.layer_types)
    assert c.attn_logit_softcapping == rc.attn_logit_softcapping
    assert c.final_logit_softcapping == rc.final_logit_softcapping
    assert c.head_dim == rc.head_dim


def test_logits_match_reference_past_window(pair):
    ref, lm = pair
    ids = torch.randint(3, ref.config.vocab_size, (SEQ,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0].float()
    got = lm.logits(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


def test_chunked_logits_equal_single_pass(pair):
    _, lm = pair
    ids = torch.randint(3, lm.config.vocab_size, (SEQ,), generator=torch.Generator().manual_seed(1))
    full = lm.logits(ids)
    chunked = lm.logits(ids, chunk=7)  # chunks that straddle the window boundary
    assert (full - chunked).abs().max().item() < 1e-4


def test_cached_decoding_equals_full_forward_every_step(pair):
    _, lm = pair
    ids = torch.randint(3, lm.config.vocab_size, (SEQ,), generator=torch.Generator().manual_seed(2))
    full = lm.logits(ids)
    cache = KVCache(lm.config, 1, SEQ, torch.float32)
    with torch.inference_mode():
        lm.model(ids[None, :5], torch.arange(5)[None], cache)
        for t in range(5, SEQ):
            step = lm.model(ids[None, t : t + 1], torch.tensor([[t]]), cache, select=torch.zeros(1, dtype=torch.long))
            assert (step[0] - full[t]).abs().max().item() < 1e-4, f"step {t}"


def test_greedy_generation_matches_transformers(pair):
    ref, lm = pair
    prompt = lm.tokenizer.encode("The quick brown fox")
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, eos_token_id=[], pad_token_id=0)
    expected = out[0, len(prompt) :].tolist()
    got = lm.generate(prompt, max_new_tokens=64, ignore_eos=True)
    assert got.token_ids == expected
    assert got.completion_tokens == 64 and got.prompt_tokens == len(prompt)
    assert got.finish_reason == "length"


def test_batched_generation_equals_one_by_one(pair):
    _, lm = pair
    prompts = ["Hello", "A much longer prompt that spans more tokens than the others do", "def f(x):\n    return"]
    batch = lm.generate(prompts, max_new_tokens=24, ignore_eos=True)
    for p, b in zip(prompts, batch):
        single = lm.generate(p, max_new_tokens=24, ignore_eos=True)
        assert b.token_ids == single.token_ids
        assert b.text == single.text


def test_prefill_chunk_follows_the_weights(pair):
    _, lm = pair
    assert lm.generator.prefill_chunk == 512  # dense float32: PyTorch's GEMM gains from long chunks
    assert gemmarun.load(lm.source, quantize="int8").generator.prefill_chunk == 128
    assert gemmarun.load(lm.source, dtype="bfloat16").generator.prefill_chunk == 128


def test_long_prompt_prefill_in_chunks(pair):
    _, lm = pair
    ids = torch.randint(3, lm.config.vocab_size, (SEQ,), generator=torch.Generator().manual_seed(3)).tolist()
    whole = lm.generate(ids, max_new_tokens=8, ignore_eos=True)
    default = lm.generator.prefill_chunk
    lm.generator.prefill_chunk = 6
    try:
        chunked = lm.generate(ids, max_new_tokens=8, ignore_eos=True)
    finally:
        lm.generator.prefill_chunk = default
    assert chunked.token_ids == whole.token_ids


def test_core_prefill_and_decode_rows_at_their_own_positions(pair):
    """The generation core: two rows resumed from different start positions, chunk by chunk across
    the window of 16, then one decoding step each, equal the full forward at the same positions."""
    from gemmarun.generation import core

    _, lm = pair
    ids = torch.randint(3, lm.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(4)).tolist()
    full = [lm.logits(row) for row in ids]
    cache = KVCache.for_model(lm.model, 2, SEQ)
    with torch.inference_mode():
        core.prefill(lm.model, cache, [ids[0][:10], ids[1][:3]], chunk=4)
        # row 0 resumes at 10 and ends at 35, row 1 at 3 and ends at 38; chunks of 7 padded tokens
        got = core.prefill(lm.model, cache, [ids[0][10:35], ids[1][3:38]], starts=[10, 3], chunk=7)
        step = core.decode(lm.model, cache, [ids[0][35], None], [35, -1])  # row 1 idles
        step2 = core.decode(lm.model, cache, [ids[0][36], ids[1][38]], [36, 38])
    assert (got[0] - full[0][34]).abs().max().item() < 1e-4
    assert (got[1] - full[1][37]).abs().max().item() < 1e-4
    assert (step[0] - full[0][35]).abs().max().item() < 1e-4
    assert (step2[0] - full[0][36]).abs().max().item() < 1e-4
    assert (step2[1] - full[1][38]).abs().max().item() < 1e-4  # the idle step wrote nothing into row 1


def test_core_scores_are_the_models_logits(pair):
    from gemmarun.generation import core

    _, lm = pair
    ids = torch.randint(3, lm.config.vocab_size, (SEQ,), generator=torch.Generator().manual_seed(5)).tolist()
    full = lm.logits(ids)
    cache = KVCache.for_model(lm.model, 1, SEQ)
    with torch.inference_mode():
        parts = list(core.score(lm.model, cache, ids, chunk=9))
    assert [s for s, _ in parts] == [0, 9, 18, 27, 36]
    assert (torch.cat([p for _, p in parts]) - full).abs().max().item() < 1e-4
    logp, greedy = core.token_logprobs(full[:-1], ids[1:])
    want = torch.log_softmax(full[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.equal(logp, want) and torch.equal(greedy, full[:-1].argmax(-1) == torch.tensor(ids[1:]))


def test_core_context_check():
    from gemmarun import ContextLengthError, InvalidParameterError
    from gemmarun.generation import core

    core.check_prompt(7, 8, 512)  # room for one new token
    core.check_prompt(8, 8, 512, room=0)  # scoring: the tokens only
    with pytest.raises(ContextLengthError, match="the prompt has 8 tokens but the context holds 8"):
        core.check_prompt(8, 8, 512)
    with pytest.raises(ContextLengthError, match="9 tokens do not fit the context of 8"):
        core.check_prompt(9, 8, 512, room=0)
    with pytest.raises(InvalidParameterError, match="empty"):
        core.check_prompt(0, 8, 512)
