"""The one decode driver: chunked prefill, then decode steps, over any transformers cache.

``Decoder(model, cache, prefill_chunk)`` is where the model is called. ``prefill`` feeds a prompt in
forward passes of ``prefill_chunk`` tokens (``prefill_spans``: never a 1-token last pass, which a
``RetrievalCache`` would take for a decode step), computing only the last position's logits unless
asked for all of the last pass's, and runs the last pass inside ``cache.last_prefill_chunk()`` when
the cache has one (each layer of a ``RetrievalCache`` then builds its index while later layers
prefill). ``step`` feeds one token; ``decode`` chooses tokens from logits (greedy by default) and
feeds them until ``max_new_tokens`` or a stop token, reporting each token before its forward pass
(streaming) and each step's seconds after it (the device synchronised). The CLI, the decode
benchmark, eval and the bench scripts all run through it; ``DynamicCache`` runs of the same model
(the baselines) too.

transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache`` (the old name warns,
and stops working in 5.40); ``cache_argument(model)`` reads which name the installed transformers'
forward takes, once per model class, and ``Decoder`` passes the cache under it (``cache_kwargs`` does
the same for callers of ``model.generate``).

Choosing tokens: ``greedy``, or ``sampler(temperature, top_p, seed)`` (transformers' own temperature
and top-p logits warpers, then a draw from a seeded generator). ``prompt_ids`` encodes a prompt, in
the tokenizer's chat template when it has one.

Sequences: ``prefill`` and ``step`` take a batch; ``decode`` runs batch 1.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from typing import Any, Callable, Iterator

import torch

from ..checks import check_int, check_number

__all__ = [
    "Decoder", "cache_argument", "cache_kwargs", "dynamic_cache", "greedy", "prefill_spans", "prompt_ids", "sampler",
    "stop_tokens",
]


def prefill_spans(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    """Token ranges [i, j) of the forward passes that prefill n tokens in chunks of ``chunk`` (>= 2).

    A last chunk of one token is merged into the one before: a 1-token forward after prefill is a
    decode step for ``RetrievalCache``.
    """
    i = 0
    while i < n:
        j = min(n, i + chunk)
        if n - j == 1:
            j = n
        yield i, j
        i = j


def dynamic_cache(offloading: bool = False) -> Any:
    """transformers' own ``DynamicCache``, the baselines' cache: the full KV cache on the device, or with
    ``offloading`` every layer's but the current one moved to the CPU and prefetched back (needs CUDA)."""
    from transformers import DynamicCache

    return DynamicCache(offloading=offloading)


@functools.lru_cache(maxsize=None)
def _forward_takes_cache(model_class: type) -> bool:
    return "cache" in inspect.signature(model_class.forward).parameters


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which ``model``'s forward (and ``generate``) takes a cache: ``"cache"`` from
    transformers 5.24 on, ``"past_key_values"`` before."""
    return "cache" if _forward_takes_cache(type(model)) else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` to pass a cache to ``model(...)`` or ``model.generate(...)`` under the name the
    installed transformers takes (``cache_argument``)."""
    return {cache_argument(model): cache}


def greedy(logits: torch.Tensor) -> int:
    """The most likely next token of logits (vocab,)."""
    return int(logits.argmax())


def sampler(temperature: float, top_p: float = 1.0, seed: int | None = None) -> Callable[[torch.Tensor], int]:
    """A token chooser that samples from logits (vocab,) at ``temperature`` (> 0) within the nucleus
    ``top_p`` (in (0, 1]), with transformers' ``TemperatureLogitsWarper`` and ``TopPLogitsWarper``;
    draws come from a generator seeded with ``seed`` (None: a random seed), so a seed repeats a run."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    check_number("", "temperature", temperature, 0.0, low_open=True)
    check_number("", "top_p", top_p, 0.0, 1.0, low_open=True)
    check_int("", "seed", seed, 0, none_allowed=True)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(float(temperature))])
    if top_p < 1:
        warpers.append(TopPLogitsWarper(float(top_p)))
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    def choose(logits: torch.Tensor) -> int:
        scores = warpers(None, logits.detach().float().reshape(1, -1).cpu())  # [1, vocab]
        return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))

    return choose


def stop_tokens(model: torch.nn.Module, tokenizer: Any) -> tuple[int, ...]:
    """The end-of-sequence tokens of a model: its generation config's (one or several) and the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [*(eos if isinstance(eos, (list, tuple)) else [eos]), getattr(tokenizer, "eos_token_id", None)]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def prompt_ids(tokenizer: Any, text: str, chat: bool = True) -> tuple[torch.Tensor, bool]:
    """Token ids (1, n) of a user's prompt, in the tokenizer's chat template (as one user turn, ready for
    the assistant's answer) when ``chat`` and the tokenizer has a template, else as plain text; and
    whether the template was used."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        return ids, True
    return tokenizer(text, return_tensors="pt").input_ids, False


class Decoder:
    """Prefill and decode steps of ``model`` through ``cache``.

    Parameters
    ----------
    model : a transformers causal LM.
    cache : the cache every forward pass uses (a ``RetrievalCache``, a ``DynamicCache``, ...).
    prefill_chunk : prompt tokens per prefill forward pass (>= 2).
    """

    def __init__(self, model: torch.nn.Module, cache: Any, prefill_chunk: int = 512):
        check_int("", "prefill_chunk", prefill_chunk, 2)
        self.model, self.cache, self.prefill_chunk = model, cache, prefill_chunk
        self.device = next(model.parameters()).device
        self._cache = cache_kwargs(model, cache)

    def _forward(self, ids: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """One forward pass of ids (B, n) through the cache: logits (B, n or logits_to_keep, vocab)."""
        return self.model(ids, **self._cache, use_cache=True, logits_to_keep=logits_to_keep).logits

    @torch.no_grad()
    def prefill(
        self, ids: torch.Tensor, all_logits: bool = False, progress: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Feed ids (B, n) in chunks; logits (B, 1, vocab) of the last position, or (B, c, vocab) of every
        position of the last chunk with ``all_logits``. ``progress(tokens)`` after each forward pass."""
        ids = ids.to(self.device)
        n = ids.shape[1]
        last_chunk = getattr(self.cache, "last_prefill_chunk", contextlib.nullcontext)
        for i, j in prefill_spans(n, self.prefill_chunk):
            with last_chunk() if j == n else contextlib.nullcontext():
                logits = self._forward(ids[:, i:j], 0 if all_logits and j == n else 1)
            if progress is not None:
                progress(j - i)
        return logits

    @torch.no_grad()
    def step(self, tokens: int | torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence (an int for batch 1, or (B,)); logits (B, vocab) of the next one."""
        ids = torch.as_tensor(tokens, device=self.device).reshape(-1, 1)  # [B, 1]
        return self._forward(ids)[:, -1]

    def synchronize(self) -> None:
        """Wait for the device (CUDA), so host timers measure finished work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def decode(
        self,
        logits: torch.Tensor,
        max_new_tokens: int,
        choose: Callable[[torch.Tensor], int] = greedy,
        stop: tuple[int, ...] = (),
        on_token: Callable[[int], None] | None = None,
        on_step: Callable[[int, float], None] | None = None,
    ) -> list[int]:
        """Decode batch 1 from logits (1, ..., vocab) of the last position: choose a token, stop on ``stop``,
        else report it (``on_token``), feed it and report the step (``on_step(i, seconds)``, the device
        synchronised); ``max_new_tokens`` tokens at most. Returns the tokens fed."""
        tokens: list[int] = []
        logits = logits.reshape(-1, logits.shape[-1])[-1]  # (vocab,)
        for i in range(max_new_tokens):
            token = choose(logits)
            if token in stop:
                break
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            start = time.perf_counter()
            logits = self.step(token)[0]
            self.synchronize()
            if on_step is not None:
                on_step(i, time.perf_counter() - start)
        return tokens
