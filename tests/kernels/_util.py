"""Helpers shared by the kernel tests (and the grouped_mm pass test)."""
import pytest
import torch

from detcompile.kernels import _common

from .._subset import cpu_subset

HAS_CUDA = torch.cuda.is_available()
# Launcher tests run the Triton code on CUDA when there is a GPU, else in the interpreter on CPU.
LAUNCH_DEV = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(
    not (HAS_CUDA or _common.triton_launchable(torch.empty(0))),
    reason="Triton cannot run here: no CUDA GPU and no Triton interpreter (TRITON_INTERPRET=1)",
)


def rel_err(out, ref):
    """Relative error of ``out`` against ``ref`` in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def tol(dtype):
    return 1e-2 if dtype in _common.HALF_DTYPES else 1e-5


def check_batch_invariant(fn, target, gen, sizes, bdim=0, out_dim=None):
    """``fn``'s output for ``target`` must be bitwise the same whatever batch it sits in.

    ``target`` is placed along ``bdim`` among fresh random neighbours (3/4 of the way in, so it
    moves as the batch grows); its result is read along ``out_dim`` (default: ``bdim``) of the
    output. Returns the result for ``target`` alone.
    """
    out_dim = bdim if out_dim is None else out_dim
    ref = fn(target.unsqueeze(bdim)).select(out_dim, 0)
    for b in sizes:
        pos = (3 * b) // 4
        shape = list(target.shape)
        shape.insert(bdim, b)
        x = (torch.randn(shape, generator=gen) * 3).to(target.dtype)
        x.select(bdim, pos).copy_(target)
        assert torch.equal(fn(x).select(out_dim, pos), ref), f"batch size {b}"
    return ref


def capture_cuda_graph(fn):
    """``fn()`` warmed up (compiled) on a side stream, then captured: ``(graph, output)``. Replaying
    the graph reruns ``fn`` on whatever its input buffers hold then."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile and warm up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def grouped_mm_ref(x, w, offs):
    """float64 grouped matmul: rows ``offs[g-1]:offs[g]`` of ``x`` times ``w[g]``; rows past the last
    offset are zero."""
    out = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float64)
    start = 0
    for g, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end].double() @ w[g].double()
        start = end
    return out


# ---------------------------------------------------------------------------------------------
# Row-plan kernels (rms_norm, layer_norm, softmax): tiny test-only constants so that small rows
# reach every path in the interpreter: 16 lanes x 2 chunks = 32-element segments, one program per
# row up to 32, split rows of 2..8 segments (33..256, one launch or two), the chunk-loop kernel above.
# ---------------------------------------------------------------------------------------------

#: 129 (five segments, a one-element tail) is the slowest in the interpreter: slow on the CPU, where 33 and
#: 64 (two segments) and SCHEDULE_PATHS' 96 and 129 still reach split rows.
SMALL_PATHS = cpu_subset([5, 16, 17, 32, 33, 64, 129, 300], keep=[5, 16, 17, 32, 33, 64, 300])


@pytest.fixture
def small_rows(monkeypatch):
    from detcompile.kernels import row_kernels as rk

    monkeypatch.setattr(rk, "ROW_LANES", 16)
    monkeypatch.setattr(rk, "ROW_SEG_CHUNKS", 2)
    monkeypatch.setattr(rk, "ROW_MIN_TILE", 64)
    monkeypatch.setattr(rk, "ROW_MAX_SEGMENTS", 8)
    return rk


@pytest.fixture
def one_launch_row_sync(monkeypatch):
    """Split rows run one launch on the GPU but two in the interpreter; these tests run the
    one-launch schedule on both and set DETCOMPILE_ROW_SYNC=0 where they compare it with the
    two-launch one. A
    DETCOMPILE_ROW_SCHEDULE from the caller's environment would override both: it is cleared."""
    monkeypatch.delenv("DETCOMPILE_ROW_SCHEDULE", raising=False)
    monkeypatch.setenv("DETCOMPILE_ROW_SYNC", "1")


# ---------------------------------------------------------------------------------------------
# Split-row schedules (row_kernels.choose_schedule): the same bits whichever one runs.
# ---------------------------------------------------------------------------------------------

#: Rows under the small_rows constants (32-element segments): 20 is one program (no schedule);
#: split into G = 2 (one element in the last segment), 3 (not a power of two, no ragged tail) and
#: 5 (neither a power of two nor a multiple of the segment) segments.
SCHEDULE_PATHS = [20, 33, 96, 129]


def same_bits(a, b):
    """Bitwise equality (torch.equal of the bit patterns: a NaN equals a NaN with the same bits,
    -0.0 differs from 0.0), element by element for tuples."""
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same_bits(x, y) for x, y in zip(a, b))
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def assert_close_to(out, ref, tol):
    """``out`` against a float64 reference: the same non-finite entries (inf, -inf, NaN), a relative
    error below ``tol`` over the finite ones."""
    out, ref = out.double().cpu(), ref.double().cpu()
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(out[~fin & ~torch.isnan(ref)], ref[~fin & ~torch.isnan(ref)])
    if fin.any():
        assert rel_err(out[fin], ref[fin]) < tol


class LaunchSpy:
    """Stands in for a Triton kernel: records ``(grid, PHASE, num_warps)`` of every launch, then
    launches the kernel."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.launches.append((tuple(grid), kwargs.get("PHASE"), kwargs.get("num_warps")))
            return launch(*args, **kwargs)

        return run


def run_schedules(monkeypatch, module, kernel_name, fn, row_loop_warps=None):
    """``fn()`` under every split-row schedule (``row_kernels.row_schedule``), with ``module``'s row
    kernel ``kernel_name`` spied on: ``{schedule: (result, [(grid, PHASE, num_warps), ...])}``."""
    from detcompile.kernels import row_kernels as rk

    spy = LaunchSpy(getattr(module, kernel_name))
    monkeypatch.setattr(module, kernel_name, spy)
    results = {}
    try:
        for name in rk.ROW_SCHEDULES:
            spy.launches = []
            with rk.row_schedule(name, row_loop_warps=row_loop_warps if name == "row_loop" else None):
                results[name] = (fn(), spy.launches)
    finally:
        monkeypatch.setattr(module, kernel_name, spy.kernel)
    return results


def check_schedules(results, T, R, row_loop_warps=None):
    """The launches each schedule must make for T rows of length R (row_kernels.row_plan), and the
    same bits from all of them. Returns the two-launch result."""
    from detcompile.kernels import row_kernels as rk

    plan = rk.row_plan(R)
    G = plan.segments
    warps = rk.ROW_LOOP_NUM_WARPS if row_loop_warps is None else row_loop_warps
    if G == 1:  # one program per row, whatever the schedule
        grid = (-(-T // plan.rows),)
        expected = {name: [(grid, 0, plan.num_warps)] for name in rk.ROW_SCHEDULES}
    else:
        sync = [((T * G,), 0, plan.num_warps)] if rk.sync_possible(G) else None
        two = [((T * G,), 1, plan.num_warps), ((T * G,), 2, plan.num_warps)]
        expected = {"two_launch": two, "sync": sync or two, "row_loop": [((T,), 3, warps)]}
    base = results["two_launch"][0]
    for name, (res, launches) in results.items():
        assert launches == expected[name], f"{name}: launched {launches}, expected {expected[name]}"
        assert same_bits(res, base), f"{name} differs from two_launch (R={R}, G={G})"
    return base


_SM90_PREAMBLE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
TARGET = GPUTarget("cuda", 90, 32)


def source(fn, sig, const):
    try:
        return ASTSource(fn, sig, constexprs=const)
    except Exception as e:  # API drift between Triton versions, not a kernel bug
        print("SKIP", e)
        raise SystemExit(0)
"""


def compile_for_sm90(script: str) -> None:
    """Run ``script`` (it compiles kernels with ``triton.compile(source(fn, sig, const), target=TARGET,
    ...)`` and prints COMPILED; ``source`` prints SKIP on Triton API drift) in a subprocess without
    TRITON_INTERPRET: the test process may be running the interpreter."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", _SM90_PREAMBLE + script], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    if r.returncode == 0 and r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0 and "COMPILED" in r.stdout, r.stderr[-3000:]
