"""The one decode driver (``hf.Decoder``) against transformers itself, on a tiny random Llama."""

from __future__ import annotations

import copy

import pytest
import torch

from retrieval_attn import RetrievalConfig
from retrieval_attn.hf import Decoder, RetrievalCache, cache_kwargs, dynamic_cache, prefill_spans

EXACT = RetrievalConfig(sink_tokens=16, window_tokens=32, top_k=1000, index="flat")  # top_k covers every key


def test_chunked_prefill_and_greedy_decode_equal_generate(tiny_llama, device):
    tiny_llama = copy.deepcopy(tiny_llama).to(device)  # the module-wide fixture stays on the CPU
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(5)).to(device)
    plain = tiny_llama.generate(ids, max_new_tokens=24, do_sample=False, **cache_kwargs(tiny_llama, dynamic_cache()))
    expected = plain[0, 300:].tolist()
    assert len(expected) == 24  # no end-of-sequence token cut generate() short: the decoders compare 24 tokens
    cache = RetrievalCache(tiny_llama, EXACT)
    decoder = Decoder(tiny_llama, cache, prefill_chunk=64)
    shown, steps = [], []
    tokens = decoder.decode(decoder.prefill(ids), 24, on_token=shown.append, on_step=lambda i, s: steps.append(i))
    assert tokens == shown == expected and steps == list(range(24))
    assert cache.stats[0].offloaded_tokens == 300 + 24 - 48  # every chosen token was fed back
    stop = expected[10]
    again = Decoder(tiny_llama, RetrievalCache(tiny_llama, EXACT), prefill_chunk=64)
    assert again.decode(again.prefill(ids), 24, stop=(stop,)) == expected[: expected.index(stop)]


@pytest.mark.parametrize("make_cache", [lambda model: dynamic_cache(), lambda model: RetrievalCache(model, EXACT)],
                         ids=["DynamicCache", "RetrievalCache"])
def test_prefill_logits_equal_one_forward(tiny_llama, make_cache):
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = tiny_llama(ids).logits  # [1, 100, vocab]: one forward, no cache
    last = list(prefill_spans(100, 32))[-1][0]  # 96: the last chunk is 4 tokens
    every = Decoder(tiny_llama, make_cache(tiny_llama), prefill_chunk=32).prefill(ids, all_logits=True)
    one = Decoder(tiny_llama, make_cache(tiny_llama), prefill_chunk=32).prefill(ids)
    assert every.shape == (1, 100 - last, 128) and one.shape == (1, 1, 128)
    torch.testing.assert_close(every, full[:, last:], rtol=1e-4, atol=1e-5)  # chunked vs one-shot: fp32 rounding
    torch.testing.assert_close(one, full[:, -1:], rtol=1e-4, atol=1e-5)


def test_the_cache_goes_under_the_name_transformers_takes_without_a_warning(tiny_llama):
    """``cache=`` from transformers 5.24 on (``past_key_values=`` warns there), ``past_key_values=`` before."""
    import inspect
    import warnings

    from retrieval_attn.hf import cache_argument

    name = cache_argument(tiny_llama)
    params = inspect.signature(type(tiny_llama).forward).parameters
    assert name in params and name == ("cache" if "cache" in params else "past_key_values")
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecation warning fails the test
        decoder = Decoder(tiny_llama, RetrievalCache(tiny_llama, EXACT), prefill_chunk=32)
        decoder.decode(decoder.prefill(ids), 4)
        tiny_llama.generate(ids, max_new_tokens=2, do_sample=False, **cache_kwargs(tiny_llama, dynamic_cache()))


def test_sampler_repeats_under_a_seed_and_narrows_with_top_p():
    from retrieval_attn.hf import greedy, sampler

    logits = torch.randn(128, generator=torch.Generator().manual_seed(9))
    draws = [sampler(1.0, seed=3)(logits) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]  # a new sampler with the same seed draws the same
    one = sampler(1.0, seed=3)
    assert len({one(logits) for _ in range(50)}) > 1  # a sampler's draws go on from its generator
    assert all(sampler(1.0, top_p=1e-6, seed=s)(logits) == greedy(logits) for s in range(5))  # nucleus of one
    assert all(sampler(1e-4, seed=s)(logits) == greedy(logits) for s in range(5))  # near-zero temperature
    for bad in (dict(temperature=0), dict(temperature=1, top_p=0), dict(temperature=1, top_p=1.5),
                dict(temperature=float("inf")), dict(temperature=1, seed=-1)):
        with pytest.raises(ValueError, match="temperature|top_p|seed"):
            sampler(**bad)


def test_prompt_ids_use_the_chat_template_when_there_is_one(tokenizer, tiny_llama):
    from retrieval_attn.hf import prompt_ids, stop_tokens

    text = "Write a long story about a dragon."
    chat, used = prompt_ids(tokenizer, text)
    plain, unused = prompt_ids(tokenizer, text, chat=False)
    assert used and not unused
    assert plain.tolist() == [tokenizer(text).input_ids]
    decoded = tokenizer.decode(chat[0])
    assert decoded.startswith("<|im_start|>system") and decoded.endswith("<|im_start|>assistant\n") and text in decoded

    class NoTemplate:
        chat_template = None

        def __call__(self, text, return_tensors):
            return tokenizer(text, return_tensors=return_tensors)

    assert torch.equal(prompt_ids(NoTemplate(), text)[0], plain)
    assert stop_tokens(tiny_llama, tokenizer)[-1] == tokenizer.eos_token_id
