"""``RetrievalCache`` and the ``"retrieval_attn"`` attention function: retrieval-attn inside transformers.

``RetrievalCache(model, config)`` holds one ``RetrievalAttention`` engine per decoder layer and
switches the model's attention implementation to ``"retrieval_attn"``, so
``model.generate(ids, cache=RetrievalCache(model, config))`` works unchanged (``past_key_values=``
before transformers 5.24). How the two
meet: transformers calls ``cache.update(k, v, layer_idx)`` right before the layer's attention
function, in the same thread; ``update`` only marks its layer as pending and hands the new k/v back,
and the attention function then runs that layer's engine (prefill or decode) on the post-RoPE q/k/v.
Without a pending ``RetrievalCache`` layer (a plain ``DynamicCache`` run of the same model), the
attention function is transformers' own sdpa, with the same masks.

Each engine keeps its device part on the device its layer's tensors arrive on, so models split across
devices with accelerate's ``device_map`` work.

Conversations: ``model.generate(ids_so_far_plus_next_turn, cache=cache)`` (or ``past_key_values=``)
continues as with a ``DynamicCache``: generate feeds only the tokens the cache has not seen, and a
forward of several tokens after decoding is the engines' next turn (``RetrievalAttention.prefill``,
exact over everything seen); a forward of one token is a decode step, whatever its origin. A prompt
that does not extend what the cache holds (shorter, or as long: transformers would feed nothing, or
re-feed its tokens at earlier positions) is refused with a ValueError before any engine runs. The
cache sees positions, not token ids: a prompt of the right length whose earlier tokens differ from
the conversation's cannot be told apart (``hf.Chat`` checks the text).

Batches: a batch without padding runs on one batched engine per layer. A left-padded batch (the
attention mask transformers builds from a 2D ``attention_mask``) runs one batch-1 engine per sequence
on that sequence's real tokens only, so padding is never offloaded, indexed or retrieved, and every
sequence decodes as it would alone; padding query rows come back as zeros. Any other mask (right
padding, holes, a non-causal pattern) is a ``ValueError``.

Threads: the handshake between ``update`` and the attention function is thread-local, so different
threads may run different models, or one model with different caches, at the same time; one cache
must not be used by two threads at once.

``RetrievalCache.fork(config)`` copies a prefilled cache to decode with other settings (one exact
prefill, several backends); ``telemetry_summary()`` reduces the per-step telemetry of
``RetrievalConfig(telemetry=True)`` to one row per layer. ``capture_qk`` records the post-RoPE q/k
the attention function sees, for the evaluation tools.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import Any, Iterator

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from ..config import RetrievalConfig
from ..engine import RetrievalAttention
from ..planner import GIB, MemoryPlan, ModelShape, plan_memory
from ..engine.telemetry import LayerTelemetry, summarise
from ..model_files import SUPPORTED_MODEL_TYPES

__all__ = ["RetrievalCache", "capture_qk", "left_padding", "ATTN_IMPLEMENTATION", "SUPPORTED_MODEL_TYPES"]

ATTN_IMPLEMENTATION = "retrieval_attn"

_pending = threading.local()  # .layer: the RetrievalLayer whose update() ran last in this thread
_capture = threading.local()  # .store: dict layer_idx -> (q, k) while capture_qk runs


class _Padding:
    """The left padding of a forward pass, read once from its mask (``left_padding``) and reused by every
    layer that receives the same mask object: transformers builds one mask per forward pass (a layer on
    another device receives a copy, read again)."""

    def __init__(self) -> None:
        self._last: tuple[Any, int, int, int, torch.Tensor, bool] | None = None  # (mask, batch, past, n, pads, any)

    def of(self, mask: torch.Tensor | None, batch: int, past: int, n: int) -> tuple[torch.Tensor, bool]:
        """``left_padding(mask, batch, past, n)`` and whether any sequence is padded, computed once per mask
        object and step."""
        last = self._last
        if last is not None and last[0] is mask and last[1:4] == (batch, past, n):
            return last[4], last[5]
        pads = left_padding(mask, batch, past, n)
        self._last = (mask, batch, past, n, pads, bool(pads.any()))  # holds the mask: its id is not reused meanwhile
        return self._last[4], self._last[5]

    def clear(self) -> None:
        self._last = None


class RetrievalLayer(CacheLayerMixin):
    """One decoder layer's cache: a ``RetrievalAttention`` engine behind transformers' layer interface."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, engine: RetrievalAttention, layer_idx: int, padding: _Padding | None = None):
        super().__init__()
        self.engine, self.layer_idx = engine, layer_idx
        self.padding = padding if padding is not None else _Padding()  # shared by the layers of a cache
        self.cumulative_length = 0
        self._pending_key: torch.Tensor | None = None
        self._sequences: list[RetrievalAttention] | None = None  # one engine per sequence of a padded batch
        self.build_after_prefill = False  # set by RetrievalCache.last_prefill_chunk

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

    @property
    def engines(self) -> list[RetrievalAttention]:
        """The engines serving this layer: the batched one, or one per sequence of a padded batch."""
        return self._sequences if self._sequences is not None else [self.engine]

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the engine(s) on this pending step: q (B, Hq, n, D), k/v (B, Hkv, n, D) -> (B, Hq, n, D).

        ``mask`` is the 4D mask transformers built for the step (None: causal, no padding); its left
        padding decides which tokens of each sequence are real. ``position_ids`` (B or 1, n), when the
        model passes them: at layer 0 of a step of several tokens (a prompt or a turn), each sequence's
        first real new token must sit right after what its engine holds, else the prompt does not extend
        the conversation and the step is refused. A one-token step's positions come from the cache
        itself and are not read back (that would wait for the device at every decode step).
        """
        if key is not self._pending_key:
            raise RuntimeError(
                f"layer {self.layer_idx}: the attention call did not receive the keys its cache update returned"
            )
        self._pending_key = None
        b, n = query.shape[0], query.shape[2]
        past = self.cumulative_length - n
        if self._sequences is None and self.engine.seen != past:
            raise ValueError(_out_of_step(self.layer_idx, self.engine.seen, past))
        pads, padded = self.padding.of(mask, b, past, n)  # [B] leading padding tokens of each sequence
        if past == 0 and self._sequences is None and padded:
            e = self.engine
            self._sequences = [
                RetrievalAttention(e.config, e.num_heads, e.num_kv_heads, e.head_dim, e.scale) for _ in range(b)
            ]
        if self.layer_idx == 0 and n > 1:  # the later layers' updates have not run yet: nothing to undo there
            self._check_positions(position_ids, pads, n)
        if self._sequences is None:
            if padded:
                raise ValueError(
                    "attention_mask: padding appeared after the first forward pass of a sequence; "
                    "left padding must be present from the first call on"
                )
            if n == 1 and self.engine.seen > 0:
                return self.engine.decode(query, key, value)
            out = self.engine.prefill(query, key, value)
            if self.build_after_prefill and query.is_cuda:
                self.engine.start_index_build()  # overlaps the prefill of the following layers
            return out
        if b != len(self._sequences):
            raise ValueError(f"batch size changed from {len(self._sequences)} to {b}; call reset() first")
        for i, engine in enumerate(self._sequences):
            if engine.seen != max(0, past - int(pads[i])):
                raise ValueError(f"attention_mask: the left padding of sequence {i} changed between forward passes")
        out = query.new_zeros(query.shape)  # padding query rows stay 0: transformers ignores them
        for i, engine in enumerate(self._sequences):  # one engine per sequence, on its real tokens only
            start = max(0, int(pads[i]) - past)  # first real token of sequence i in this step
            if start == n:
                continue
            q, k, v = query[i : i + 1, :, start:], key[i : i + 1, :, start:], value[i : i + 1, :, start:]
            prefill = not (n == 1 and engine.seen > 0)
            out[i : i + 1, :, start:] = (engine.prefill if prefill else engine.decode)(q, k, v)
            if prefill and self.build_after_prefill and query.is_cuda:
                engine.start_index_build()
        return out

    def _check_positions(self, position_ids: torch.Tensor | None, pads: torch.Tensor, n: int) -> None:
        """Refuse, before any engine runs, new tokens whose positions do not continue what the engines hold
        (``generate`` given a prompt that is not the conversation so far plus a new turn re-feeds part of
        it at earlier positions). The step is undone: the cache stays as it was."""
        if position_ids is None or position_ids.dim() != 2:
            return
        past = self.cumulative_length - n
        starts = (pads - past).clamp(min=0)  # [B]: first real new token of each sequence in this step
        engines = self._sequences if self._sequences is not None else [self.engine] * len(pads)
        rows = position_ids.expand(len(pads), -1).cpu()  # [B, n]
        for i, (engine, start) in enumerate(zip(engines, starts.tolist())):
            if start < n and int(rows[i, start]) != engine.seen:
                self.cumulative_length = past
                raise ValueError(_not_a_continuation(engine.seen, f"starts at position {int(rows[i, start])}"))

    def get_mask_sizes(self, query_length: int | torch.Tensor, *args: Any, **kwargs: Any) -> tuple[int, int]:
        """(kv_length, kv_offset); accepts the query length as an int or as a cache_position tensor."""
        q_len = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.cumulative_length + q_len, 0

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        """transformers < 5.24's name of ``get_max_length``: -1, the cache has no maximum length."""
        return -1

    def reset(self) -> None:
        """Forget every token (engines drop their device buffers, CPU store and index)."""
        self.engine.reset()
        self.padding.clear()
        self._sequences = None
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
    max_context : tokens per sequence (prompt + generated) the cache is planned for, or None. If
        given, the memory planner checks before any work that the request fits the device budget
        (``config.gpu_memory_gib``, else the device's free memory) and the CPU's available memory,
        raising ``planner.MemoryBudgetError`` with the numbers if not, and each layer's CPU store is
        sized for it up front.
    batch, prefill_chunk : the request's batch size and prefill chunk length, for the planner.
    prompt_tokens : for a conversation, the first prompt's tokens (e.g. a document) when later turns
        are prefilled after decoding up to ``max_context`` (``generate`` with the ids so far plus the
        next turn), for the planner; None: ``max_context`` is one prompt and its answer.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: RetrievalConfig | None = None,
        max_context: int | None = None,
        batch: int = 1,
        prefill_chunk: int = 4096,
        prompt_tokens: int | None = None,
    ):
        config = config if config is not None else RetrievalConfig()
        if not isinstance(config, RetrievalConfig):
            raise ValueError(f"config must be a RetrievalConfig, got {type(config).__name__}")
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise ValueError(f"model must be a transformers causal LM, got {type(model).__name__}")
        attn_modules = _attention_modules(model)
        self.memory_plan: MemoryPlan | None = None
        if max_context is not None:
            self.memory_plan = plan_memory(
                ModelShape.from_model(model), max_context, config, batch=batch, prefill_chunk=prefill_chunk,
                dtype=next(model.parameters()).dtype, device=next(model.parameters()).device,
                prompt_tokens=prompt_tokens,
            )
            self.memory_plan.check()
        _enforce_gpu_budget(model, config)
        text = model.config.get_text_config()
        hq, hkv = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        padding = _Padding()  # one forward pass's mask serves every layer
        layers = [
            RetrievalLayer(RetrievalAttention(config, hq, hkv, m.head_dim, scale=float(m.scaling)), i, padding)
            for i, m in enumerate(attn_modules)
        ]
        super().__init__(layers=layers)
        self.retrieval_config = config
        self._attention_config = getattr(attn_modules[0], "config", model.config)  # what the layers dispatch on
        if max_context is not None:
            for layer in layers:
                layer.engine.reserve(max_context)
        _use_retrieval_attention(model)

    @contextlib.contextmanager
    def last_prefill_chunk(self) -> Iterator[None]:
        """Within the block (the forward pass of the prompt's last chunk), each layer on a GPU starts building
        its index on a background thread right after its prefill, overlapping the following layers; layers
        on the CPU start theirs when the block ends (a build next to the prefill would take the cores the
        following layers compute on).
        Decoding does not wait for the builds (``RetrievalConfig.serve_while_building``)."""
        for layer in self.layers:
            layer.build_after_prefill = True
        try:
            yield
        finally:
            for layer in self.layers:
                layer.build_after_prefill = False
        for layer in self.layers:  # the block completed: every layer has its prompt (started ones: no-op)
            for engine in layer.engines:
                if engine.seen:
                    engine.start_index_build()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        """Hand the new k, v of layer ``layer_idx`` to its engine's next attention call.

        Refuses, before any engine runs, a model whose attention implementation was switched away from
        ``"retrieval_attn"`` after the cache was made (its layers would attend over the new tokens only)."""
        impl = getattr(self._attention_config, "_attn_implementation", ATTN_IMPLEMENTATION)
        if impl != ATTN_IMPLEMENTATION:
            raise ValueError(
                f"RetrievalCache needs the model's attention implementation {ATTN_IMPLEMENTATION!r}, but it was "
                f"switched to {impl!r} after the cache was made (model.set_attn_implementation or "
                f"config._attn_implementation); switch it back with model.set_attn_implementation("
                f"{ATTN_IMPLEMENTATION!r}), or generate with another cache"
            )
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0, *args: Any, **kwargs: Any) -> int:
        """All tokens seen, offloaded or not."""
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length: int | torch.Tensor, layer_idx: int = 0, *args: Any, **kwargs: Any):
        """(kv_length, kv_offset) of a forward pass; transformers asks before running the layers, so this
        is where a forward pass that cannot continue the cache is refused, before any work."""
        q_len = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        self._check_in_step(q_len)
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def _check_in_step(self, new_tokens: int) -> None:
        """ValueError naming ``reset()`` when the layers disagree on what they hold (a forward pass was
        interrupted) or a forward pass brings no token to a cache that holds some (a prompt that does
        not extend what the cache holds)."""
        held = self.layers[0].cumulative_length
        for i, layer in enumerate(self.layers):
            seen = layer.engine.seen if layer._sequences is None else layer.cumulative_length
            if layer.cumulative_length != held or seen != held:
                raise ValueError(_out_of_step(i, seen, held))
        if new_tokens == 0 and held:
            raise ValueError(_not_a_continuation(held, "brings no new token"))

    def wait_for_index(self) -> None:
        """Wait for every layer's background index build (``RetrievalAttention.wait_for_index``)."""
        for layer in self.layers:
            for engine in layer.engines:
                engine.wait_for_index()

    @property
    def stats(self) -> list:
        """Per-layer ``EngineStats`` of the batched engine (for a padded batch: of the first sequence's engine)."""
        return [layer.engines[0].stats for layer in self.layers]

    @property
    def sequence_stats(self) -> list[list]:
        """Per layer, the ``EngineStats`` of each engine: one per sequence of a padded batch, else one."""
        return [[engine.stats for engine in layer.engines] for layer in self.layers]

    def fork(self, config: RetrievalConfig) -> RetrievalCache:
        """A copy of this cache after prefill that decodes with ``config`` (see ``RetrievalAttention.fork``).

        One exact prefill then serves several decode settings, e.g. every index backend.
        """
        if any(layer._sequences is not None for layer in self.layers):
            raise ValueError("fork of a cache holding a padded batch is not supported; fork before padding or run unpadded")
        twin = copy.copy(self)
        twin.layers = [copy.copy(layer) for layer in self.layers]
        for layer in twin.layers:
            layer.engine = layer.engine.fork(config)
        twin.retrieval_config = config
        return twin

    def telemetry_summary(self) -> list[dict[str, float | int]]:
        """Per layer, the summary of ``retrieval_attn.engine.telemetry.summarise`` with a ``layer`` field, over
        every sequence's heads (one engine per sequence of a padded batch); needs
        ``RetrievalConfig(telemetry=True)``."""
        if not self.retrieval_config.telemetry:
            raise ValueError("telemetry_summary needs RetrievalConfig(telemetry=True)")
        return [{"layer": i, **summarise(LayerTelemetry.side_by_side([e.telemetry for e in layer.engines]))}
                for i, layer in enumerate(self.layers)]


def _out_of_step(layer: int, seen: int, counted: int) -> str:
    return (f"layer {layer} holds {seen} tokens but the cache counts {counted} (an interrupted forward pass?): "
            "call cache.reset() before generating again")


def _not_a_continuation(held: int, what: str) -> str:
    return (f"the RetrievalCache holds {held} tokens of a sequence and this forward pass {what}: the prompt does "
            "not extend what the cache holds; pass every token so far plus the new turn (generate feeds only the "
            "ones the cache has not seen), or call cache.reset() (or use a new RetrievalCache) to start from a new "
            "prompt")


def _enforce_gpu_budget(model: torch.nn.Module, config: RetrievalConfig) -> None:
    """On CUDA, cap this process's allocator at ``config.gpu_memory_gib`` (emulating a smaller card)."""
    device = next(model.parameters()).device
    if config.gpu_memory_gib is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    budget = config.gpu_memory_gib * GIB
    if budget > total:
        raise ValueError(
            f"RetrievalConfig.gpu_memory_gib ({config.gpu_memory_gib}) exceeds the device's "
            f"{total / GIB:.2f} GiB: it must be in (0, {total / GIB:.2f}]"
        )
    torch.cuda.set_per_process_memory_fraction(budget / total, device)


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
    out = layer.attend(query, key, value, attention_mask, kwargs.get("position_ids"))  # [B, Hq, n, D]
    return out.transpose(1, 2).contiguous(), None


def left_padding(mask: torch.Tensor | None, batch: int, past: int, n: int) -> torch.Tensor:
    """Leading padding tokens of each sequence, (batch,) int64, read from an attention step's 4D mask.

    Parameters
    ----------
    mask : (batch, 1 or heads, n, past + n), bool (True: visible) or float (0: visible), or None
        (causal, no padding). Query row r is the token at position ``past + r``.
    batch, past, n : the step's batch size, tokens already cached, new tokens.

    Raises ValueError unless the mask is exactly "left padding + causal": row r of sequence i sees the
    keys j with pads[i] <= j <= past + r. A sequence whose tokens so far are all padding counts them all.
    """
    if mask is None:
        return torch.zeros(batch, dtype=torch.int64)
    kv = past + n
    if mask.dim() != 4 or mask.shape[0] != batch or mask.shape[2] != n or mask.shape[3] != kv:
        raise ValueError(
            f"attention_mask: expected a 4D mask (batch={batch}, heads, {n}, {kv}), got shape {tuple(mask.shape)}"
        )
    visible = mask if mask.dtype == torch.bool else mask == 0  # [B, H, n, kv]
    pads = (~visible[:, 0, -1]).long().cumprod(dim=-1).sum(dim=-1)  # [B]: leading masked keys of the last row
    cols = torch.arange(kv, device=mask.device)
    rows = torch.arange(n, device=mask.device) + past
    expected = (cols[None, None, :] >= pads[:, None, None]) & (cols[None, None, :] <= rows[None, :, None])
    bad = (visible != expected[:, None]).flatten(1).any(dim=1)  # [B]
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"attention_mask of sequence {i} is not left padding followed by causal attention "
            "(right padding or padding between tokens is not supported): pad batches on the left"
        )
    return pads.cpu()


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
