"""Batch-invariant cumulative sum: ``detcompile::cumsum`` (aten.cumsum for floating results).

The scanned dim is moved last and the input flattened to ``[rows, R]``.

* Triton: one program per row; the row is scanned in chunks of the fixed ``BLOCK`` in ascending
  order: ``out = carry + tl.cumsum(chunk)``, then ``carry += chunk total``. ``tl.cumsum``'s
  association follows the register layout the compiler picks, and that layout can follow Triton's
  argument specialisation (``R % 16``, pointer alignment). So ``R`` is marked
  ``do_not_specialize`` and the launcher only passes 16-byte aligned pointers: one binary per
  dtype, hence the same instruction sequence for every row, batch size and ``R``.
* CPU: ``out[..., j] = out[..., j-1] + x[..., j]``, one elementwise add per step.

Accumulation is fp32 (fp64 for fp64); integer/bool results are exact and use aten.cumsum.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _common
from ._common import HAS_TRITON, UnsupportedError, tl, triton

#: Chunk width along the scanned dim (constant: never derived from R or the number of rows).
BLOCK = 1024
NUM_WARPS = 4

if HAS_TRITON:

    @triton.jit(do_not_specialize=["R"])
    def _cumsum_kernel(x_ptr, out_ptr, R, ACC_FP64: tl.constexpr, BLOCK: tl.constexpr):
        ACC = tl.float64 if ACC_FP64 else tl.float32  # accumulation dtype
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * R
        o_row = out_ptr + row * R
        offs = tl.arange(0, BLOCK)
        # Running total of the previous chunks (same value in every lane).
        carry = tl.zeros([BLOCK], ACC)
        for start in range(0, R, BLOCK):
            idx = start + offs
            mask = idx < R
            v = tl.load(x_row + idx, mask=mask, other=0.0).to(ACC)
            s = tl.cumsum(v, axis=0)
            tl.store(o_row + idx, (carry + s).to(out_ptr.dtype.element_ty), mask=mask)
            # Chunk total = last scan element; summing it with exact zeros just extracts it.
            carry = carry + tl.sum(tl.where(offs == BLOCK - 1, s, 0.0), axis=0)


def _result_dtype(x: Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is not None:
        return dtype
    if x.is_floating_point() or x.is_complex():
        return x.dtype
    return torch.int64  # aten promotes integer and bool cumsums to int64


def _plan(x: Tensor, dim: int, dtype: Optional[torch.dtype]):
    """(wrapped dim, input as aten would convert it, accumulation dtype, result dtype)."""
    _common.check_inputs("cumsum", x)
    if x.is_complex() or (dtype is not None and dtype.is_complex):
        raise UnsupportedError("detcompile.cumsum: complex tensors are not supported")
    dim = _common.wrap_dim("cumsum", dim, x.dim())
    res = _result_dtype(x, dtype)
    if res.is_floating_point and (not x.is_floating_point() or not _common.exact_upcast(x.dtype, res)):
        x = x.to(res)  # aten converts the input to dtype= first (e.g. fp32 -> bf16, int -> float)
    acc = torch.float64 if torch.float64 in (x.dtype, res) else torch.float32
    return dim, x, acc, res


def triton_cumsum(x: Tensor, dim: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Triton path of ``detcompile::cumsum`` (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    if not _common.triton_launchable(x):
        raise UnsupportedError("detcompile.cumsum: Triton cannot run on this tensor")
    dim, xin, acc, res = _plan(x, dim, dtype)
    if not res.is_floating_point:
        return torch.cumsum(x, dim, dtype=dtype)
    # Keep the pointer specialisation (and so the compiled scan) identical for every call.
    x2 = _common.aligned16(_common.rows_last(xin, dim))
    rows, R = x2.shape
    out2 = torch.empty((rows, R), dtype=res, device=x.device)
    if rows > 0 and R > 0:
        _cumsum_kernel[(rows,)](
            x2, out2, R,
            ACC_FP64=acc == torch.float64, BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    return _common.restore_rows(out2, x, dim)


def cpu_cumsum(x: Tensor, dim: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """CPU path: sequential running sum, one elementwise add per position."""
    dim, xin, acc, res = _plan(x, dim, dtype)
    if not res.is_floating_point:
        return torch.cumsum(x, dim, dtype=dtype)
    xt = _common.rows_last(xin, dim).to(acc).t().contiguous()  # [R, rows]: each step reads a contiguous row
    out = torch.empty_like(xt)
    if xt.shape[0] > 0:
        run = xt[0].clone()
        out[0] = run
        for j in range(1, xt.shape[0]):
            run = run + xt[j]
            out[j] = run
    return _common.restore_rows(out.t().to(res), x, dim)


@torch.library.custom_op(
    "detcompile::cumsum",
    mutates_args=(),
    schema="(Tensor x, int dim, ScalarType? dtype=None) -> Tensor",
)
def cumsum(x: Tensor, dim: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Batch-invariant ``aten.cumsum``."""
    _common.check_inputs("cumsum", x)
    raise UnsupportedError(f"detcompile.cumsum: device {x.device.type!r} is not supported")


@cumsum.register_fake
def _(x, dim, dtype=None):
    return x.new_empty(x.shape, dtype=_result_dtype(x, dtype))


@cumsum.register_kernel("cpu")
def _(x, dim, dtype=None):
    return cpu_cumsum(x, dim, dtype)


@cumsum.register_kernel("cuda")
def _(x, dim, dtype=None):
    return triton_cumsum(x, dim, dtype)
