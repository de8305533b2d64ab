"""CPU-side storage of offloaded keys and values, the kernels that attend over retrieved rows, and how the C
heap returns large freed blocks (``host_memory``, applied at import)."""

from .host_memory import return_large_blocks
from .kernels import attend_rows, gather_rows
from .store import KVStore

return_large_blocks()

__all__ = ["KVStore", "attend_rows", "gather_rows"]
