"""retrieval-attn: long-context decoding with the KV cache offloaded to CPU and retrieved by an ANN index.

Public API: ``RetrievalConfig`` (every knob), ``RetrievalAttention`` (the per-layer engine for custom
decoders), ``EngineStats``, ``merge_state`` (exact log-sum-exp merge of two partial attentions). The
transformers integration lives in ``retrieval_attn.hf`` and is imported on demand, so this package
does not import transformers.

The names are loaded on first use (PEP 562), so importing the package itself loads neither torch nor
numba: the ``retrieval-attn`` command (``cli``) sets their OpenMP wait policy before they load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_names

__all__ = ["RetrievalConfig", "RetrievalAttention", "EngineStats", "merge_state"]
__version__ = "0.1.0"

_WHERE = {"RetrievalConfig": "config", "RetrievalAttention": "engine", "EngineStats": "engine",
          "merge_state": "attention"}

if TYPE_CHECKING:
    from .attention import merge_state
    from .config import RetrievalConfig
    from .engine import EngineStats, RetrievalAttention


__getattr__ = lazy_names(__name__, _WHERE, globals())
