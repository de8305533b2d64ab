"""transformers integration: the ``RetrievalCache``, model loading, and the one decode driver.

The only package that imports transformers. ``cache``: ``RetrievalCache`` and the ``"retrieval_attn"``
attention function (and ``capture_qk``); ``models``: ``load_model`` (GGUF, folder, the embedded
SmolLM2, cached de-quantised) and ``random_model``; ``generate``: ``Decoder``, the chunked prefill and
decode loop every tool runs through, the cache argument's name in the installed transformers, token
choosers (greedy, sampling) and prompt encoding (chat template); ``chat``: ``Chat``, a conversation
about documents read once, turn after turn on one cache.
"""

from .cache import ATTN_IMPLEMENTATION, RetrievalCache, capture_qk, left_padding
from .chat import Chat, TurnStats, chat_opening
from .generate import (
    Decoder,
    cache_argument,
    cache_kwargs,
    dynamic_cache,
    greedy,
    prefill_spans,
    prompt_ids,
    sampler,
    stop_tokens,
)
from .models import (
    MODEL_SHAPES, cached_copy, embedded_model_path, load_model, quiet_transformers, random_model,
    trained_positions,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "MODEL_SHAPES",
    "Chat",
    "Decoder",
    "RetrievalCache",
    "cache_argument",
    "cache_kwargs",
    "cached_copy",
    "TurnStats",
    "capture_qk",
    "chat_opening",
    "dynamic_cache",
    "embedded_model_path",
    "greedy",
    "left_padding",
    "load_model",
    "prefill_spans",
    "prompt_ids",
    "quiet_transformers",
    "random_model",
    "sampler",
    "stop_tokens",
    "trained_positions",
]
