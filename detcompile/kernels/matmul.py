"""Batch-invariant matmul: ``detcompile::matmul(a, b, bias=None, alpha=1.0, beta=1.0)``.

Covers aten mm / addmm / bmm / baddbmm: ``out = alpha * (a @ b) + beta * bias`` computed in float32
(float64 on the CPU for float64 inputs) and rounded once to ``a.dtype``.

Why it is batch-invariant:

* GPU (Triton): a persistent kernel walks output tiles; each tile reduces the whole K dimension in
  BLOCK_K chunks, in ascending order, into one float32 accumulator through ``tl.dot``. There is no
  split-K, and the tile/warp/stage configuration depends on the dtype only, never on M or on the
  batch, so every output element sees the same instruction sequence (same MMA instruction, same
  chunking of K) whatever the other rows hold or however many there are. Masked K positions load as
  exact zeros, so zero-padding K at the end leaves the bits unchanged.
* CPU: ``_common.cpu_seq_matmul`` (sequential K loop of exactly rounded elementwise mul + add).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import _common
from ._common import HAS_TRITON, UnsupportedError

if HAS_TRITON:
    import triton
    import triton.language as tl

OP = "matmul"

# Fixed launch configurations, one per dtype. BLOCK_K is the only constant that touches the
# reduction order; BLOCK_M/BLOCK_N/num_warps/num_stages are fixed too because a different config
# can make Triton pick a different MMA instruction (hence different bits) for the same element.
_CONFIG_16BIT = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
_CONFIG_FP32 = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
_CONFIGS = {
    torch.float16: _CONFIG_16BIT,
    torch.bfloat16: _CONFIG_16BIT,
    torch.float32: _CONFIG_FP32,
}


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:

    # M and the batch count change with the batch size: not letting Triton specialize on them
    # (==1, divisible by 16) keeps M=1 from getting its own compiled variant. Strides, N and K
    # stay specialized: their alignment only decides how memory is moved (vector width, cp.async
    # pipelining, which 16-bit inputs need), never the arithmetic of the K reduction.
    @triton.jit(do_not_specialize=["NUM_BATCH", "M"])
    def _matmul_kernel(
        a_ptr, b_ptr, x_ptr, c_ptr,
        NUM_BATCH, M, N, K,
        s_ab, s_am, s_ak,
        s_bb, s_bk, s_bn,
        s_cb, s_cm, s_cn,
        s_xb, s_xm, s_xn,
        alpha, beta,
        HAS_BIAS: tl.constexpr,
        IS_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        tiles_per_batch = tiles_m * tiles_n
        num_tiles = NUM_BATCH * tiles_per_batch
        num_k = tl.cdiv(K, BLOCK_K)
        offs_k = tl.arange(0, BLOCK_K)

        for tile in range(pid, num_tiles, nprog):
            # The batch is just the outermost tile coordinate; inside a batch element, tiles are
            # grouped along M for L2 reuse (only the visiting order changes, not any arithmetic).
            bid = tile // tiles_per_batch
            t = tile % tiles_per_batch
            in_group = GROUP_M * tiles_n
            first_m = (t // in_group) * GROUP_M
            group_m = tl.minimum(tiles_m - first_m, GROUP_M)
            pid_m = first_m + (t % in_group) % group_m
            pid_n = (t % in_group) // group_m

            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_m = offs_m < M
            mask_n = offs_n < N
            # 64-bit offsets: batch * stride and row * stride can exceed 2**31 on big inputs.
            bid64 = bid.to(tl.int64)
            om = offs_m.to(tl.int64)
            on = offs_n.to(tl.int64)

            a_ptrs = a_ptr + bid64 * s_ab + om[:, None] * s_am + offs_k[None, :] * s_ak
            b_ptrs = b_ptr + bid64 * s_bb + offs_k[:, None] * s_bk + on[None, :] * s_bn

            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            # Whole K, ascending BLOCK_K chunks, one accumulator: the same reduction order for
            # every output element whatever M is. Out-of-range K loads as exact 0, so a row
            # zero-padded along K produces the same bits.
            for kb in range(0, num_k):
                k_left = K - kb * BLOCK_K
                a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
                b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
                if IS_FP32:
                    acc = tl.dot(a, b, acc, input_precision=PRECISION)
                else:
                    acc = tl.dot(a, b, acc)
                a_ptrs += BLOCK_K * s_ak
                b_ptrs += BLOCK_K * s_bk

            # Epilogue in fp32, then the single rounding to the output dtype.
            acc = acc * alpha
            mask = mask_m[:, None] & mask_n[None, :]
            if HAS_BIAS:
                x_ptrs = x_ptr + bid64 * s_xb + om[:, None] * s_xm + on[None, :] * s_xn
                bias = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
                acc = acc + bias * beta
            c_ptrs = c_ptr + bid64 * s_cb + om[:, None] * s_cm + on[None, :] * s_cn
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Shared checks and helpers
# ----------------------------------------------------------------------------------------------


def _out_shape(a: Tensor, b: Tensor, bias: Optional[Tensor]) -> list:
    """Validate structure (works on fake tensors with symbolic sizes) and return the output shape."""
    if a.dim() not in (2, 3) or b.dim() != a.dim():
        raise UnsupportedError(
            f"detcompile.{OP}: expected a [M, K] @ b [K, N] or a [B, M, K] @ b [B, K, N], "
            f"got a.shape={tuple(a.shape)}, b.shape={tuple(b.shape)}"
        )
    if not a.is_floating_point() or not b.is_floating_point():
        raise UnsupportedError(
            f"detcompile.{OP}: expected floating inputs, got a.dtype={a.dtype}, b.dtype={b.dtype}"
        )
    if a.dtype != b.dtype:
        raise UnsupportedError(
            f"detcompile.{OP}: a and b must have the same dtype, got {a.dtype} and {b.dtype}"
        )
    if a.device != b.device or (bias is not None and bias.device != a.device):
        raise UnsupportedError(
            f"detcompile.{OP}: all inputs must be on one device, got a on {a.device}, "
            f"b on {b.device}" + ("" if bias is None else f", bias on {bias.device}")
        )
    torch._check(
        a.shape[-1] == b.shape[-2],
        lambda: f"detcompile.{OP}: inner dims differ: a.shape={tuple(a.shape)}, b.shape={tuple(b.shape)}",
    )
    if a.dim() == 3:
        torch._check(
            a.shape[0] == b.shape[0],
            lambda: f"detcompile.{OP}: batch dims differ: a.shape={tuple(a.shape)}, b.shape={tuple(b.shape)}",
        )
        shape = [a.shape[0], a.shape[1], b.shape[2]]
    else:
        shape = [a.shape[0], b.shape[1]]
    if bias is not None:
        if not bias.is_floating_point():
            raise UnsupportedError(f"detcompile.{OP}: bias must be floating, got {bias.dtype}")
        if bias.dim() > len(shape):
            raise UnsupportedError(
                f"detcompile.{OP}: bias of shape {tuple(bias.shape)} does not broadcast to the "
                f"output shape {tuple(shape)}"
            )
    return shape


def _expand_bias(bias: Tensor, shape: list) -> Tensor:
    try:
        return bias.expand(shape)
    except RuntimeError as e:
        raise UnsupportedError(
            f"detcompile.{OP}: bias of shape {tuple(bias.shape)} does not broadcast to the output "
            f"shape {tuple(shape)}"
        ) from e


def _epilogue(acc: Tensor, bias: Optional[Tensor], alpha: float, beta: float, dtype) -> Tensor:
    """alpha * acc + beta * bias in acc's dtype (elementwise, so batch-invariant), then one rounding."""
    out = acc * alpha
    if bias is not None and beta != 0:
        out = out + bias.to(acc.dtype) * beta
    return out.to(dtype)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


# ----------------------------------------------------------------------------------------------
# Launcher and CPU implementation
# ----------------------------------------------------------------------------------------------


def triton_matmul(
    a: Tensor, b: Tensor, bias: Optional[Tensor] = None, alpha: float = 1.0, beta: float = 1.0
) -> Tensor:
    """Run the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1).

    a [M, K] @ b [K, N] -> [M, N], or a [B, M, K] @ b [B, K, N] -> [B, M, N]; any strides.
    """
    _common.check_inputs(OP, a, b, bias)
    shape = _out_shape(a, b, bias)
    if not _common.triton_launchable(a):
        raise UnsupportedError(
            f"detcompile.{OP}: the Triton kernel cannot run on {a.device} "
            "(needs CUDA, or TRITON_INTERPRET=1 with Triton installed)"
        )
    if a.dtype not in _CONFIGS:
        raise UnsupportedError(f"detcompile.{OP}: dtype {a.dtype} is not supported by the Triton kernel")
    use_bias = bias is not None and beta != 0  # aten ignores bias (even NaN) when beta == 0
    xb = _expand_bias(bias, shape) if use_bias else None
    K = a.shape[-1]
    out = torch.empty(shape, dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    if K == 0:
        # No reduction at all: the epilogue alone, elementwise in fp32 (no kernel on empty inputs).
        acc = torch.zeros(shape, dtype=torch.float32, device=a.device)
        out.copy_(_epilogue(acc, xb, alpha, beta, a.dtype))
        return out

    # 2-D is a batch of one: same kernel, batch stride unused.
    a3 = a if a.dim() == 3 else a.unsqueeze(0)
    b3 = b if b.dim() == 3 else b.unsqueeze(0)
    c3 = out if out.dim() == 3 else out.unsqueeze(0)
    if xb is not None:
        x3 = xb if xb.dim() == 3 else xb.unsqueeze(0)
        x_strides = x3.stride()
    else:
        x3 = out  # never read (HAS_BIAS=False); any valid pointer will do
        x_strides = (0, 0, 0)
    nb, M, _ = a3.shape
    N = b3.shape[-1]

    cfg = _CONFIGS[a.dtype]
    num_tiles = nb * triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    grid = (max(1, min(_common.num_sms(a.device), num_tiles)),)
    # Triton launches on the current CUDA device; make that a's device.
    with torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext():
        _matmul_kernel[grid](
            a3, b3, x3, c3,
            nb, M, N, K,
            *a3.stride(), *b3.stride(), *c3.stride(), *x_strides,
            float(alpha), float(beta),
            HAS_BIAS=xb is not None,
            IS_FP32=a.dtype == torch.float32,
            PRECISION=_dot_precision(a.dtype),
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"],
            GROUP_M=cfg["GROUP_M"],
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    return out


def cpu_matmul(
    a: Tensor, b: Tensor, bias: Optional[Tensor] = None, alpha: float = 1.0, beta: float = 1.0
) -> Tensor:
    """CPU path: sequential-K elementwise matmul in fp32 (fp64 for fp64), epilogue, one rounding."""
    _common.check_inputs(OP, a, b, bias)
    shape = _out_shape(a, b, bias)
    use_bias = bias is not None and beta != 0
    xb = _expand_bias(bias, shape) if use_bias else None
    acc = _common.cpu_seq_matmul(a, b)
    return _epilogue(acc, xb, alpha, beta, a.dtype).contiguous()


# ----------------------------------------------------------------------------------------------
# Op registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_common.NAMESPACE}::{OP}", mutates_args=())
def matmul(
    a: Tensor, b: Tensor, bias: Optional[Tensor] = None, alpha: float = 1.0, beta: float = 1.0
) -> Tensor:
    raise UnsupportedError(
        f"detcompile.{OP}: device {a.device.type!r} is not supported (only cpu and cuda)"
    )


@matmul.register_fake
def _(a, b, bias=None, alpha=1.0, beta=1.0):
    shape = _out_shape(a, b, bias)
    return a.new_empty(shape)


@matmul.register_kernel("cpu")
def _(a, b, bias=None, alpha=1.0, beta=1.0):
    return cpu_matmul(a, b, bias, alpha, beta)


@matmul.register_kernel("cuda")
def _(a, b, bias=None, alpha=1.0, beta=1.0):
    _common.check_inputs(OP, a, b, bias)
    if not HAS_TRITON:
        raise UnsupportedError(f"detcompile.{OP}: Triton is required on CUDA")
    return triton_matmul(a, b, bias, alpha, beta)
