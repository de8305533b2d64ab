"""The memory planner: every byte a request holds on the device and on the host, checked before any work.

``plan_memory`` adds up, for a model shape, a context length and a ``RetrievalConfig``:

- device: the weights; each layer's sink + window (+1 scratch slot) of K and V; the activations of
  the largest prefill chunk (hidden states, q/k/v, the MLP, the last position's logits, and one copy
  of the keys and values of the whole prompt, which prefill attention reads back); on a CPU device
  also the fp32 attention scores of a prefill block (sdpa's math path; CUDA kernels tile them away);
  for a conversation (``prompt_tokens`` below ``context_tokens``: turns prefilled after decoding),
  one tile of the turns' attention (``engine.prefill.turn_attention``: a block of offloaded rows on
  the device, fp32 scores of ``prefill_block`` queries by as many keys, the chunk's merged output);
  and, when roar trains on the device, its block of keys and scores;
- device, for an index that selects on the device (``sketch``): each layer's key codes and ranges, and the
  first stage's buffers its searches share (``estimate_device_nbytes``, ``estimate_shared_device_nbytes``);
- host: each layer's offloaded K and V in the model's dtype (exactly: the store is reserved for the
  context), each layer's index structures (``KeyIndex.estimate_nbytes``: what the backend holds
  besides the store's rows, which graphs and flat read in place; faiss and hnswlib count their own
  fp32 copies; for a conversation, as grown by ``add`` from the first prompt's keys to the whole
  context, which takes a graph longer runs than a build over all of it), buffers its searches share
  (``estimate_shared_nbytes``), the prefill queries each layer keeps until its build (one per
  position, in the model's dtype), and the transient peak of one build in flight
  (``estimate_build_nbytes``; builds run one at a time) and of one insert of spilled keys
  (``estimate_add_nbytes``: roar's co-occurrence candidates of one insert chunk); with
  ``rebuild_growth``, each layer's ring of recent queries that trains rebuilds, and, while rebuilds are in flight, a second index per layer
  (a finished one waits for its layer's next decode step to be swapped in) with its copy of the ring.

On a CPU-only run the device *is* host memory: ``host_total`` adds both sides, weights included.
Items whose name ends in "(transient)" are freed when their step ends; ``steady_host`` leaves them
out (what the process holds while decoding, less the Python runtime itself).

Not counted: the CUDA context (a few hundred MiB outside torch's allocator).

``MemoryPlan.check`` raises ``MemoryBudgetError`` with needed and available bytes when either side
does not fit. Available device memory is ``RetrievalConfig.gpu_memory_gib`` when set, else what the
device reports (free memory on CUDA; on a CPU device both sides are checked against host memory).

This module knows nothing about transformers: ``ModelShape.from_config`` reads attribute names any
Llama-style config has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .checks import check_int
from .config import RetrievalConfig
from .index import backend_for, index_class
from .offload import tail_nbytes

__all__ = [
    "ModelShape", "MemoryPlan", "MemoryBudgetError", "plan_memory", "available_cpu_bytes", "resident_bytes", "GIB",
]

GIB = 1 << 30
_STORE_INITIAL_ROWS = 1024  # KVStore's first capacity (reserve only grows it)


class MemoryBudgetError(ValueError):
    """A request needs more device or CPU memory than is available; the message gives both numbers."""


@dataclass(frozen=True)
class ModelShape:
    """What memory planning needs of a decoder-only model.

    ``weight_bytes`` are the bytes of all parameters and buffers on the device.
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    weight_bytes: int

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype, weight_bytes: int | None = None) -> ModelShape:
        """From a Llama-style model config; without ``weight_bytes`` the parameter count of a Llama layout."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hq = text.num_attention_heads
        hkv = getattr(text, "num_key_value_heads", None) or hq
        d = getattr(text, "head_dim", None) or text.hidden_size // hq
        h, inter, vocab, layers = text.hidden_size, text.intermediate_size, text.vocab_size, text.num_hidden_layers
        if weight_bytes is None:
            per_layer = h * d * (2 * hq + 2 * hkv) + 3 * h * inter + 2 * h
            heads = vocab * h * (1 if getattr(text, "tie_word_embeddings", False) else 2)
            weight_bytes = (layers * per_layer + heads + h) * dtype.itemsize
        return cls(layers, h, hq, hkv, d, inter, vocab, int(weight_bytes))

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ModelShape:
        """From a loaded model: its config, and the bytes its parameters and buffers actually hold."""
        tensors = [*model.parameters(), *model.buffers()]
        weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
        return cls.from_config(model.config, tensors[0].dtype, weight_bytes)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes needed per item on each side, and what is available there (None: not checked)."""

    context_tokens: int
    batch: int
    device_kind: str
    device: dict[str, int]
    cpu: dict[str, int]
    device_available: int | None
    cpu_available: int | None

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def cpu_total(self) -> int:
        return sum(self.cpu.values())

    @property
    def host_total(self) -> int:
        """Every byte on the host: the CPU side, and the device side too when the device is the CPU."""
        return self.cpu_total + (self.device_total if self.device_kind == "cpu" else 0)

    @property
    def steady_host(self) -> int:
        """``host_total`` without the transient items: what a decoding process holds besides its runtime."""
        items = {**self.cpu, **(self.device if self.device_kind == "cpu" else {})}
        return sum(v for k, v in items.items() if not k.endswith("(transient)"))

    def rows(self) -> list[tuple[str, str]]:
        """(item, GiB) rows for a table: every item, then the totals against what is available."""
        out = [(f"device: {k}", f"{v / GIB:.2f} GiB") for k, v in self.device.items()]
        out += [(f"cpu: {k}", f"{v / GIB:.2f} GiB") for k, v in self.cpu.items()]
        for side, total, avail in (("device", self.device_total, self.device_available),
                                   ("cpu", self.cpu_total, self.cpu_available)):
            out.append((f"{side} total / available", f"{total / GIB:.2f} / " + (
                "unchecked" if avail is None else f"{avail / GIB:.2f} GiB")))
        return out

    def check(self) -> None:
        """Raise ``MemoryBudgetError`` naming each side that does not fit, with needed and available bytes."""
        problems = []
        if self.device_kind == "cpu" and self.cpu_available is not None:
            need = self.device_total + self.cpu_total  # the "device" is host memory too
            if need > self.cpu_available:
                problems.append(_shortfall("host memory (device part on the CPU + offloaded part)", need,
                                           self.cpu_available))
            if self.device_available is not None and self.device_total > self.device_available:
                problems.append(_shortfall("device budget", self.device_total, self.device_available))
        else:
            if self.device_available is not None and self.device_total > self.device_available:
                problems.append(_shortfall(f"{self.device_kind} memory", self.device_total, self.device_available))
            if self.cpu_available is not None and self.cpu_total > self.cpu_available:
                problems.append(_shortfall("CPU memory", self.cpu_total, self.cpu_available))
        if problems:
            detail = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in {**self.device, **self.cpu}.items())
            raise MemoryBudgetError(
                f"a context of {self.context_tokens} tokens (batch {self.batch}) does not fit: "
                + "; ".join(problems) + f". Needed: {detail}"
            )


def _shortfall(side: str, need: int, available: int) -> str:
    return f"{side} needs {need} bytes ({need / GIB:.2f} GiB) but {available} bytes ({available / GIB:.2f} GiB) are available"


def _proc_bytes(path: str, key: str) -> int | None:
    """The ``key:`` line of a Linux /proc status file (in kB there) in bytes, or None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_cpu_bytes() -> int:
    """Host memory the process may still use: MemAvailable on Linux, else free physical pages."""
    available = _proc_bytes("/proc/meminfo", "MemAvailable")
    return available if available is not None else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """Resident memory of this process now (Linux; 0 where /proc is missing)."""
    return _proc_bytes("/proc/self/status", "VmRSS") or 0


def _available_device_bytes(device: torch.device, config: RetrievalConfig) -> int | None:
    if config.gpu_memory_gib is not None:
        return int(config.gpu_memory_gib * GIB)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def plan_memory(
    shape: ModelShape,
    context_tokens: int,
    config: RetrievalConfig,
    *,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    prefill_chunk: int = 4096,
    device: str | torch.device = "cpu",
    check_available: bool = True,
    prompt_tokens: int | None = None,
) -> MemoryPlan:
    """Bytes a request of ``context_tokens`` tokens per sequence needs on the device and on the CPU.

    Parameters
    ----------
    shape : the model (``ModelShape.from_model`` or ``from_config``).
    context_tokens : prompt plus generated tokens (>= 1); for a conversation, every turn's tokens and
        answers: the host side is planned for all of them.
    config : sink, window, index and the device budget ``gpu_memory_gib``.
    batch : sequences (>= 1).
    dtype : activation and KV dtype on the device.
    prefill_chunk : tokens per prefill forward pass (>= 1).
    device : where the model runs.
    check_available : fill in the available bytes (False: leave them None, nothing is checked).
    prompt_tokens : the first prefill's tokens, when later turns are prefilled after decoding up to
        ``context_tokens`` (a conversation); None: the whole context is one prompt.
    """
    prompt_tokens = context_tokens if prompt_tokens is None else prompt_tokens
    for name, value in (("context_tokens", context_tokens), ("batch", batch), ("prefill_chunk", prefill_chunk),
                        ("prompt_tokens", prompt_tokens)):
        check_int("", name, value, 1)
    if prompt_tokens > context_tokens:
        raise ValueError(f"prompt_tokens ({prompt_tokens}) must be <= context_tokens ({context_tokens})")
    device = torch.device(device)
    t, b, c = context_tokens, batch, min(prefill_chunk, context_tokens)
    hq, hkv, d, h = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.hidden_size
    es = dtype.itemsize
    on_device = min(t, config.sink_tokens + config.window_tokens)
    n_off = t - on_device
    kv_prompt = 2 * b * hkv * prompt_tokens * d * es  # K and V of the whole prompt, one layer
    # the last position's fp32 logits only: generate() and our CLI/bench prefill with logits_to_keep=1
    activations = b * c * (4 * h + (hq + 2 * hkv) * d + 3 * shape.intermediate_size) * es + b * shape.vocab_size * 4
    dev = {
        "weights": shape.weight_bytes,
        "sink + window KV": shape.num_layers * 2 * b * hkv * (config.sink_tokens + config.window_tokens + 1) * d * es,
        "prefill activations (one chunk)": activations,
        "prefill attention keys/values (the whole prompt)": kv_prompt,
    }
    block = min(config.prefill_block, c)
    if device.type == "cpu":
        dev["prefill attention scores (fp32, math path)"] = 2 * b * hq * block * prompt_tokens * 4
    if prompt_tokens < t:  # a tile's scores and probabilities, its rows moved and widened, merge temporaries
        tile = 2 * b * hq * block * block * 4 + 2 * b * hkv * block * d * (es + 4) + 4 * b * hq * block * d * 4
        # the chunk's merged out + lse (fp32) and the result in the model's dtype
        dev["prefill attention of a turn (one tile)"] = tile + b * hq * c * ((d + 1) * 4 + d * es)
    built = max(0, prompt_tokens - on_device)  # keys of the first build; add() inserts the later turns' keys
    # auto decides at the first build over keys: the prompt's, or (a prompt that spilled none) a later turn's
    name, params = backend_for(config.index, config.index_params, built or n_off, config.top_k)
    backend, groups, group = index_class(name), b * hkv, hq // hkv
    kept = 0  # prefill positions each layer keeps to train its index, one query each per group
    if backend.uses_train_queries and n_off:
        kept = min(t, backend.resolved_params(params)["train_queries"])
        if device.type != "cpu":
            dev["roar training top lists (build, transient)"] = min(n_off * d * 4, 1 << 28) + (1 << 26)
    if n_off and hasattr(backend, "estimate_device_nbytes"):  # an index that keeps codes on the device (sketch)
        capacity = max(n_off, _STORE_INITIAL_ROWS)  # the codes follow the store's rows
        dev[f"index ({name}) codes, all layers"] = shape.num_layers * backend.estimate_device_nbytes(
            groups, n_off, d, params, capacity)
        dev[f"index ({name}) first-stage buffers (shared)"] = backend.estimate_shared_device_nbytes(
            groups, n_off, d, params, group)
    gathered = 0  # sketch with retrieved_attention="device": each layer's candidates' K, V rows, host and device
    if n_off and hasattr(backend, "estimate_device_nbytes") and config.retrieved_attention == "device":
        gathered = shape.num_layers * 2 * groups * group * backend.resolved_params(params)["candidates"] * d * es
        dev[f"index ({name}) candidates' rows, all layers"] = gathered
    dev_items = list(dev)
    for item in dev_items:  # the prefill's activations and copies are freed when it ends
        if item.startswith("prefill"):
            dev[f"{item} (transient)"] = dev.pop(item)
    cpu = {
        f"offloaded KV ({str(dtype).removeprefix('torch.')})":
            shape.num_layers * 2 * groups * max(n_off, _STORE_INITIAL_ROWS) * d * es,
        f"index ({name})": shape.num_layers * backend.estimate_nbytes(groups, n_off, d, params, group, config.top_k,
                                                                      n_off - built) if n_off else 0,
        f"{name} search buffers": backend.estimate_shared_nbytes(groups, n_off, d, params, group) if n_off else 0,
        "training queries, until each layer's build (transient)": shape.num_layers * groups * kept * d * es,
        "index build, one layer (transient)": backend.estimate_build_nbytes(groups, n_off, d, params, kept)
        if n_off else 0,
        "index insert, one chunk of keys (transient)": backend.estimate_add_nbytes(groups, d, params, group,
                                                                                   config.top_k) if n_off else 0,
    }
    if config.estimate_tail and n_off:  # summaries or draws, scratch, result
        cpu[f"tail estimate ({config.tail_method})"] = shape.num_layers * tail_nbytes(
            config.tail_method, groups, group, n_off, d, config.tail_block, config.tail_stride)
    if gathered:
        cpu[f"index ({name}) candidates' rows, pinned, all layers"] = gathered
    if config.rebuild_growth is not None and n_off:
        ring = shape.num_layers * groups * config.rebuild_queries * group * d * 4  # [G, steps, group, D] fp32
        cpu["rebuild training ring (fp32)"] = ring
        if config.retrieve and name != "flat":  # flat is exact: never rebuilt
            rebuilt = backend.estimate_nbytes(groups, n_off, d, params, group, config.top_k)  # built over all keys
            cpu["rebuilds: a second index and its training queries per layer (transient)"] = (
                shape.num_layers * rebuilt + ring)
    return MemoryPlan(
        context_tokens=t,
        batch=b,
        device_kind=device.type,
        device=dev,
        cpu=cpu,
        device_available=_available_device_bytes(device, config) if check_available else None,
        cpu_available=available_cpu_bytes() if check_available else None,
    )
