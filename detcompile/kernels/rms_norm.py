"""Batch-invariant RMS norm over the last dimension: ``detcompile::rms_norm``.

Semantics of torch's composite ``rms_norm``: ``u = x.float()`` (float64 stays float64),
``y = u * rsqrt(mean(u * u) + eps)``, then ``y * weight`` (weight upcast), cast back to x.dtype.

GPU (``row_kernels.row_plan``; the plan is a function of the hidden size R only): the row is cut into
segments of 8192 elements, each a register tile ``[1024 lanes, 8 chunks]`` (element
``c * 1024 + l``; a row of R <= 8192 is one tile of ``next_pow2`` lanes/chunks). ``sum(u * u)`` of a
segment is a fixed pairwise tree over the chunks, then over the lanes (``row_kernels.tile_sum``, built
from ``tl.sum`` over axes of size 2, whose result cannot depend on the register layout); segments
are added by a fixed pairwise tree over their index. R <= 8192 (every common hidden size): one
program per row (several rows per program when R is small), one read and one write. Longer rows
run one of ``row_kernels.choose_schedule``'s schedules, which share the per-segment helpers below (same
bits): one launch whose programs exchange their partial sums (``row_kernels.row_arrive_and_wait``; the
GPU default), two launches of one program per segment (partial sums to a workspace, then the
output; longer rows and the interpreter), or one program per row looping over its segments twice
(opt-in).
Nothing depends on the number of rows or their alignment; FMA contraction is off, so the bits do
not depend on the compiler's fusion choices either. Rows longer than 2**23 elements use the
chunk-loop kernel (ascending chunks into 1024 lanes, then the lane tree).
CPU: a fixed pairwise tree sum of elementwise adds (``_cpu.tree_sum``), then elementwise ops.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _common, _cpu, _pdl
from . import row_kernels as _rk
from ._common import HAS_TRITON, tl, triton

#: Elements per chunk of the chunk-loop kernel (rows longer than 2**23). A constant.
BLOCK = 1024
#: Warps of the chunk-loop kernel.
NUM_WARPS = 4

if HAS_TRITON:
    from ._pdl import start as pdl_start
    from ._trees import tree_sum
    from .row_kernels import load_segment_f32, row_arrive_and_wait, tile_offsets, tile_sum

    @triton.jit
    def _weighted(y, w, HAS_WEIGHT: tl.constexpr, out_dtype: tl.constexpr):
        """HAS_WEIGHT 1: ``y * w`` in fp32 (torch's rms_norm); 2: ``y`` rounded to the output dtype
        first, then ``* w`` (Hugging Face's ``weight * norm(x).to(dtype)``; the product of two 16-bit
        values is exact in fp32, so it rounds once, as the eager mul does)."""
        if HAS_WEIGHT == 2:
            y = y.to(out_dtype).to(tl.float32)
        return y * w.to(tl.float32)

    @triton.jit
    def _write(out_ptr, w_ptr, offs, col, mask, u, r, HAS_WEIGHT: tl.constexpr):
        y = u * r
        if HAS_WEIGHT != 0:
            y = _weighted(y, tl.load(w_ptr + col, mask=mask, other=0.0), HAS_WEIGHT, out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    # Split rows: the helpers every schedule (PHASE 0..3) uses for a segment, so that they share
    # the arithmetic by construction.

    @triton.jit
    def _segment_sumsq(x_ptr, row, g, R, LANES: tl.constexpr, LOG2_LANES: tl.constexpr,
                       CHUNKS: tl.constexpr, LOG2_CHUNKS: tl.constexpr):
        """Segment g of split row ``row``: (u, col, offs, mask, sum(u * u)), the sum a scalar (the
        chunk tree, the lane tree, then a [1] -> scalar sum: exact)."""
        u, col, offs, mask = load_segment_f32(x_ptr, row, g, R, LANES, CHUNKS)
        return u, col, offs, mask, tl.sum(tile_sum(u * u, LOG2_LANES, LOG2_CHUNKS), axis=0)

    @triton.jit
    def _row_sumsq(x_ptr, row, R, G, LANES: tl.constexpr, LOG2_LANES: tl.constexpr,
                   CHUNKS: tl.constexpr, LOG2_CHUNKS: tl.constexpr, GP2: tl.constexpr):
        """Every segment's sum of squares of split row ``row``, computed by this program: [GP2]
        (0 past G; exact selects)."""
        gi = tl.arange(0, GP2)
        sv = tl.zeros([GP2], tl.float32)
        for g in range(0, G):
            _, _, _, _, sg = _segment_sumsq(x_ptr, row, g, R, LANES, LOG2_LANES, CHUNKS, LOG2_CHUNKS)
            sv = tl.where(gi == g, sg, sv)
        return sv

    @triton.jit
    def _rstd(sv, R, eps, LOG2_GP2: tl.constexpr):
        """Segment sums of squares [GP2] -> rsqrt(mean(u * u) + eps) (a fixed tree over g)."""
        return tl.math.rsqrt(tree_sum(sv, LOG2_GP2) / R + eps)

    @triton.jit
    def _write_segment(x_ptr, w_ptr, out_ptr, row, g, R, r, LANES: tl.constexpr,
                       CHUNKS: tl.constexpr, HAS_WEIGHT: tl.constexpr):
        """(Re)load segment g of split row ``row`` and write its output."""
        u, col, offs, mask = load_segment_f32(x_ptr, row, g, R, LANES, CHUNKS)
        _write(out_ptr, w_ptr, offs, col, mask, u, r, HAS_WEIGHT)

    @triton.jit(do_not_specialize=["T", "timeout_ns"])
    def _rms_norm_rows_kernel(
        x_ptr, w_ptr, out_ptr, b_ptr, sum_ptr, ws_ptr, cnt_ptr, R, eps, T, G, timeout_ns,
        HAS_WEIGHT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        ROWS: tl.constexpr, LANES: tl.constexpr, LOG2_LANES: tl.constexpr,
        CHUNKS: tl.constexpr, LOG2_CHUNKS: tl.constexpr, GP2: tl.constexpr,
        LOG2_GP2: tl.constexpr, SPLIT: tl.constexpr, PHASE: tl.constexpr, PDL: tl.constexpr = False,
    ):
        """See softmax._softmax_rows_kernel for the roles of SPLIT and PHASE. HAS_RESIDUAL (rows of
        one program only): the row is ``x + b`` rounded to x's dtype, as eager's add gives it, also
        stored to ``sum_ptr``."""
        tl.static_assert(not (HAS_RESIDUAL and SPLIT))
        pdl_start(PDL)
        pid = tl.program_id(0)
        if not SPLIT:
            rows, col, offs, mask = tile_offsets(pid, R, T, ROWS, LANES, CHUNKS)
            u = tl.load(x_ptr + offs, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                bu = tl.load(b_ptr + offs, mask=mask, other=0.0)
                u = (u.to(tl.float32) + bu.to(tl.float32)).to(sum_ptr.dtype.element_ty)
                tl.store(sum_ptr + offs, u, mask=mask)
            u = u.to(tl.float32)
            ss = tile_sum(u * u, LOG2_LANES, LOG2_CHUNKS)
            r = tl.math.rsqrt(ss / R + eps)
            _write(out_ptr, w_ptr, offs, col, mask, u, r[:, None, None], HAS_WEIGHT)
        elif PHASE == 3:
            row = pid.to(tl.int64)
            r = _rstd(_row_sumsq(x_ptr, row, R, G, LANES, LOG2_LANES, CHUNKS, LOG2_CHUNKS, GP2),
                      R, eps, LOG2_GP2)
            for g in range(0, G):
                _write_segment(x_ptr, w_ptr, out_ptr, row, g, R, r, LANES, CHUNKS, HAS_WEIGHT)
        else:
            row = (pid // G).to(tl.int64)
            seg = pid % G
            ws_row = ws_ptr + row * G
            gi = tl.arange(0, GP2)
            if PHASE != 2:
                u, col, offs, mask, ss = _segment_sumsq(x_ptr, row, seg, R, LANES, LOG2_LANES,
                                                        CHUNKS, LOG2_CHUNKS)
                tl.store(ws_row + seg, ss)
            if PHASE == 0:
                ok = row_arrive_and_wait(cnt_ptr + pid // G, G, timeout_ns)
                if ok:
                    sv = tl.load(ws_row + gi, mask=gi < G, other=0.0, cache_modifier=".cg")
                    r = _rstd(sv, R, eps, LOG2_GP2)
                    _write(out_ptr, w_ptr, offs, col, mask, u, r, HAS_WEIGHT)
                else:
                    # The row's other programs did not arrive in time: compute every segment's
                    # partial sum here (the same functions, so the same bits), then reload u.
                    sv = _row_sumsq(x_ptr, row, R, G, LANES, LOG2_LANES, CHUNKS, LOG2_CHUNKS, GP2)
                    r = _rstd(sv, R, eps, LOG2_GP2)
                    _write_segment(x_ptr, w_ptr, out_ptr, row, seg, R, r, LANES, CHUNKS, HAS_WEIGHT)
            elif PHASE == 2:
                u, col, offs, mask = load_segment_f32(x_ptr, row, seg, R, LANES, CHUNKS)
                sv = tl.load(ws_row + gi, mask=gi < G, other=0.0)
                r = _rstd(sv, R, eps, LOG2_GP2)
                _write(out_ptr, w_ptr, offs, col, mask, u, r, HAS_WEIGHT)

    @triton.jit
    def _rms_norm_loop_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        N,
        eps,
        HAS_WEIGHT: tl.constexpr,
        BLOCK: tl.constexpr,
        LOG2_BLOCK: tl.constexpr,
    ):
        """Rows longer than row_kernels.ROW_MAX_SEGMENTS segments: per-lane sums of squares over
        1024-chunks in ascending order, the fixed lane tree, then a second pass to normalize."""
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * N
        o_row = out_ptr + row * N
        cols = tl.arange(0, BLOCK)

        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            offs = start + cols
            mask = offs < N
            u = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            acc += u * u
        mean_sq = tree_sum(acc, LOG2_BLOCK) / N
        r = tl.math.rsqrt(mean_sq + eps)

        for start in range(0, N, BLOCK):
            offs = start + cols
            mask = offs < N
            u = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            y = u * r
            if HAS_WEIGHT != 0:
                y = _weighted(y, tl.load(w_ptr + offs, mask=mask, other=0.0), HAS_WEIGHT, out_ptr.dtype.element_ty)
            tl.store(o_row + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


_aligned = _common.aligned16


def _check(x: Tensor, weight: Tensor | None) -> None:
    _common.check_inputs("rms_norm", x, weight)
    if x.dim() == 0:
        raise ValueError("detcompile.rms_norm: x must have at least one dimension")
    if not x.is_floating_point():
        raise _common.UnsupportedError(f"detcompile.rms_norm: x must be floating point, got {x.dtype}")
    _common.check_norm_params("rms_norm", x, x.shape[-1], f"x.shape[-1] = {x.shape[-1]}", weight=weight)


def _all_half(*tensors: Tensor | None) -> bool:
    """16-bit data and weight: the split kernel fits row_kernels.ROW_SPLIT_MAXNREG registers."""
    return all(t is None or t.dtype in _common.HALF_DTYPES for t in tensors)


def triton_rms_norm(x: Tensor, weight: Tensor | None, eps: float, *, weight_after_cast: bool = False) -> Tensor:
    """Launch the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    _check(x, weight)
    mode = 0 if weight is None else (2 if weight_after_cast else 1)
    if not _common.triton_launchable(x):
        raise _common.UnsupportedError("detcompile.rms_norm: Triton cannot run on this tensor")
    n = x.shape[-1]
    xc = _aligned(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    m = x.numel() // n if n > 0 else 0
    if m == 0 or n == 0:
        return out
    w = _aligned(weight.reshape(-1)) if weight is not None else xc  # dummy pointer when absent
    plan = _rk.row_plan(n)
    with _common.on_device(x):
        if plan is None:
            _rms_norm_loop_kernel[(m,)](
                xc, w, out, n, float(eps), HAS_WEIGHT=mode, BLOCK=BLOCK,
                LOG2_BLOCK=BLOCK.bit_length() - 1, num_warps=NUM_WARPS, enable_fp_fusion=False,
            )
        else:
            _rk.launch_rows(
                _rms_norm_rows_kernel, plan, m, x.device, torch.float32, 1, (xc, w, out, xc, xc),
                (n, float(eps)), maxnreg=_rk.ROW_SPLIT_MAXNREG if _all_half(x, weight) else None,
                pdl=_pdl.enabled(x), HAS_WEIGHT=mode, HAS_RESIDUAL=False,
            )
    return out


def add_fusable(n: int) -> bool:
    """Whether rows of ``n`` elements run in one program each (every common hidden size, n <= 8192):
    only there does the rows kernel take the residual add (``add_rms_norm_weight_after_cast``)."""
    plan = _rk.row_plan(n)
    return plan is not None and not plan.split


def triton_add_rms_norm_weight_after_cast(a: Tensor, b: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(a + b, weight * rms_norm((a + b).float()).to(dtype)) in one launch (rows of one program)."""
    _check_add(a, b, weight)
    n = a.shape[-1]
    if not (_common.triton_launchable(a) and add_fusable(n)):
        raise _common.UnsupportedError(f"detcompile.add_rms_norm_weight_after_cast: rows of {n} on {a.device} "
                                       "do not run in one Triton program")
    return _launch_add_rms_norm(a, b, weight, eps)


def _launch_add_rms_norm(a: Tensor, b: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    n = a.shape[-1]
    ac, bc = _aligned(a), _aligned(b)
    total = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    m = a.numel() // n if n > 0 else 0
    if m == 0 or n == 0:
        return total, out
    with _common.on_device(a):
        _rk.launch_rows(
            _rms_norm_rows_kernel, _rk.row_plan(n), m, a.device, torch.float32, 1,
            (ac, _aligned(weight.reshape(-1)), out, bc, total), (n, float(eps)),
            pdl=_pdl.enabled(a), HAS_WEIGHT=2, HAS_RESIDUAL=True,
        )
    return total, out


def cpu_rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """Fixed-tree-sum CPU implementation (batch-invariant by construction)."""
    _check(x, weight)
    dt = _common.acc_dtype(x.dtype)
    n = x.shape[-1]
    u = x.contiguous().to(dt)
    mean_sq = _cpu.tree_sum(u * u) / n
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


# ----------------------------------------------------------------------------------------------
# Hugging Face's RMSNorm in one launch: weight * rms_norm(x.float()).to(x.dtype)
# ----------------------------------------------------------------------------------------------


def _check_after_cast(x: Tensor, weight: Tensor) -> None:
    _check(x, weight)
    if x.dtype not in _common.HALF_DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"detcompile.rms_norm_weight_after_cast: x and weight must share a 16-bit dtype, got "
                         f"{x.dtype} and {weight.dtype}")


@torch.library.custom_op("detcompile::rms_norm_weight_after_cast", mutates_args=())
def rms_norm_weight_after_cast(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * rms_norm(x.float(), eps).to(x.dtype)`` for 16-bit x and weight (Llama, Mistral,
    Qwen's RMSNorm as Hugging Face writes it): the norm's bits, rounded to x.dtype, times the weight
    rounded once, as the three eager ops give them; one kernel on CUDA instead of four."""
    _check_after_cast(x, weight)
    raise _common.UnsupportedError(f"detcompile.rms_norm_weight_after_cast: device {x.device.type!r} is not supported")


@rms_norm_weight_after_cast.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x.new_empty(x.shape)


@rms_norm_weight_after_cast.register_kernel("cpu")
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    _check_after_cast(x, weight)
    return torch.mul(weight, cpu_rms_norm(x.float(), None, eps).to(x.dtype))


@rms_norm_weight_after_cast.register_kernel("cuda")
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    _check_after_cast(x, weight)
    return triton_rms_norm(x, weight, eps, weight_after_cast=True)


# ----------------------------------------------------------------------------------------------
# The residual add before it, in the same launch: h = a + b; weight * rms_norm(h.float()).to(h.dtype)
# ----------------------------------------------------------------------------------------------


def _check_add(a: Tensor, b: Tensor, weight: Tensor) -> None:
    _check_after_cast(a, weight)
    if b.shape != a.shape or b.dtype != a.dtype or b.device != a.device:
        raise ValueError(f"detcompile.add_rms_norm_weight_after_cast: b {tuple(b.shape)} {b.dtype} must match "
                         f"a {tuple(a.shape)} {a.dtype}")


@torch.library.custom_op("detcompile::add_rms_norm_weight_after_cast", mutates_args=())
def add_rms_norm_weight_after_cast(a: Tensor, b: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``h = a + b`` and ``weight * rms_norm(h.float(), eps).to(h.dtype)`` (a decoder layer's residual
    add and the next RMSNorm): the bits of eager's add and of ``rms_norm_weight_after_cast``; one
    kernel on CUDA (rows of one program) instead of two."""
    _check_add(a, b, weight)
    raise _common.UnsupportedError(f"detcompile.add_rms_norm_weight_after_cast: device {a.device.type!r} is not supported")


@add_rms_norm_weight_after_cast.register_fake
def _(a: Tensor, b: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return a.new_empty(a.shape), a.new_empty(a.shape)


@add_rms_norm_weight_after_cast.register_kernel("cpu")
def _(a: Tensor, b: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check_add(a, b, weight)
    total = torch.add(a, b)
    return total, torch.mul(weight, cpu_rms_norm(total.float(), None, eps).to(a.dtype))


@add_rms_norm_weight_after_cast.register_kernel("cuda")
def _(a: Tensor, b: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check_add(a, b, weight)
    if add_fusable(a.shape[-1]):
        return _launch_add_rms_norm(a, b, weight, eps)
    total = torch.add(a, b)  # split rows: the add on its own, then the norm (the same bits)
    return total, triton_rms_norm(total, weight, eps, weight_after_cast=True)
