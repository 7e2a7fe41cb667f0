"""Tensor parallelism whose bits do not depend on the TP size (issue #15; CPU part first).

``row_parallel``: the one place where TP changes an addition order (a row-parallel linear's partial
sums and their all-reduce) done in an order fixed by K and ``MAX_TP`` alone. Design and argument:
docs/tensor_parallel.md.
"""
from .row_parallel import MAX_TP, chunk_bounds, owned_chunks, row_parallel_linear, tree_sum

__all__ = ["MAX_TP", "chunk_bounds", "owned_chunks", "row_parallel_linear", "tree_sum"]
