"""An MLP's gate/up projections and SwiGLU in one launch: ``detcompile::linear_swiglu(a, w_gate, w_up)``.

Returns ``silu(a @ w_gate.t()) * (a @ w_up.t())`` for nn.Linear weights ``[N, K]`` (no bias), with
**exactly the bits of** ``detcompile.silu_mul(*detcompile.linear_group(a, [w_gate, w_up]))``:
each program computes one column block of the gate and of the up projection with the matmul
kernel's own K loop (``matmul.k_reduction``: the same BLOCK_K chunks in ascending order, one fp32
accumulator each), rounds both to the dtype as the matmul's store does, then runs ``silu_mul``'s
instruction sequence (``_ptx``: ATen's silu, one rounding, the product, one rounding).

Why: at decode (M <= 16) the SwiGLU is a launch of its own, a few microseconds a layer on the
critical path of a step that is otherwise weight reads; here it is the gate/up kernel's epilogue.
Larger M (prefill) and every case the fused kernel does not take run the two ops unfused (the same
bits by definition). CPU: the unfused CPU ops.

On a GPU the one-launch kernel runs only with ``DETCOMPILE_SWIGLU_ONE_LAUNCH=1`` until its GPU tests
have passed (written 2026-12-03 without a GPU; the interpreter runs it always): a kernel whose bits
were never compared on the hardware does not get to decide a decode step's bits by default.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from . import _common, _pdl, _ptx
from .linear_group import MAX_M, linear_group
from .matmul import BLOCK_K_16BIT, BLOCK_K_FP32
from .silu_mul import matches_eager, silu_mul

OP = "linear_swiglu"
ONE_LAUNCH_ENV = "DETCOMPILE_SWIGLU_ONE_LAUNCH"
#: Rows per tile: linear_group's (the matmul kernel's M <= 16 tile: the same MMA instructions).
BLOCK_M = 16

if _common.HAS_TRITON:
    triton = _common.triton
    tl = _common.tl
    from ._pdl import start_with_prefetch
    from .silu_mul import swiglu
    from .linear_group import weight_tile
    from .matmul import k_reduction

    @triton.jit(do_not_specialize=["M"])
    def _linear_swiglu_kernel(
        a_ptr, wg, wu, c, M, K, N, s_am, s_ak,
        IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_UNROLL: tl.constexpr,
        PTX: tl.constexpr, PDL: tl.constexpr, PF_BYTES,
    ):
        """One program per [BLOCK_M, BLOCK_N] output tile: the gate tile, then the up tile, then the
        SwiGLU. Weights row-major [N, K], the output row-major [M, N]."""
        om, on, mask_m, mask_n = weight_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Before anything is read: the gate rows, read first, may start into L2 (experimental, _pdl).
        start_with_prefetch(PDL, wg + tl.where(mask_n, on, 0) * K, PF_BYTES)
        a_ptrs = a_ptr + om[:, None] * s_am + offs_k[None, :] * s_ak
        num_k = tl.cdiv(K, BLOCK_K)
        # W.t() [K, N]: element (k, n) sits at n * K + k (linear_group's addressing)
        g = k_reduction(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a_ptrs, wg + offs_k[:, None] + on[None, :] * K,
                        mask_m, mask_n, K, num_k, s_ak, 1, IS_FP32, PRECISION, BLOCK_K, K_UNROLL)
        u = k_reduction(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a_ptrs, wu + offs_k[:, None] + on[None, :] * K,
                        mask_m, mask_n, K, num_k, s_ak, 1, IS_FP32, PRECISION, BLOCK_K, K_UNROLL)
        dt: tl.constexpr = c.dtype.element_ty
        # The unfused graph stores both projections in the dtype (linear_group's store), and silu_mul
        # reads them back: round here the same way.
        g = g.to(dt).to(tl.float32)
        u = u.to(dt).to(tl.float32)
        y = swiglu(g, u, dt, PTX)
        tl.store(c + om[:, None] * N + on[None, :], y, mask=mask_m[:, None] & mask_n[None, :])


def _check(a: Tensor, w_gate: Tensor, w_up: Tensor) -> None:
    _common.check_inputs(OP, a, w_gate, w_up)
    if a.dim() != 2 or w_gate.dim() != 2 or w_gate.shape != w_up.shape or w_gate.shape[1] != a.shape[1]:
        raise ValueError(f"detcompile.{OP}: expected a [M, K] and two weights [N, K], got a.shape={tuple(a.shape)}, "
                         f"w_gate.shape={tuple(w_gate.shape)}, w_up.shape={tuple(w_up.shape)}")
    if any(w.dtype != a.dtype or w.device != a.device for w in (w_gate, w_up)):
        raise ValueError(f"detcompile.{OP}: a and the weights must have one dtype and device, got a {a.dtype} on "
                         f"{a.device}, w_gate {w_gate.dtype} on {w_gate.device}, w_up {w_up.dtype} on {w_up.device}")


def _tile_config(n: int) -> dict:
    """Weight-streaming tiles, one program per tile. Each program reads a gate and an up block, so a
    stage holds one chunk of both: linear_group's gate+up config (BLOCK_N 32, 3 stages), not yet
    swept for this kernel."""
    return dict(BLOCK_N=32, num_warps=4, num_stages=3, K_UNROLL=1)


def fused(a: Tensor, w_gate: Tensor, w_up: Tensor) -> bool:
    """Whether the one-launch kernel takes these inputs: decode-sized M, contiguous weights, a GPU
    dtype, and (on a GPU: asked for, see the module doc) a GPU where silu_mul's kernel is known to
    give ATen's bits. Otherwise the unfused ops."""
    M, K = a.shape
    if not (0 < M <= MAX_M and K > 0 and w_gate.is_contiguous() and w_up.is_contiguous()
            and a.dtype in _common.GPU_DTYPES and _common.triton_launchable(a)):
        return False
    if not _ptx.use_ptx(a):
        return True  # the interpreter
    return os.environ.get(ONE_LAUNCH_ENV, "0") == "1" and matches_eager(a.device) is True


def triton_linear_swiglu(a: Tensor, w_gate: Tensor, w_up: Tensor, *, _config: dict | None = None) -> Tensor:
    """CUDA (or the interpreter): one launch where ``fused`` says so, else the two ops unfused.
    ``_config`` overrides the tile's BLOCK_N / num_warps / num_stages / K_UNROLL (benchmarks only)."""
    _check(a, w_gate, w_up)
    if not fused(a, w_gate, w_up):
        return silu_mul(*linear_group(a, [w_gate, w_up]))
    M, K = a.shape
    N = w_gate.shape[0]
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    cfg = dict(_tile_config(N), **(_config or {}))
    fp32 = a.dtype == torch.float32
    tiles = triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(M, BLOCK_M)
    pdl = _pdl.enabled(a)
    es = a.element_size()
    pf = _pdl.row_prefetch_bytes(pdl, K * es, N, w_gate.data_ptr() % 16 == 0 and K * es % 16 == 0)
    with _common.on_device(a):
        _linear_swiglu_kernel[(tiles,)](
            a, w_gate, w_up, out, M, K, N, a.stride(0), a.stride(1),
            IS_FP32=fp32, PRECISION=_common.dot_precision(a.dtype),
            BLOCK_M=BLOCK_M, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=BLOCK_K_FP32 if fp32 else BLOCK_K_16BIT,
            K_UNROLL=cfg["K_UNROLL"], PTX=_ptx.use_ptx(a),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_pdl.launch_kwargs(pdl), PF_BYTES=pf,
        )
    return out


@torch.library.custom_op(f"{_common.NAMESPACE}::{OP}", mutates_args=())
def linear_swiglu(a: Tensor, w_gate: Tensor, w_up: Tensor) -> Tensor:
    raise _common.UnsupportedError(f"detcompile.{OP}: device {a.device.type!r} is not supported (only cpu and cuda)")


@linear_swiglu.register_fake
def _(a, w_gate, w_up):
    return a.new_empty((a.shape[0], w_gate.shape[0]))


@linear_swiglu.register_kernel("cpu")
def _(a, w_gate, w_up):
    _check(a, w_gate, w_up)
    return silu_mul(*linear_group(a, [w_gate, w_up]))


@linear_swiglu.register_kernel("cuda")
def _(a, w_gate, w_up):
    return triton_linear_swiglu(a, w_gate, w_up)
