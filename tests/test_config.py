"""RetrievalConfig validation: every bad value names its field and the allowed range."""

from __future__ import annotations

import pytest

from retrieval_attn import RetrievalConfig
from retrieval_attn.checks import ConfigError


def test_defaults():
    c = RetrievalConfig()
    assert (c.sink_tokens, c.window_tokens, c.top_k, c.index) == (128, 512, 100, "auto")
    assert dict(c.index_params) == {} and c.cpu_threads is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sink_tokens": -1}, r"RetrievalConfig.sink_tokens must be an int >= 0, got -1"),
        ({"window_tokens": 0}, r"window_tokens must be an int >= 1, got 0"),
        ({"top_k": -5}, r"top_k must be an int >= 1, got -5"),
        ({"top_k": 2.5}, r"top_k must be an int"),
        ({"top_k": True}, r"top_k must be an int"),
        ({"cpu_threads": 0}, r"cpu_threads must be an int >= 1 or None, got 0"),
        ({"prefill_block": 0}, r"prefill_block"),
        ({"index": "nope"}, r"index must be one of auto, .*flat.*, got 'nope'"),
        ({"index": "flat", "index_params": {"ef": 10}}, r"index 'flat': unknown parameter\(s\) \['ef'\]"),
        ({"index": "roar", "index_params": {"ef": 0}}, r"parameter 'ef' must be in \[1, inf\]"),
        ({"top_k": 250, "index_params": {"ef": 200}},
         r"top_k must be <= the search queue ef \(200\) of index 'roar', got 250"),
        ({"index": "keygraph", "top_k": 64, "index_params": {"ef": 32}}, r"top_k must be <= .* ef \(32\).*, got 64"),
        ({"index_params": {"bogus": 1}}, r"index_params.*unknown parameter\(s\) \['bogus'\]"),
        ({"index_params": [1]}, r"index_params must be a mapping"),
    ],
)
def test_bad_values_raise_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        RetrievalConfig(**kwargs)
    assert info.value.owner == "RetrievalConfig" and info.value.field in kwargs  # the field, as data


def test_frozen():
    c = RetrievalConfig()
    with pytest.raises(Exception):
        c.top_k = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.index_params["x"] = 1  # type: ignore[index]


def test_auto_resolves_by_size_and_takes_roar_params():
    from retrieval_attn.index import AUTO_FLAT_BELOW, resolve_index

    assert RetrievalConfig(index="auto", index_params={"ef": 256}, top_k=200).index_params["ef"] == 256
    assert RetrievalConfig(index="flat", top_k=5000).top_k == 5000  # exact search has no queue limit
    assert resolve_index("auto", AUTO_FLAT_BELOW - 1) == "flat"
    assert resolve_index("auto", AUTO_FLAT_BELOW) == "roar"
    assert resolve_index("hnsw", 10) == "hnsw"


@pytest.mark.parametrize("index, default_ef", [("auto", 200), ("roar", 200), ("keygraph", 128), ("hnsw", 128)])
def test_ef_follows_top_k_unless_set(index, default_ef):
    from retrieval_attn.index import backend_for, index_params_for

    assert index_params_for(index, {}, default_ef) == {}  # up to the default, the default
    assert index_params_for(index, {}, 1000) == {"ef": 1000}  # above it, ef = top_k
    assert index_params_for(index, {"ef": 1200, "M": 8}, 1000) == {"ef": 1200, "M": 8}  # a set ef is kept
    config = RetrievalConfig(index=index, top_k=1000)  # accepted: no ef to raise by hand
    assert dict(config.index_params) == {}  # the config keeps what was given
    backend, params = backend_for(index, config.index_params, 10**6, config.top_k)
    assert params["ef"] == 1000 and backend == ("roar" if index == "auto" else index)
    assert index_params_for("flat", {}, 1000) == {} and index_params_for("ivf", {}, 1000) == {}


def test_a_backend_whose_library_is_missing_is_left_out_and_refused_by_name(monkeypatch):
    """As on the GPU machine, which lacks faiss and hnswlib: the other backends stay usable, and naming
    hnsw or ivf is refused before any work, with the package it needs."""
    import sys

    from retrieval_attn.evaluation.methods import method_config
    from retrieval_attn.index import available_indexes, make_index, missing_library, registry

    monkeypatch.setattr(registry, "_REGISTRY", {k: v for k, v in registry._REGISTRY.items() if k not in ("hnsw", "ivf")})
    for module in ("faiss", "hnswlib"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails, find_spec finds nothing
    assert (missing_library("hnsw"), missing_library("ivf"), missing_library("roar")) == ("hnswlib", "faiss-cpu", None)
    assert available_indexes() == ["flat", "keygraph", "roar", "sketch"]
    with pytest.raises(ValueError, match=r"got 'hnsw' \(it needs the hnswlib package, which is not installed here: pip install hnswlib\)"):
        RetrievalConfig(index="hnsw")
    with pytest.raises(ValueError, match=r"index 'ivf' needs the faiss-cpu package, which is not installed here"):
        make_index("ivf")
    with pytest.raises(ValueError, match=r"got 'ivf:nprobe=2' \(it needs the faiss-cpu package"):
        method_config("ivf:nprobe=2", RetrievalConfig())
    assert RetrievalConfig(index="roar").index == "roar"
