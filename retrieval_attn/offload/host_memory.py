"""How the process's C heap treats large blocks: freed ones go back to the system.

glibc serves a block of at least ``M_MMAP_THRESHOLD`` bytes with its own ``mmap`` and unmaps it when
it is freed, but by default it raises that threshold to the size of each such block freed (up to
32 MiB): after the first prefill chunk frees its temporaries, blocks of up to 32 MiB come from the
heap, whose freed memory stays resident (and per-thread arenas keep theirs: the builder's, the CPU
worker's, numba's threads'). A decoder's prefill, its store's growth and its index builds free
hundreds of MiB of such temporaries, which then count in the resident set a user sees, as if held.

``return_large_blocks`` fixes the threshold (``mallopt``), which also stops the raising: every block
of at least ``LARGE_BLOCK`` bytes is mapped on its own and returned when freed. Smaller blocks keep
the heap's speed. The package calls it once, at import of ``retrieval_attn.offload``; a threshold the
user set (``MALLOC_MMAP_THRESHOLD_``, or ``GLIBC_TUNABLES`` naming ``mmap_threshold``) is left as
set, and on a C library other than glibc nothing is done.

Knows nothing of tensors, stores or indexes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["LARGE_BLOCK", "return_large_blocks"]

LARGE_BLOCK = 1 << 20  # bytes: blocks this large are mapped on their own and returned to the system when freed
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_large_blocks(threshold: int = LARGE_BLOCK) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; True if it was set (False: not glibc, or the user
    chose one)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold)))
    except (OSError, AttributeError):
        return False
