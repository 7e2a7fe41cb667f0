"""Batch-invariant grouped matmul for MoE experts: ``detcompile::grouped_mm(x, w, offs)``.

``x`` [S, K] holds rows sorted by group; rows ``offs[g-1] <= r < offs[g]`` are multiplied by ``w[g]``
([G, K, N], any strides: transformers passes ``weight.transpose(-2, -1)`` of [G, N, K] experts);
rows past ``offs[-1]`` are zero. Semantics of ``aten._grouped_mm`` (2-D x 3-D) and of
transformers' ``grouped_mm_fallback``. Offsets are clamped to [0, S], and an offset below an
earlier one ends an empty group: group g covers ``[E[g-1], E[g])`` with
``E = cummax(clamp(offs, 0, S))`` and ``E[-1] = 0``.

Why it is batch-invariant: a row's output is its row of ``x`` times ``w[g]``, each element reduced
over K with the reduction of ``detcompile::matmul`` (one fp32 accumulator, ascending BLOCK_K chunks
through ``tl.dot``, BLOCK_K fixed by the dtype, no split-K; or ``cpu_matmul`` on the CPU), whose
order depends on K and the dtype alone; so a token's expert output does not depend on how many
other tokens there are or which experts they chose.

CPU: one ``cpu_matmul`` per group (``grouped_mm_per_group``), group sizes read on the host.

CUDA: one Triton launch with a grid computed from the shapes only, no host sync, so it can be
captured in a CUDA graph and replayed with other offsets. Row tiles start at their group's first
row, like the per-group launches they replace. Tile slot numbering, with ``s_g = E[g-1]`` the start
of group g, the zero tail being group G (``[E[G-1], S)``): group g's j-th row tile is slot
``first(g) + j`` with ``first(g) = s_g // BLOCK_M + g``. ``first`` increases strictly with g and a
group's tiles end before the next group's first slot, so the slots of different groups never
collide, and all lie below ``S // BLOCK_M + G + 1``: that is the grid (times the column tiles). A
program finds its group by a binary search for the last g with ``first(g) <= slot``, each step one
masked max over ``offs`` (no scan); a slot in a gap has no rows and does nothing.

Why the bits equal the per-group ``triton_matmul`` launches (``grouped_mm_per_group`` with
``matmul.triton_matmul``, the former CUDA path): the K loop is ``matmul._matmul_kernel``'s
statement for statement (BLOCK_K 64 for 16-bit, 32 for fp32; out-of-range rows and K load as exact
zeros; the same ``tl.dot`` precision; one rounding to the output dtype). BLOCK_M, BLOCK_N, warps and
stages only decide which program computes a row and how data moves, which matmul relies on too
(its configs change with M); ``tests/kernels/test_grouped_mm.py`` checks the equality bitwise.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import _common
from ._common import HAS_TRITON, UnsupportedError
from .matmul import BLOCK_K_16BIT, BLOCK_K_FP32, _launch_fitting, cpu_matmul, fit_stages

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .matmul import k_reduction

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


def grouped_mm_per_group(x: Tensor, w: Tensor, offs: Tensor, mm) -> Tensor:
    """One ``mm`` per non-empty group, the group sizes read on the host: the CPU path, and on CUDA
    (with ``triton_matmul``) the reference the one-launch kernel must match bit for bit."""
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

    # S changes with the batch: no specialization on it (==1, divisible by 16), so one compiled
    # variant serves every batch; it only enters integer bookkeeping and masks. N, K and the
    # strides stay specialized as in matmul's kernel (memory movement only).
    @triton.jit(do_not_specialize=["S"])
    def _grouped_mm_kernel(
        x_ptr, w_ptr, offs_ptr, c_ptr,
        S, N, K, G,
        s_xm, s_xk,
        s_wg, s_wk, s_wn,
        s_cm, s_cn,
        IS_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        G_LANES: tl.constexpr,
        SEARCH_STEPS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        tiles_n = tl.cdiv(N, BLOCK_N)
        slot = pid // tiles_n
        pid_n = pid % tiles_n

        # Group ends clamped to [0, S], one lane per group (read on the device, never the host).
        lanes = tl.arange(0, G_LANES)
        ends = tl.load(offs_ptr + lanes, mask=lanes < G, other=0).to(tl.int64)
        ends = tl.minimum(tl.maximum(ends, 0), S).to(tl.int32)

        # Binary search over g in [0, G] (G = the zero tail) for the last g with first(g) <= slot,
        # first(g) = s_g // BLOCK_M + g, s_g = max(ends[:g]) (the cummax: decreasing offsets end
        # empty groups). Reductions only, no scan; SEARCH_STEPS = ceil(log2(G + 1)).
        lo = slot * 0
        hi = lo + G + 1
        for _ in tl.static_range(SEARCH_STEPS):
            mid = (lo + hi) // 2
            first_mid = tl.max(tl.where(lanes < mid, ends, 0), axis=0) // BLOCK_M + mid
            ok = first_mid <= slot
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        g = lo
        is_group = g < G
        row_start = tl.max(tl.where(lanes < g, ends, 0), axis=0)
        row_end = tl.where(is_group, tl.max(tl.where(lanes <= g, ends, 0), axis=0), S)
        row_lo = row_start + (slot - (row_start // BLOCK_M + g)) * BLOCK_M

        # This program's rows: [row_lo, row_end) within one BLOCK_M tile; none for a slot in a gap
        # between groups (row_lo >= row_end: the mask is empty and the K loop does not run).
        offs_m = row_lo + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < row_end
        mask_n = offs_n < N
        om = offs_m.to(tl.int64)
        on = offs_n.to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        w_group = tl.minimum(g, G - 1).to(tl.int64)  # the tail reads no weights; keep it in range
        a_ptrs = x_ptr + om[:, None] * s_xm + offs_k[None, :] * s_xk
        b_ptrs = w_ptr + w_group * s_wg + offs_k[:, None] * s_wk + on[None, :] * s_wn

        # matmul's K loop itself (whole K, ascending BLOCK_K chunks, one fp32 accumulator;
        # out-of-range rows and K load as exact zeros). The tail and empty slots run no chunk: the
        # tail stores the zero accumulator, empty slots store nothing.
        num_k = tl.where(is_group & (row_lo < row_end), tl.cdiv(K, BLOCK_K), 0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = k_reduction(acc, a_ptrs, b_ptrs, mask_m, mask_n, K, num_k, s_xk, s_wk,
                          IS_FP32, PRECISION, BLOCK_K, 1)

        c_ptrs = c_ptr + om[:, None] * s_cm + on[None, :] * s_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def select_grouped_config(S: int, G: int, dtype: torch.dtype) -> dict:
    """Launch config from the shapes only (never the offsets). BLOCK_K is matmul's for the dtype
    (the one constant along the reduction); the tile is sized for the mean non-empty group for
    speed. fp32 takes matmul's fp32 config whole."""
    if dtype == torch.float32:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=BLOCK_K_FP32, num_warps=8, num_stages=3)
    rows = S / max(1, min(S, G))  # every group non-empty when S >= G (top-k routing spreads)
    if rows <= 16:  # decode: a few tokens per expert, weights stream once
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=BLOCK_K_16BIT, num_warps=4, num_stages=4)
    if rows <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=BLOCK_K_16BIT, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=BLOCK_K_16BIT, num_warps=8, num_stages=3)


def triton_grouped_mm(x: Tensor, w: Tensor, offs: Tensor, *, _config: Optional[dict] = None) -> Tensor:
    """One Triton launch for all groups, no host sync (CUDA, or CPU tensors under TRITON_INTERPRET=1).

    ``_config`` overrides BLOCK_M / BLOCK_N / num_warps / num_stages (tests of config independence
    only; BLOCK_K cannot be overridden).
    """
    _check(x, w, offs)
    if not _common.triton_launchable(x):
        raise UnsupportedError(
            f"detcompile.{OP}: the Triton kernel cannot run on {x.device} "
            "(needs CUDA, or TRITON_INTERPRET=1 with Triton installed)"
        )
    if x.dtype not in _common.GPU_DTYPES:
        raise UnsupportedError(f"detcompile.{OP}: dtype {x.dtype} is not supported by the Triton kernel")
    S, K = x.shape
    G, _, N = w.shape
    if S >= 2**31:
        raise UnsupportedError(f"detcompile.{OP}: {S} rows do not fit the kernel's 32-bit row numbers")
    out = torch.empty(S, N, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if G == 0 or K == 0:
        return out.zero_()  # every row in the tail, or an empty reduction: zeros either way
    # Same device (a no-op when already there, as in a captured step), int32/int64, unit stride.
    if offs.dtype not in (torch.int32, torch.int64):
        offs = offs.to(torch.int64)
    offs = offs.to(x.device).contiguous()
    cfg = select_grouped_config(S, G, x.dtype)
    if _config is not None:
        cfg.update({k: v for k, v in _config.items() if k != "BLOCK_K"})
    es = x.element_size()
    cfg = fit_stages(cfg, _common.shared_memory_limit(x.device), es, es, False)
    slots = S // cfg["BLOCK_M"] + G + 1  # bound on the row tiles of any offsets (module doc)
    grid = (slots * triton.cdiv(N, cfg["BLOCK_N"]),)
    key = (str(x.device), OP, x.dtype, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"])

    def launch(stages):
        _grouped_mm_kernel[grid](
            x, w, offs, out,
            S, N, K, G,
            *x.stride(), *w.stride(), *out.stride(),
            IS_FP32=x.dtype == torch.float32,
            PRECISION=_common.dot_precision(x.dtype),
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"],
            G_LANES=max(16, triton.next_power_of_2(G)),
            SEARCH_STEPS=G.bit_length(),
            num_warps=cfg["num_warps"],
            num_stages=stages,
        )

    # Triton launches on the current CUDA device; make that x's device.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _launch_fitting(key, cfg["num_stages"], launch)
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
    return grouped_mm_per_group(x, w, offs, cpu_matmul)


@grouped_mm.register_kernel("cuda")
def _(x, w, offs):
    if not HAS_TRITON:
        raise UnsupportedError(f"detcompile.{OP}: Triton is required on CUDA")
    return triton_grouped_mm(x, w, offs)
