"""Batch-invariant RMS norm over the last dimension: ``detcompile::rms_norm``.

Semantics of torch's composite ``rms_norm``: ``u = x.float()`` (float64 stays float64),
``y = u * rsqrt(mean(u * u) + eps)``, then ``y * weight`` (weight upcast), cast back to x.dtype.

GPU: one program per row. The row is read in chunks of a fixed ``BLOCK`` elements; each lane of an
fp32 vector accumulator adds its element of every chunk in ascending chunk order, and one
``tl.sum`` reduces the lanes at the end. The reduction order therefore depends only on the row
length (masked tail lanes add exact zeros), never on how many rows the batch holds.
CPU: a sequential left-to-right sum (``_common.cpu_seq_sum``), then elementwise ops.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from . import _common

#: Elements per chunk along the reduced (last) dim. A constant: it fixes the reduction order.
BLOCK = 1024
#: Warps per program. Also a constant: tl.sum's tree depends on the layout, which depends on it.
NUM_WARPS = 4

if _common.HAS_TRITON:
    triton = _common.triton
    tl = _common.tl

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        N,
        eps,
        HAS_WEIGHT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * N
        o_row = out_ptr + row * N
        cols = tl.arange(0, BLOCK)

        # Pass 1: per-lane sum of squares across chunks, in ascending order; one tree sum at the end.
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            offs = start + cols
            mask = offs < N
            u = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            acc += u * u
        mean_sq = tl.sum(acc, axis=0) / N
        r = tl.math.rsqrt(mean_sq + eps)

        # Pass 2: normalize (elementwise, no reduction).
        for start in range(0, N, BLOCK):
            offs = start + cols
            mask = offs < N
            u = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            y = u * r
            if HAS_WEIGHT:
                w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                y = y * w
            tl.store(o_row + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


_aligned = _common.aligned16


def _on_device(x: Tensor):
    """Launch on x's GPU (Triton launches on the current device); a no-op for CPU tensors."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _check(x: Tensor, weight: Tensor | None) -> None:
    _common.check_inputs("rms_norm", x, weight)
    if x.dim() == 0:
        raise ValueError("detcompile.rms_norm: x must have at least one dimension")
    if not x.is_floating_point():
        raise _common.UnsupportedError(f"detcompile.rms_norm: x must be floating point, got {x.dtype}")
    if weight is not None:
        if not weight.is_floating_point():
            raise _common.UnsupportedError(
                f"detcompile.rms_norm: weight must be floating point, got {weight.dtype}"
            )
        if weight.device != x.device:
            raise _common.UnsupportedError(
                f"detcompile.rms_norm: weight is on {weight.device} but x is on {x.device}"
            )
        if weight.numel() != x.shape[-1]:
            raise ValueError(
                f"detcompile.rms_norm: weight has {weight.numel()} elements, expected x.shape[-1]"
                f" = {x.shape[-1]}"
            )


def triton_rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """Launch the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    _check(x, weight)
    if not _common.triton_launchable(x):
        raise _common.UnsupportedError("detcompile.rms_norm: Triton cannot run on this tensor")
    n = x.shape[-1]
    xc = _aligned(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    m = x.numel() // n if n > 0 else 0
    if m == 0 or n == 0:
        return out
    w = _aligned(weight.reshape(-1)) if weight is not None else xc  # dummy pointer when absent
    with _on_device(x):
        _rms_norm_kernel[(m,)](
            xc, w, out, n, float(eps), HAS_WEIGHT=weight is not None, BLOCK=BLOCK, num_warps=NUM_WARPS
        )
    return out


def cpu_rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """Sequential-sum CPU implementation (batch-invariant by construction)."""
    _check(x, weight)
    dt = _common.acc_dtype(x.dtype)
    n = x.shape[-1]
    u = x.contiguous().to(dt)
    mean_sq = _common.cpu_seq_sum(u * u) / n
    # sqrt and division are correctly rounded in vector and scalar code alike (unlike a fast rsqrt).
    r = 1.0 / torch.sqrt(mean_sq + eps)
    y = u * r.unsqueeze(-1)
    if weight is not None:
        y = y * weight.reshape(n).to(dt)
    return y.to(x.dtype)


@torch.library.custom_op("detcompile::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    _check(x, weight)
    raise _common.UnsupportedError(
        f"detcompile.rms_norm: device {x.device.type!r} is not supported (only cpu and cuda)"
    )


@rms_norm.register_fake
def _(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    return x.new_empty(x.shape)


@rms_norm.register_kernel("cpu")
def _(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    return cpu_rms_norm(x, weight, eps)


@rms_norm.register_kernel("cuda")
def _(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    return triton_rms_norm(x, weight, eps)
