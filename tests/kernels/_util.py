"""Helpers shared by the kernel tests (and the grouped_mm pass test)."""
import pytest
import torch

from detcompile.kernels import _common

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

SMALL_PATHS = [5, 16, 17, 32, 33, 64, 129, 300]


@pytest.fixture
def small_rows(monkeypatch):
    from detcompile.kernels import reduce as rd

    monkeypatch.setattr(rd, "ROW_LANES", 16)
    monkeypatch.setattr(rd, "ROW_SEG_CHUNKS", 2)
    monkeypatch.setattr(rd, "ROW_MIN_TILE", 64)
    monkeypatch.setattr(rd, "ROW_MAX_SEGMENTS", 8)
    return rd


@pytest.fixture
def one_launch_row_sync(monkeypatch):
    """Split rows default to two launches; these tests run the one-launch schedule by default and
    set DETCOMPILE_ROW_SYNC=0 where they compare it with the two-launch one."""
    monkeypatch.setenv("DETCOMPILE_ROW_SYNC", "1")
