"""transformers integration: generate() with RetrievalCache equals plain generate(), model loading errors."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from retrieval_attn import RetrievalConfig
from retrieval_attn.hf import RetrievalCache, capture_qk, load_model


@pytest.mark.slow
def test_smollm_generate_matches_sdpa_and_offloads(smollm, passkey_ids):
    model, tokenizer = smollm
    ids = passkey_ids
    assert ids.shape[1] >= 2000
    plain = model.generate(ids, max_new_tokens=64, do_sample=False, min_new_tokens=64)
    exact = RetrievalCache(model, RetrievalConfig(sink_tokens=64, window_tokens=128, top_k=ids.shape[1] + 64, index="flat"))
    out = model.generate(ids, max_new_tokens=64, do_sample=False, min_new_tokens=64, past_key_values=exact)
    assert torch.equal(out, plain), (tokenizer.decode(out[0, ids.shape[1]:]), tokenizer.decode(plain[0, ids.shape[1]:]))
    assert exact.get_seq_length() == ids.shape[1] + 63  # the last token is never fed back

    approx = RetrievalCache(model, RetrievalConfig(sink_tokens=64, window_tokens=128, top_k=100))
    out = model.generate(ids, max_new_tokens=16, do_sample=False, past_key_values=approx)
    stats = approx.stats
    assert len(stats) == model.config.num_hidden_layers
    seen = out.shape[1] - 1  # every token but the last generated one went through the cache
    assert all(s.device_tokens == 192 and s.offloaded_tokens == seen - 192 for s in stats)
    assert stats[0].retrieved_last_step == 9 * 100  # 9 query heads, top_k 100
    assert "52718" in tokenizer.decode(out[0, ids.shape[1]:])
    # a plain run of the model, still switched to "retrieval_attn", falls back to sdpa unchanged
    fallback = model.generate(ids[:, :300], max_new_tokens=8, do_sample=False, past_key_values=DynamicCache())
    model.set_attn_implementation("sdpa")
    assert torch.equal(fallback, model.generate(ids[:, :300], max_new_tokens=8, do_sample=False))


def _tiny(cls, config_cls, **extra):
    torch.manual_seed(0)
    cfg = config_cls(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, **extra,
    )
    return cls(cfg).eval()


@pytest.mark.parametrize("cls, config_cls", [(Qwen2ForCausalLM, Qwen2Config), (LlamaForCausalLM, LlamaConfig)])
def test_tiny_random_model_generate_matches(cls, config_cls):
    model = _tiny(cls, config_cls)
    ids = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(1))  # batch 2, equal lengths
    plain = model.generate(ids, max_new_tokens=40, do_sample=False, min_new_tokens=40)
    cache = RetrievalCache(model, RetrievalConfig(sink_tokens=16, window_tokens=32, top_k=1000, index="flat"))
    out = model.generate(ids, max_new_tokens=40, do_sample=False, min_new_tokens=40, past_key_values=cache)
    assert torch.equal(out, plain)
    assert cache.stats[1].offloaded_tokens == 300 + 39 - 48


def test_unsupported_architecture_and_padding_are_clear_errors():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50)).eval()
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'"):
        RetrievalCache(gpt2, RetrievalConfig())
    model = _tiny(LlamaForCausalLM, LlamaConfig)
    ids = torch.randint(0, 128, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    with pytest.raises(ValueError, match="padded batches"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, past_key_values=RetrievalCache(model, RetrievalConfig()))


def test_capture_qk_returns_post_rope_queries_and_keys():
    model = _tiny(LlamaForCausalLM, LlamaConfig)
    ids = torch.randint(0, 128, (1, 50))
    with capture_qk(model, layers=[1]) as captured:
        model(ids)
    q, k = captured[1]
    assert q.shape == (1, 4, 50, 16) and k.shape == (1, 2, 50, 16)
    with pytest.raises(ValueError, match=r"layers must be in \[0, 1\]"):
        with capture_qk(model, layers=[2]):
            pass


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.gguf")
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        load_model(bogus)
    with pytest.raises(ValueError, match="has no config.json"):
        load_model(tmp_path)


def test_signature_drift_is_tolerated():
    model = _tiny(LlamaForCausalLM, LlamaConfig)
    cache = RetrievalCache(model, RetrievalConfig(sink_tokens=2, window_tokens=4))
    k = torch.randn(1, 2, 5, 16)
    # older callers pass cache_kwargs positionally or by name
    assert cache.update(k, k, 0, {"cache_position": torch.arange(5)})[0] is k
    assert cache.update(k, k, 1, cache_kwargs={"sin": None})[0] is k
    assert cache.get_seq_length() == 5
    assert cache.get_mask_sizes(3, 0) == (8, 0)
    assert cache.get_mask_sizes(torch.arange(5, 8), 0) == (8, 0)  # mask size from a cache_position tensor


def test_last_prefill_chunk_builds_indexes_in_the_background_with_the_same_tokens():
    """Chunked prefill whose last chunk starts every layer's index build gives the tokens of build-at-decode."""
    model = _tiny(LlamaForCausalLM, LlamaConfig)
    ids = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(2))
    cfg = RetrievalConfig(sink_tokens=16, window_tokens=32, top_k=40, index="roar")
    tokens = {}
    for background in (False, True):
        cache = RetrievalCache(model, cfg, max_context=430)
        with torch.no_grad():
            model(ids[:, :200], past_key_values=cache)
            with cache.last_prefill_chunk() if background else contextlib.nullcontext():
                logits = model(ids[:, 200:], past_key_values=cache).logits
            started = [layer.engine._build_future is not None for layer in cache.layers]
            assert started == [background] * 2
            out = []
            for _ in range(30):
                out.append(int(logits[0, -1].argmax()))
                logits = model(torch.tensor([[out[-1]]]), past_key_values=cache).logits
        tokens[background] = out
        assert all(s.index == "roar" and s.index_build_seconds > 0 for s in cache.stats)
    assert tokens[True] == tokens[False]
