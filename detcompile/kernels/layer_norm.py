"""Batch-invariant layer norm: ``detcompile::layer_norm``, the outputs of ``aten.native_layer_norm``.

Returns ``(out, mean, rstd)``: out in x.dtype; mean/rstd of shape
``x.shape[:axis] + [1] * len(normalized_shape)``, float32 for 16-bit x (x.dtype otherwise), as
aten's meta/CUDA kernels give. Two passes: ``mean = sum(x) / N``, then the biased variance
``sum((x - mean)^2) / N``; ``rstd = rsqrt(var + eps)``; ``out = (x - mean) * rstd * w + b`` in fp32.

GPU: one program per row (one normalized slice). Each sum reads the row in chunks of a fixed
``BLOCK`` elements into an fp32 per-lane accumulator, chunks in ascending order, then one
``tl.sum`` over the lanes: the order depends only on the row length, never on the number of rows.
CPU: sequential left-to-right sums (``_common.cpu_seq_sum``), then elementwise ops.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from . import _common

#: Elements per chunk along the normalized dim. A constant: it fixes the reduction order.
BLOCK = 1024
#: Warps per program. Also a constant: tl.sum's tree depends on the layout, which depends on it.
NUM_WARPS = 4

if _common.HAS_TRITON:
    triton = _common.triton
    tl = _common.tl

    @triton.jit
    def _layer_norm_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        out_ptr,
        mean_ptr,
        rstd_ptr,
        N,
        eps,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * N
        o_row = out_ptr + row * N
        cols = tl.arange(0, BLOCK)

        # Pass 1: mean. Per-lane sums across chunks in ascending order, one tree sum at the end.
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            offs = start + cols
            mask = offs < N
            acc += tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / N

        # Pass 2: biased variance around the mean (two-pass, as aten). Tail lanes must add 0,
        # not (0 - mean)^2, so the centered value is masked.
        acc2 = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            offs = start + cols
            mask = offs < N
            u = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, u - mean, 0.0)
            acc2 += d * d
        var = tl.sum(acc2, axis=0) / N
        rstd = tl.math.rsqrt(var + eps)
        tl.store(mean_ptr + row, mean.to(mean_ptr.dtype.element_ty))
        tl.store(rstd_ptr + row, rstd.to(rstd_ptr.dtype.element_ty))

        # Pass 3: normalize and apply the affine transform (elementwise).
        for start in range(0, N, BLOCK):
            offs = start + cols
            mask = offs < N
            u = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            y = (u - mean) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(o_row + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


_aligned = _common.aligned16


def _on_device(x: Tensor):
    """Launch on x's GPU (Triton launches on the current device); a no-op for CPU tensors."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _common.HALF_DTYPES else dtype


def _stats_shape(x: Tensor, normalized_shape) -> list:
    axis = x.dim() - len(normalized_shape)
    return list(x.shape[:axis]) + [1] * len(normalized_shape)


def _check(x: Tensor, normalized_shape, weight: Tensor | None, bias: Tensor | None) -> int:
    """Validate the inputs; returns N, the number of elements of one normalized slice."""
    _common.check_inputs("layer_norm", x, weight, bias)
    if not x.is_floating_point():
        raise _common.UnsupportedError(f"detcompile.layer_norm: x must be floating point, got {x.dtype}")
    k = len(normalized_shape)
    if k < 1 or x.dim() < k or list(x.shape[x.dim() - k :]) != list(normalized_shape):
        raise ValueError(
            f"detcompile.layer_norm: normalized_shape={list(normalized_shape)} does not match the "
            f"trailing dims of x.shape={list(x.shape)}"
        )
    n = math.prod(normalized_shape)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise _common.UnsupportedError(f"detcompile.layer_norm: {name} must be floating point, got {t.dtype}")
        if t.device != x.device:
            raise _common.UnsupportedError(f"detcompile.layer_norm: {name} is on {t.device} but x is on {x.device}")
        if t.numel() != n:
            raise ValueError(f"detcompile.layer_norm: {name} has {t.numel()} elements, expected {n}")
    return n


def triton_layer_norm(
    x: Tensor, normalized_shape: list[int], weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    n = _check(x, normalized_shape, weight, bias)
    if not _common.triton_launchable(x):
        raise _common.UnsupportedError("detcompile.layer_norm: Triton cannot run on this tensor")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    sdt = _stats_dtype(x.dtype)
    mean = torch.empty(_stats_shape(x, normalized_shape), dtype=sdt, device=x.device)
    rstd = torch.empty(_stats_shape(x, normalized_shape), dtype=sdt, device=x.device)
    m = mean.numel()
    if m == 0 or n == 0:
        # Nothing to reduce (aten gives NaN statistics for an empty slice; so do we).
        mean.fill_(float("nan"))
        rstd.fill_(float("nan"))
        return out, mean, rstd
    xc = _aligned(x)
    w = _aligned(weight.reshape(-1)) if weight is not None else xc  # dummy pointers when absent
    b = _aligned(bias.reshape(-1)) if bias is not None else xc
    with _on_device(x):
        _layer_norm_kernel[(m,)](
            xc, w, b, out, mean, rstd, n, float(eps),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BLOCK=BLOCK, num_warps=NUM_WARPS,
        )
    return out, mean, rstd


def cpu_layer_norm(
    x: Tensor, normalized_shape: list[int], weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Sequential-sum CPU implementation (batch-invariant by construction)."""
    n = _check(x, normalized_shape, weight, bias)
    dt = _common.acc_dtype(x.dtype)
    stats_shape = _stats_shape(x, normalized_shape)
    m = math.prod(stats_shape)
    u = x.contiguous().to(dt).reshape(m, n)
    mean = _common.cpu_seq_sum(u) / n
    d = u - mean.unsqueeze(-1)
    var = _common.cpu_seq_sum(d * d) / n
    # sqrt and division are correctly rounded in vector and scalar code alike (unlike a fast rsqrt).
    rstd = 1.0 / torch.sqrt(var + eps)
    y = d * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.reshape(n).to(dt)
    if bias is not None:
        y = y + bias.reshape(n).to(dt)
    sdt = _stats_dtype(x.dtype)
    return (
        y.to(x.dtype).reshape(x.shape),
        mean.to(sdt).reshape(stats_shape),
        rstd.to(sdt).reshape(stats_shape),
    )


@torch.library.custom_op(
    "detcompile::layer_norm",
    mutates_args=(),
    schema="(Tensor x, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps) "
    "-> (Tensor, Tensor, Tensor)",
)
def layer_norm(
    x: Tensor, normalized_shape: list[int], weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    _check(x, normalized_shape, weight, bias)
    raise _common.UnsupportedError(
        f"detcompile.layer_norm: device {x.device.type!r} is not supported (only cpu and cuda)"
    )


@layer_norm.register_fake
def _(x, normalized_shape, weight, bias, eps):
    sdt = _stats_dtype(x.dtype)
    stats_shape = _stats_shape(x, normalized_shape)
    return x.new_empty(x.shape), x.new_empty(stats_shape, dtype=sdt), x.new_empty(stats_shape, dtype=sdt)


@layer_norm.register_kernel("cpu")
def _(x, normalized_shape, weight, bias, eps):
    return cpu_layer_norm(x, normalized_shape, weight, bias, eps)


@layer_norm.register_kernel("cuda")
def _(x, normalized_shape, weight, bias, eps):
    return triton_layer_norm(x, normalized_shape, weight, bias, eps)
