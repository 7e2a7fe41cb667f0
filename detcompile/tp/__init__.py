"""Tensor parallelism whose bits do not depend on the TP size (issue #15; CPU part first).

``row_parallel``: the one place where TP changes an addition order (a row-parallel linear's partial
sums and their all-reduce) done in an order fixed by K and ``MAX_TP`` alone; ``ops``: the collectives
as detcompile ops (inside the deterministic compile); ``shard``: a Llama-style model sharded for one
rank. Design and argument: docs/tensor_parallel.md.
"""
from .ops import register_group
from .row_parallel import MAX_TP, chunk_bounds, owned_chunks, row_parallel_linear, tree_sum
from .shard import check_shardable, shard_for_engine, shard_llama

__all__ = ["MAX_TP", "check_shardable", "chunk_bounds", "owned_chunks", "register_group", "row_parallel_linear",
           "shard_for_engine", "shard_llama", "tree_sum"]
