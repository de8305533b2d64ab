"""Shared fixtures: the device every device-taking test runs on, small random attention inputs, a tiny
random Llama, and the embedded model (and its tokenizer) loaded once per session.

``device`` is "cpu" and, when torch sees a GPU, "cuda"; without one the "cuda" case is collected and
skipped with the reason "no CUDA device". Both carry the ``device`` marker and the "cuda" case the
``cuda`` marker too, so ``pytest -m "device and cuda"`` runs every device-taking test on CUDA
(``bench/gpu_check.sh`` does) and ``-m "device and not cuda"`` on the CPU.
"""

from __future__ import annotations

import contextlib
import traceback
import warnings

import numpy as np
import pytest
import torch

PASSKEY = "52718"  # the fact hidden in retrieval_attn/data/passkey.txt
CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.device),
    pytest.param("cuda", marks=[pytest.mark.device, pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA device")]),
]


def pytest_configure(config):
    config.addinivalue_line("markers", "device: takes a device; runs on cpu and, when present, cuda (-m device)")
    config.addinivalue_line("markers", "cuda: the cuda case of a device-taking test (-m 'device and cuda')")


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """The device a test runs on: "cpu", and "cuda" when torch sees a GPU (else skipped: "no CUDA device")."""
    return request.param


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


# What makes a buffer: the factories of torch and NumPy, copies of a tensor to another device or into
# pinned memory, the search's result arrays, CUDA events and streams. Kernels' own temporaries are not
# buffers (the caching allocator serves them on a GPU).
_TORCH_FACTORIES = ("empty", "zeros", "ones", "full", "empty_like", "zeros_like", "ones_like", "full_like",
                    "empty_strided", "tensor")
_NUMPY_FACTORIES = ("empty", "zeros", "ones", "full", "empty_like", "zeros_like", "ones_like", "full_like")
_TENSOR_METHODS = ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor", "pin_memory")


@contextlib.contextmanager
def count_buffers(monkeypatch):
    """Within the block, every buffer made in any thread (see above) is appended to the yielded list as
    (what, where it was made)."""
    made: list[tuple[str, str]] = []

    def counted(what, fn, keep=lambda result, *args, **kwargs: True):
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            if keep(result, *args, **kwargs):
                made.append((what, "".join(traceback.format_stack(limit=4)[:-1])))
            return result
        return wrapper

    with monkeypatch.context() as m:
        for name in _TORCH_FACTORIES:
            m.setattr(torch, name, counted(f"torch.{name}", getattr(torch, name)))
        for name in _NUMPY_FACTORIES:
            m.setattr(np, name, counted(f"np.{name}", getattr(np, name)))
        for name in _TENSOR_METHODS:
            m.setattr(torch.Tensor, name, counted(f"Tensor.{name}", getattr(torch.Tensor, name)))
        for name in ("to", "cpu", "cuda"):  # a copy to another device
            m.setattr(torch.Tensor, name, counted(f"Tensor.{name}", getattr(torch.Tensor, name),
                                                  lambda r, x, *a, **kw: r.device != x.device))
        from retrieval_attn.index import SearchResult

        m.setattr(SearchResult, "empty", classmethod(counted("SearchResult.empty", SearchResult.empty.__func__)))
        if torch.cuda.is_available():
            m.setattr(torch.cuda, "Event", counted("torch.cuda.Event", torch.cuda.Event))
            m.setattr(torch.cuda, "Stream", counted("torch.cuda.Stream", torch.cuda.Stream,  # a new stream, not
                                                    lambda r, *a, **kw: "stream_id" not in kw))  # current_stream()'s handle
        yield made


@contextlib.contextmanager
def count_device_syncs(monkeypatch):
    """Within the block, every host <-> device synchronisation is appended to the yielded list: explicit ones
    (``torch.cuda.synchronize``, ``Stream.synchronize``, ``Event.synchronize``) and implicit ones (reading
    a device value: ``.item()``, ``bool()``, blocking copies to the host), which CUDA's sync debug mode
    reports as warnings. On a machine without CUDA the same property is counted where it would arise: every
    read of a tensor's value into Python (``bool()``, ``int()``, ``float()``, ``.item()``, ``.tolist()``),
    which on a GPU is an implicit sync (explicit syncs have no CPU counterpart)."""
    syncs: list[str] = []
    if not torch.cuda.is_available():
        with monkeypatch.context() as m:
            for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
                def reading(*args, _name=name, _fn=getattr(torch.Tensor, name), **kwargs):
                    syncs.append(f"Tensor.{_name}")
                    return _fn(*args, **kwargs)
                m.setattr(torch.Tensor, name, reading)
            yield syncs
        return

    def explicit(name, fn):
        def wrapper(*args, **kwargs):
            syncs.append(name)
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)  # counted here, not again as a warning
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        return wrapper

    with monkeypatch.context() as m, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.setattr(torch.cuda, "synchronize", explicit("torch.cuda.synchronize", torch.cuda.synchronize))
        m.setattr(torch.cuda.Stream, "synchronize", explicit("Stream.synchronize", torch.cuda.Stream.synchronize))
        m.setattr(torch.cuda.Event, "synchronize", explicit("Event.synchronize", torch.cuda.Event.synchronize))
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield syncs
        finally:
            torch.cuda.set_sync_debug_mode(0)
            syncs += [f"implicit: {w.message}" for w in caught if "synchroniz" in str(w.message)]
