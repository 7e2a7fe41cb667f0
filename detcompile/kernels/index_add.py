"""Batch-invariant, deterministic ``detcompile::index_add`` (functional aten.index_add).

Order rule: every destination slice ``out[index[i]]`` starts from ``self`` (converted to the
accumulation dtype: fp32, fp64 for fp64) and adds its contributions ``alpha * source[i]`` one at a
time in ascending source position ``i``; the result is rounded to the tensor dtype once, at the end.
So a destination's bits depend only on its own ``self`` value and its own contributions, never on
other destinations or sources (e.g. the other tokens of a Mixtral expert loop).

Algorithm (device-agnostic torch ops, no atomics, no ``accumulate=True``): the contributions are
processed in *rounds*; round ``r`` takes the r-th occurrence (in source order) of every destination.
Within a round the destinations are unique, so ``gather -> add -> put`` (``acc[dest] =
acc[dest] + src``, an index_put_ without accumulate) is an exact, race-free update; the number
of rounds is the largest multiplicity of an index. Every add is one elementwise op, exactly
rounded on CPU and CUDA. There is no Triton kernel: the CUDA implementation runs this same
algorithm with torch ops.

Integer/bool tensors are exact in any order and use aten.index_add.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _common
from ._common import UnsupportedError


def occurrence_rank(keys: Tensor) -> Tensor:
    """``rank[i]`` = number of ``j < i`` with ``keys[j] == keys[i]`` (1-D integer tensor).

    A stable sort keeps equal keys in position order, so the rank is the distance to the start of
    the key's group in sorted order. All steps are integer ops: exact on any device.
    """
    n = keys.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=keys.device)
    sorted_keys, perm = torch.sort(keys, stable=True)
    pos = torch.arange(n, device=keys.device)
    is_start = torch.ones(n, dtype=torch.bool, device=keys.device)
    is_start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group_start = torch.cummax(torch.where(is_start, pos, torch.zeros_like(pos)), dim=0).values
    rank = torch.empty_like(pos)
    rank[perm] = pos - group_start  # perm is a permutation: each slot written once
    return rank


def rounds(keys: Tensor):
    """Yield, round by round, the (ascending) positions of the r-th occurrence of every key."""
    rank = occurrence_rank(keys)
    if rank.numel() == 0:
        return
    n_rounds = int(rank.max().item()) + 1
    if n_rounds == 1:
        yield None  # every key unique: one round over all positions
        return
    for r in range(n_rounds):
        yield torch.nonzero(rank == r).squeeze(1)


def _check(self: Tensor, dim: int, index: Tensor, source: Tensor) -> int:
    _common.check_inputs("index_add", self, source)
    if index.dtype not in (torch.int64, torch.int32):
        raise UnsupportedError(
            f"detcompile.index_add: index must be int64 or int32, got {index.dtype}"
        )
    if index.dim() > 1:
        raise RuntimeError("detcompile.index_add: index must be a vector (0-d or 1-d)")
    if self.dtype != source.dtype:
        raise RuntimeError(
            f"detcompile.index_add: self ({self.dtype}) and source ({source.dtype}) must have "
            "the same dtype"
        )
    if source.dim() != self.dim() and not (self.dim() <= 1 and source.numel() == index.numel()):
        raise RuntimeError(
            f"detcompile.index_add: source ({source.dim()} dims) and self ({self.dim()} dims) "
            "must have the same number of dims"
        )
    if self.device != source.device or self.device != index.device:
        raise RuntimeError("detcompile.index_add: self, index and source must be on one device")
    n = max(self.dim(), 1)
    if not -n <= dim < n:
        raise IndexError(f"detcompile.index_add: dim {dim} is out of range for {self.dim()} dims")
    return dim % n


def index_add_rounds(self: Tensor, dim: int, index: Tensor, source: Tensor, alpha=1) -> Tensor:
    """The round algorithm (CPU and CUDA); inputs already checked, ``dim`` wrapped."""
    if not self.is_floating_point():
        return torch.index_add(self, dim, index, source, alpha=alpha)
    out_shape = self.shape
    if self.dim() <= 1:
        self, source = self.reshape(-1), source.reshape(-1)
    acc_dt = _common.acc_dtype(self.dtype)
    acc = torch.empty(self.shape, dtype=acc_dt, device=self.device)
    acc.copy_(self)  # fresh buffer: the output never aliases self
    idx = index.reshape(-1).to(torch.int64)
    if idx.numel() != source.shape[dim]:
        raise RuntimeError(
            "detcompile.index_add: index length must equal source.size(dim) "
            f"({idx.numel()} vs {source.shape[dim]})"
        )
    for d in range(self.dim()):
        if d != dim and source.shape[d] != self.shape[d]:
            raise RuntimeError(
                f"detcompile.index_add: source {tuple(source.shape)} and self "
                f"{tuple(self.shape)} differ in dim {d} (only dim {dim} may differ)"
            )
    if idx.numel() > 0:
        size = self.shape[dim]
        if bool(((idx < 0) | (idx >= size)).any()):  # advanced indexing would wrap negatives
            raise IndexError(
                f"detcompile.index_add: index out of range for dimension {dim} with size {size}"
            )
        src = source.to(acc_dt)
        if alpha != 1:
            src = src * alpha  # one exactly rounded product per element, before the add
        # Indexed dim first (views): plain advanced indexing then gathers/puts whole slices.
        acc_m, src_m = acc.movedim(dim, 0), src.movedim(dim, 0)
        for pos in rounds(idx):
            dest = idx if pos is None else idx[pos]
            contrib = src_m if pos is None else src_m[pos]
            # Unique destinations in a round: a non-accumulating put (deterministic; allowed
            # under torch.use_deterministic_algorithms) of exactly rounded sums.
            acc_m[dest] = acc_m[dest] + contrib
    return acc.to(self.dtype).reshape(out_shape)


@torch.library.custom_op(
    "detcompile::index_add",
    mutates_args=(),
    schema="(Tensor self, int dim, Tensor index, Tensor source, Scalar alpha=1) -> Tensor",
)
def index_add(self: Tensor, dim: int, index: Tensor, source: Tensor, alpha: float = 1) -> Tensor:
    """Deterministic, batch-invariant out-of-place ``aten.index_add`` (see the module doc)."""
    _common.check_inputs("index_add", self, source)
    raise UnsupportedError(f"detcompile.index_add: device {self.device.type!r} is not supported")


@index_add.register_fake
def _(self, dim, index, source, alpha=1):
    return self.new_empty(self.shape)


@index_add.register_kernel("cpu")
def _(self, dim, index, source, alpha=1):
    dim = _check(self, dim, index, source)
    return index_add_rounds(self, dim, index, source, alpha)


@index_add.register_kernel("cuda")
def _(self, dim, index, source, alpha=1):
    # No Triton kernel: the same round algorithm in torch ops (gather, add, plain put; no atomics).
    dim = _check(self, dim, index, source)
    return index_add_rounds(self, dim, index, source, alpha)
