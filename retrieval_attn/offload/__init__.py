"""CPU-side storage of offloaded keys and values."""

from .store import KVStore

__all__ = ["KVStore"]
