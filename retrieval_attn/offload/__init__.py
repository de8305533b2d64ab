"""CPU-side storage of offloaded keys and values, the kernels that attend over retrieved rows, and the
block summaries (and estimators) of the rows a step did not retrieve."""

from .kernels import attend_rows, gather_rows
from .store import KVStore
from .summaries import BlockSummaries, estimate_blocks, estimate_sample, tail_nbytes

__all__ = ["KVStore", "attend_rows", "gather_rows", "BlockSummaries", "estimate_blocks", "estimate_sample",
           "tail_nbytes"]
