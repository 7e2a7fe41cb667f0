"""Batch-invariant softmax / log-softmax: ``detcompile::softmax`` (aten ``_softmax`` / ``_log_softmax``).

The softmax dim is moved last and the input flattened to ``[rows, R]``. Each row is computed by the
same instruction sequence whatever the other rows are, and that sequence depends only on ``R``
(and the dtype):

* Triton (``row_kernels.row_plan``): the row is cut into segments of 8192 elements, each a register
  tile ``[1024 lanes, 8 chunks]`` (element ``c * 1024 + l``; a row shorter than one segment uses
  ``next_pow2`` lanes/chunks of it). Per segment g: the max ``m_g`` (exact; ``+ 0.0`` makes a -0
  max +0), then ``s_g`` = the sum of ``exp(x - m_g)`` by a fixed pairwise tree over the chunks, then
  over the lanes (``row_kernels.tile_sum``; ``s_g = 0`` for an all -inf segment). Row statistics:
  ``M = max_g m_g``, ``S`` = fixed pairwise tree over g of ``s_g * f_g`` with ``f_g = 1`` exactly
  when ``m_g == M``, else ``exp(m_g - M)``. Output ``exp(x - M) * (1 / S)`` or
  ``(x - M) - log(S)``. Every tree step is one sum of two numbers (``tl.sum`` over an axis of
  size 2), so no register layout, warp count, alignment or specialization can change a bit; FMA
  contraction is off.
  A row of one segment (R <= 8192) is one program: one read, one write. A longer row runs one of
  ``row_kernels.choose_schedule``'s schedules, all computing ``(m_g, s_g)`` and ``(M, S)`` with the same
  helpers (same bits): one launch of one program per segment exchanging ``(m_g, s_g)``
  (``row_kernels.row_arrive_and_wait``; the GPU default: one read, one write), two launches of one
  program per segment (statistics to a workspace, then the output; longer rows and the
  interpreter), or one program per row looping over its segments twice (opt-in).
  **Right padding with -inf** (attention) is an exact no-op on the real part of a row, for every R:
  padded lanes, chunks and segments add ``exp(-inf) = +0`` leaves to the trees (a zero subtree adds
  an exact +0), padded segments have ``m_g = -inf``, ``s_g = 0``, ``f_g = 0``, and the max does not
  move. This holds across the one-program / split boundary because both compute the same
  definition (a one-segment row is the G = 1 case: ``M = m_0``, ``S = s_0 * 1``).
  Rows longer than 2**23 elements use the old chunk-loop kernel (3 passes; its own fixed order).
* CPU: max (exact), ``exp`` elementwise, then a fixed pairwise tree sum (``_cpu.tree_sum``, a
  function of the row length); trailing zeros from -inf padding leave it unchanged.

Arithmetic is fp32 (fp64 for fp64 CPU inputs); output is fp32 if ``half_to_float`` else x.dtype.
A row that is entirely -inf gives NaN, as in torch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _common, _cpu
from . import row_kernels as _rk
from ._common import HAS_TRITON, UnsupportedError, tl, triton
from .reduce import BLOCK, LOG2_BLOCK, NUM_WARPS

if HAS_TRITON:
    from ._trees import tree_sum
    from .row_kernels import row_arrive_and_wait, segment_offsets, tile_offsets, tile_sum

    @triton.jit
    def _segment_stats(x, LOG2_LANES: tl.constexpr, LOG2_CHUNKS: tl.constexpr):
        """x [ROWS, LANES, CHUNKS] (-inf where masked) -> (m, s) [ROWS]."""
        m = tl.max(tl.max(x, axis=2), axis=1) + 0.0
        s = tile_sum(tl.exp(x - m[:, None, None]), LOG2_LANES, LOG2_CHUNKS)
        return m, tl.where(m == float("-inf"), 0.0, s)

    @triton.jit
    def _combine(mv, sv, LOG2_GP2: tl.constexpr):
        """Segment statistics [GP2] (m = -inf, s = 0 past G) -> (M, S) scalars."""
        M = tl.max(mv, axis=0) + 0.0
        f = tl.where(mv == M, 1.0, tl.exp(mv - M))
        return M, tree_sum(sv * f, LOG2_GP2)

    @triton.jit
    def _write(out_ptr, offs, mask, x, M, S, LOG: tl.constexpr):
        """M, S broadcast against x: [ROWS, 1, 1] (one-program rows) or scalars (split rows)."""
        if LOG:
            y = (x - M) - tl.log(S)
        else:
            y = tl.exp(x - M) * (1.0 / S)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    # Split rows: the helpers every schedule (PHASE 0..3) uses for a segment, so that they share
    # the arithmetic by construction.

    @triton.jit
    def _load_segment(x_ptr, row, g, R, ACC_FP64: tl.constexpr, LANES: tl.constexpr,
                      CHUNKS: tl.constexpr):
        """Segment g of split row ``row``: x [1, LANES, CHUNKS] (-inf where masked), offs, mask."""
        ACC = tl.float64 if ACC_FP64 else tl.float32
        _, offs, mask = segment_offsets(row, g, R, LANES, CHUNKS)
        x = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(ACC)
        return x, offs, mask

    @triton.jit
    def _segment_stats_of(x_ptr, row, g, R, ACC_FP64: tl.constexpr, LANES: tl.constexpr,
                          LOG2_LANES: tl.constexpr, CHUNKS: tl.constexpr, LOG2_CHUNKS: tl.constexpr):
        """Statistics of segment g of split row ``row``: (x, offs, mask, m_g, s_g), m_g and s_g
        scalars (a [1] -> scalar max: exact)."""
        x, offs, mask = _load_segment(x_ptr, row, g, R, ACC_FP64, LANES, CHUNKS)
        m, s = _segment_stats(x, LOG2_LANES, LOG2_CHUNKS)
        return x, offs, mask, tl.max(m, axis=0), tl.max(s, axis=0)

    @triton.jit
    def _row_stats(x_ptr, row, R, G, ACC_FP64: tl.constexpr, LANES: tl.constexpr,
                   LOG2_LANES: tl.constexpr, CHUNKS: tl.constexpr, LOG2_CHUNKS: tl.constexpr,
                   GP2: tl.constexpr, LOG2_GP2: tl.constexpr):
        """(M, S) of split row ``row``, every segment's statistics computed by this program into
        [GP2] vectors (exact selects), then combined by the same tree as from the workspace."""
        ACC = tl.float64 if ACC_FP64 else tl.float32
        gi = tl.arange(0, GP2)
        mv = tl.full([GP2], float("-inf"), ACC)
        sv = tl.zeros([GP2], ACC)
        for g in range(0, G):
            _, _, _, mg, sg = _segment_stats_of(x_ptr, row, g, R, ACC_FP64, LANES, LOG2_LANES,
                                                CHUNKS, LOG2_CHUNKS)
            mv = tl.where(gi == g, mg, mv)
            sv = tl.where(gi == g, sg, sv)
        return _combine(mv, sv, LOG2_GP2)

    @triton.jit
    def _write_segment(x_ptr, out_ptr, row, g, R, M, S, LOG: tl.constexpr, ACC_FP64: tl.constexpr,
                       LANES: tl.constexpr, CHUNKS: tl.constexpr):
        """(Re)load segment g of split row ``row`` and write its output."""
        x, offs, mask = _load_segment(x_ptr, row, g, R, ACC_FP64, LANES, CHUNKS)
        _write(out_ptr, offs, mask, x, M, S, LOG)

    @triton.jit(do_not_specialize=["T", "timeout_ns"])
    def _softmax_rows_kernel(
        x_ptr, out_ptr, ws_ptr, cnt_ptr, R, T, G, timeout_ns,
        LOG: tl.constexpr, ACC_FP64: tl.constexpr,
        ROWS: tl.constexpr, LANES: tl.constexpr, LOG2_LANES: tl.constexpr,
        CHUNKS: tl.constexpr, LOG2_CHUNKS: tl.constexpr, GP2: tl.constexpr,
        LOG2_GP2: tl.constexpr, SPLIT: tl.constexpr, PHASE: tl.constexpr,
    ):
        """One-program rows (not SPLIT): ROWS rows per program. Split rows (row_kernels.launch_rows):
        program ``row * G + g`` owns segment g in PHASE 0 (the programs of a row exchange their
        segment statistics in ``ws`` and each writes its segment), PHASE 1 (statistics only) and
        PHASE 2 (the output, from phase 1's statistics: a second launch); in PHASE 3 program
        ``row`` loops over the row's segments for the statistics, then again for the output."""
        ACC = tl.float64 if ACC_FP64 else tl.float32
        NEG_INF = float("-inf")
        pid = tl.program_id(0)
        if not SPLIT:
            rows, col, offs, mask = tile_offsets(pid, R, T, ROWS, LANES, CHUNKS)
            x = tl.load(x_ptr + offs, mask=mask, other=NEG_INF).to(ACC)
            m, s = _segment_stats(x, LOG2_LANES, LOG2_CHUNKS)
            _write(out_ptr, offs, mask, x, m[:, None, None], s[:, None, None], LOG)
        elif PHASE == 3:
            row = pid.to(tl.int64)
            M, S = _row_stats(x_ptr, row, R, G, ACC_FP64, LANES, LOG2_LANES, CHUNKS, LOG2_CHUNKS,
                              GP2, LOG2_GP2)
            for g in range(0, G):
                _write_segment(x_ptr, out_ptr, row, g, R, M, S, LOG, ACC_FP64, LANES, CHUNKS)
        else:
            row = (pid // G).to(tl.int64)
            seg = pid % G
            ws_row = ws_ptr + row * (2 * G)
            gi = tl.arange(0, GP2)
            if PHASE != 2:
                x, offs, mask, m, s = _segment_stats_of(x_ptr, row, seg, R, ACC_FP64, LANES,
                                                        LOG2_LANES, CHUNKS, LOG2_CHUNKS)
                tl.store(ws_row + 2 * seg, m)
                tl.store(ws_row + 2 * seg + 1, s)
            if PHASE == 0:
                ok = row_arrive_and_wait(cnt_ptr + pid // G, G, timeout_ns)
                if ok:
                    mv = tl.load(ws_row + 2 * gi, mask=gi < G, other=NEG_INF, cache_modifier=".cg")
                    sv = tl.load(ws_row + 2 * gi + 1, mask=gi < G, other=0.0, cache_modifier=".cg")
                    M, S = _combine(mv, sv, LOG2_GP2)
                    _write(out_ptr, offs, mask, x, M, S, LOG)
                else:
                    # The row's other programs did not arrive in time: compute every segment's
                    # statistics here (the same functions, so the same bits), then reload x.
                    M, S = _row_stats(x_ptr, row, R, G, ACC_FP64, LANES, LOG2_LANES, CHUNKS,
                                      LOG2_CHUNKS, GP2, LOG2_GP2)
                    _write_segment(x_ptr, out_ptr, row, seg, R, M, S, LOG, ACC_FP64, LANES, CHUNKS)
            elif PHASE == 2:
                x, offs, mask = _load_segment(x_ptr, row, seg, R, ACC_FP64, LANES, CHUNKS)
                mv = tl.load(ws_row + 2 * gi, mask=gi < G, other=NEG_INF)
                sv = tl.load(ws_row + 2 * gi + 1, mask=gi < G, other=0.0)
                M, S = _combine(mv, sv, LOG2_GP2)
                _write(out_ptr, offs, mask, x, M, S, LOG)

    @triton.jit
    def _softmax_loop_kernel(
        x_ptr, out_ptr, R,
        LOG: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK: tl.constexpr, LOG2: tl.constexpr,
    ):
        """Rows longer than row_kernels.ROW_MAX_SEGMENTS segments: three passes over 1024-chunks
        (max; lane sums in ascending chunk order, then the lane tree; write)."""
        ACC = tl.float64 if ACC_FP64 else tl.float32  # accumulation dtype
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * R
        o_row = out_ptr + row * R
        offs = tl.arange(0, BLOCK)
        # Pass 1: row max (max is exact, so tl.max's internal order does not matter).
        mx = tl.full([BLOCK], float("-inf"), ACC)
        for start in range(0, R, BLOCK):
            idx = start + offs
            v = tl.load(x_row + idx, mask=idx < R, other=float("-inf")).to(ACC)
            mx = tl.maximum(mx, v)
        m = tl.max(mx, axis=0)
        # Pass 2: lane accumulators in ascending chunk order, then the fixed lane tree.
        acc = tl.zeros([BLOCK], ACC)
        for start in range(0, R, BLOCK):
            idx = start + offs
            v = tl.load(x_row + idx, mask=idx < R, other=float("-inf")).to(ACC)
            acc += tl.exp(v - m)
        s = tree_sum(acc, LOG2)
        # Pass 3: normalise.
        if LOG:
            log_s = tl.log(s)
            for start in range(0, R, BLOCK):
                idx = start + offs
                mask = idx < R
                v = tl.load(x_row + idx, mask=mask, other=0.0).to(ACC)
                tl.store(o_row + idx, ((v - m) - log_s).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            for start in range(0, R, BLOCK):
                idx = start + offs
                mask = idx < R
                v = tl.load(x_row + idx, mask=mask, other=float("-inf")).to(ACC)
                tl.store(o_row + idx, (tl.exp(v - m) / s).to(out_ptr.dtype.element_ty), mask=mask)


def _out_dtype(x: Tensor, half_to_float: bool) -> torch.dtype:
    return torch.float32 if (half_to_float and x.dtype in _common.HALF_DTYPES) else x.dtype


def _check(x: Tensor, dim: int) -> int:
    _common.check_inputs("softmax", x)
    if not x.is_floating_point():
        raise UnsupportedError(f"detcompile.softmax: expected a floating tensor, got {x.dtype}")
    return _common.wrap_dim("softmax", dim, x.dim())


def triton_softmax(x: Tensor, dim: int, half_to_float: bool = False, log: bool = False) -> Tensor:
    """Triton path of ``detcompile::softmax`` (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    if not _common.triton_launchable(x):
        raise UnsupportedError("detcompile.softmax: Triton cannot run on this tensor")
    dim = _check(x, dim)
    # 16-byte aligned rows give vectorized loads (the bits do not depend on it).
    x2 = _common.aligned16(_common.rows_last(x, dim))
    rows, R = x2.shape
    out2 = torch.empty((rows, R), dtype=_out_dtype(x, half_to_float), device=x.device)
    if rows > 0 and R > 0:
        acc64 = x.dtype == torch.float64
        plan = _rk.row_plan(R)
        with _common.on_device(x):
            if plan is None:
                _softmax_loop_kernel[(rows,)](
                    x2, out2, R,
                    LOG=bool(log), ACC_FP64=acc64, BLOCK=BLOCK, LOG2=LOG2_BLOCK,
                    num_warps=NUM_WARPS, enable_fp_fusion=False,
                )
            else:
                _rk.launch_rows(
                    _softmax_rows_kernel, plan, rows, x.device,
                    torch.float64 if acc64 else torch.float32, 2, (x2, out2), (R,),
                    # 16-bit in, fp32 out would spill at the register cap (ptxas, sm_90a).
                    maxnreg=None if out2.dtype != x2.dtype else _rk.ROW_SPLIT_MAXNREG,
                    LOG=bool(log), ACC_FP64=acc64,
                )
    return _common.restore_rows(out2, x, dim)


def cpu_softmax(x: Tensor, dim: int, half_to_float: bool = False, log: bool = False) -> Tensor:
    """CPU path: exact max, elementwise exp, fixed-tree sum."""
    dim = _check(x, dim)
    xa = _common.rows_last(x, dim).to(_common.acc_dtype(x.dtype))
    m = _cpu.row_max(xa).unsqueeze(-1)
    z = xa - m
    # torch.exp/log on CPU run through vml, whose loop tail is a partial vector: every element
    # gets the same instructions wherever it sits, so this is position (batch) independent.
    e = torch.exp(z)
    s = _cpu.tree_sum(e).unsqueeze(-1)
    out2 = (z - torch.log(s)) if log else (e / s)
    return _common.restore_rows(out2.to(_out_dtype(x, half_to_float)), x, dim)


@torch.library.custom_op(
    "detcompile::softmax",
    mutates_args=(),
    schema="(Tensor x, int dim, bool half_to_float, bool log) -> Tensor",
)
def softmax(x: Tensor, dim: int, half_to_float: bool, log: bool) -> Tensor:
    """Batch-invariant ``aten._softmax`` (log=False) / ``aten._log_softmax`` (log=True)."""
    _common.check_inputs("softmax", x)
    raise UnsupportedError(f"detcompile.softmax: device {x.device.type!r} is not supported")


@softmax.register_fake
def _(x, dim, half_to_float, log):
    return x.new_empty(x.shape, dtype=_out_dtype(x, half_to_float))


@softmax.register_kernel("cpu")
def _(x, dim, half_to_float, log):
    return cpu_softmax(x, dim, half_to_float, log)


@softmax.register_kernel("cuda")
def _(x, dim, half_to_float, log):
    return triton_softmax(x, dim, half_to_float, log)
