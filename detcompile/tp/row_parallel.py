"""A row-parallel linear whose result has the same bits at TP = 1, 2, 4 and 8.

``y = x @ W.T`` with K (W's input dim) split over ranks. A plain TP setup adds each rank's partial
sum with an all-reduce, so the addition order depends on the TP size (and NCCL's ring or tree).
Here K is cut into ``MAX_TP`` chunks fixed by K alone; each chunk's partial product is a
deterministic fp32 matmul (``detcompile::matmul`` on fp32 copies: 16-bit values and their products
are exact in fp32, so this is the 16-bit kernel's fp32 accumulation with the chunk edges as the only
difference), and the chunk partials are added in one fixed binary tree. Rank r of a TP = t group
owns chunks ``[r * MAX_TP / t, (r + 1) * MAX_TP / t)``: a whole subtree, which it adds locally; the
subtree sums are all-gathered (a copy, no arithmetic) and every rank adds the top of the tree in the
same order. TP = 1 adds the whole tree itself. So at every TP size the same fp32 partials meet in
the same additions: the same bits, rounded once to the output dtype after the bias.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

#: Chunks along K: the largest TP size supported (a power of two; every TP size must divide it).
MAX_TP = 8


def chunk_bounds(K: int, chunks: int = MAX_TP) -> list[tuple[int, int]]:
    """[lo, hi) of each of ``chunks`` K-chunks: fixed by K alone (K must be a multiple of ``chunks``,
    so that each rank's slice of x and W is a whole number of chunks)."""
    if K % chunks:
        raise ValueError(f"detcompile.tp: K = {K} is not a multiple of {chunks} chunks (MAX_TP)")
    step = K // chunks
    return [(c * step, (c + 1) * step) for c in range(chunks)]


def owned_chunks(rank: int, tp: int, chunks: int = MAX_TP) -> range:
    """The chunks rank ``rank`` of a TP = ``tp`` group holds: one whole subtree of the chunk tree."""
    if tp < 1 or chunks % tp or tp & (tp - 1):
        raise ValueError(f"detcompile.tp: TP size {tp} must be a power of two dividing {chunks}")
    if not 0 <= rank < tp:
        raise ValueError(f"detcompile.tp: rank {rank} out of range for TP size {tp}")
    per = chunks // tp
    return range(rank * per, (rank + 1) * per)


def tree_sum(parts: list[Tensor]) -> Tensor:
    """Pairwise tree over a power-of-two list: neighbours added level by level, left + right."""
    if not parts or len(parts) & (len(parts) - 1):
        raise ValueError(f"detcompile.tp: tree_sum needs a power-of-two number of parts, got {len(parts)}")
    while len(parts) > 1:
        parts = [parts[i] + parts[i + 1] for i in range(0, len(parts), 2)]
    return parts[0]


def _chunk_partial(x: Tensor, w: Tensor) -> Tensor:
    """fp32 [M, N] partial product of one K-chunk (x [M, k], w [N, k])."""
    return torch.ops.detcompile.matmul(x.float().contiguous(), w.float().contiguous().t())


def row_parallel_linear(x_local: Tensor, w_local: Tensor, bias: Optional[Tensor] = None, *, rank: int = 0,
                        tp: int = 1, group=None, chunks: int = MAX_TP) -> Tensor:
    """This rank's share of ``x @ W.T + bias``: ``x_local`` [M, K/tp] and ``w_local`` [N, K/tp] are the
    rank's slices of x and W along K (chunks ``owned_chunks(rank, tp)``); ``bias`` [N] is added once,
    after the tree. Every rank returns the full [M, N] result in x's dtype. ``tp`` = 1 needs no process
    group; otherwise ``group`` (default: the world) must hold exactly ``tp`` ranks."""
    if x_local.dim() != 2 or w_local.dim() != 2 or x_local.shape[1] != w_local.shape[1]:
        raise ValueError(f"detcompile.tp: x_local [M, k] and w_local [N, k] expected, got "
                         f"{tuple(x_local.shape)} and {tuple(w_local.shape)}")
    mine = owned_chunks(rank, tp, chunks)
    k_local = x_local.shape[1]
    bounds = chunk_bounds(k_local * tp, chunks)
    lo0 = bounds[mine.start][0]
    partials = [_chunk_partial(x_local[:, lo - lo0:hi - lo0], w_local[:, lo - lo0:hi - lo0])
                for lo, hi in (bounds[c] for c in mine)]
    subtree = tree_sum(partials)
    if tp > 1:
        if (dist.get_world_size(group) if dist.is_initialized() else 1) != tp:
            raise ValueError(f"detcompile.tp: the process group must hold {tp} ranks")
        gathered = [torch.empty_like(subtree) for _ in range(tp)]
        dist.all_gather(gathered, subtree.contiguous(), group=group)
        subtree = tree_sum(gathered)  # the top of the tree, in rank order (= chunk order)
    if bias is not None:
        subtree = subtree + bias.float()
    return subtree.to(x_local.dtype)
