"""gemmarun against transformers' eager Gemma 2 / Gemma 3 on saved random checkpoints."""
from __future__ import annotations

import pytest
import torch

import gemmarun
from gemmarun.cache import KVCache
from checkpoints import make_reference, save_checkpoint

SEQ = 40  # longer than the test window of 16


@pytest.fixture(scope="module", params=[("gemma2", 16), ("gemma2", 144), ("gemma3", 16)], ids=["g2-256style", "g2-27bstyle", "g3"])
def pair(request, tmp_path_factory):
    kind, scalar = request.param
    ref = make_reference(kind, seed=1, query_pre_attn_scalar=scalar)
    folder = save_checkpoint(ref, tmp_path_factory.mktemp(f"{kind}-{scalar}"))
    return ref, gemmarun.load(folder)


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
