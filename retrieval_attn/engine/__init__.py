"""``RetrievalAttention``: the per-layer state machine of retrieval-attn, and its library API.

One engine serves one attention layer. ``prefill(q, k, v)`` runs exact causal attention and splits
the keys/values: the first ``sink_tokens`` and the last ``window_tokens`` stay on the tensors' device,
the rest go to a CPU ``KVStore``. The first ``decode`` builds the key index over the offloaded keys;
each ``decode(q, k, v)`` then attends on the device over sink + window + the new token, retrieves the
top-k offloaded keys of every query head from the index on the CPU, attends over them there, and
merges both parts exactly by log-sum-exp. The new token joins the window; once the window is full,
its oldest token spills to the CPU store and into the index. ``prefill`` after decode steps takes
the next turn of a conversation: its tokens attend exactly over everything seen, then enter the
window, and what spills goes to the store and into the index, as for decode.

The engine is a facade: it validates calls, runs prefill, orders the work of a decode step, and owns
the ``KVStore``, the one copy of the offloaded rows, which it hands to its parts. A decode step is a
list of partial attentions (``_partials``: the device window's, then the retrieved rows'), each
(out, lse), merged by log-sum-exp: another partial state plugs in there. Each part has one concern:

- ``window.DeviceWindow``: sink + ring buffers on the device and attention over them; hands back the
  rows that spill.
- ``indexing.IndexLifecycle``: the index as a state machine (sampling -> building -> built <->
  rebuilding), from the build (foreground, or on a background thread from ``start_index_build`` so it
  overlaps the prefill of later layers) to the insertion of spilled keys and background rebuilds
  (``config.rebuild_growth``); it owns "the prompt is over", which makes later prefills turns.
- ``prefill``: the exact attention of a prefill chunk, over one copy of the context while the prompt
  is read, over the window and the store's rows in bounded blocks merged by lse after decoding.
- ``retrieval.HostRetrieval``: preallocated (pinned, on CUDA) host buffers, the copy of q to the host,
  the CPU worker running the search and its placement's work (numba calls that release the GIL; with
  ``config.overlap`` on a worker thread while the device attends over sink + window), and the return of
  the retrieved part to the device; ``CpuPlacement`` attends over the rows on the CPU,
  ``DevicePlacement`` ships them for the device to attend over.
- ``stats``: ``EngineStats`` and the step timer.

``RetrievalConfig(estimate_tail=True)`` adds a third part to every step: ``tail.TailEstimate``, an
estimate of the attention over the offloaded rows the step did not retrieve, merged by lse like the
other two (with ``retrieve=False``, over every offloaded row).
``RetrievalConfig(retrieve=False)`` skips the index and the retrieval (the sink + window baseline);
``RetrievalConfig(telemetry=True)`` makes every decode step also measure, exactly, what retrieval
missed (``self.telemetry``, see ``retrieval_attn.engine.telemetry``). ``fork(config)`` copies an engine
after prefill to decode with other settings, so one exact prefill serves several of them.

Plain tensors in, tensors out: this package knows nothing about transformers or tokenizers.
"""

from __future__ import annotations

import contextlib
import copy
from types import MappingProxyType

import torch

from ..attention import merge_state
from ..checks import check_int
from ..config import RetrievalConfig
from ..index import ThreadChooser, cpu_threads, params_class, thread_budget
from ..offload import KVStore
from .checks import check_call, check_construction, check_finite, check_fork, finite_flag
from .indexing import IndexLifecycle, Phase
from .prefill import prompt_attention, turn_attention
from .retrieval import HostRetrieval
from .selection import DeviceSelection
from .stats import STEP_PARTS, EngineStats, StepTimer
from .tail import TailEstimate
from .telemetry import LayerTelemetry, record_step
from .window import DeviceWindow

__all__ = ["RetrievalAttention", "EngineStats", "STEP_PARTS"]

Partial = tuple[torch.Tensor, torch.Tensor]  # out (B, Hq, 1, D), lse (B, Hq, 1), fp32


class RetrievalAttention:
    """Attention for one layer with the middle of the KV cache offloaded to the CPU and retrieved.

    Parameters
    ----------
    config : what stays on the device, top_k, the index backend.
    num_heads : query heads (Hq); must be a multiple of num_kv_heads (GQA).
    num_kv_heads : key/value heads (Hkv).
    head_dim : D.
    scale : logit scale; default ``head_dim ** -0.5``.
    """

    def __init__(
        self, config: RetrievalConfig, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None
    ):
        check_construction(config, num_heads, num_kv_heads, head_dim, scale)
        self.config = config
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.scale = float(scale) if scale is not None else head_dim**-0.5
        self._reserved = 0  # offloaded rows to allocate at the first prefill (``reserve``)
        self._start()

    def _start(self) -> None:
        """The state before any token: buffers are made at the first prefill."""
        self.window: DeviceWindow | None = None
        self.store: KVStore | None = None  # the offloaded rows, [B * Hkv, n, D] per K and V
        self.retrieval: HostRetrieval | None = None
        self.tail: TailEstimate | None = None  # estimate_tail: the third part of a step, made with the store
        self.indexing = IndexLifecycle(self.config)
        self.timer = StepTimer()
        self._dirty = False  # True while a call updates the state: an interruption there leaves it set
        self.telemetry = LayerTelemetry() if self.config.telemetry else None

    def _hold(self, window: DeviceWindow, store: KVStore) -> None:
        """Keep tokens in ``window`` and ``store``, with host buffers to retrieve from the store."""
        self.window, self.store = window, store
        threads = self.config.cpu_threads or ThreadChooser(thread_budget(window.k.device))
        # an index that selects on the layer's device (sketch) gets the device selection
        part = DeviceSelection if getattr(params_class(self.config.index), "selects_on_device", False) else HostRetrieval
        self.retrieval = part(self.config, store.groups, self.group, self.head_dim, self.scale,
                              pin_memory=window.k.is_cuda, timer=self.timer, dtype=store.dtype, threads=threads)
        # the estimate of the unretrieved rows, beside the store
        if self.config.estimate_tail:
            self.tail = TailEstimate(self.config, store.groups, self.group, self.head_dim, self.scale,
                                     pin_memory=window.k.is_cuda)
            self.tail.reserve(self._reserved)

    @property
    def seen(self) -> int:
        """Tokens of the sequence so far, prefill and decode."""
        return self.window.seen if self.window is not None else 0

    def reserve(self, tokens: int) -> None:
        """Size the CPU store for a context of ``tokens`` tokens per sequence at the first prefill (memory planning)."""
        check_int("", "tokens", tokens, 1)
        self._reserved = max(0, tokens - self.config.sink_tokens - self.config.window_tokens)
        if self.store is not None:
            self.store.reserve(self._reserved)
        if self.tail is not None:
            self.tail.reserve(self._reserved)

    def reset(self) -> None:
        """Forget every token: wait for an index build in flight, drop the device buffers, the (pinned) CPU
        store and the index; next comes a prefill."""
        self.indexing.wait()
        self._start()

    def _check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decode: bool) -> None:
        """ValueError naming the argument for any mismatch with the engine or what it holds, or a call out of order."""
        held = None if self.window is None else (self.window.batch, self.window.k.dtype, self.window.k.device)
        check_call(q, k, v, self.num_heads, self.num_kv_heads, self.head_dim, held, self.seen, decode, self._dirty)

    def _offload(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Move spilled k, v (B, Hkv, t, D) to the CPU store, and into the index once it holds keys."""
        t, d = k.shape[2], k.shape[3]
        self.store.append(k.reshape(-1, t, d), v.reshape(-1, t, d))  # [B * Hkv, t, D]; async from a GPU
        self.indexing.add(self.store)

    @torch.no_grad()
    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Exact causal attention for a chunk of new tokens, then store them.

        Parameters
        ----------
        q : (batch, num_heads, n, head_dim), post-RoPE.
        k, v : (batch, num_kv_heads, n, head_dim), post-RoPE keys.

        Returns
        -------
        out : (batch, num_heads, n, head_dim), q's dtype and device.

        May be called several times before the first ``decode`` (chunked prefill); the result equals
        one call on the concatenated chunks. After ``decode`` steps (or ``start_index_build``) a
        prefill is the next turn of the conversation: exact over every token seen, with the offloaded
        rows brought to q's device ``prefill_block`` rows at a time, then its tokens enter the window
        and what spills is indexed (``add``; with ``rebuild_growth``, its queries train rebuilds).
        """
        self._check(q, k, v, decode=False)
        if self.window is None:
            b = k.shape[0]
            store = KVStore(b * self.num_kv_heads, self.head_dim, dtype=k.dtype)  # rows in the model's dtype
            store.reserve(self._reserved)
            self._hold(DeviceWindow(self.config.sink_tokens, self.config.window_tokens, b, self.num_kv_heads,
                                    self.head_dim, k.dtype, k.device), store)
        if self.indexing.phase is Phase.BUILDING and not self.indexing.standing_in:
            self.indexing.ready(self.store, self.window.k.device)  # the rows to come go into the index
        block, turn = self.config.prefill_block, self.indexing.prompt_over
        attention = turn_attention if turn else prompt_attention
        out = attention(q, k, v, self.window, self.store, block, self.scale).to(q.dtype)
        self._dirty = True
        self.indexing.sample(q, self.seen, self.num_kv_heads)
        if turn and self.config.rebuild_growth is not None:
            self.indexing.remember_chunk(q, self.num_kv_heads)
        spilled = self.window.append(k, v)
        if spilled is not None:
            self._offload(*spilled)
        self._dirty = False
        return out

    def start_index_build(self) -> None:
        """Start building the index over the offloaded keys on a background thread.

        Call it after the last prefill chunk (``RetrievalCache.last_prefill_chunk`` does, layer by
        layer), so the build of this layer overlaps the prefill of the next ones. Decode serves with
        exact search until the build lands (``RetrievalConfig.serve_while_building``; False: the first
        decode waits for it). Without it, the first ``decode`` builds the index itself. A second call is
        a no-op; a prefill afterwards is the next turn (see ``prefill``).
        """
        if self.seen == 0:
            raise ValueError("start_index_build called before prefill")
        if self.indexing.phase is Phase.SAMPLING and self.config.retrieve:
            self.indexing.start_build(self.store, self.window.k.device)

    def wait_for_index(self) -> None:
        """Block until the background index build (if one is in flight) has finished, re-raising its error;
        the next decode step serves with it. For measurements of the index, not of the exact stand-in."""
        self.indexing.finish_build()

    @torch.no_grad()
    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of one new token per sequence over everything seen, with retrieval from the CPU.

        Parameters
        ----------
        q : (batch, num_heads, 1, head_dim), post-RoPE.
        k, v : (batch, num_kv_heads, 1, head_dim).

        Returns
        -------
        out : (batch, num_heads, 1, head_dim), q's dtype and device.

        On a GPU the step syncs the device once: q, the finiteness check of q, k, v and the row that
        leaves the window reach the host together.
        """
        self._check(q, k, v, decode=True)
        self.timer.start_step()
        top_k = min(self.config.top_k, self.store.n) if self.config.retrieve else 0  # 0: nothing to retrieve
        tail = self.tail if self.store.n else None  # the estimate of the offloaded rows retrieval leaves out
        spilled = self.window.outgoing()  # the oldest window token, spilled at the end of the step
        if spilled is not None:  # copied now so that it lands with q; it joins the store once the step is done
            staged = self.store.stage(*(x.reshape(-1, 1, self.head_dim) for x in spilled))  # [B * Hkv, 1, D]
        if not self.retrieval.to_host(q if top_k or tail is not None else None, finite_flag(q, k, v)):
            self.timer.cancel_step()  # the stats still report the last step
            check_finite(q, k, v)  # names the culprit; nothing was stored
        self.retrieval.clear()
        self.indexing.ready(self.store, self.window.k.device)
        self.window.write(k, v)
        parts = self._partials(q, top_k)
        o, lse = parts[0]
        with self._small_ops(q):
            for part in parts[1:]:
                o, lse = merge_state(o, lse, *part, validate=False)
        top_k_part = (o, lse)  # sink + window + the retrieved rows
        if tail is not None:  # the third part: the estimate of the unretrieved rows, merged like the other two
            with cpu_threads(self.retrieval.thread_count):
                tail.estimate(self.retrieval.q, self.retrieval.ids, self.store)
            with self._small_ops(q):
                o_tail, lse_tail = tail.fetch(q)  # [B, Hq, 1, D], [B, Hq, 1]
                o, lse = merge_state(o, lse, o_tail, lse_tail, validate=False)
                tail.record(lse_tail, lse)
        if self.telemetry is not None and self.store.n:
            self.store.synchronize()
            ids = self.retrieval.ids
            # qg: [G, group, D] fp32 on the CPU: the host copy when this step retrieved, else q itself
            qg = self.retrieval.q if ids is not None else q.reshape(-1, self.group, self.head_dim).float().cpu()
            record_step(self.telemetry, qg, self.store.keys, self.store.values, ids, self.scale,
                        min(self.config.top_k, self.store.n), parts[0],
                        (top_k_part, lse_tail, o) if tail is not None else None)
        self._dirty = True  # everything above only computed; from here on the state changes
        if spilled is not None:
            self.store.commit(staged)
            with cpu_threads(self.retrieval.thread_count):  # inserting the key: the search's thread count
                self.indexing.add(self.store)
        self.window.advance()
        self._dirty = False
        return o.to(q.dtype)

    def _partials(self, q: torch.Tensor, top_k: int) -> list[Partial]:
        """The step's partial attentions, merged by lse in order: the device window's (sink + window + the
        new token) first, then the ``top_k`` retrieved rows' (none when ``top_k`` is 0)."""
        if not top_k:
            return [self._device_attention(q)]
        if self.config.rebuild_growth is not None:
            self.indexing.remember(self.retrieval.q)
        if self.config.overlap or (self.config.overlap is None and q.is_cuda):
            cpu_part = self.retrieval.start(self.indexing.index, self.store, top_k)
            device = self._device_attention(q)
            self.retrieval.wait(cpu_part, q.is_cuda)
        else:
            self.retrieval.run(self.indexing.index, self.store, top_k)
            device = self._device_attention(q)
        with self._small_ops(q):
            return [device, self.retrieval.fetch(q, top_k)]

    @staticmethod
    def _small_ops(q: torch.Tensor) -> contextlib.AbstractContextManager:
        """Where the step's own small torch ops (window attention, merge) run with one thread: on the CPU. A
        torch team of several threads next to numba's (the search) waits on the cores the other's
        workers spin on."""
        return contextlib.nullcontext() if q.is_cuda else cpu_threads(1)

    def _device_attention(self, q: torch.Tensor) -> Partial:
        """Timed attention of q (B, Hq, 1, D) over the window."""
        with self._small_ops(q), self.timer.span("device_attention", torch.cuda.current_stream(q.device) if q.is_cuda else None):
            return self.window.attend(q, self.scale)

    def fork(self, config: RetrievalConfig) -> RetrievalAttention:
        """A copy of this engine, after prefill and before any decode, that decodes with ``config``.

        Prefill is exact whatever the index, so one prefill serves several decode settings. ``config``
        must keep this engine's ``sink_tokens`` and ``window_tokens`` (the device layout); an index that
        trains on prefill queries (roar) needs an engine whose own index kept them (prefill with such
        an index). Device window, CPU store and query sample are copied; this engine is unchanged.
        """
        trains = check_fork(config, self.config, self.indexing.prompt_over, self.indexing.train is not None or not self.seen)
        twin = RetrievalAttention(config, self.num_heads, self.num_kv_heads, self.head_dim, self.scale)
        twin._reserved, twin._dirty = self._reserved, self._dirty
        if self.window is not None:
            twin._hold(copy.deepcopy(self.window), copy.deepcopy(self.store))
        twin.indexing.train = copy.deepcopy(self.indexing.train) if trains else None
        return twin

    @property
    def stats(self) -> EngineStats:
        """Token placement and the cost of the last decode step."""
        window, store, index, retrieval = self.window, self.store, self.indexing.index, self.retrieval
        return EngineStats(
            index=(f"{index.name} (index building)" if self.indexing.standing_in else index.name)
            if index is not None else "",
            seen_tokens=self.seen,
            device_tokens=window.filled if window is not None else 0,
            offloaded_tokens=store.n if store is not None else 0,
            keys_scanned_last_step=retrieval.scanned if retrieval is not None else 0,
            keys_scanned_fraction=retrieval.scanned_fraction if retrieval is not None else 0.0,
            retrieved_last_step=retrieval.retrieved if retrieval is not None else 0,
            cpu_bytes=(store.nbytes if store is not None else 0) + (index.nbytes if index is not None else 0)
            + (self.tail.nbytes if self.tail is not None else 0),
            device_bytes=(window.nbytes if window is not None else 0)
            + getattr(index, "device_nbytes", 0),  # sketch's codes live on the layer's device
            index_build_seconds=self.indexing.build_seconds,
            index_rebuilds=self.indexing.rebuilds,
            step_seconds=MappingProxyType(self.timer.measured()),
        )
