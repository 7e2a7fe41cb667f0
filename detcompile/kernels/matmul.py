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
* CPU: ``_cpu.tile_matmul``: BLAS calls of one fixed shape ([64, 128] @ [128, 128] tiles of the
  zero-padded operands), K tiles added in ascending order; see ``_cpu`` for why that is invariant.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import _common, _cpu, _pdl
from ._common import HAS_TRITON, UnsupportedError

if HAS_TRITON:
    import triton
    import triton.language as tl

    from triton.runtime.errors import OutOfResources

    from ._pdl import start as pdl_start
    from ._pdl import start_with_prefetch as pdl_start_with_prefetch

    try:
        from triton.tools.tensor_descriptor import TensorDescriptor

        _HAS_TENSOR_DESCRIPTOR = True
    except ImportError:  # older Triton: pointer kernel only
        _HAS_TENSOR_DESCRIPTOR = False
else:
    _HAS_TENSOR_DESCRIPTOR = False
    OutOfResources = RuntimeError  # never raised without Triton

OP = "matmul"

# BLOCK_K is fixed per dtype: 64 for 16-bit inputs, 32 for fp32. It is the only launch constant
# along the reduced dimension (K_UNROLL, picked by M for decode, only groups whole chunks per loop
# iteration: the dots and their order stay those of BLOCK_K, see k_reduction). Everything else
# (BLOCK_M, BLOCK_N, warps, stages, TMA or pointer loads, persistent grid size) is picked from M
# and N below for speed: it changes which program
# computes an element and how data moves, never the element's reduction. Each output element is
# one fp32 accumulator fed by the MMA instructions over K in ascending order (Triton chains the
# k16 MMAs of each chunk into the accumulator); benchmarks/matmul_configs.py checked on the H100
# that all of these configs, with mma.sync (BLOCK_M = 16/32) and wgmma (BLOCK_M >= 64) alike, give
# identical bits, and tests/kernels/test_matmul.py checks row 0 across every M bucket on the GPU.
BLOCK_K_16BIT = 64
BLOCK_K_FP32 = 32
_CONFIG_FP32 = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=BLOCK_K_FP32, GROUP_M=8, num_warps=8, num_stages=3, TMA=False)
# Large-M 16-bit tiles: (config, relative cost of one tile) for the wave-quantisation estimate.
# Measured on the H100 (benchmarks/matmul_configs.py): 128x128 tiles run ~7% below 128x256 per
# flop, 64x128 tiles ~30% below; the smaller tiles win when they fill the last wave better.
# The 128x128 and 64x128 tiles run six stages deep (192 / 144 KB of operand buffers): where few
# tiles leave SMs idle (M = 256) the deeper prefetch took qkv from 0.78x to 0.94x cuBLAS, o from
# 0.85x to 0.96x and down from 0.88x to 1.0x (benchmarks/matmul_configs.py --mid-only, 2026-11-24).
_LARGE_TILES = (
    (dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=3), 2.0),
    (dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=6), 1.075),
    (dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=6), 0.7),
)
# Pointer-load fallback for M > 64 when TMA cannot describe an operand (odd strides): the big TMA
# tiles need more shared memory without TMA, so this one (same bits, like every config) is used.
_POINTER_LARGE = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)


def select_config(M: int, N: int, dtype: torch.dtype, num_sms: int) -> dict:
    """Launch config for an [M, K] @ [K, N] product. BLOCK_K depends on the dtype only."""
    if dtype == torch.float32:
        return dict(_CONFIG_FP32)
    base = dict(BLOCK_K=BLOCK_K_16BIT, GROUP_M=8)
    if M <= 16:
        # Memory-bound (weights stream once): many narrow N tiles to keep every SM loading.
        # Small TMA boxes measured slower than pointer loads here. Per N, the fastest config of
        # benchmarks/matmul_small_m.py (H200, 2026-12-03; all of them give the same bits): one
        # program per tile (several resident per SM) except at N = 4096, where the persistent grid
        # tied. k/v 1024: 13.2 -> 11.8 us, gate/up 14336: 35.5 -> 33.1 us, lm_head: 273 -> 243 us.
        # Narrow N (k/v, q/o, down) walk four K chunks per loop iteration (K_UNROLL: the same dots
        # in the same order, see k_reduction): k/v 11.7 -> 9.6 us, q/o 13.9 -> 12.9 us, down
        # 40.0 -> 31.6 us (3713 GB/s, cuBLAS 3658); wide N gained nothing.
        small = dict(base, BLOCK_M=16, num_warps=4, num_stages=8, TMA=False, PERSISTENT=False)
        if N <= 2048:
            return dict(small, BLOCK_N=32, num_stages=4, K_UNROLL=4)
        if N < 6144:
            return dict(small, BLOCK_N=32, num_stages=6, PERSISTENT=True, K_UNROLL=4)
        if N < 16384:
            return dict(small, BLOCK_N=64)
        return dict(small, BLOCK_N=32, num_warps=2)
    if M <= 64:
        # Still a weight read (batched decode). benchmarks/matmul_small_m.py --mid (H200, 2026-12-03,
        # M = 32/64; every config gave the same bits): pointer loads beat the TMA kernel. k/v
        # (N <= 2048) is fastest with the decode tile (14.6 -> 8.9 us, cuBLAS 8.0). Where 32-wide
        # tiles fill one wave, four K chunks per iteration: q/o 19.7 -> 13.8 us at M = 32 (cuBLAS
        # 13.0), down 62.5 -> 35.1 (33.8). Wider N gets 64-wide tiles, or a second wave of 32-wide
        # ones runs half empty (qkv at M = 64: 0.64x cuBLAS): gate/up 49.1 -> 33.1 us (32.2),
        # lm_head 282 -> 258 us (267).
        if N <= 2048:
            return select_config(16, N, dtype, num_sms)
        mid = dict(base, BLOCK_M=64, num_warps=4, TMA=False, PERSISTENT=False)
        if -(-N // 32) <= num_sms:
            return dict(mid, BLOCK_N=32, num_stages=4, K_UNROLL=4)
        if M > 32 and -(-N // 64) <= num_sms:
            # One wave of 64-wide tiles (fused qkv, N = 6144): the TMA kernel won at M = 64
            # (17.7 us vs 19.6; cuBLAS 16.1); at M = 32 nothing beat the pointer kernel (19.2 us).
            return dict(base, BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=8, TMA=True)
        return dict(mid, BLOCK_N=64, num_stages=6)
    # Compute-bound: the tile whose whole number of waves over the SMs costs least.
    def cost(tile):
        cfg, unit = tile
        tiles = -(-M // cfg["BLOCK_M"]) * -(-N // cfg["BLOCK_N"])
        return -(-tiles // num_sms) * unit
    cfg, _ = min(_LARGE_TILES, key=cost)
    return dict(base, **cfg, TMA=True)


def smem_estimate(cfg: dict, in_bytes: int, out_bytes: int, has_bias: bool) -> int:
    """Shared memory of a launch config, estimated: ``num_stages`` buffers of the A and B tiles,
    the output tile staged for the store (the TMA kernel's epilogue overlaps the next tile's loads),
    BLOCK_M x BLOCK_N bytes of layout-conversion scratch when a bias is added, and 1 KiB of
    barriers and slack. On the H200 the 6-stage 128x128 bf16 config with a bias needed 237616 and
    245784 bytes (ctrl, xlnet, trocr); this gives 246784."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    # A pipeline stage is one loop iteration: K_UNROLL chunks of each operand.
    operands = cfg["num_stages"] * cfg.get("K_UNROLL", 1) * (bm * bk + bk * bn) * in_bytes
    epilogue = bm * bn * out_bytes + (bm * bn if has_bias else 0)
    return operands + epilogue + 1024


def fit_stages(cfg: dict, limit: Optional[int], in_bytes: int, out_bytes: int, has_bias: bool) -> dict:
    """``cfg`` with ``num_stages`` lowered until ``smem_estimate`` fits in ``limit`` bytes (at least
    one stage). Nothing else changes: BLOCK_K and the ascending K loop stay, and the pipeline depth
    only decides how far ahead tiles are loaded, so every element gets the same bits."""
    cfg = dict(cfg)
    if limit is None:
        return cfg
    while cfg["num_stages"] > 1 and smem_estimate(cfg, in_bytes, out_bytes, has_bias) > limit:
        cfg["num_stages"] -= 1
    return cfg


#: Pipeline depths Triton found too deep after all (the estimate is only an estimate): launch key
#: -> the depth that fitted. Later launches with the key start there.
_STAGE_CAP: dict = {}


def _launch_fitting(key, stages: int, launch) -> int:
    """``launch(stages)``, one stage shallower each time Triton reports that shared memory does not
    suffice (it raises before anything runs). Returns the depth that ran."""
    stages = min(stages, _STAGE_CAP.get(key, stages))
    while True:
        try:
            launch(stages)
            return stages
        except OutOfResources as e:
            if getattr(e, "name", "") != "shared memory" or stages <= 1:
                raise
            stages -= 1
            _STAGE_CAP[key] = stages


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _tile_coords(t, tiles_m, tiles_n, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) of tile t: tiles grouped along M for L2 reuse (visiting order only)."""
        in_group = GROUP_M * tiles_n
        first_m = (t // in_group) * GROUP_M
        group_m = tl.minimum(tiles_m - first_m, GROUP_M)
        return first_m + (t % in_group) % group_m, (t % in_group) // group_m

    @triton.jit
    def _chunk_dot(a, b, acc, IS_FP32: tl.constexpr, PRECISION: tl.constexpr):
        """``acc`` plus one BLOCK_K chunk's product (fp32 inputs at the dtype's dot precision)."""
        if IS_FP32:
            return tl.dot(a, b, acc, input_precision=PRECISION)
        return tl.dot(a, b, acc)

    @triton.jit
    def k_reduction(acc, a_ptrs, b_ptrs, mask_m, mask_n, K, num_k, s_ak, s_bk,
                    IS_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
                    K_UNROLL: tl.constexpr):
        """``acc`` plus the [BLOCK_M, K] @ [K, BLOCK_N] product of the tiles at ``a_ptrs`` /
        ``b_ptrs`` (K offset 0), over ``num_k`` chunks: the pointer kernels' K loop, shared with
        ``grouped_mm`` so that its rows get matmul's bits.

        Whole K, ascending BLOCK_K chunks, one accumulator: the same reduction order for every
        output element whatever M is. Out-of-range K (and masked rows / columns) load as exact 0,
        so a row zero-padded along K produces the same bits.

        ``K_UNROLL`` > 1 walks the whole chunks K_UNROLL at a time (loads without K masks, then
        the K_UNROLL dots in ascending order), the rest one by one as before: the accumulator sees
        the same ``tl.dot`` calls on the same chunks in the same order, so the bits cannot change;
        only the loop's shape does (fewer iterations, wider loads in flight: at decode a weight
        read)."""
        offs_k = tl.arange(0, BLOCK_K)
        kb0 = 0
        if K_UNROLL > 1:
            groups = tl.minimum(K // BLOCK_K, num_k) // K_UNROLL  # whole chunks only: no K mask
            for _g in range(0, groups):
                for u in tl.static_range(K_UNROLL):
                    a = tl.load(a_ptrs + u * BLOCK_K * s_ak, mask=mask_m[:, None], other=0.0)
                    b = tl.load(b_ptrs + u * BLOCK_K * s_bk, mask=mask_n[None, :], other=0.0)
                    acc = _chunk_dot(a, b, acc, IS_FP32, PRECISION)
                a_ptrs += K_UNROLL * BLOCK_K * s_ak
                b_ptrs += K_UNROLL * BLOCK_K * s_bk
            kb0 = groups * K_UNROLL
        for kb in range(kb0, num_k):
            k_left = K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
            acc = _chunk_dot(a, b, acc, IS_FP32, PRECISION)
            a_ptrs += BLOCK_K * s_ak
            b_ptrs += BLOCK_K * s_bk
        return acc

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
        K_UNROLL: tl.constexpr,
        PDL: tl.constexpr,
        PF_BYTES,
    ):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        tiles_per_batch = tiles_m * tiles_n
        num_tiles = NUM_BATCH * tiles_per_batch
        num_k = tl.cdiv(K, BLOCK_K)
        offs_k = tl.arange(0, BLOCK_K)
        # Before anything is read: the first tile's B rows (a weight's, K-contiguous: the launcher
        # passes PF_BYTES 0 otherwise) may start into L2 (experimental, _pdl).
        pf_m, pf_n = _tile_coords(pid % tiles_per_batch, tiles_m, tiles_n, GROUP_M)
        pf_cols = pf_n * BLOCK_N + tl.arange(0, BLOCK_N)
        pf_cols = tl.where(pf_cols < N, pf_cols, 0).to(tl.int64)
        pdl_start_with_prefetch(PDL, b_ptr + (pid // tiles_per_batch).to(tl.int64) * s_bb + pf_cols * s_bn, PF_BYTES)

        for tile in range(pid, num_tiles, nprog):
            # The batch is just the outermost tile coordinate; inside a batch element, tiles are
            # grouped along M for L2 reuse (only the visiting order changes, not any arithmetic).
            bid = tile // tiles_per_batch
            pid_m, pid_n = _tile_coords(tile % tiles_per_batch, tiles_m, tiles_n, GROUP_M)

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
            acc = k_reduction(acc, a_ptrs, b_ptrs, mask_m, mask_n, K, num_k, s_ak, s_bk,
                              IS_FP32, PRECISION, BLOCK_K, K_UNROLL)

            # Epilogue in fp32, then the single rounding to the output dtype.
            acc = acc * alpha
            mask = mask_m[:, None] & mask_n[None, :]
            if HAS_BIAS:
                x_ptrs = x_ptr + bid64 * s_xb + om[:, None] * s_xm + on[None, :] * s_xn
                bias = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
                acc = acc + bias * beta
            c_ptrs = c_ptr + bid64 * s_cb + om[:, None] * s_cm + on[None, :] * s_cn
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


    # Hopper path: the same tiles and the same K loop as _matmul_kernel, with operands moved by
    # TMA (tensor descriptors) instead of pointer loads. Only data movement differs, so every
    # element gets the same MMA sequence and the same bits (checked by tests/kernels/test_matmul.py
    # on the GPU). ``flatten`` lets the software pipeliner prefetch the next tile's K chunks while
    # the current tile's epilogue runs.
    @triton.jit(do_not_specialize=["M"])
    def _matmul_tma_kernel(
        a_desc, b_desc, c_desc, x_ptr,
        M, N, K,
        s_xm, s_xn,
        alpha, beta,
        HAS_BIAS: tl.constexpr,
        B_KMAJOR: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        PDL: tl.constexpr = 0,
    ):
        pdl_start(PDL)  # nothing is read before (the descriptors are launch parameters)
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        num_tiles = tiles_m * tiles_n
        num_k = tl.cdiv(K, BLOCK_K)
        for tile in tl.range(pid, num_tiles, nprog, flatten=True):
            pid_m, pid_n = _tile_coords(tile, tiles_m, tiles_n, GROUP_M)
            om = pid_m * BLOCK_M
            on = pid_n * BLOCK_N

            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            # Whole K, ascending chunks, one accumulator (TMA loads out-of-range K as zeros).
            for kb in range(0, num_k):
                a = a_desc.load([om, kb * BLOCK_K])
                if B_KMAJOR:
                    b = b_desc.load([on, kb * BLOCK_K]).T
                else:
                    b = b_desc.load([kb * BLOCK_K, on])
                acc = tl.dot(a, b, acc)

            acc = acc * alpha
            if HAS_BIAS:
                offs_m = om + tl.arange(0, BLOCK_M)
                offs_n = on + tl.arange(0, BLOCK_N)
                mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
                x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * s_xm + offs_n.to(tl.int64)[None, :] * s_xn
                bias = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
                acc = acc + bias * beta
            c_desc.store([om, on], acc.to(c_desc.dtype))


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
    out = acc * alpha if alpha != 1 else acc  # x * 1 == x exactly: skip the pass
    if bias is not None and beta != 0:
        out = out + (bias.to(acc.dtype) * beta if beta != 1 else bias.to(acc.dtype))
    return out.to(dtype)


#: Set DETCOMPILE_MATMUL_TMA=0 to force the pointer-load kernel (debugging; same bits either way).
_TMA_ENABLED = os.environ.get("DETCOMPILE_MATMUL_TMA", "1") != "0"


def _tma_capable(a: Tensor) -> bool:
    """TMA needs Hopper or newer and is used for 16-bit inputs only (fp32 keeps the pointer path)."""
    return (
        _TMA_ENABLED and _HAS_TENSOR_DESCRIPTOR and a.is_cuda
        and a.dtype in (torch.float16, torch.bfloat16)
        and _common.cuda_capability(a.device)[0] >= 9
    )


def _tma_ok(t: Tensor) -> bool:
    """A 2-D tensor a TMA descriptor can describe: unit last stride, 16-byte aligned base and rows."""
    es = t.element_size()
    return t.stride(-1) == 1 and (t.stride(0) * es) % 16 == 0 and t.data_ptr() % 16 == 0


def _tma_descriptors(a: Tensor, b: Tensor, c: Tensor, cfg: dict):
    """(a_desc, b_desc, c_desc, b_kmajor) for 2-D a [M, K], b [K, N], c [M, N], or None when a
    layout does not suit TMA (the pointer kernel then runs; the bits are the same)."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if not (_tma_ok(a) and _tma_ok(c)):
        return None
    bt = b.t()
    if b.stride(0) == 1 and _tma_ok(bt):  # b = w.t() of an nn.Linear weight w [N, K]
        b_desc, kmajor = TensorDescriptor.from_tensor(bt, [bn, bk]), True
    elif _tma_ok(b):
        b_desc, kmajor = TensorDescriptor.from_tensor(b, [bk, bn]), False
    else:
        return None
    return TensorDescriptor.from_tensor(a, [bm, bk]), b_desc, TensorDescriptor.from_tensor(c, [bm, bn]), kmajor


# ----------------------------------------------------------------------------------------------
# Launcher and CPU implementation
# ----------------------------------------------------------------------------------------------


def triton_matmul(
    a: Tensor, b: Tensor, bias: Optional[Tensor] = None, alpha: float = 1.0, beta: float = 1.0,
    *, _config: Optional[dict] = None,
) -> Tensor:
    """Run the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1).

    a [M, K] @ b [K, N] -> [M, N], or a [B, M, K] @ b [B, K, N] -> [B, M, N]; any strides.
    ``_config`` overrides the launch config (benchmarks/tests of config equivalence only).
    """
    _common.check_inputs(OP, a, b, bias)
    shape = _out_shape(a, b, bias)
    if not _common.triton_launchable(a):
        raise UnsupportedError(
            f"detcompile.{OP}: the Triton kernel cannot run on {a.device} "
            "(needs CUDA, or TRITON_INTERPRET=1 with Triton installed)"
        )
    if a.dtype not in (torch.float16, torch.bfloat16, torch.float32):
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

    num_sms = _common.num_sms(a.device)
    cfg = select_config(M, N, a.dtype, num_sms)
    if _config is not None:
        cfg.update(_config)
    use_tma = cfg.get("TMA", True) and nb == 1 and _tma_capable(a)
    descs = _tma_descriptors(a3[0], b3[0], c3[0], cfg) if use_tma else None
    if descs is None and cfg["BLOCK_M"] * cfg["BLOCK_N"] > 128 * 128:
        cfg.update(_POINTER_LARGE)
    num_tiles = nb * triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    # Persistent grid (one program per SM walking the tiles), or one program per tile when the
    # config asks for it (several CTAs per SM overlap each other's epilogues); either way each
    # tile runs the same instruction sequence.
    grid = (max(1, min(num_sms, num_tiles)) if cfg.get("PERSISTENT", True) else num_tiles,)
    # The pipeline must fit the device's shared memory for this dtype and epilogue.
    es = a.element_size()
    cfg = fit_stages(cfg, _common.shared_memory_limit(a.device), es, es, xb is not None)
    b_kmajor = descs[3] if descs is not None else None
    key = (str(a.device), descs is not None, b_kmajor, a.dtype, xb is not None,
           cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"], cfg.get("K_UNROLL", 1))

    # What both kernels take from the config; the pipeline depth is fitted at launch.
    tile_args = dict(
        HAS_BIAS=xb is not None,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"],
    )

    def launch_tma(stages):
        a_desc, b_desc, c_desc, _ = descs
        _matmul_tma_kernel[grid](
            a_desc, b_desc, c_desc, x3,
            M, N, K,
            *x_strides[1:],
            float(alpha), float(beta),
            B_KMAJOR=b_kmajor,
            num_stages=stages,
            **tile_args,
            **pdl_kwargs,
        )

    def launch_pointer(stages):
        _matmul_kernel[grid](
            a3, b3, x3, c3,
            nb, M, N, K,
            *a3.stride(), *b3.stride(), *c3.stride(), *x_strides,
            float(alpha), float(beta),
            IS_FP32=a.dtype == torch.float32,
            PRECISION=_common.dot_precision(a.dtype),
            K_UNROLL=cfg.get("K_UNROLL", 1),
            num_stages=stages,
            **tile_args,
            **pdl_kwargs,
            PF_BYTES=pf,
        )

    pdl = _pdl.enabled(a)
    pdl_kwargs = _pdl.launch_kwargs(pdl)
    # Pointer kernel, weight-like B (K-contiguous rows): the rows the programs' first tiles read may be
    # prefetched (the TMA kernel prefetches nothing).
    pf = 0 if descs is not None else _pdl.row_prefetch_bytes(
        pdl and b3.stride(1) == 1, K * es, min(grid[0], num_tiles) * cfg["BLOCK_N"],
        b3.data_ptr() % 16 == 0 and b3.stride(2) * es % 16 == 0 and b3.stride(0) * es % 16 == 0)

    # Triton launches on the current CUDA device; make that a's device.
    with _common.on_device(a):
        _launch_fitting(key, cfg["num_stages"], launch_tma if descs is not None else launch_pointer)
    return out


def cpu_matmul(
    a: Tensor, b: Tensor, bias: Optional[Tensor] = None, alpha: float = 1.0, beta: float = 1.0
) -> Tensor:
    """CPU path: fixed-tile GEMM in fp32 (fp64 for fp64), epilogue, one rounding."""
    _common.check_inputs(OP, a, b, bias)
    shape = _out_shape(a, b, bias)
    use_bias = bias is not None and beta != 0
    xb = _expand_bias(bias, shape) if use_bias else None
    acc = _cpu.tile_matmul(a, b)
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
