"""Shared fixtures: small random attention inputs, a tiny random Llama, and the embedded model (and its
tokenizer) loaded once per session."""

from __future__ import annotations

import pytest
import torch

PASSKEY = "52718"  # the fact hidden in retrieval_attn/data/passkey.txt


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct GGUF, fp32 on CPU."""
    from retrieval_attn.hf import load_model

    return load_model(None)


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2's tokenizer alone (no weights loaded)."""
    from transformers import AutoTokenizer

    from retrieval_attn.hf import embedded_model_path

    path = embedded_model_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def tiny_llama():
    """A randomly initialised Llama: 2 layers, 4 query heads, 2 KV heads, head dim 16, vocabulary 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def small_model_with_the_embedded_vocabulary(tokenizer):
    """A randomly initialised 2-layer Llama over the embedded tokenizer's vocabulary (fast, meaningless):
    2 query heads, 1 KV head, head dim 16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def passkey_ids(smollm):
    """Token ids (1, n) of the built-in pass-key document, n >= 2,000."""
    from importlib import resources

    text = resources.files("retrieval_attn").joinpath("data", "passkey.txt").read_text()
    return smollm[1](text, return_tensors="pt").input_ids


def random_qkv(batch: int, hq: int, hkv: int, n: int, d: int, seed: int = 0, dtype=torch.float32):
    """q (batch, hq, n, d) and k, v (batch, hkv, n, d), standard normal."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, n, d, generator=g).to(dtype)
    k = torch.randn(batch, hkv, n, d, generator=g).to(dtype)
    v = torch.randn(batch, hkv, n, d, generator=g).to(dtype)
    return q, k, v


def gathered_reference(scores: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, scale: float):
    """Attention of each query over its own retrieved rows, in float64: the reference of the CPU kernel.

    scores (G, m, k) raw q . key of the rows ids (G, m, k) of values (G, n, D) -> out (G, m, D), lse (G, m).
    """
    rows = torch.arange(ids.shape[0])[:, None, None]
    logits = scores.double() * scale  # [G, m, k]
    out = torch.einsum("gmk,gmkd->gmd", torch.softmax(logits, dim=-1), values.double()[rows, ids])
    return out, torch.logsumexp(logits, dim=-1)
