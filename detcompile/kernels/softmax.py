"""Batch-invariant softmax / log-softmax: ``detcompile::softmax`` (aten ``_softmax`` / ``_log_softmax``).

The softmax dim is moved last and the input flattened to ``[rows, R]``. Each row is computed by the
same instruction sequence whatever the other rows are, and that sequence depends only on ``R``:

* Triton: one program per row, three passes over the row in chunks of the fixed ``BLOCK``:
  (1) lane-wise running max, then a max over the lanes (exact); (2) lane-wise running
  ``sum(exp(x - max))`` in ascending chunk order, combined by the fixed pairwise lane tree of
  ``reduce.tree_sum`` (layout-independent); (3) write ``exp(x - max) / sum`` or
  ``x - max - log(sum)``. Right padding by -inf adds ``exp(-inf) = 0`` to lanes, an exact no-op,
  so the real part of a padded row has the same bits (attention with right padding).
* CPU: max (exact), ``exp`` elementwise, then a sequential left-to-right sum
  (``_common.cpu_seq_sum``); trailing zeros from -inf padding leave a sequential sum unchanged.

Arithmetic is fp32 (fp64 for fp64 CPU inputs); output is fp32 if ``half_to_float`` else x.dtype.
A row that is entirely -inf gives NaN, as in torch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _common
from ._common import HAS_TRITON, UnsupportedError, tl, triton
from .reduce import BLOCK, LOG2_BLOCK, NUM_WARPS

if HAS_TRITON:
    from .reduce import tree_sum

    @triton.jit
    def _softmax_kernel(
        x_ptr, out_ptr, R,
        LOG: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK: tl.constexpr, LOG2: tl.constexpr,
    ):
        ACC = tl.float64 if ACC_FP64 else tl.float32  # accumulation dtype
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * R
        o_row = out_ptr + row * R
        offs = tl.arange(0, BLOCK)
        # Pass 1: row max (max is exact, so tl.max's internal order does not matter).
        mx = tl.full([BLOCK], float("-inf"), ACC)
        for start in range(0, R, BLOCK):
            idx = start + offs
            v = tl.load(x_row + idx, mask=idx < R, other=float("-inf")).to(ACC)
            mx = tl.maximum(mx, v)
        m = tl.max(mx, axis=0)
        # Pass 2: lane accumulators in ascending chunk order, then the fixed lane tree.
        acc = tl.zeros([BLOCK], ACC)
        for start in range(0, R, BLOCK):
            idx = start + offs
            v = tl.load(x_row + idx, mask=idx < R, other=float("-inf")).to(ACC)
            acc += tl.exp(v - m)
        s = tree_sum(acc, LOG2)
        # Pass 3: normalise.
        if LOG:
            log_s = tl.log(s)
            for start in range(0, R, BLOCK):
                idx = start + offs
                mask = idx < R
                v = tl.load(x_row + idx, mask=mask, other=0.0).to(ACC)
                tl.store(o_row + idx, ((v - m) - log_s).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            for start in range(0, R, BLOCK):
                idx = start + offs
                mask = idx < R
                v = tl.load(x_row + idx, mask=mask, other=float("-inf")).to(ACC)
                tl.store(o_row + idx, (tl.exp(v - m) / s).to(out_ptr.dtype.element_ty), mask=mask)


def _out_dtype(x: Tensor, half_to_float: bool) -> torch.dtype:
    return torch.float32 if (half_to_float and x.dtype in _common.HALF_DTYPES) else x.dtype


def _check(x: Tensor, dim: int) -> int:
    _common.check_inputs("softmax", x)
    if not x.is_floating_point():
        raise UnsupportedError(f"detcompile.softmax: expected a floating tensor, got {x.dtype}")
    n = max(x.dim(), 1)
    if not -n <= dim < n:
        raise IndexError(f"detcompile.softmax: dim {dim} is out of range for {x.dim()} dims")
    return dim % n


def _rows(x: Tensor, dim: int) -> Tensor:
    """x with `dim` moved last, as a contiguous [rows, R] tensor."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    xm = x.movedim(dim, -1)
    return xm.reshape(-1, x.shape[dim]).contiguous()


def _restore(out2: Tensor, x: Tensor, dim: int) -> Tensor:
    """[rows, R] result back to x's shape, contiguous (what the fake impl promises)."""
    if x.dim() == 0:
        return out2.reshape(())
    shape = list(x.shape)
    moved = shape[:dim] + shape[dim + 1:] + [shape[dim]]
    return out2.reshape(moved).movedim(-1, dim).contiguous()


def triton_softmax(x: Tensor, dim: int, half_to_float: bool = False, log: bool = False) -> Tensor:
    """Triton path of ``detcompile::softmax`` (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    if not _common.triton_launchable(x):
        raise UnsupportedError("detcompile.softmax: Triton cannot run on this tensor")
    dim = _check(x, dim)
    x2 = _rows(x, dim)
    rows, R = x2.shape
    out2 = torch.empty((rows, R), dtype=_out_dtype(x, half_to_float), device=x.device)
    if rows > 0 and R > 0:
        _softmax_kernel[(rows,)](
            x2, out2, R,
            LOG=bool(log), ACC_FP64=x.dtype == torch.float64, BLOCK=BLOCK, LOG2=LOG2_BLOCK,
            num_warps=NUM_WARPS,
        )
    return _restore(out2, x, dim)


def cpu_softmax(x: Tensor, dim: int, half_to_float: bool = False, log: bool = False) -> Tensor:
    """CPU path: exact max, elementwise exp, sequential sum."""
    dim = _check(x, dim)
    xa = _rows(x, dim).to(_common.acc_dtype(x.dtype))
    m = _common.cpu_seq_max(xa).unsqueeze(-1)
    z = xa - m
    # torch.exp/log on CPU run through vml, whose loop tail is a partial vector: every element
    # gets the same instructions wherever it sits, so this is position (batch) independent.
    e = torch.exp(z)
    s = _common.cpu_seq_sum(e).unsqueeze(-1)
    out2 = (z - torch.log(s)) if log else (e / s)
    return _restore(out2.to(_out_dtype(x, half_to_float)), x, dim)


@torch.library.custom_op(
    "detcompile::softmax",
    mutates_args=(),
    schema="(Tensor x, int dim, bool half_to_float, bool log) -> Tensor",
)
def softmax(x: Tensor, dim: int, half_to_float: bool, log: bool) -> Tensor:
    """Batch-invariant ``aten._softmax`` (log=False) / ``aten._log_softmax`` (log=True)."""
    _common.check_inputs("softmax", x)
    raise UnsupportedError(f"detcompile.softmax: device {x.device.type!r} is not supported")


@softmax.register_fake
def _(x, dim, half_to_float, log):
    return x.new_empty(x.shape, dtype=_out_dtype(x, half_to_float))


@softmax.register_kernel("cpu")
def _(x, dim, half_to_float, log):
    return cpu_softmax(x, dim, half_to_float, log)


@softmax.register_kernel("cuda")
def _(x, dim, half_to_float, log):
    return triton_softmax(x, dim, half_to_float, log)
