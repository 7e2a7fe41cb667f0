"""Batch-invariant grouped matmul for MoE experts: ``detcompile::grouped_mm(x, w, offs)``.

``x`` [S, K] holds rows sorted by group; rows ``offs[g-1] <= r < offs[g]`` are multiplied by ``w[g]``
([G, K, N]); rows past ``offs[-1]`` are zero. Semantics of ``aten._grouped_mm`` (2-D x 3-D) and of
transformers' ``grouped_mm_fallback``. Offsets are clamped to [0, S] and a group whose end lies
before the previous end is empty: group g covers ``[E[g-1], E[g])`` with ``E = cummax(clamp(offs))``.

Why it is batch-invariant: a row's output is its row of ``x`` times ``w[g]``, reduced over K with
the reduction of ``detcompile::matmul``, whose order is fixed by K and the dtype alone; so a token's
expert output does not depend on how many other tokens chose the same expert.

CPU: one ``cpu_matmul`` per group (reads the group sizes on the host, which is fine there).

CUDA: one Triton launch, no host sync, no data-dependent shape, so it can be captured in a CUDA
graph and replayed with other offsets. The grid is ``(cdiv(S, BLOCK_M) + G) * cdiv(N, BLOCK_N)``
programs, a function of the shapes only; that bounds the number of row tiles of any split of S
rows into G groups plus the zero tail. Each program reads ``offs`` on the device, finds its
group and row tile, and exits when it has none. Why the bits equal the former per-group
``triton_matmul`` launches: the K loop below is ``matmul._matmul_kernel``'s (same BLOCK_K, taken
from ``matmul.select_config``; ascending chunks into one fp32 accumulator through ``tl.dot`` with
the same precision; out-of-range K and rows loaded as exact zeros; epilogue ``acc * alpha`` with
alpha = 1 and one rounding to the output dtype; default FP fusion). BLOCK_M, BLOCK_N, warps and
stages only decide which program computes a row and how data moves, which matmul already relies
on (its configs change with M); tests/kernels/test_grouped_mm.py checks the equality bitwise.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import _common
from ._common import HAS_TRITON, UnsupportedError
from .matmul import _dot_precision, cpu_matmul, select_config

if HAS_TRITON:
    import triton
    import triton.language as tl

OP = "grouped_mm"


def _check(x: Tensor, w: Tensor, offs: Tensor) -> None:
    _common.check_inputs(OP, x, w)
    if x.dim() != 2 or w.dim() != 3:
        raise UnsupportedError(f"detcompile.{OP}: expects x [S, K] and w [G, K, N], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise UnsupportedError(f"detcompile.{OP}: K mismatch {x.shape[1]} vs {w.shape[1]}")
    if offs.dim() != 1 or offs.shape[0] != w.shape[0] or offs.is_floating_point():
        raise UnsupportedError(f"detcompile.{OP}: offs must be an integer vector of length G={w.shape[0]}")
    if x.dtype != w.dtype:
        raise UnsupportedError(f"detcompile.{OP}: x and w dtypes differ ({x.dtype}, {w.dtype})")


def grouped_per_group(x: Tensor, w: Tensor, offs: Tensor, mm) -> Tensor:
    """One ``mm`` per non-empty group, group sizes read on the host (the CPU path; on CUDA the
    reference the Triton kernel must match bit for bit)."""
    _check(x, w, offs)
    out = torch.zeros(x.shape[0], w.shape[2], dtype=x.dtype, device=x.device)
    start = 0
    for g, end in enumerate(offs.tolist()):
        end = min(int(end), x.shape[0])
        if end > start:
            out[start:end] = mm(x[start:end], w[g])
        start = max(start, end)
    return out


# ----------------------------------------------------------------------------------------------
# Triton kernel (CUDA, or the interpreter in tests)
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _max2(a, b):
        return tl.maximum(a, b)

    # S changes with the batch: no specialization on it (==1, divisible by 16), so one compiled
    # variant serves every batch; it only enters integer bookkeeping anyway. N, K and the strides
    # stay specialized exactly as in matmul's kernel.
    @triton.jit(do_not_specialize=["S"])
    def _grouped_mm_kernel(
        x_ptr, w_ptr, offs_ptr, c_ptr,
        S, N, K, G,
        s_xm, s_xk,
        s_wg, s_wk, s_wn,
        s_cm, s_cn,
        alpha,
        IS_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        G_POW2: tl.constexpr,
    ):
        pid = tl.program_id(0)
        tiles_n = tl.cdiv(N, BLOCK_N)
        t = pid // tiles_n  # this program's row tile among all groups' row tiles
        pid_n = pid % tiles_n

        # Row ranges of the G groups plus lane G = the zero tail [E[G-1], S), all on the device.
        lanes = tl.arange(0, G_POW2)
        is_group = lanes < G
        end = tl.load(offs_ptr + lanes, mask=is_group, other=0).to(tl.int64)
        end = tl.where(is_group, end, S)
        end = tl.minimum(tl.maximum(end, 0), S).to(tl.int32)
        end = tl.associative_scan(end, 0, _max2)
        # start[g] = max(0, E[0..g-1]) (0 for g = 0): the same scan over offs shifted by one lane.
        prev = tl.load(offs_ptr + lanes - 1, mask=(lanes >= 1) & (lanes <= G), other=0).to(tl.int64)
        prev = tl.minimum(tl.maximum(prev, 0), S).to(tl.int32)
        start = tl.associative_scan(prev, 0, _max2)
        n_tiles = tl.where(lanes <= G, (end - start + BLOCK_M - 1) // BLOCK_M, 0)
        tile_end = tl.cumsum(n_tiles, 0)
        total = tl.sum(n_tiles, 0)

        if t < total:
            g = tl.sum((tile_end <= t).to(tl.int32), 0)
            sel = lanes == g
            first_tile = tl.sum(tl.where(sel, tile_end - n_tiles, 0), 0)
            row_lo = tl.sum(tl.where(sel, start, 0), 0) + (t - first_tile) * BLOCK_M
            row_hi = tl.sum(tl.where(sel, end, 0), 0)

            offs_m = row_lo + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_m = offs_m < row_hi
            mask_n = offs_n < N
            om = offs_m.to(tl.int64)
            on = offs_n.to(tl.int64)
            mask = mask_m[:, None] & mask_n[None, :]
            c_ptrs = c_ptr + om[:, None] * s_cm + on[None, :] * s_cn
            if g < G:
                offs_k = tl.arange(0, BLOCK_K)
                num_k = tl.cdiv(K, BLOCK_K)
                a_ptrs = x_ptr + om[:, None] * s_xm + offs_k[None, :] * s_xk
                b_ptrs = w_ptr + g.to(tl.int64) * s_wg + offs_k[:, None] * s_wk + on[None, :] * s_wn
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                # matmul._matmul_kernel's K loop, statement for statement: this is what makes a
                # row's bits those of a per-group triton_matmul.
                for kb in range(0, num_k):
                    k_left = K - kb * BLOCK_K
                    a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
                    b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
                    if IS_FP32:
                        acc = tl.dot(a, b, acc, input_precision=PRECISION)
                    else:
                        acc = tl.dot(a, b, acc)
                    a_ptrs += BLOCK_K * s_xk
                    b_ptrs += BLOCK_K * s_wk
                acc = acc * alpha  # matmul's epilogue (alpha = 1, no bias), then one rounding
                tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
            else:
                # The tail past the last group: zeros, as in the per-group reference.
                tl.store(c_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=c_ptr.dtype.element_ty), mask=mask)


def select_grouped_config(S: int, N: int, G: int, dtype: torch.dtype, num_sms: int) -> dict:
    """Launch config from the shapes only. BLOCK_K is matmul's for this dtype (the one constant
    along the reduction); the rest is sized for the average group for speed."""
    block_k = select_config(max(S, 1), N, dtype, num_sms)["BLOCK_K"]
    if dtype == torch.float32:
        # matmul's fp32 tiles: the same tile shapes also keep the interpreter's numpy dot identical.
        cfg = select_config(max(S, 1), N, dtype, num_sms)
        return dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    rows = S / max(G, 1)
    if rows <= 16:  # decode: a few tokens per expert
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=block_k, num_warps=4, num_stages=6)
    if rows <= 128:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=block_k, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, num_warps=8, num_stages=3)


def triton_grouped_mm(x: Tensor, w: Tensor, offs: Tensor, *, _config: Optional[dict] = None) -> Tensor:
    """One Triton launch for all groups, no host sync (CUDA, or CPU under TRITON_INTERPRET=1).

    ``_config`` overrides BLOCK_M / BLOCK_N / num_warps / num_stages (tests of config
    independence only; BLOCK_K is not overridable).
    """
    _check(x, w, offs)
    if not _common.triton_launchable(x):
        raise UnsupportedError(f"detcompile.{OP}: the Triton kernel cannot run on {x.device}")
    S, K = x.shape
    G, _, N = w.shape
    if K == 0 or G == 0:
        # No reduction (matmul's epilogue of a zero accumulator) or no group: all zeros.
        return torch.zeros(S, N, dtype=x.dtype, device=x.device)
    out = torch.empty(S, N, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    offs = offs.to(x.device)  # no-op when already there (the captured case)
    cfg = select_grouped_config(S, N, G, x.dtype, _common.num_sms(x.device))
    if _config is not None:
        cfg.update({k: v for k, v in _config.items() if k != "BLOCK_K"})
    tiles_m = triton.cdiv(S, cfg["BLOCK_M"]) + G  # bound on row tiles, whatever the offsets
    grid = (tiles_m * triton.cdiv(N, cfg["BLOCK_N"]),)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _grouped_mm_kernel[grid](
            x, w, offs, out,
            S, N, K, G,
            *x.stride(), *w.stride(), *out.stride(),
            1.0,
            IS_FP32=x.dtype == torch.float32,
            PRECISION=_dot_precision(x.dtype),
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"],
            G_POW2=triton.next_power_of_2(G + 1),
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    return out


# ----------------------------------------------------------------------------------------------
# Op registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_common.NAMESPACE}::{OP}", mutates_args=())
def grouped_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    raise UnsupportedError(f"detcompile.{OP}: device {x.device.type!r} is not supported (cpu, cuda)")


@grouped_mm.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[2])


@grouped_mm.register_kernel("cpu")
def _(x, w, offs):
    return grouped_per_group(x, w, offs, cpu_matmul)


@grouped_mm.register_kernel("cuda")
def _(x, w, offs):
    if not HAS_TRITON:
        raise UnsupportedError(f"detcompile.{OP}: Triton is required on CUDA")
    return triton_grouped_mm(x, w, offs)
