"""retrieval-attn: long-context decoding with the KV cache offloaded to CPU and retrieved by an ANN index.

Public API: ``RetrievalConfig`` (every knob), ``RetrievalAttention`` (the per-layer engine for custom
decoders), ``merge_state`` (exact log-sum-exp merge of two partial attentions). The transformers
integration lives in ``retrieval_attn.hf`` and is imported on demand, so this package does not
import transformers.
"""

from .attention import merge_state
from .config import RetrievalConfig
from .engine import EngineStats, RetrievalAttention

__all__ = ["RetrievalConfig", "RetrievalAttention", "EngineStats", "merge_state"]
__version__ = "0.1.0"
