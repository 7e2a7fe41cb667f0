"""Batch-invariant triangular solve: ``detcompile::solve_triangular`` (``aten.linalg_solve_triangular``).

Solves ``A X = B`` (``left=True``) or ``X A = B`` (``left=False``) for a batch of triangular ``A
[..., n, n]`` (the batch dims of ``A`` and ``B`` broadcast), with ``upper`` and ``unitriangular``
as in ``torch.linalg.solve_triangular``; the other triangle of ``A`` (and its diagonal when
``unitriangular``) is never read. ``X A = B`` is solved as ``A^T X^T = B^T``.

Why not ATen: on CUDA, ``triangular_solve_kernel`` calls a loop of cuBLAS ``trsm`` when the batch has
at most 8 matrices of size >= 64 and the batched cuBLAS ``trsmBatched`` otherwise: two different
algorithms picked by the batch count (gated-DeltaNet's chunk size is exactly 64). On the CPU the
LAPACK/BLAS ``trsm`` order is the library's choice.

Here each matrix is solved by substitution in one fixed order, whatever the batch holds. For a lower
``A`` (upper: the same with the row order reversed), column by column of B::

    r = B
    for j in 0 .. n-1:                      # ascending (upper: descending)
        x[j] = r[j]                         # (/ A[j, j] unless unitriangular; correctly rounded)
        r[i] = r[i] - A[i, j] * x[j]        # for every row i after j (upper: before j)

so ``x[i] = (B[i] - A[i, j0] x[j0] - A[i, j1] x[j1] - ...) / A[i, i]`` with the solved rows in the
order they were solved. Accumulation is fp32 (fp64 for fp64); the result is rounded once at the end.

* Triton: one program per (matrix, block of ``BLOCK_K`` right-hand-side columns); the residual
  ``[BLOCK_N, BLOCK_K]`` stays in registers; the update is one explicit ``tl.fma`` per element and step
  (Triton's fp-fusion setting cannot change it), the division ``div_rn`` (correctly rounded). Row
  ``j`` is read out of the register tile by a sum whose other terms are exact zeros (exact whatever
  the tree). ``BLOCK_N`` is ``n`` rounded up to a power of two (at least 16, at most ``MAX_N``):
  it follows the matrix size, never the batch.
* CPU: the same loop with elementwise tensor ops over the whole batch (a multiply, then a subtract:
  each exactly rounded, in the vector body and the scalar tail alike).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _common
from ._common import HAS_TRITON, UnsupportedError, tl, triton

OP = "solve_triangular"
#: Largest matrix the Triton kernel keeps in registers.
MAX_N = 128
NUM_WARPS = 4

if HAS_TRITON:

    @triton.jit
    def _solve_kernel(
        a_ptr, b_ptr, out_ptr, N, KC,
        UPPER: tl.constexpr, UNIT: tl.constexpr, ACC_FP64: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        ACC = tl.float64 if ACC_FP64 else tl.float32
        mat = tl.program_id(0).to(tl.int64)
        rows = tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        r_mask = rows < N
        c_mask = cols < KC
        a_mat = a_ptr + mat * N * N
        tile = mat * N * KC + rows[:, None] * KC + cols[None, :]
        tile_mask = r_mask[:, None] & c_mask[None, :]
        r = tl.load(b_ptr + tile, mask=tile_mask, other=0.0).to(ACC)
        x = tl.zeros([BLOCK_N, BLOCK_K], ACC)
        for s in range(0, N):
            if UPPER:
                j = N - 1 - s
            else:
                j = s
            is_j = rows[:, None] == j
            # Row j of the residual is final: one value per column plus exact zeros.
            xj = tl.sum(tl.where(is_j, r, 0.0), axis=0)
            if not UNIT:
                d = tl.load(a_mat + j * N + j).to(ACC)
                if ACC_FP64:
                    xj = xj / d
                else:
                    xj = tl.math.div_rn(xj, d)
            x = tl.where(is_j, xj[None, :], x)
            if UPPER:
                todo = rows < j
            else:
                todo = (rows > j) & r_mask
            a_col = tl.load(a_mat + rows * N + j, mask=todo, other=0.0).to(ACC)
            r = tl.where(todo[:, None], tl.fma(-a_col[:, None], xj[None, :], r), r)
        tl.store(out_ptr + tile, x.to(out_ptr.dtype.element_ty), mask=tile_mask)


def _check(A: Tensor, B: Tensor, left: bool) -> None:
    _common.check_inputs(OP, A, B)
    for name, t in (("A", A), ("B", B)):
        if not t.is_floating_point():
            raise UnsupportedError(f"detcompile.{OP}: {name} must be floating point, got {t.dtype}")
    if A.dtype != B.dtype:
        raise UnsupportedError(f"detcompile.{OP}: A has dtype {A.dtype} but B has {B.dtype}")
    if A.device != B.device:
        raise UnsupportedError(f"detcompile.{OP}: A is on {A.device} but B is on {B.device}")
    if A.dim() < 2 or B.dim() < 2:
        raise ValueError(f"detcompile.{OP}: A and B must have at least 2 dims")
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(f"detcompile.{OP}: A must be square, got {tuple(A.shape[-2:])}")
    n = A.shape[-1]
    if (B.shape[-2] if left else B.shape[-1]) != n:
        side = "B.shape[-2]" if left else "B.shape[-1]"
        raise ValueError(f"detcompile.{OP}: {side} must be {n} (A is {n} x {n}), B has shape {tuple(B.shape)}")
    torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])  # raises on mismatch


def out_shape(A: Tensor, B: Tensor) -> tuple:
    return tuple(torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])) + tuple(B.shape[-2:])


def _as_left(A: Tensor, B: Tensor, upper: bool, left: bool):
    """(A, B, upper) of the equivalent left solve: X A = B  <=>  A^T X^T = B^T."""
    if left:
        return A, B, upper
    return A.mT, B.mT, not upper


def _batched(A: Tensor, B: Tensor):
    """A as [batch, n, n] and B as [batch, n, k], contiguous, batch dims broadcast."""
    batch = tuple(torch.broadcast_shapes(A.shape[:-2], B.shape[:-2]))
    n, k = B.shape[-2:]
    A3 = A.expand(batch + (n, n)).reshape(-1, n, n).contiguous()
    B3 = B.expand(batch + (n, k)).reshape(-1, n, k).contiguous()
    return A3, B3, batch


def block_sizes(n: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for n x n matrices: a function of n only."""
    if n > MAX_N:
        raise UnsupportedError(
            f"detcompile.{OP}: the Triton kernel handles matrices up to {MAX_N} x {MAX_N}, got {n} x {n}"
        )
    block_n = max(16, triton.next_power_of_2(n)) if HAS_TRITON else max(16, 1 << (n - 1).bit_length())
    return block_n, (64 if block_n <= 64 else 32)


def triton_solve_triangular(A: Tensor, B: Tensor, upper: bool, left: bool = True, unitriangular: bool = False) -> Tensor:
    """Triton path of ``detcompile::solve_triangular`` (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    _check(A, B, left)
    if not _common.triton_launchable(A):
        raise UnsupportedError(f"detcompile.{OP}: Triton cannot run on this tensor")
    shape = out_shape(A, B)
    A, B, upper = _as_left(A, B, upper, left)
    A3, B3, batch = _batched(A, B)
    nb, n, k = B3.shape
    out = torch.empty((nb, n, k), dtype=B.dtype, device=B.device)
    if out.numel() > 0:
        block_n, block_k = block_sizes(n)
        with _common.on_device(A):
            _solve_kernel[(nb, triton.cdiv(k, block_k))](
                A3, B3, out, n, k,
                UPPER=bool(upper), UNIT=bool(unitriangular), ACC_FP64=B.dtype == torch.float64,
                BLOCK_N=block_n, BLOCK_K=block_k, num_warps=NUM_WARPS,
            )
    out = out.reshape(batch + (n, k))
    return (out if left else out.mT).contiguous().reshape(shape)


def cpu_solve_triangular(A: Tensor, B: Tensor, upper: bool, left: bool = True, unitriangular: bool = False) -> Tensor:
    """CPU path: the substitution loop as exactly rounded elementwise ops over the whole batch."""
    _check(A, B, left)
    shape = out_shape(A, B)
    dtype = B.dtype
    A, B, upper = _as_left(A, B, upper, left)
    A3, B3, batch = _batched(A, B)
    acc = _common.acc_dtype(dtype)
    a = A3.to(acc)
    r = B3.to(acc, copy=True)  # the residual, updated in place (B3 may share the caller's storage)
    n = a.shape[-1]
    x = torch.empty_like(r)
    for j in (range(n - 1, -1, -1) if upper else range(n)):
        xj = r[:, j, :]
        if not unitriangular:
            xj = xj / a[:, j, j : j + 1]
        x[:, j, :] = xj
        todo = slice(0, j) if upper else slice(j + 1, n)
        r[:, todo, :] = r[:, todo, :] - a[:, todo, j : j + 1] * xj.unsqueeze(1)
    x = x.to(dtype).reshape(batch + tuple(x.shape[-2:]))
    return (x if left else x.mT).contiguous().reshape(shape)


@torch.library.custom_op(
    f"{_common.NAMESPACE}::{OP}",
    mutates_args=(),
    schema="(Tensor A, Tensor B, bool upper, bool left=True, bool unitriangular=False) -> Tensor",
)
def solve_triangular(A: Tensor, B: Tensor, upper: bool, left: bool = True, unitriangular: bool = False) -> Tensor:
    """Batch-invariant ``torch.linalg.solve_triangular``."""
    _check(A, B, left)
    raise UnsupportedError(f"detcompile.{OP}: device {A.device.type!r} is not supported (only cpu and cuda)")


@solve_triangular.register_fake
def _(A, B, upper, left=True, unitriangular=False):
    return B.new_empty(out_shape(A, B))


@solve_triangular.register_kernel("cpu")
def _(A, B, upper, left=True, unitriangular=False):
    return cpu_solve_triangular(A, B, upper, left, unitriangular)


@solve_triangular.register_kernel("cuda")
def _(A, B, upper, left=True, unitriangular=False):
    return triton_solve_triangular(A, B, upper, left, unitriangular)
