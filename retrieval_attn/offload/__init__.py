"""CPU-side storage of offloaded keys and values, and the kernels that attend over retrieved rows."""

from .kernels import attend_rows, gather_rows
from .store import KVStore

__all__ = ["KVStore", "attend_rows", "gather_rows"]
