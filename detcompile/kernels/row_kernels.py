"""The tiling and split-row schedules shared by the row kernels (rms_norm, layer_norm, softmax).

``row_plan`` (a function of the row length R only), ``launch_rows`` and its split-row schedules
(``choose_schedule``, ``row_schedule``), and the Triton helpers the kernels share: ``tile_sum``,
``tile_offsets`` / ``segment_offsets``, ``load_segment_f32``, ``row_arrive_and_wait``.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

from . import _common, _pdl
from ._common import HAS_TRITON, tl, triton

if HAS_TRITON:
    from ._trees import pair_sum_2d, pair_sum_3d


# The row (length R) is cut into *segments* of ROW_LANES * ROW_SEG_CHUNKS elements; a segment is
# a register tile [lanes, chunks] with element ``c * ROW_LANES + l`` at (l, c). A segment is
# reduced by a fixed pairwise tree over the chunk axis (chunk 2i + chunk 2i+1 per level), then a
# fixed pairwise tree over the lanes; segments are combined by a fixed pairwise tree over segment
# indices. Every tree is padded to a power of two with zero leaves, and a zero subtree adds an exact
# +0, so trailing padding never changes a bit (softmax's -inf padding gives exp(-inf) = +0).
# A row of R <= one segment is one tile held by one program (one read, one write). A longer row is
# split into ``G = cdiv(R, segment)`` segments and runs one of three schedules (``choose_schedule``),
# which compute the same segment statistics with the same functions and combine them with the same
# tree in the same order, so they give the same bits:
#   * "sync" (the default on the GPU for rows of at most ROW_MAX_SYNC_SEGMENTS): one launch
#     (PHASE 0) of T * G programs, program ``row * G + g`` owning segment g; the programs of a row
#     exchange their statistics (``row_arrive_and_wait``) and write their segment from registers
#     (one read, one write).
#   * "two_launch" (longer rows, the Triton interpreter, or DETCOMPILE_ROW_SCHEDULE=two_launch):
#     launch 1 (PHASE 1) writes every segment's statistics to a workspace; launch 2 (PHASE 2)
#     re-reads the segment, combines the row's statistics and writes it (two reads, one write).
#   * "row_loop" (DETCOMPILE_ROW_SCHEDULE=row_loop): one launch (PHASE 3) of T programs; program
#     ``row`` loops over the row's segments computing their statistics into registers, combines
#     them, then loops over the segments again, re-reading x and writing the output (two reads,
#     one write; the second read was meant to hit L2, but it measured slower than both others on
#     the H100). Needs neither workspace nor counter; its warp count is ROW_LOOP_NUM_WARPS.
# None of this depends on the number of rows, the alignment, the warp count or the register layout
# (every tree step is a ``tl.sum`` over an axis of size 2: one addition, a + b == b + a bitwise).

#: Lanes of a segment tile (rows shorter than this use next_pow2(R) lanes: the same tree).
ROW_LANES = 1024
#: Chunks of ROW_LANES per segment: a segment is 8192 elements (64 fp32 registers per thread).
ROW_SEG_CHUNKS = 8
#: Rows longer than this many segments (2**23 elements) use the chunk-loop kernels instead.
ROW_MAX_SEGMENTS = 1024
#: The "sync" schedule (one launch of cooperating programs) takes rows of at most this many
#: segments; longer ones fall back to two launches. H100, 2026-11-24 ([8192, 128256] bf16, share of
#: copy bandwidth, benchmarks/norm_schedules.py): rms_norm 110% vs 83% in two launches, softmax 90%
#: vs 83%, log_softmax 97% vs 83%; "row_loop" 80%.
ROW_MAX_SYNC_SEGMENTS = 64
#: A short row's program takes several rows (ROW_MIN_TILE // tile of one row): scheduling only.
ROW_MIN_TILE = 2048
#: Warps of a row program: with 4 warps the 1024 lanes cover every thread of the program, so the
#: chunk tree stays inside each thread. (A function of nothing: the bits never depend on it.)
ROW_NUM_WARPS = 4
#: Warps of a "row_loop" program (PHASE 3, one program per split row). Scheduling only: the trees
#: are fixed by the program text, not by the layout, so any power of two gives the same bits.
ROW_LOOP_NUM_WARPS = 8
#: Split-row schedules (see the block comment above and ``choose_schedule``).
ROW_SCHEDULES = ("two_launch", "sync", "row_loop")
#: How long a split program waits for its row's other programs before it computes the whole
#: row's statistics itself (same bits; never needed when the GPU runs the launch normally).
ROW_SYNC_TIMEOUT_NS = 2_000_000
#: Without ``tl.atomic_poll`` the wait is a loop of acquire loads, bounded by
#: ROW_SYNC_TIMEOUT_NS / ROW_SYNC_SPIN_NS polls (an L2 round trip is at least this long).
ROW_SYNC_SPIN_NS = 500

#: Register cap of the one-launch split kernels of softmax and (16-bit) rms_norm. ptxas gives them
#: 104-140 registers when free (3-4 programs of 4 warps per SM); they fit 96 (5 per SM) with at most
#: 8 bytes of spill (ptxas for sm_90a, Triton 3.9). layer_norm (128, no spill) and rms_norm with
#: fp32 data or weight (130-142; 96 would spill) run uncapped. Scheduling only: not in the bits.
ROW_SPLIT_MAXNREG = 96

def _has_atomic_poll() -> bool:
    """``tl.atomic_poll`` with a timeout (Triton 3.9); without it (Triton 3.6) the one-launch
    schedule waits in a bounded spin loop of acquire loads instead (``row_arrive_and_wait``)."""
    try:
        import inspect

        return "timeout_ns" in inspect.signature(tl.atomic_poll).parameters
    except Exception:  # pragma: no cover - depends on the Triton build
        return False


HAS_ATOMIC_POLL = HAS_TRITON and _has_atomic_poll()
if HAS_TRITON:
    _HAS_ATOMIC_POLL_C = tl.constexpr(HAS_ATOMIC_POLL)  # compiled kernels read constexpr globals only


def _has_maxnreg() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        return "maxnreg" in CUDAOptions.__dataclass_fields__
    except Exception:  # pragma: no cover - depends on the Triton build
        return False


_MAXNREG = HAS_TRITON and _has_maxnreg()


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@dataclass(frozen=True)
class RowPlan:
    """How a row of length R is tiled: a function of R (and the module constants) only."""

    rows: int  # rows per program (1 when the row is split)
    lanes: int  # lanes of the tile: min(ROW_LANES, next_pow2(R))
    chunks: int  # chunks of the tile: next_pow2(cdiv(R, ROW_LANES)), ROW_SEG_CHUNKS when split
    segments: int  # G: programs per row (1: the whole row in one program's registers)
    num_warps: int

    @property
    def split(self) -> bool:
        return self.segments > 1

    def constexprs(self) -> dict:
        gp2 = _next_pow2(self.segments)
        return dict(
            ROWS=self.rows, LANES=self.lanes, LOG2_LANES=self.lanes.bit_length() - 1,
            CHUNKS=self.chunks, LOG2_CHUNKS=self.chunks.bit_length() - 1,
            GP2=gp2, LOG2_GP2=gp2.bit_length() - 1, SPLIT=self.split,
        )


def row_plan(R: int) -> Optional[RowPlan]:
    """The tile plan for rows of length ``R`` (> 0); None: longer than ROW_MAX_SEGMENTS segments."""
    seg = ROW_LANES * ROW_SEG_CHUNKS
    if R <= seg:
        lanes = min(ROW_LANES, _next_pow2(R))
        chunks = _next_pow2(-(-R // ROW_LANES))
        rows = max(1, ROW_MIN_TILE // (lanes * chunks))
        return RowPlan(rows, lanes, chunks, 1, ROW_NUM_WARPS)
    g = -(-R // seg)
    if g > ROW_MAX_SEGMENTS:
        return None
    return RowPlan(1, ROW_LANES, ROW_SEG_CHUNKS, g, ROW_NUM_WARPS)


#: Set by ``row_schedule`` (None: the environment decides).
_schedule_override: Optional[str] = None


def _check_schedule(name: str, source: str) -> str:
    if name not in ROW_SCHEDULES:
        raise ValueError(
            f"detcompile: unknown split-row schedule {name!r} from {source}; expected one of "
            f"{', '.join(ROW_SCHEDULES)}"
        )
    return name


def requested_schedule() -> Optional[str]:
    """The split-row schedule asked for: ``row_schedule``'s override, else the environment
    (``DETCOMPILE_ROW_SCHEDULE`` in ROW_SCHEDULES, else ``DETCOMPILE_ROW_SYNC``: 1 -> "sync", 0 ->
    "two_launch"); None when nothing is asked (``choose_schedule`` then uses its default)."""
    if _schedule_override is not None:
        return _schedule_override
    name = os.environ.get("DETCOMPILE_ROW_SCHEDULE", "").strip()
    if name:
        return _check_schedule(name, "DETCOMPILE_ROW_SCHEDULE")
    sync = os.environ.get("DETCOMPILE_ROW_SYNC", "").strip()
    if sync:
        return "two_launch" if sync == "0" else "sync"
    return None


def sync_possible(segments: int) -> bool:
    """Whether rows of ``segments`` segments can run the one-launch "sync" schedule."""
    return HAS_TRITON and segments <= ROW_MAX_SYNC_SEGMENTS


def choose_schedule(T: int, G: int) -> str:
    """The schedule of ``T`` split rows of ``G`` (> 1) segments: one of ROW_SCHEDULES.

    Scheduling only: every schedule gives the same bits, so this may look at T (unlike the plan).
    An explicit request wins; "sync" falls back to "two_launch" where it cannot run.
    """
    name = requested_schedule()
    if name is None:
        # The interpreter runs programs one at a time, so "sync" programs could never meet: each
        # would compute its whole row's statistics itself (same bits, G times the work).
        name = "two_launch" if _common.triton_interpret() else "sync"
    if name == "sync" and not sync_possible(G):
        return "two_launch"
    return name


@contextlib.contextmanager
def row_schedule(name: Optional[str], row_loop_warps: Optional[int] = None):
    """Within the block, split rows use schedule ``name`` (one of ROW_SCHEDULES) whatever the
    environment says (None: the environment / default decides), and "row_loop" programs use
    ``row_loop_warps`` warps if given (else ROW_LOOP_NUM_WARPS). For benchmarks and tests: it sets
    module state, so it is not thread-safe. The schedule is read when a kernel is launched (also
    when a CUDA graph is captured), never inside a compiled kernel."""
    global _schedule_override, ROW_LOOP_NUM_WARPS
    if name is not None:
        _check_schedule(name, "row_schedule()")
    if row_loop_warps is not None and (row_loop_warps <= 0 or row_loop_warps & (row_loop_warps - 1)):
        raise ValueError(f"detcompile: row_loop_warps must be a power of two, got {row_loop_warps}")
    saved = (_schedule_override, ROW_LOOP_NUM_WARPS)
    _schedule_override = name
    if row_loop_warps is not None:
        ROW_LOOP_NUM_WARPS = row_loop_warps
    try:
        yield
    finally:
        _schedule_override, ROW_LOOP_NUM_WARPS = saved


def launch_rows(kernel, plan: RowPlan, T: int, device, ws_dtype, ws_width: int, ptrs: tuple,
                scalars: tuple, maxnreg: Optional[int] = None, pdl: bool = False, **constexprs) -> None:
    """Launch a row kernel with the signature ``(*ptrs, ws, cnt, R-first scalars..., T, G,
    timeout_ns, *rest)``; ``scalars`` is ``(R, ...)`` up to, not including, T.

    Register path: one program per ``plan.rows`` rows. Split path (``choose_schedule``):
    "two_launch" and "sync" run T * G programs, program ``row * G + g`` owning segment g of row
    ``row``; ``ws`` holds ``ws_width`` statistics per segment, ``cnt`` one arrival counter per row
    (zeroed here, per call; "sync" only). "row_loop" runs T programs of ROW_LOOP_NUM_WARPS warps,
    one per row, and needs neither. ``maxnreg``: register cap of the "sync" kernel (scheduling
    only), where it does not make ptxas spill. ``pdl``: programmatic dependent launch (``_pdl``; the
    kernel takes a ``PDL`` constexpr).
    """
    # only when on: the other row kernels take no PDL constexpr
    opts = dict(num_warps=plan.num_warps, enable_fp_fusion=False, **(_pdl.launch_kwargs(True) if pdl else {}))
    cx = dict(plan.constexprs(), **constexprs)
    x = ptrs[0]
    if not plan.split:
        kernel[(triton.cdiv(T, plan.rows),)](*ptrs, x, x, *scalars, T, 1, 0, PHASE=0, **cx, **opts)
        return
    G = plan.segments
    schedule = choose_schedule(T, G)
    if schedule == "row_loop":
        opts["num_warps"] = ROW_LOOP_NUM_WARPS
        kernel[(T,)](*ptrs, x, x, *scalars, T, G, 0, PHASE=3, **cx, **opts)
        return
    ws = torch.empty(T * G * ws_width, dtype=ws_dtype, device=device)
    grid = (T * G,)
    if schedule == "sync":
        cnt = torch.zeros(T, dtype=torch.int32, device=device)
        # The interpreter runs programs one after another: waiting could never succeed.
        timeout = 0 if _common.triton_interpret() else ROW_SYNC_TIMEOUT_NS
        if not HAS_ATOMIC_POLL:
            timeout //= ROW_SYNC_SPIN_NS  # the spin loop counts polls, not nanoseconds
        if maxnreg and _MAXNREG and scalars[0] % 16 == 0:
            # Only for R % 16 == 0 (Triton's divisibility specialization, so 16-byte loads): with
            # scalar loads the cap makes ptxas spill.
            opts["maxnreg"] = maxnreg
        kernel[grid](*ptrs, ws, cnt, *scalars, T, G, timeout, PHASE=0, **cx, **opts)
    else:
        kernel[grid](*ptrs, ws, x, *scalars, T, G, 0, PHASE=1, **cx, **opts)
        kernel[grid](*ptrs, ws, x, *scalars, T, G, 0, PHASE=2, **cx, **opts)


if HAS_TRITON:

    @triton.jit
    def tile_sum(x, LOG2_LANES: tl.constexpr, LOG2_CHUNKS: tl.constexpr):
        """[ROWS, LANES, CHUNKS] -> [ROWS]: the chunk tree in each lane, then the lane tree."""
        return pair_sum_2d(pair_sum_3d(x, LOG2_CHUNKS), LOG2_LANES)

    @triton.jit
    def tile_offsets(pid, R, T, ROWS: tl.constexpr, LANES: tl.constexpr, CHUNKS: tl.constexpr):
        """Offsets and mask of a one-program-rows tile [ROWS, LANES, CHUNKS] (element
        ``c * LANES + l`` of each row at (r, l, c)), its rows (int64) and the column of each
        element."""
        lanes = tl.arange(0, LANES)
        chunks = tl.arange(0, CHUNKS)
        rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
        col = lanes[None, :, None] + chunks[None, None, :] * LANES
        mask = (rows[:, None, None] < T) & (col < R)
        offs = rows[:, None, None] * R + col
        return rows, col, offs, mask

    @triton.jit
    def segment_offsets(row, seg, R, LANES: tl.constexpr, CHUNKS: tl.constexpr):
        """Column, offsets and mask of segment ``seg`` of split row ``row`` (an int64 scalar < T):
        a [1, LANES, CHUNKS] tile, element ``seg * LANES * CHUNKS + c * LANES + l`` of the row at
        (0, l, c). The one helper every split schedule uses to address a segment."""
        lanes = tl.arange(0, LANES)
        chunks = tl.arange(0, CHUNKS)
        col = seg * (LANES * CHUNKS) + lanes[None, :, None] + chunks[None, None, :] * LANES
        mask = col < R
        offs = (row + tl.arange(0, 1))[:, None, None] * R + col
        return col, offs, mask

    @triton.jit
    def load_segment_f32(x_ptr, row, g, R, LANES: tl.constexpr, CHUNKS: tl.constexpr):
        """Segment g of split row ``row`` (the norms): u [1, LANES, CHUNKS] fp32 (0 where masked),
        col, offs, mask."""
        col, offs, mask = segment_offsets(row, g, R, LANES, CHUNKS)
        u = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return u, col, offs, mask

    @triton.jit
    def row_arrive_and_wait(cnt_ptr, G, timeout_ns):
        """Publish this program's segment statistics (stored before the call) and wait until all
        G programs of the row have. True when they have; False after ``timeout_ns`` (then the
        caller computes the row's statistics itself, with the same arithmetic: same bits).

        Thread 0 does a gpu-scope release add and an acquire poll; the barrier before it orders
        every thread's stores, and the statistics are then read with ``.cg`` loads (L2, never a
        stale L1 line). Forward progress: programs of a row have consecutive ids, so the GPU
        dispatches them together in practice; the timeout makes any other order slow, never
        wrong and never a hang.
        """
        tl.debug_barrier()
        tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")
        if _HAS_ATOMIC_POLL_C:
            return tl.atomic_poll(cnt_ptr, G, sem="acquire", scope="gpu", timeout_ns=timeout_ns)
        else:
            # timeout_ns is a poll count here (see launch_rows). A scalar atomic runs in one
            # thread and is broadcast; adding 0 is an acquire read of the counter.
            seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
            polls = 0
            while (seen < G) & (polls < timeout_ns):
                seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
                polls += 1
            return seen >= G

