"""The texts the tools run models on, and their token ids.

``builtin_text``: ~465 KB of English prose shipped with CPython, the sweep's long context;
``book_text``: a public-domain book shipped with the package (``BOOKS``): ``data/alice.txt``, eval's
needle filler and default fidelity text, and ``data/frankenstein.txt`` (Mary Shelley, *Frankenstein*,
1831 edition, public domain), a second fidelity text that nothing was tuned on. Tokenizers come from the caller (any transformers tokenizer); this module
loads no model and imports no transformers.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

import torch

__all__ = ["BOOK", "BOOKS", "builtin_text", "builtin_token_ids", "book_text", "token_ids"]

BOOK = "alice.txt"
BOOKS = (BOOK, "frankenstein.txt")


def builtin_text() -> str:
    """~465 KB of English prose shipped with CPython: the values of ``pydoc_data.topics.topics``, by key."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


def builtin_token_ids(tokenizer: Any, n: int) -> torch.Tensor:
    """The first ``n`` tokens of ``builtin_text()`` (repeated if it is shorter), (1, n) int64."""
    ids = tokenizer(builtin_text(), return_tensors="pt", verbose=False).input_ids[0]
    if len(ids) < n:
        ids = ids.repeat(math.ceil(n / len(ids)))
    return ids[:n].unsqueeze(0)


def book_text(name: str = BOOK) -> str:
    """A shipped public-domain text of ``BOOKS``: Alice's Adventures in Wonderland (default; ~143 KB, ~37K
    SmolLM2 tokens) or Frankenstein (~438 KB)."""
    if name not in BOOKS:
        raise ValueError(f"text must be one of {list(BOOKS)}, got {name!r}")
    return resources.files("retrieval_attn").joinpath("data", name).read_text()


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """The token ids of ``text`` alone (no special tokens added), so pieces can be concatenated."""
    return list(tokenizer(text, add_special_tokens=False).input_ids)
