"""Batch-invariant, deterministic ``detcompile::scatter_add`` (functional aten.scatter_add).

``out[..., index[i, ...], ...] += src[i, ...]`` along ``dim``. Order rule (same as
``detcompile::index_add``): each destination element starts from ``self`` in the accumulation dtype
(fp32, fp64 for fp64), adds its contributions one at a time in ascending position along ``dim``,
and is rounded to the tensor dtype once at the end. A destination's bits depend only on its own
``self`` value and contributions.

Each element of ``index`` gets the linear offset of its destination in the contiguous output
(``destination_offsets``). Elements sharing a destination differ only in their coordinate along
``dim``, so in row-major order they appear by ascending position along ``dim``: the order rule is
index_add's rule on the flattened output, with the offsets as the index.

CPU (torch ops, no atomics): ``index_add.occurrence_rank`` of the offsets splits the updates into
rounds with unique destinations, each applied with an exact ``gather -> add -> put`` (no
accumulate=True); the number of rounds is read on the host.

CUDA (no host sync, so it can be captured in a CUDA graph): ``index_add``'s Triton kernel on the
flattened output, the offsets as the index. Same bits as the rounds: every element sees the same
fp32 adds in the same order and one rounding. Indices out of range trip a device-side assert (as
aten's CUDA scatter_add does) instead of a host check.

Integer/bool tensors are exact in any order and use aten.scatter_add.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _common
from ._common import HAS_TRITON, UnsupportedError
from .index_add import rounds, triton_index_add


def _check(self: Tensor, dim: int, index: Tensor, src: Tensor) -> int:
    _common.check_inputs("scatter_add", self, src)
    if index.dtype != torch.int64:
        raise UnsupportedError(f"detcompile.scatter_add: index must be int64, got {index.dtype}")
    if self.dtype != src.dtype:
        raise RuntimeError(
            f"detcompile.scatter_add: self ({self.dtype}) and src ({src.dtype}) must have the "
            "same dtype"
        )
    if self.device != src.device or self.device != index.device:
        raise RuntimeError("detcompile.scatter_add: self, index and src must be on one device")
    dim = _common.wrap_dim("scatter_add", dim, self.dim())
    if index.numel() > 0:
        if not (index.dim() == self.dim() == src.dim()):
            raise RuntimeError(
                "detcompile.scatter_add: index, self and src must have the same number of dims"
            )
        for d in range(index.dim()):
            if index.shape[d] > src.shape[d] or (d != dim and index.shape[d] > self.shape[d]):
                raise RuntimeError(
                    f"detcompile.scatter_add: index {tuple(index.shape)} is larger than src "
                    f"{tuple(src.shape)} or self {tuple(self.shape)} in dim {d}"
                )
    return dim


def destination_offsets(index: Tensor, dim: int, out_strides) -> Tensor:
    """Flat (row-major) vector of the linear offset, in a contiguous output with ``out_strides``,
    of each ``index`` element's destination. Integer arithmetic: exact on any device."""
    key = index * out_strides[dim]
    for d in range(index.dim()):
        if d != dim:
            view = [1] * index.dim()
            view[d] = index.shape[d]
            coord = torch.arange(index.shape[d], device=index.device).view(view)
            key = key + coord * out_strides[d]
    return key.reshape(-1)


def contributions(index: Tensor, src: Tensor) -> Tensor:
    """The ``src`` elements ``index`` covers, flat in the row-major order of the offsets."""
    return src[tuple(slice(0, s) for s in index.shape)].reshape(-1)


def scatter_add_rounds(self: Tensor, dim: int, index: Tensor, src: Tensor) -> Tensor:
    """The round algorithm (the CPU path; on CUDA the reference of the Triton path); inputs
    already checked, ``dim`` wrapped. Reads the index range and the number of rounds on the host."""
    if not self.is_floating_point():
        return torch.scatter_add(self, dim, index, src)
    out_shape = self.shape
    if self.dim() == 0:
        self, index, src = self.reshape(1), index.reshape(1), src.reshape(1)
    acc_dt = _common.acc_dtype(self.dtype)
    acc = torch.empty(self.shape, dtype=acc_dt, device=self.device)
    acc.copy_(self)  # fresh contiguous buffer: the output never aliases self
    if index.numel() > 0:
        size = self.shape[dim]
        bad = (index < 0) | (index >= size)
        if bool(bad.any()):
            raise IndexError(
                f"detcompile.scatter_add: index out of bounds for dimension {dim} with size {size}"
            )
        flat = acc.view(-1)
        key = destination_offsets(index, dim, acc.stride())
        vals = contributions(index, src).to(acc_dt)
        for pos in rounds(key):
            k = key if pos is None else key[pos]
            v = vals if pos is None else vals[pos]
            flat[k] = flat[k] + v  # unique destinations: a non-accumulating, exact put
    return acc.to(self.dtype).reshape(out_shape)


def triton_scatter_add(self: Tensor, dim: int, index: Tensor, src: Tensor) -> Tensor:
    """The sync-free algorithm (CUDA, or CPU tensors under TRITON_INTERPRET=1): index_add's Triton
    kernel on the flattened output; inputs already checked, ``dim`` wrapped."""
    if not self.is_floating_point():
        return torch.scatter_add(self, dim, index, src)
    out_shape = self.shape
    if self.dim() == 0:
        self, index, src = self.reshape(1), index.reshape(1), src.reshape(1)
    self = self.contiguous()
    if index.numel() == 0:
        return self.clone().reshape(out_shape)  # a fresh copy, like the round algorithm
    size = self.shape[dim]
    # An index out of range may still land inside the flat output (the next row): checked on the
    # device, per index element.
    torch._assert_async(((index >= 0) & (index < size)).all(),
                        "detcompile.scatter_add: index out of bounds")
    key = destination_offsets(index, dim, self.stride())
    # The values keep the tensor dtype: the kernel converts each one to fp32 (exact) as it adds.
    out = triton_index_add(self.reshape(-1), 0, key, contributions(index, src))
    return out.reshape(out_shape)


@torch.library.custom_op(
    "detcompile::scatter_add",
    mutates_args=(),
    schema="(Tensor self, int dim, Tensor index, Tensor src) -> Tensor",
)
def scatter_add(self: Tensor, dim: int, index: Tensor, src: Tensor) -> Tensor:
    """Deterministic, batch-invariant out-of-place ``aten.scatter_add`` (see the module doc)."""
    _common.check_inputs("scatter_add", self, src)
    raise UnsupportedError(
        f"detcompile.scatter_add: device {self.device.type!r} is not supported"
    )


@scatter_add.register_fake
def _(self, dim, index, src):
    return self.new_empty(self.shape)


@scatter_add.register_kernel("cpu")
def _(self, dim, index, src):
    dim = _check(self, dim, index, src)
    return scatter_add_rounds(self, dim, index, src)


@scatter_add.register_kernel("cuda")
def _(self, dim, index, src):
    dim = _check(self, dim, index, src)
    if not HAS_TRITON:
        raise UnsupportedError("detcompile.scatter_add: Triton is required on CUDA")
    return triton_scatter_add(self, dim, index, src)
