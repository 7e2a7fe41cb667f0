"""Batch-invariant, deterministic ``detcompile::index_add`` (functional aten.index_add).

Order rule: every destination slice ``out[index[i]]`` starts from ``self`` (converted to the
accumulation dtype: fp32, fp64 for fp64) and adds its contributions ``alpha * source[i]`` one at a
time in ascending source position ``i``; the result is rounded to the tensor dtype once, at the end.
So a destination's bits depend only on its own ``self`` value and its own contributions, never on
other destinations or sources (e.g. the other tokens of a Mixtral expert loop).

CPU (torch ops, no atomics, no ``accumulate=True``): the contributions are processed in *rounds*;
round ``r`` takes the r-th occurrence (in source order) of every destination. Within a round the
destinations are unique, so ``gather -> add -> put`` (``acc[dest] = acc[dest] + src``, an
index_put_ without accumulate) is an exact, race-free update; the number of rounds is the largest
multiplicity of an index, read on the host (fine on the CPU). Every add is one exactly rounded
elementwise op.

CUDA (one Triton kernel, no host sync, shapes fixed by the inputs' shapes, so it can be captured in
a CUDA graph): a stable sort of the index lists each destination's sources in ascending position
and ``searchsorted`` gives each destination its segment of that list, all on the device. One
program per (destination, column block) starts from ``self`` in fp32 and adds the segment's rows
one at a time, then rounds once. Why the bits equal the round algorithm's: each element sees the
same fp32 adds (exactly rounded, nothing to fuse: ``alpha * source`` is still computed first by the
same torch op) in the same order, and the same single round-to-nearest-even at the end. Indices
out of range trip a device-side assert (as aten's CUDA index_add does) instead of a host check.

Integer/bool tensors are exact in any order and use aten.index_add.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _common
from ._common import HAS_TRITON, UnsupportedError

if HAS_TRITON:
    import triton
    import triton.language as tl


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
    return _common.wrap_dim("index_add", dim, self.dim())


def _check_shapes(self: Tensor, dim: int, idx: Tensor, source: Tensor) -> None:
    """Host-side shape checks shared by both algorithms (shapes only: no sync)."""
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


def index_add_rounds(self: Tensor, dim: int, index: Tensor, source: Tensor, alpha=1) -> Tensor:
    """The round algorithm (the CPU path; on CUDA the reference of the Triton kernel); inputs
    already checked, ``dim`` wrapped. Reads the number of rounds on the host."""
    if not self.is_floating_point():
        return torch.index_add(self, dim, index, source, alpha=alpha)
    out_shape = self.shape
    if self.dim() <= 1:
        self, source = self.reshape(-1), source.reshape(-1)
    acc_dt = _common.acc_dtype(self.dtype)
    acc = torch.empty(self.shape, dtype=acc_dt, device=self.device)
    acc.copy_(self)  # fresh buffer: the output never aliases self
    idx = index.reshape(-1).to(torch.int64)
    _check_shapes(self, dim, idx, source)
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


# ----------------------------------------------------------------------------------------------
# Triton kernel (CUDA, or the interpreter in tests)
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:

    # Tensors are seen as [P, D, Q] (self, out) and [P, n, Q] (source), contiguous, with dim in
    # the middle; a destination's "row" is its P*Q elements, split into BLOCK-wide column blocks.
    @triton.jit(do_not_specialize=["D", "n_src"])
    def _index_add_kernel(
        self_ptr, src_ptr, out_ptr, order_ptr, seg_ptr,
        D, n_src, Q, PQ,
        BLOCK: tl.constexpr,
    ):
        d = tl.program_id(0).to(tl.int64)
        # This destination's sources: order[lo:hi], in ascending source position (n < 2**31).
        lo = tl.load(seg_ptr + d).to(tl.int32)
        hi = tl.load(seg_ptr + d + 1).to(tl.int32)
        n_blocks = tl.cdiv(PQ, BLOCK)
        for cb in range(tl.program_id(1), n_blocks, tl.num_programs(1)):
            cols = tl.arange(0, BLOCK).to(tl.int64) + cb * BLOCK
            mask = cols < PQ
            p = cols // Q
            q = cols % Q
            dst = p * D * Q + d * Q + q
            acc = tl.load(self_ptr + dst, mask=mask, other=0.0).to(tl.float32)
            src_row = p * n_src * Q + q
            # One fp32 add per contribution, in ascending source position: the round
            # algorithm's sequence of exactly rounded adds.
            for j in range(lo, hi):
                i = tl.load(order_ptr + j)
                acc = acc + tl.load(src_ptr + src_row + i * Q, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=mask)


def triton_index_add(self: Tensor, dim: int, index: Tensor, source: Tensor, alpha=1) -> Tensor:
    """The sync-free algorithm (CUDA, or CPU tensors under TRITON_INTERPRET=1); inputs already
    checked, ``dim`` wrapped."""
    if not self.is_floating_point():
        return torch.index_add(self, dim, index, source, alpha=alpha)
    if not _common.triton_launchable(self) or self.dtype not in _common.GPU_DTYPES:
        raise UnsupportedError(
            f"detcompile.index_add: the Triton kernel cannot run on {self.device} / {self.dtype}"
        )
    out_shape = self.shape
    if self.dim() <= 1:
        self, source = self.reshape(-1), source.reshape(-1)
    idx = index.reshape(-1).to(torch.int64)
    _check_shapes(self, dim, idx, source)
    out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
    if out.numel() == 0:
        return out.reshape(out_shape)
    D, n = self.shape[dim], idx.numel()
    P = math.prod(self.shape[:dim])
    Q = math.prod(self.shape[dim + 1:])
    if n > 0:
        if alpha != 1:
            # The same torch op as the round algorithm: alpha * source rounded to fp32 first.
            source = source.to(_common.acc_dtype(self.dtype)) * alpha
        sorted_idx, order = torch.sort(idx, stable=True)
        seg = torch.searchsorted(sorted_idx, torch.arange(D + 1, device=idx.device))
        # Every index in [0, D) <=> the segments hold all n sources; checked on the device.
        torch._assert_async(seg[D] - seg[0] == n, "detcompile.index_add: index out of range")
    else:
        order = idx
        seg = torch.zeros(D + 1, dtype=torch.int64, device=idx.device)
    block = min(1024, triton.next_power_of_2(P * Q))
    grid = (D, min(triton.cdiv(P * Q, block), 65535))
    with _common.on_device(self):
        _index_add_kernel[grid](
            self.contiguous(), source.contiguous(), out, order, seg,
            D, n, Q, P * Q,
            BLOCK=block,
            num_warps=4,
        )
    return out.reshape(out_shape)


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
    dim = _check(self, dim, index, source)
    if not HAS_TRITON:
        raise UnsupportedError("detcompile.index_add: Triton is required on CUDA")
    return triton_index_add(self, dim, index, source, alpha)
