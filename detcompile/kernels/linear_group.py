"""Sibling linears of one input in one launch: ``detcompile::linear_group(a, [W0, W1, W2])``.

Returns ``[a @ W0.t(), a @ W1.t(), ...]`` for nn.Linear weights ``Wi [Ni, K]`` (no bias): an
attention layer's q/k/v projections, an MLP's gate/up. Each output has **exactly the bits of**
``detcompile.matmul(a, Wi.t())``: every element is one fp32 accumulator fed by the same ``tl.dot``
chunks of BLOCK_K over K in ascending order (``matmul.k_reduction``, the matmul kernel's own loop);
only which program computes a tile differs.

Why: at decode (M <= 16) a matmul is a weight read, and k_proj / v_proj of a GQA model are narrow
(N = 1024 for Llama-3-8B): 64 tiles leave half the SMs idle, and each launch pays its own ramp.
One launch over the concatenated N range keeps every SM streaming (H200: q + k + v took 14.1 + 2 x
13.2 us as three launches). Larger M (prefill) runs one ``matmul`` per weight: there the launches
are compute-bound and the matmul kernel's own tile choice is better.

CPU: one ``matmul`` per weight (the same tiles as ever).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _common, _pdl
from .matmul import BLOCK_K_16BIT, BLOCK_K_FP32, cpu_matmul, triton_matmul

OP = "linear_group"
#: Largest M that takes the one-launch kernel (the matmul kernel's weight-streaming range).
MAX_M = 16
MAX_WEIGHTS = 3
#: Rows per tile of the one-launch kernel: the matmul kernel's M <= 16 tile (same MMA instructions).
BLOCK_M = 16

if _common.HAS_TRITON:
    triton = _common.triton
    tl = _common.tl
    from ._pdl import start_with_prefetch
    from .matmul import k_reduction

    @triton.jit
    def weight_tile(t, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Tile ``t`` of an [M, N] output (M fastest): its int64 rows and columns and their masks
        (``t`` counts M tiles first, so neighbouring programs read the same weight columns)."""
        tiles_m = tl.cdiv(M, BLOCK_M)
        offs_m = (t % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = (t // tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)
        return offs_m.to(tl.int64), offs_n.to(tl.int64), offs_m < M, offs_n < N

    @triton.jit(do_not_specialize=["M"])
    def _linear_group_kernel(
        a_ptr, w0, w1, w2, c0, c1, c2,
        M, K, N0, N1, N2, s_am, s_ak,
        IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_UNROLL: tl.constexpr,
        PDL: tl.constexpr, PF_BYTES,
    ):
        """One program per output tile; tiles of W0 first, then W1, then W2. Weights are
        row-major [Ni, K] (an nn.Linear's), outputs row-major [M, Ni]."""
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        t0 = tl.cdiv(N0, BLOCK_N) * tiles_m
        t1 = tl.cdiv(N1, BLOCK_N) * tiles_m
        if pid < t0:
            w, c, N, t = w0, c0, N0, pid
        elif pid < t0 + t1:
            w, c, N, t = w1, c1, N1, pid - t0
        else:
            w, c, N, t = w2, c2, N2, pid - t0 - t1
        om, on, mask_m, mask_n = weight_tile(t, M, N, BLOCK_M, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Before anything is read: the tile's weight rows may start into L2 (experimental, _pdl).
        start_with_prefetch(PDL, w + tl.where(mask_n, on, 0) * K, PF_BYTES)
        a_ptrs = a_ptr + om[:, None] * s_am + offs_k[None, :] * s_ak
        # W.t() [K, N]: element (k, n) sits at n * K + k
        b_ptrs = w + offs_k[:, None] + on[None, :] * K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = k_reduction(acc, a_ptrs, b_ptrs, mask_m, mask_n, K, tl.cdiv(K, BLOCK_K), s_ak, 1,
                          IS_FP32, PRECISION, BLOCK_K, K_UNROLL)
        tl.store(c + om[:, None] * N + on[None, :], acc.to(c.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


def _check(a: Tensor, weights: list[Tensor]) -> None:
    _common.check_inputs(OP, a, *weights)
    if a.dim() != 2 or not weights or len(weights) > MAX_WEIGHTS:
        raise ValueError(f"detcompile.{OP}: expected a [M, K] and 1..{MAX_WEIGHTS} weights [Ni, K], "
                         f"got a.shape={tuple(a.shape)} and {len(weights)} weights")
    for w in weights:
        if w.dim() != 2 or w.shape[1] != a.shape[1] or w.dtype != a.dtype or w.device != a.device:
            raise ValueError(f"detcompile.{OP}: weight {tuple(w.shape)} {w.dtype} on {w.device} does not match "
                             f"a {tuple(a.shape)} {a.dtype} on {a.device}")


def _one_launch_config(total_n: int) -> dict:
    """Weight-streaming tiles, one program per tile: the fastest of benchmarks/matmul_small_m.py's
    group sweep (H200, 2026-12-03, M = 2 and 16; every config gives the same bits): q+k+v 16.6 us
    at BLOCK_N 32 x 8 stages; gate+up 70.7 -> 58.9 us at 3 stages instead of BLOCK_N 64 x 8
    (3987 GB/s; separate cuBLAS calls 3863). Unrolling the K loop gained nothing here."""
    if total_n < 16384:
        return dict(BLOCK_N=32, num_warps=4, num_stages=8)
    return dict(BLOCK_N=32, num_warps=4, num_stages=3)


def triton_linear_group(a: Tensor, weights: list[Tensor], *, _one_launch: bool | None = None,
                        _config: dict | None = None) -> list[Tensor]:
    """CUDA (or the interpreter): one launch for M <= MAX_M and contiguous weights, else a matmul each.
    ``_config`` overrides the one-launch tile's BLOCK_N / num_warps / num_stages / K_UNROLL (benchmarks
    only)."""
    _check(a, weights)
    M, K = a.shape
    one = (M <= MAX_M and K > 0 and all(w.is_contiguous() for w in weights)
           and a.dtype in _common.GPU_DTYPES) if _one_launch is None else _one_launch
    if not one:
        return [triton_matmul(a, w.t()) for w in weights]
    outs = [torch.empty((M, w.shape[0]), dtype=a.dtype, device=a.device) for w in weights]
    if M == 0:
        return outs
    ws = list(weights) + [weights[-1]] * (MAX_WEIGHTS - len(weights))
    cs = outs + [outs[-1]] * (MAX_WEIGHTS - len(outs))
    ns = [w.shape[0] for w in weights] + [0] * (MAX_WEIGHTS - len(weights))
    cfg = dict(_one_launch_config(sum(ns)), **(_config or {}))
    fp32 = a.dtype == torch.float32
    bk = BLOCK_K_FP32 if fp32 else BLOCK_K_16BIT
    tiles = sum(triton.cdiv(n, cfg["BLOCK_N"]) for n in ns) * triton.cdiv(M, BLOCK_M)
    pdl = _pdl.enabled(a)
    es = a.element_size()
    pf = _pdl.row_prefetch_bytes(pdl, K * es, sum(ns), all(w.data_ptr() % 16 == 0 for w in weights) and K * es % 16 == 0)
    with _common.on_device(a):
        _linear_group_kernel[(tiles,)](
            a, *ws, *cs, M, K, *ns, a.stride(0), a.stride(1),
            IS_FP32=fp32, PRECISION=_common.dot_precision(a.dtype),
            BLOCK_M=BLOCK_M, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk, K_UNROLL=cfg.get("K_UNROLL", 1),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_pdl.launch_kwargs(pdl), PF_BYTES=pf,
        )
    return outs


@torch.library.custom_op(f"{_common.NAMESPACE}::{OP}", mutates_args=(), schema="(Tensor a, Tensor[] weights) -> Tensor[]")
def linear_group(a: Tensor, weights: list[Tensor]) -> list[Tensor]:
    raise _common.UnsupportedError(f"detcompile.{OP}: device {a.device.type!r} is not supported (only cpu and cuda)")


@linear_group.register_fake
def _(a, weights):
    return [a.new_empty((a.shape[0], w.shape[0])) for w in weights]


@linear_group.register_kernel("cpu")
def _(a, weights):
    _check(a, weights)
    return [cpu_matmul(a, w.t()) for w in weights]


@linear_group.register_kernel("cuda")
def _(a, weights):
    return triton_linear_group(a, weights)
