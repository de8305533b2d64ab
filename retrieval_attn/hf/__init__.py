"""transformers integration: the ``RetrievalCache``, model loading, and the one decode driver.

The only package that imports transformers. ``cache``: ``RetrievalCache`` and the ``"retrieval_attn"``
attention function (and ``capture_qk``); ``models``: ``load_model`` (GGUF, folder, the embedded
SmolLM2) and ``random_model``; ``generate``: ``Decoder``, the chunked prefill and decode loop every
tool runs through; ``chat``: ``Chat``, a conversation about documents read once, turn after turn on one
cache.
"""

from .cache import ATTN_IMPLEMENTATION, RetrievalCache, capture_qk, left_padding
from .chat import Chat, TurnStats, chat_opening
from .generate import Decoder, dynamic_cache, greedy, prefill_spans
from .models import MODEL_SHAPES, embedded_model_path, load_model, random_model

__all__ = [
    "ATTN_IMPLEMENTATION",
    "MODEL_SHAPES",
    "Chat",
    "Decoder",
    "RetrievalCache",
    "TurnStats",
    "capture_qk",
    "chat_opening",
    "dynamic_cache",
    "embedded_model_path",
    "greedy",
    "left_padding",
    "load_model",
    "prefill_spans",
    "random_model",
]
