"""Batch-invariant 1-D convolution: ``detcompile::conv1d`` (``aten.convolution`` with one spatial dim).

Semantics of ``F.conv1d``: ``x [N, C_in, L]``, ``weight [C_out, C_in / groups, K]``, ``bias [C_out]`` or
None; ``padding`` zeros on both sides, ``stride``, ``dilation``, ``groups``. The output is
``[N, C_out, L_out]`` with ``L_out = (L + 2 * padding - dilation * (K - 1) - 1) // stride + 1``.
The Mamba/SSM family uses the depthwise causal form (``groups == C_in == C_out``, ``K`` about 4,
``padding = K - 1``); small grouped and dense convolutions take the same path.

Every output element ``y[n, co, t]`` (``co`` in group ``g``, ``Cg = C_in / groups`` input channels per
group) is one fixed sequence of operations, whatever the batch holds::

    acc = 0
    for ci in 0 .. Cg-1:          # ascending
        for k in 0 .. K-1:        # ascending
            acc += x[n, g*Cg + ci, t*stride - padding + k*dilation] * w[co, ci, k]
    acc += bias[co]
    y = acc rounded once to the output dtype

Accumulation is fp32 (fp64 for fp64). Taps in the zero padding add exact zeros.

* Triton: one program per (sample, block of ``BLOCK_C`` output channels, block of ``BLOCK_L`` output
  positions). Each lane of the [BLOCK_C, BLOCK_L] tile is one output element and runs the loop above
  with ``tl.fma`` (one rounding per tap; explicit, so Triton's fp-fusion setting cannot change it);
  there is no cross-lane reduction at all, so neither the register layout nor the tile sizes can
  change the order.
* CPU: the same loop as elementwise tensor ops (``acc = acc + tap * w``: an exactly rounded multiply,
  then an exactly rounded add, like ``_cpu.seq_matmul``), so the vector body and the scalar
  tail of ATen's kernels give the same bits.

Transposed and 2-D/3-D convolutions are not handled here (the convolution pass leaves them to the
audit).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _common
from ._common import HAS_TRITON, UnsupportedError, tl, triton

OP = "conv1d"
#: Output channels per program (a constant, never derived from the shapes).
BLOCK_C = 16
#: Output positions per program (a constant).
BLOCK_L = 64
NUM_WARPS = 4

if HAS_TRITON:

    @triton.jit
    def _conv1d_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr,
        C_in, L, C_out, L_out, CG, COG, K, stride, padding, dilation,
        HAS_BIAS: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        ACC = tl.float64 if ACC_FP64 else tl.float32
        n = tl.program_id(0).to(tl.int64)
        co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # output channels of this tile
        t = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)  # output positions of this tile
        c_mask = co < C_out
        t_mask = t < L_out
        # First input channel of each output channel's group.
        cin0 = (co // COG) * CG
        x_n = x_ptr + n * C_in * L
        pos0 = t * stride - padding
        acc = tl.zeros([BLOCK_C, BLOCK_L], ACC)
        for ci in range(0, CG):
            x_c = x_n + (cin0 + ci).to(tl.int64) * L  # [BLOCK_C] row pointers
            for k in range(0, K):
                w = tl.load(w_ptr + (co.to(tl.int64) * CG + ci) * K + k, mask=c_mask, other=0.0).to(ACC)
                pos = pos0 + k * dilation
                m = c_mask[:, None] & (t_mask & (pos >= 0) & (pos < L))[None, :]
                xv = tl.load(x_c[:, None] + pos[None, :], mask=m, other=0.0).to(ACC)
                acc = tl.fma(xv, w[:, None], acc)
        if HAS_BIAS:
            b = tl.load(b_ptr + co, mask=c_mask, other=0.0).to(ACC)
            acc = acc + b[:, None]
        o = out_ptr + n * C_out * L_out + co[:, None].to(tl.int64) * L_out + t[None, :]
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=c_mask[:, None] & t_mask[None, :])


def out_length(L: int, K: int, stride: int, padding: int, dilation: int) -> int:
    return (L + 2 * padding - dilation * (K - 1) - 1) // stride + 1


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int, dilation: int, groups: int) -> int:
    """Validate the arguments like aten does; returns L_out."""
    _common.check_inputs(OP, x, weight, bias)
    if x.dim() != 3 or weight.dim() != 3:
        raise UnsupportedError(
            f"detcompile.{OP}: expected x [N, C_in, L] and weight [C_out, C_in/groups, K] (3-D), got "
            f"x of shape {tuple(x.shape)} and weight of shape {tuple(weight.shape)}"
        )
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise UnsupportedError(f"detcompile.{OP}: {name} must be floating point, got {t.dtype}")
        if t is not None and t.dtype != x.dtype:
            raise UnsupportedError(f"detcompile.{OP}: {name} has dtype {t.dtype} but x has {x.dtype}")
        if t is not None and t.device != x.device:
            raise UnsupportedError(f"detcompile.{OP}: {name} is on {t.device} but x is on {x.device}")
    if stride < 1 or dilation < 1 or padding < 0 or groups < 1:
        raise ValueError(
            f"detcompile.{OP}: need stride >= 1, dilation >= 1, padding >= 0, groups >= 1 (got stride={stride}, "
            f"padding={padding}, dilation={dilation}, groups={groups})"
        )
    N, C_in, L = x.shape
    C_out, CG, K = weight.shape
    if C_in % groups or C_out % groups or CG * groups != C_in:
        raise ValueError(
            f"detcompile.{OP}: x has {C_in} channels and weight has shape {tuple(weight.shape)}, which does not "
            f"match groups={groups} (need C_in = groups * weight.shape[1] and C_out divisible by groups)"
        )
    if bias is not None and tuple(bias.shape) != (C_out,):
        raise ValueError(f"detcompile.{OP}: bias must have shape ({C_out},), got {tuple(bias.shape)}")
    L_out = out_length(L, K, stride, padding, dilation)
    if L_out < 1 or K < 1:
        raise ValueError(
            f"detcompile.{OP}: the padded input ({L} + 2*{padding}) is shorter than the dilated kernel "
            f"({dilation} * ({K} - 1) + 1)"
        )
    return L_out


def triton_conv1d(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: int = 1, padding: int = 0, dilation: int = 1, groups: int = 1
) -> Tensor:
    """Triton path of ``detcompile::conv1d`` (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    L_out = _check(x, weight, bias, stride, padding, dilation, groups)
    if not _common.triton_launchable(x):
        raise UnsupportedError(f"detcompile.{OP}: Triton cannot run on this tensor")
    N, C_in, L = x.shape
    C_out, CG, K = weight.shape
    out = torch.empty((N, C_out, L_out), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    xc = x.contiguous()
    wc = weight.contiguous()
    bc = bias.contiguous() if bias is not None else wc  # dummy pointer when absent
    grid = (N, triton.cdiv(C_out, BLOCK_C), triton.cdiv(L_out, BLOCK_L))
    with _common.on_device(x):
        _conv1d_kernel[grid](
            xc, wc, bc, out,
            C_in, L, C_out, L_out, CG, C_out // groups, K, stride, padding, dilation,
            HAS_BIAS=bias is not None, ACC_FP64=x.dtype == torch.float64,
            BLOCK_C=BLOCK_C, BLOCK_L=BLOCK_L, num_warps=NUM_WARPS,
        )
    return out


def cpu_conv1d(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: int = 1, padding: int = 0, dilation: int = 1, groups: int = 1
) -> Tensor:
    """CPU path: the fixed (input channel, tap) loop as exactly rounded elementwise ops."""
    L_out = _check(x, weight, bias, stride, padding, dilation, groups)
    N, C_in, L = x.shape
    C_out, CG, K = weight.shape
    dt = _common.acc_dtype(x.dtype)
    xp = F.pad(x.to(dt), (padding, padding))  # exact zeros at both ends
    w = weight.to(dt)
    # Input channel read by output channel co for its ci-th group channel: (co // COG) * CG + ci.
    first = (torch.arange(C_out, device=x.device) // (C_out // groups)) * CG
    depthwise = CG == 1 and C_out == C_in
    span = (L_out - 1) * stride + 1
    acc = torch.zeros((N, C_out, L_out), dtype=dt, device=x.device)
    for ci in range(CG):
        xs = xp if depthwise else xp.index_select(1, first + ci)  # [N, C_out, L + 2p]
        for k in range(K):
            tap = xs[:, :, k * dilation : k * dilation + span : stride]
            acc = acc + tap * w[:, ci, k].reshape(1, C_out, 1)
    if bias is not None:
        acc = acc + bias.to(dt).reshape(1, C_out, 1)
    return acc.to(x.dtype)


@torch.library.custom_op(
    f"{_common.NAMESPACE}::{OP}",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, int stride=1, int padding=0, int dilation=1, int groups=1) -> Tensor",
)
def conv1d(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: int = 1, padding: int = 0, dilation: int = 1, groups: int = 1
) -> Tensor:
    """Batch-invariant ``F.conv1d`` (non-transposed, zero padding)."""
    _check(x, weight, bias, stride, padding, dilation, groups)
    raise UnsupportedError(f"detcompile.{OP}: device {x.device.type!r} is not supported (only cpu and cuda)")


@conv1d.register_fake
def _(x, weight, bias, stride=1, padding=0, dilation=1, groups=1):
    N, _, L = x.shape
    C_out, _, K = weight.shape
    return x.new_empty((N, C_out, out_length(L, K, stride, padding, dilation)))


@conv1d.register_kernel("cpu")
def _(x, weight, bias, stride=1, padding=0, dilation=1, groups=1):
    return cpu_conv1d(x, weight, bias, stride, padding, dilation, groups)


@conv1d.register_kernel("cuda")
def _(x, weight, bias, stride=1, padding=0, dilation=1, groups=1):
    return triton_conv1d(x, weight, bias, stride, padding, dilation, groups)
