"""CPU-side storage of offloaded keys and values, the kernels that attend over retrieved rows, the block
summaries (and estimators) of the rows a step did not retrieve, and how the C heap returns large freed
blocks (``host_memory``, applied at import)."""

from .host_memory import return_large_blocks
from .kernels import attend_rows, gather_rows
from .store import KVStore
from .summaries import BlockSummaries, estimate_blocks, estimate_sample, tail_nbytes

return_large_blocks()

__all__ = ["KVStore", "attend_rows", "gather_rows", "BlockSummaries", "estimate_blocks", "estimate_sample",
           "tail_nbytes"]
