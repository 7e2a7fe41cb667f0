"""Batch-invariant layer norm: ``detcompile::layer_norm``, the outputs of ``aten.native_layer_norm``.

Returns ``(out, mean, rstd)``: out in x.dtype; mean/rstd of shape
``x.shape[:axis] + [1] * len(normalized_shape)``, float32 for 16-bit x (x.dtype otherwise), as
aten's meta/CUDA kernels give. ``rstd = rsqrt(var + eps)`` with the biased variance;
``out = (x - mean) * rstd * w + b`` in fp32.

GPU (``row_kernels.row_plan``; the plan is a function of the normalized size N only): the row is cut
into segments of 8192 elements, each a register tile ``[1024 lanes, 8 chunks]`` (a row of
N <= 8192 is one tile of ``next_pow2`` lanes/chunks). Sums are fixed pairwise trees over the
chunks, then the lanes (``row_kernels.tile_sum``: ``tl.sum`` over axes of size 2, layout-independent).
N <= 8192: one program per row (several for small N), two-pass statistics from registers,
``mean = sum(x) / N``, ``var = sum((x - mean)^2) / N``; one read, one write. Longer rows: per
segment g, ``sum_g`` and ``m2_g = sum((x - sum_g / n_g)^2)`` over its ``n_g`` elements, combined by fixed pairwise trees over g (Chan et al.): ``mean = tree(sum_g) / N``,
``var = tree(m2_g + n_g * (sum_g / n_g - mean)^2) / N``. The schedules of
``row_kernels.choose_schedule`` share these per-segment helpers (same bits): one launch whose programs
exchange them (``row_kernels.row_arrive_and_wait``; the GPU default), two launches of one program per
segment (statistics to a workspace, then the output; longer rows and the interpreter), or one
program per row looping over its segments twice (opt-in).
Nothing depends on the number of rows or the alignment; FMA contraction is off. Rows longer than
2**23 elements use the three-pass chunk-loop kernel.
CPU: fixed pairwise tree sums of elementwise adds (``_cpu.tree_sum``), then elementwise ops.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _common, _cpu
from . import row_kernels as _rk
from ._common import HAS_TRITON, tl, triton

#: Elements per chunk of the chunk-loop kernel (rows longer than 2**23). A constant.
BLOCK = 1024
#: Warps of the chunk-loop kernel.
NUM_WARPS = 4

if HAS_TRITON:
    from ._trees import tree_sum
    from .row_kernels import load_segment_f32, row_arrive_and_wait, tile_offsets, tile_sum

    @triton.jit
    def _segment_stats(x, mask, n, LOG2_LANES: tl.constexpr, LOG2_CHUNKS: tl.constexpr):
        """x [ROWS, LANES, CHUNKS] (0 where masked) of n elements -> (sum, m2 around sum / n)."""
        sm = tile_sum(x, LOG2_LANES, LOG2_CHUNKS)
        d = tl.where(mask, x - (sm / n)[:, None, None], 0.0)
        return sm, tile_sum(d * d, LOG2_LANES, LOG2_CHUNKS)

    @triton.jit
    def _combine(sv, m2v, G, R, SEG: tl.constexpr, LOG2_GP2: tl.constexpr):
        """Segment statistics [GP2] (0 past G) -> (mean, biased var) scalars."""
        gi = tl.arange(0, sv.shape[0])
        valid = gi < G
        mean = tree_sum(sv, LOG2_GP2) / R
        n = tl.where(valid, tl.minimum(R - gi * SEG, SEG), 1).to(tl.float32)
        dm = sv / n - mean
        var = tree_sum(tl.where(valid, m2v + n * (dm * dm), 0.0), LOG2_GP2) / R
        return mean, var

    @triton.jit
    def _write(out_ptr, w_ptr, b_ptr, offs, col, mask, u, mean, rstd,
               HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
        y = (u - mean) * rstd
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + col, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + col, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    # Split rows: the helpers every schedule (PHASE 0..3) uses for a segment, so that they share
    # the arithmetic by construction.

    @triton.jit
    def _segment_stats_of(x_ptr, row, g, R, LANES: tl.constexpr, LOG2_LANES: tl.constexpr,
                          CHUNKS: tl.constexpr, LOG2_CHUNKS: tl.constexpr):
        """Segment g of split row ``row`` (n_g = min(R - g * SEG, SEG) elements): (u, col, offs,
        mask, sum_g, m2_g), the statistics scalars (a [1] -> scalar sum: exact)."""
        SEG: tl.constexpr = LANES * CHUNKS
        u, col, offs, mask = load_segment_f32(x_ptr, row, g, R, LANES, CHUNKS)
        sm, m2 = _segment_stats(u, mask, tl.minimum(R - g * SEG, SEG), LOG2_LANES, LOG2_CHUNKS)
        return u, col, offs, mask, tl.sum(sm, axis=0), tl.sum(m2, axis=0)

    @triton.jit
    def _row_mean_var(x_ptr, row, R, G, LANES: tl.constexpr, LOG2_LANES: tl.constexpr,
                      CHUNKS: tl.constexpr, LOG2_CHUNKS: tl.constexpr, GP2: tl.constexpr,
                      LOG2_GP2: tl.constexpr):
        """(mean, var) of split row ``row``, every segment's statistics computed by this program
        into [GP2] vectors (exact selects), then combined by the same trees as from the workspace."""
        SEG: tl.constexpr = LANES * CHUNKS
        gi = tl.arange(0, GP2)
        sv = tl.zeros([GP2], tl.float32)
        m2v = tl.zeros([GP2], tl.float32)
        for g in range(0, G):
            _, _, _, _, sg, m2g = _segment_stats_of(x_ptr, row, g, R, LANES, LOG2_LANES, CHUNKS,
                                                    LOG2_CHUNKS)
            sv = tl.where(gi == g, sg, sv)
            m2v = tl.where(gi == g, m2g, m2v)
        return _combine(sv, m2v, G, R, SEG, LOG2_GP2)

    @triton.jit
    def _write_segment(x_ptr, w_ptr, b_ptr, out_ptr, row, g, R, mean, rstd, LANES: tl.constexpr,
                       CHUNKS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
        """(Re)load segment g of split row ``row`` and write its output."""
        u, col, offs, mask = load_segment_f32(x_ptr, row, g, R, LANES, CHUNKS)
        _write(out_ptr, w_ptr, b_ptr, offs, col, mask, u, mean, rstd, HAS_WEIGHT, HAS_BIAS)

    @triton.jit(do_not_specialize=["T", "timeout_ns"])
    def _layer_norm_rows_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, ws_ptr, cnt_ptr, R, eps, T, G, timeout_ns,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
        ROWS: tl.constexpr, LANES: tl.constexpr, LOG2_LANES: tl.constexpr,
        CHUNKS: tl.constexpr, LOG2_CHUNKS: tl.constexpr, GP2: tl.constexpr,
        LOG2_GP2: tl.constexpr, SPLIT: tl.constexpr, PHASE: tl.constexpr,
    ):
        """See softmax._softmax_rows_kernel for the roles of SPLIT and PHASE."""
        SEG: tl.constexpr = LANES * CHUNKS
        pid = tl.program_id(0)
        if not SPLIT:
            rows, col, offs, mask = tile_offsets(pid, R, T, ROWS, LANES, CHUNKS)
            u = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            sm, m2 = _segment_stats(u, mask, R, LOG2_LANES, LOG2_CHUNKS)
            mean = sm / R
            rstd = tl.math.rsqrt(m2 / R + eps)
            rmask = rows < T
            tl.store(mean_ptr + rows, mean.to(mean_ptr.dtype.element_ty), mask=rmask)
            tl.store(rstd_ptr + rows, rstd.to(rstd_ptr.dtype.element_ty), mask=rmask)
            _write(out_ptr, w_ptr, b_ptr, offs, col, mask, u, mean[:, None, None],
                   rstd[:, None, None], HAS_WEIGHT, HAS_BIAS)
        elif PHASE == 3:
            row = pid.to(tl.int64)
            mean, var = _row_mean_var(x_ptr, row, R, G, LANES, LOG2_LANES, CHUNKS, LOG2_CHUNKS,
                                      GP2, LOG2_GP2)
            rstd = tl.math.rsqrt(var + eps)
            tl.store(mean_ptr + row, mean.to(mean_ptr.dtype.element_ty))
            tl.store(rstd_ptr + row, rstd.to(rstd_ptr.dtype.element_ty))
            for g in range(0, G):
                _write_segment(x_ptr, w_ptr, b_ptr, out_ptr, row, g, R, mean, rstd, LANES, CHUNKS,
                               HAS_WEIGHT, HAS_BIAS)
        else:
            row = (pid // G).to(tl.int64)
            seg = pid % G
            ws_row = ws_ptr + row * (2 * G)
            gi = tl.arange(0, GP2)
            if PHASE != 2:
                u, col, offs, mask, sm, m2 = _segment_stats_of(x_ptr, row, seg, R, LANES, LOG2_LANES,
                                                               CHUNKS, LOG2_CHUNKS)
                tl.store(ws_row + 2 * seg, sm)
                tl.store(ws_row + 2 * seg + 1, m2)
            if PHASE == 0:
                ok = row_arrive_and_wait(cnt_ptr + row, G, timeout_ns)
                if ok:
                    sv = tl.load(ws_row + 2 * gi, mask=gi < G, other=0.0, cache_modifier=".cg")
                    m2v = tl.load(ws_row + 2 * gi + 1, mask=gi < G, other=0.0, cache_modifier=".cg")
                    mean, var = _combine(sv, m2v, G, R, SEG, LOG2_GP2)
                    rstd = tl.math.rsqrt(var + eps)
                else:
                    # The row's other programs did not arrive in time: compute every segment's
                    # statistics here (the same functions, so the same bits), then reload u.
                    mean, var = _row_mean_var(x_ptr, row, R, G, LANES, LOG2_LANES, CHUNKS,
                                              LOG2_CHUNKS, GP2, LOG2_GP2)
                    rstd = tl.math.rsqrt(var + eps)
                    u, _, _, _ = load_segment_f32(x_ptr, row, seg, R, LANES, CHUNKS)
            elif PHASE == 2:
                u, col, offs, mask = load_segment_f32(x_ptr, row, seg, R, LANES, CHUNKS)
                sv = tl.load(ws_row + 2 * gi, mask=gi < G, other=0.0)
                m2v = tl.load(ws_row + 2 * gi + 1, mask=gi < G, other=0.0)
                mean, var = _combine(sv, m2v, G, R, SEG, LOG2_GP2)
                rstd = tl.math.rsqrt(var + eps)
            if PHASE != 1:
                if seg == 0:
                    tl.store(mean_ptr + row, mean.to(mean_ptr.dtype.element_ty))
                    tl.store(rstd_ptr + row, rstd.to(rstd_ptr.dtype.element_ty))
                _write(out_ptr, w_ptr, b_ptr, offs, col, mask, u, mean, rstd, HAS_WEIGHT, HAS_BIAS)

    @triton.jit
    def _layer_norm_loop_kernel(
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
        LOG2_BLOCK: tl.constexpr,
    ):
        """Rows longer than row_kernels.ROW_MAX_SEGMENTS segments: three passes over 1024-chunks
        (per-lane sums in ascending chunk order, then the fixed lane tree)."""
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * N
        o_row = out_ptr + row * N
        cols = tl.arange(0, BLOCK)

        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            offs = start + cols
            mask = offs < N
            acc += tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tree_sum(acc, LOG2_BLOCK) / N

        # Biased variance around the mean (two-pass). Tail lanes must add 0, not (0 - mean)^2.
        acc2 = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            offs = start + cols
            mask = offs < N
            u = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, u - mean, 0.0)
            acc2 += d * d
        var = tree_sum(acc2, LOG2_BLOCK) / N
        rstd = tl.math.rsqrt(var + eps)
        tl.store(mean_ptr + row, mean.to(mean_ptr.dtype.element_ty))
        tl.store(rstd_ptr + row, rstd.to(rstd_ptr.dtype.element_ty))

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
    _common.check_norm_params("layer_norm", x, n, f"{n}", weight=weight, bias=bias)
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
    plan = _rk.row_plan(n)
    with _common.on_device(x):
        if plan is None:
            _layer_norm_loop_kernel[(m,)](
                xc, w, b, out, mean, rstd, n, float(eps),
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                BLOCK=BLOCK, LOG2_BLOCK=BLOCK.bit_length() - 1, num_warps=NUM_WARPS,
                enable_fp_fusion=False,
            )
        else:
            # No register cap: the split kernel takes 128 registers (4 programs per SM) and would
            # spill at row_kernels.ROW_SPLIT_MAXNREG.
            _rk.launch_rows(
                _layer_norm_rows_kernel, plan, m, x.device, torch.float32, 2,
                (xc, w, b, out, mean, rstd), (n, float(eps)),
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            )
    return out, mean, rstd


def cpu_layer_norm(
    x: Tensor, normalized_shape: list[int], weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Fixed-tree-sum CPU implementation (batch-invariant by construction)."""
    n = _check(x, normalized_shape, weight, bias)
    dt = _common.acc_dtype(x.dtype)
    stats_shape = _stats_shape(x, normalized_shape)
    m = math.prod(stats_shape)
    y, mean, rstd = _cpu.normalize(x.contiguous().to(dt).reshape(m, n), eps)
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
