"""The one decode driver (``hf.Decoder``) against transformers itself, on a tiny random Llama."""

from __future__ import annotations

import copy

import pytest
import torch

from retrieval_attn import RetrievalConfig
from retrieval_attn.hf import Decoder, RetrievalCache, dynamic_cache, prefill_spans

EXACT = RetrievalConfig(sink_tokens=16, window_tokens=32, top_k=1000, index="flat")  # top_k covers every key


def test_chunked_prefill_and_greedy_decode_equal_generate(tiny_llama, device):
    tiny_llama = copy.deepcopy(tiny_llama).to(device)  # the module-wide fixture stays on the CPU
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(5)).to(device)
    plain = tiny_llama.generate(ids, max_new_tokens=24, do_sample=False, past_key_values=dynamic_cache())
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
