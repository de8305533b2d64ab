"""model_files: a model path checked and read without loading the model, and where cached models live."""

from __future__ import annotations

import json
import time

import pytest

from retrieval_attn.model_files import embedded_model_path, inspect_model, model_cache_dir, model_cache_key


def test_embedded_gguf_header_without_transformers():
    start = time.perf_counter()
    info = inspect_model(None)
    assert info.gguf and info.model_type == "llama" and info.num_layers == 30
    assert info.path == embedded_model_path()
    assert time.perf_counter() - start < 30  # a header read (or the cached config), not a model load


def test_folders_are_read_from_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "num_hidden_layers": 24}))
    with pytest.raises(ValueError, match="has config.json but no weights"):
        inspect_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="has config.json but no tokenizer"):
        inspect_model(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    info = inspect_model(tmp_path)
    assert (info.gguf, info.model_type, info.num_layers) == (False, "qwen2", 24)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x", "text_config": {"model_type": "llama"}}))
    assert inspect_model(tmp_path).num_layers is None  # the layer count is unknown, not guessed


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.gguf", "does not exist"),
    (lambda p: (p / "m.gguf").write_text("text") and p / "m.gguf", "is not a GGUF file"),
    (lambda p: (p / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00") and p / "m.gguf", "not a readable GGUF file"),
    (lambda p: p, "has no config.json"),
    (lambda p: (p / "x.gguf").write_text("x") and p, "it holds x.gguf: pass that file"),
    (lambda p: (p / "config.json").write_text("{") and p, "config.json is not valid JSON"),
    (lambda p: (p / "config.json").write_text('{"model_type": "gpt2"}') and p, "unsupported architecture 'gpt2'"),
])
def test_bad_paths_name_the_path_and_what_is_expected(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        inspect_model(path)


def test_cache_folder_follows_xdg_and_keys_change_with_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_cache_dir() == tmp_path / "xdg" / "retrieval-attn" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert str(model_cache_dir()).endswith(".cache/retrieval-attn/models")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF1")
    key = model_cache_key(model)
    assert key.startswith("m-") and key == model_cache_key(model)
    model.write_bytes(b"GGUF12")  # another size (and time): another key
    assert model_cache_key(model) != key
