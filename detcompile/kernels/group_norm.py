"""Batch-invariant group norm: ``detcompile::group_norm``, the outputs of ``aten.native_group_norm``.

x is ``[N, C, *]`` with ``HxW = prod(x.shape[2:])``; channels split into ``group`` groups. Returns
``(out, mean, rstd)``: out like x; mean/rstd ``[N, group]`` in x.dtype (as aten's meta kernel and
its non-mixed-dtype CPU/CUDA kernels give). Per (sample, group) slice of ``C / group * HxW``
elements: ``mean = sum(x) / L``, biased ``var = sum((x - mean)^2) / L``, ``rstd = rsqrt(var + eps)``,
``out = (x - mean) * rstd * weight[c] + bias[c]`` in fp32 (float64 stays float64 on the CPU).

GPU: one program per (sample, group) slice, which is contiguous in memory. Each sum reads it in
chunks of a fixed ``BLOCK`` elements into an fp32 per-lane accumulator, chunks in ascending order,
then one ``tl.sum``: the order depends only on the slice length, never on N.
CPU: fixed pairwise tree sums of elementwise adds (``_cpu.tree_sum``), then elementwise ops.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _common, _cpu
from ._common import HAS_TRITON, tl, triton

#: Elements per chunk along the reduced (slice) dim. A constant: it fixes the reduction order.
BLOCK = 1024
#: Warps per program. Also a constant: tl.sum's tree depends on the layout, which depends on it.
NUM_WARPS = 4

if HAS_TRITON:

    @triton.jit
    def _group_norm_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        out_ptr,
        mean_ptr,
        rstd_ptr,
        G,
        CPG,
        HW,
        L,
        eps,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # row = sample * G + group
        x_row = x_ptr + row * L
        o_row = out_ptr + row * L
        cols = tl.arange(0, BLOCK)

        # Pass 1: mean. Per-lane sums across chunks in ascending order, one tree sum at the end.
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, L, BLOCK):
            offs = start + cols
            mask = offs < L
            acc += tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / L

        # Pass 2: biased variance around the mean; tail lanes add exactly 0.
        acc2 = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, L, BLOCK):
            offs = start + cols
            mask = offs < L
            u = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, u - mean, 0.0)
            acc2 += d * d
        var = tl.sum(acc2, axis=0) / L
        rstd = tl.math.rsqrt(var + eps)
        tl.store(mean_ptr + row, mean.to(mean_ptr.dtype.element_ty))
        tl.store(rstd_ptr + row, rstd.to(rstd_ptr.dtype.element_ty))

        # Pass 3: normalize, per-channel affine (elementwise).
        c0 = (row % G) * CPG
        for start in range(0, L, BLOCK):
            offs = start + cols
            mask = offs < L
            u = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            y = (u - mean) * rstd
            ch = c0 + offs // HW  # channel of each element (dead code when there is no affine)
            if HAS_WEIGHT:
                y = y * tl.load(w_ptr + ch, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(b_ptr + ch, mask=mask, other=0.0).to(tl.float32)
            tl.store(o_row + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


_aligned = _common.aligned16


def _check(x: Tensor, weight: Tensor | None, bias: Tensor | None, N: int, C: int, HxW: int, group: int) -> None:
    _common.check_inputs("group_norm", x, weight, bias)
    if not x.is_floating_point():
        raise _common.UnsupportedError(f"detcompile.group_norm: x must be floating point, got {x.dtype}")
    if x.dim() < 2 or x.shape[0] != N or x.shape[1] != C or x.numel() != N * C * HxW:
        raise ValueError(
            f"detcompile.group_norm: x.shape={list(x.shape)} does not match N={N}, C={C}, HxW={HxW}"
        )
    if group <= 0 or C % group != 0:
        raise ValueError(f"detcompile.group_norm: C={C} is not divisible by group={group}")
    _common.check_norm_params("group_norm", x, C, f"C={C}", weight=weight, bias=bias)


def triton_group_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, N: int, C: int, HxW: int, group: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    _check(x, weight, bias, N, C, HxW, group)
    if not _common.triton_launchable(x):
        raise _common.UnsupportedError("detcompile.group_norm: Triton cannot run on this tensor")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty((N, group), dtype=x.dtype, device=x.device)
    rstd = torch.empty((N, group), dtype=x.dtype, device=x.device)
    cpg = C // group
    length = cpg * HxW
    if N * group == 0:
        return out, mean, rstd
    if length == 0:
        mean.fill_(float("nan"))
        rstd.fill_(float("nan"))
        return out, mean, rstd
    xc = _aligned(x)
    w = _aligned(weight.reshape(-1)) if weight is not None else xc  # dummy pointers when absent
    b = _aligned(bias.reshape(-1)) if bias is not None else xc
    with _common.on_device(x):
        _group_norm_kernel[(N * group,)](
            xc, w, b, out, mean, rstd, group, cpg, HxW, length, float(eps),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BLOCK=BLOCK, num_warps=NUM_WARPS,
        )
    return out, mean, rstd


def cpu_group_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, N: int, C: int, HxW: int, group: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Fixed-tree-sum CPU implementation (batch-invariant by construction)."""
    _check(x, weight, bias, N, C, HxW, group)
    dt = _common.acc_dtype(x.dtype)
    length = C // group * HxW
    y, mean, rstd = _cpu.normalize(x.contiguous().to(dt).reshape(N, group, length), eps)
    y = y.reshape(N, C, HxW)
    if weight is not None:
        y = y * weight.reshape(1, C, 1).to(dt)
    if bias is not None:
        y = y + bias.reshape(1, C, 1).to(dt)
    return y.to(x.dtype).reshape(x.shape), mean.to(x.dtype), rstd.to(x.dtype)


@torch.library.custom_op(
    "detcompile::group_norm",
    mutates_args=(),
    schema="(Tensor x, Tensor? weight, Tensor? bias, SymInt N, SymInt C, SymInt HxW, int group, "
    "float eps) -> (Tensor, Tensor, Tensor)",
)
def group_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    N: int,
    C: int,
    HxW: int,
    group: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    _check(x, weight, bias, N, C, HxW, group)
    raise _common.UnsupportedError(
        f"detcompile.group_norm: device {x.device.type!r} is not supported (only cpu and cuda)"
    )


@group_norm.register_fake
def _(x, weight, bias, N, C, HxW, group, eps):
    return x.new_empty(x.shape), x.new_empty((N, group)), x.new_empty((N, group))


@group_norm.register_kernel("cpu")
def _(x, weight, bias, N, C, HxW, group, eps):
    return cpu_group_norm(x, weight, bias, N, C, HxW, group, eps)


@group_norm.register_kernel("cuda")
def _(x, weight, bias, N, C, HxW, group, eps):
    return triton_group_norm(x, weight, bias, N, C, HxW, group, eps)
