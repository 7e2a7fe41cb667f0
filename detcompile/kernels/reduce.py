"""Batch-invariant generic reductions: ``detcompile::reduce`` (sum, mean, amax, amin, logsumexp) and
``detcompile::var_mean``.

Layout: the reduced dims are moved to the end and the input is flattened to ``[rows, R]``. Every row
is reduced by the same instruction sequence, which depends only on ``R``:

* Triton: one program per row. The row is read in chunks of the fixed ``BLOCK`` (never derived from
  ``R`` or ``rows``); chunk ``c`` is added (max-ed) into a ``BLOCK``-wide lane accumulator, in
  ascending chunk order, and the lanes are then combined by a fixed pairwise tree
  (``_trees.tree_sum``): lane ``2i`` with lane ``2i+1``, ten levels. Each level is a reshape to pairs and a ``tl.sum``
  over the axis of size 2 (one addition, whose result cannot depend on operand order), so the
  association is fixed by the program text and not by the register layout the compiler picks (which
  can change with the pointer-alignment / ``R % 16`` specialisation). Zero (sum) or -inf (max)
  padding at the end of a row only adds exact zeros to lanes, so it changes no bit.
* CPU: a fixed pairwise tree of elementwise adds over the reduced elements (``_cpu.tree_sum``, a
  function of their count only); amax/amin are exact in any order and use ``torch.amax``/``torch.amin``.

Integer/bool results are exact in any order, so those cases just call the aten op.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _common, _cpu
from ._common import HAS_TRITON, UnsupportedError, tl, triton

#: Chunk width along the reduced dim (a constant: the per-row order must not depend on R or rows).
BLOCK = 1024
LOG2_BLOCK = 10
#: Fixed so the compiled kernel (and hence the lane tree) is the same for every launch.
NUM_WARPS = 4

KINDS = ("sum", "mean", "amax", "amin", "logsumexp")
_KIND_ID = {k: i for i, k in enumerate(KINDS)}

if HAS_TRITON:
    from ._trees import tree_max, tree_min, tree_sum

    @triton.jit
    def _reduce_kernel(
        x_ptr, out_ptr, R,
        KIND: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK: tl.constexpr, LOG2: tl.constexpr,
    ):
        ACC = tl.float64 if ACC_FP64 else tl.float32  # accumulation dtype
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * R
        offs = tl.arange(0, BLOCK)
        if KIND <= 1:  # sum (0), mean (1)
            acc = tl.zeros([BLOCK], ACC)
            for start in range(0, R, BLOCK):
                idx = start + offs
                acc += tl.load(base + idx, mask=idx < R, other=0.0).to(ACC)
            res = tree_sum(acc, LOG2)
            if KIND == 1:
                res = res / R
        elif KIND == 2:  # amax
            acc = tl.full([BLOCK], float("-inf"), ACC)
            for start in range(0, R, BLOCK):
                idx = start + offs
                v = tl.load(base + idx, mask=idx < R, other=float("-inf")).to(ACC)
                acc = tl.maximum(acc, v, propagate_nan=tl.PropagateNan.ALL)
            res = tree_max(acc, LOG2)
        elif KIND == 3:  # amin
            acc = tl.full([BLOCK], float("inf"), ACC)
            for start in range(0, R, BLOCK):
                idx = start + offs
                v = tl.load(base + idx, mask=idx < R, other=float("inf")).to(ACC)
                acc = tl.minimum(acc, v, propagate_nan=tl.PropagateNan.ALL)
            res = tree_min(acc, LOG2)
        else:  # logsumexp
            mx = tl.full([BLOCK], float("-inf"), ACC)
            for start in range(0, R, BLOCK):
                idx = start + offs
                v = tl.load(base + idx, mask=idx < R, other=float("-inf")).to(ACC)
                mx = tl.maximum(mx, v)
            m = tree_max(mx, LOG2)
            # Like aten: an infinite max is replaced by 0 so all -inf rows give -inf (not NaN).
            m = tl.where(tl.abs(m) == float("inf"), 0.0, m)
            acc = tl.zeros([BLOCK], ACC)
            for start in range(0, R, BLOCK):
                idx = start + offs
                v = tl.load(base + idx, mask=idx < R, other=float("-inf")).to(ACC)
                acc += tl.exp(v - m)
            res = tl.log(tree_sum(acc, LOG2)) + m
        tl.store(out_ptr + row, res.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _var_mean_kernel(
        x_ptr, var_ptr, mean_ptr, R, divisor,
        ACC_FP64: tl.constexpr, BLOCK: tl.constexpr, LOG2: tl.constexpr,
    ):
        ACC = tl.float64 if ACC_FP64 else tl.float32  # accumulation dtype
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * R
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], ACC)
        for start in range(0, R, BLOCK):
            idx = start + offs
            acc += tl.load(base + idx, mask=idx < R, other=0.0).to(ACC)
        mean = tree_sum(acc, LOG2) / R
        # Second pass over the deviations (two-pass, like the CPU path): no cancellation issue.
        acc = tl.zeros([BLOCK], ACC)
        for start in range(0, R, BLOCK):
            idx = start + offs
            mask = idx < R
            v = tl.load(base + idx, mask=mask, other=0.0).to(ACC)
            d = tl.where(mask, v - mean, 0.0)
            acc += d * d
        var = tree_sum(acc, LOG2) / divisor
        tl.store(var_ptr + row, var.to(var_ptr.dtype.element_ty))
        tl.store(mean_ptr + row, mean.to(mean_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
# Shape / dtype planning (shared by the fake, CPU and Triton paths).
# ----------------------------------------------------------------------------------------------


def _norm_dims(op: str, ndim: int, dim: Optional[Sequence[int]]) -> List[int]:
    """Sorted reduced dims; None or [] means all dims (aten sum.dim_IntList semantics)."""
    if dim is None or len(dim) == 0:
        return list(range(ndim))
    n = max(ndim, 1)  # a 0-d tensor accepts dim 0 / -1
    out = []
    for d in dim:
        d = int(d)
        if not -n <= d < n:
            raise IndexError(
                f"detcompile.{op}: dim {d} is out of range for a tensor of {ndim} dims"
            )
        d = d % n
        if d in out:
            raise RuntimeError(f"detcompile.{op}: dim {d} appears multiple times in the list of dims")
        out.append(d)
    if ndim == 0:
        return []
    return sorted(out)


def _out_shape(shape: Sequence, red: Sequence[int], keepdim: bool) -> list:
    if keepdim:
        return [1 if i in red else s for i, s in enumerate(shape)]
    return [s for i, s in enumerate(shape) if i not in red]


def _result_dtype(x: Tensor, kind: str, dtype: Optional[torch.dtype]) -> torch.dtype:
    if kind not in _KIND_ID:
        raise ValueError(f"detcompile.reduce: unknown kind {kind!r} (expected one of {KINDS})")
    if x.is_complex() or (dtype is not None and dtype.is_complex):
        raise UnsupportedError("detcompile.reduce: complex tensors are not supported")
    if kind in ("sum", "mean"):
        if dtype is not None:
            return dtype
        if x.is_floating_point():
            return x.dtype
        if kind == "sum":
            return torch.int64  # aten promotes integer and bool sums to int64
        raise RuntimeError(
            "detcompile.reduce: mean(): could not infer output dtype. Input dtype must be a "
            f"floating point dtype (got {x.dtype}); pass dtype="
        )
    if dtype is not None:
        raise ValueError(f"detcompile.reduce: kind {kind!r} takes no dtype")
    if kind == "logsumexp" and not x.is_floating_point():
        return torch.get_default_dtype()
    return x.dtype


def _prepare_input(x: Tensor, kind: str, dtype: Optional[torch.dtype]) -> Tuple[Tensor, torch.dtype]:
    """Input converted as aten converts it, and the accumulation dtype (fp32, fp64 for fp64)."""
    res = _result_dtype(x, kind, dtype)
    if kind in ("amax", "amin"):
        return x, x.dtype
    if not _common.exact_upcast(x.dtype, res) or not x.is_floating_point():
        # aten casts the input to dtype= first (e.g. fp32 -> bf16, int -> float); do the same.
        x = x.to(res)
    acc = torch.float64 if torch.float64 in (x.dtype, res) else torch.float32
    return x, acc


def _rows(x: Tensor, red: Sequence[int]) -> Tensor:
    """x with the reduced dims moved last, as a contiguous [rows, R] tensor."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    keep = [d for d in range(x.dim()) if d not in red]
    R = 1
    for d in red:
        R *= x.shape[d]
    rows = 1
    for d in keep:
        rows *= x.shape[d]
    return x.permute(keep + list(red)).reshape(rows, R).contiguous()


def _check_nonempty(kind: str, x: Tensor, red: Sequence[int]) -> None:
    if kind in ("amax", "amin"):
        for d in red:
            if x.shape[d] == 0:
                raise IndexError(
                    f"detcompile.reduce: {kind}(): Expected reduction dim {d} to have non-zero size."
                )


def _int_reduce(x: Tensor, red: List[int], keepdim: bool, kind: str, dtype) -> Tensor:
    """Integer / bool results: exact in any order, so aten is batch-invariant already."""
    if kind == "sum":
        return torch.sum(x, dim=red, keepdim=keepdim, dtype=dtype)
    if kind == "amax":
        return torch.amax(x, dim=red, keepdim=keepdim)
    if kind == "amin":
        return torch.amin(x, dim=red, keepdim=keepdim)
    raise UnsupportedError(f"detcompile.reduce: kind {kind!r} with integer result")


def _int_result(x: Tensor, kind: str, dtype) -> bool:
    res = _result_dtype(x, kind, dtype)
    return not (res.is_floating_point or res.is_complex)


def _reduce(
    x: Tensor, dim: Optional[Sequence[int]], keepdim: bool, kind: str, dtype,
    reduce_rows: Callable[[Tensor, torch.dtype, torch.dtype], Tensor],
) -> Tensor:
    """What the Triton and CPU paths of ``reduce`` share: dims, dtypes, integer results (aten: exact
    in any order) and the ``[rows, R]`` layout. ``reduce_rows(x2, acc, out_dtype)`` reduces the rows
    of x2 (accumulating in ``acc``) to a ``[rows]`` tensor of ``out_dtype``."""
    red = _norm_dims("reduce", x.dim(), dim)
    out_dtype = _result_dtype(x, kind, dtype)
    out_shape = _out_shape(x.shape, red, keepdim)
    if _int_result(x, kind, dtype):
        return _int_reduce(x, red, keepdim, kind, dtype)
    _check_nonempty(kind, x, red)
    xin, acc = _prepare_input(x, kind, dtype)
    return reduce_rows(_rows(xin, red), acc, out_dtype).reshape(out_shape)


# ----------------------------------------------------------------------------------------------
# Triton launchers.
# ----------------------------------------------------------------------------------------------


def triton_reduce(
    x: Tensor,
    dim: Optional[Sequence[int]],
    keepdim: bool,
    kind: str,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Triton path of ``detcompile::reduce`` (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    if not _common.triton_launchable(x):
        raise UnsupportedError("detcompile.reduce: Triton cannot run on this tensor")

    def launch(x2: Tensor, acc: torch.dtype, out_dtype: torch.dtype) -> Tensor:
        rows, R = x2.shape
        out = torch.empty(rows, dtype=out_dtype, device=x.device)
        if rows > 0:
            _reduce_kernel[(rows,)](
                x2, out, R,
                KIND=_KIND_ID[kind], ACC_FP64=acc == torch.float64, BLOCK=BLOCK, LOG2=LOG2_BLOCK,
                num_warps=NUM_WARPS,
            )
        return out

    return _reduce(x, dim, keepdim, kind, dtype, launch)


def triton_var_mean(
    x: Tensor, dim: Optional[Sequence[int]], correction: float, keepdim: bool
) -> Tuple[Tensor, Tensor]:
    """Triton path of ``detcompile::var_mean``."""
    if not _common.triton_launchable(x):
        raise UnsupportedError("detcompile.var_mean: Triton cannot run on this tensor")
    red = _norm_dims("var_mean", x.dim(), dim)
    out_shape = _out_shape(x.shape, red, keepdim)
    x2 = _rows(x, red)
    rows, R = x2.shape
    var = torch.empty(rows, dtype=x.dtype, device=x.device)
    mean = torch.empty(rows, dtype=x.dtype, device=x.device)
    if rows > 0:
        _var_mean_kernel[(rows,)](
            x2, var, mean, R, float(max(R - correction, 0.0)),
            ACC_FP64=x.dtype == torch.float64, BLOCK=BLOCK, LOG2=LOG2_BLOCK,
            num_warps=NUM_WARPS,
        )
    return var.reshape(out_shape), mean.reshape(out_shape)


# ----------------------------------------------------------------------------------------------
# CPU implementations (fixed pairwise trees of elementwise adds).
# ----------------------------------------------------------------------------------------------


def cpu_reduce(
    x: Tensor, dim: Optional[Sequence[int]], keepdim: bool, kind: str, dtype=None
) -> Tensor:
    def reduce_rows(x2: Tensor, acc: torch.dtype, out_dtype: torch.dtype) -> Tensor:
        R = x2.shape[1]
        if kind == "amax":
            res = _cpu.row_max(x2)  # exact in any order
        elif kind == "amin":
            res = torch.amin(x2, dim=-1)
        else:
            xa = x2.to(acc)
            if kind in ("sum", "mean"):
                res = _cpu.tree_sum(xa)
                if kind == "mean":
                    res = res / R
            else:  # logsumexp
                m = _cpu.row_max(xa)
                m = torch.where(m.abs() == float("inf"), torch.zeros_like(m), m)
                # torch.exp/log on CPU go through vml (a vector loop whose tail is a partial
                # vector), so each element gets the same instructions wherever it sits.
                s = _cpu.tree_sum(torch.exp(xa - m.unsqueeze(-1)))
                res = torch.log(s) + m
        return res.to(out_dtype)

    return _reduce(x, dim, keepdim, kind, dtype, reduce_rows)


def cpu_var_mean(
    x: Tensor, dim: Optional[Sequence[int]], correction: float, keepdim: bool
) -> Tuple[Tensor, Tensor]:
    red = _norm_dims("var_mean", x.dim(), dim)
    out_shape = _out_shape(x.shape, red, keepdim)
    xa = _rows(x, red).to(_common.acc_dtype(x.dtype))
    R = xa.shape[1]
    mean = _cpu.tree_sum(xa) / R
    d = xa - mean.unsqueeze(-1)
    var = _cpu.tree_sum(d * d) / max(R - correction, 0.0)
    return var.to(x.dtype).reshape(out_shape), mean.to(x.dtype).reshape(out_shape)


# ----------------------------------------------------------------------------------------------
# Op registration.
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "detcompile::reduce",
    mutates_args=(),
    schema="(Tensor x, int[]? dim, bool keepdim, str kind, ScalarType? dtype=None) -> Tensor",
)
def reduce(
    x: Tensor,
    dim: Optional[List[int]],
    keepdim: bool,
    kind: str,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Batch-invariant sum / mean / amax / amin / logsumexp over ``dim`` (None or [] = all dims)."""
    _common.check_inputs("reduce", x)
    raise UnsupportedError(f"detcompile.reduce: device {x.device.type!r} is not supported")


@reduce.register_fake
def _(x, dim, keepdim, kind, dtype=None):
    red = _norm_dims("reduce", x.dim(), dim)
    return x.new_empty(_out_shape(x.shape, red, keepdim), dtype=_result_dtype(x, kind, dtype))


@reduce.register_kernel("cpu")
def _(x, dim, keepdim, kind, dtype=None):
    _common.check_inputs("reduce", x)
    return cpu_reduce(x, dim, keepdim, kind, dtype)


@reduce.register_kernel("cuda")
def _(x, dim, keepdim, kind, dtype=None):
    _common.check_inputs("reduce", x)
    return triton_reduce(x, dim, keepdim, kind, dtype)


@torch.library.custom_op(
    "detcompile::var_mean",
    mutates_args=(),
    schema="(Tensor x, int[]? dim, float correction, bool keepdim) -> (Tensor, Tensor)",
)
def var_mean(
    x: Tensor, dim: Optional[List[int]], correction: float, keepdim: bool
) -> Tuple[Tensor, Tensor]:
    """Batch-invariant two-pass ``aten.var_mean.correction``: (var, mean)."""
    _common.check_inputs("var_mean", x)
    raise UnsupportedError(f"detcompile.var_mean: device {x.device.type!r} is not supported")


def _check_var_mean_dtype(x: Tensor) -> None:
    if not x.is_floating_point():
        raise RuntimeError(
            f"detcompile.var_mean: only floating point dtypes are supported (got {x.dtype})"
        )


@var_mean.register_fake
def _(x, dim, correction, keepdim):
    _check_var_mean_dtype(x)
    shape = _out_shape(x.shape, _norm_dims("var_mean", x.dim(), dim), keepdim)
    return x.new_empty(shape), x.new_empty(shape)


@var_mean.register_kernel("cpu")
def _(x, dim, correction, keepdim):
    _common.check_inputs("var_mean", x)
    _check_var_mean_dtype(x)
    return cpu_var_mean(x, dim, correction, keepdim)


@var_mean.register_kernel("cuda")
def _(x, dim, correction, keepdim):
    _common.check_inputs("var_mean", x)
    _check_var_mean_dtype(x)
    return triton_var_mean(x, dim, correction, keepdim)
