"""detcompile::solve_triangular: batch invariance, fixed order, accuracy vs float64, the other triangle
(and a unit diagonal) never read, left/right/upper/lower, broadcasting, opcheck, errors."""
import itertools

import pytest
import torch

from detcompile.kernels import _common
from detcompile.kernels import solve_triangular as st

from ._util import LAUNCH_DEV, needs_triton, rel_err, tol

OP = torch.ops.detcompile.solve_triangular
FLAGS = list(itertools.product([False, True], [True, False], [True, False]))  # upper, left, unitriangular


def _system(gen, batch, n, k, upper, left, dtype=torch.float32):
    """A well-conditioned triangular A (garbage in the other triangle) and B."""
    A = torch.randn(*batch, n, n, generator=gen) * (0.5 / n**0.5)
    A.diagonal(dim1=-2, dim2=-1).add_(2.0)
    A = A.masked_fill(_other_triangle(n, upper), 7.0)  # never read: the reference masks it out
    B = torch.randn(*batch, *((n, k) if left else (k, n)), generator=gen)
    return A.to(dtype), B.to(dtype)


def _other_triangle(n, upper):
    ones = torch.ones(n, n, dtype=torch.bool)
    return ones.tril(-1) if upper else ones.triu(1)


def _ref(A, B, upper, left, unit):
    A = A.double().triu() if upper else A.double().tril()
    return torch.linalg.solve_triangular(A, B.double(), upper=upper, left=left, unitriangular=unit)


def _check_batch_invariant(fn, A0, B0, gen, sizes):
    """fn(A, B)[pos] must be bitwise fn(A0, B0) alone, with fresh neighbours at every batch size."""
    ref = fn(A0[None], B0[None])[0]
    for b in sizes:
        pos = (3 * b) // 4
        A = (torch.randn((b,) + A0.shape, generator=gen) * 0.1).to(A0.dtype)
        A.diagonal(dim1=-2, dim2=-1).add_(2.0)
        B = torch.randn((b,) + B0.shape, generator=gen).to(B0.dtype)
        A[pos], B[pos] = A0, B0
        assert torch.equal(fn(A, B)[pos], ref), f"batch size {b}"
    return ref


# ---------------------------------------------------------------------------------------------
# CPU op
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("upper,left,unit", FLAGS)
def test_cpu_batch_invariant_and_accurate(gen, upper, left, unit):
    A0, B0 = _system(gen, (), 24, 7, upper, left)
    fn = lambda A, B: OP(A, B, upper, left, unit)  # noqa: E731
    ref = _check_batch_invariant(fn, A0, B0, gen, (2, 3, 8, 33))
    assert rel_err(ref, _ref(A0, B0, upper, left, unit)) < 1e-5


def test_cpu_deltanet_shape(gen):
    # Gated DeltaNet: [batch, heads, chunks, 64, 64] lower, unit diagonal; B has head_dim columns.
    A, B = _system(gen, (3, 2, 2), 64, 16, False, True)
    out = OP(A, B, False, True, True)
    assert out.shape == B.shape
    assert rel_err(out, _ref(A, B, False, True, True)) < 1e-5
    assert torch.equal(OP(A[1:2], B[1:2], False, True, True), out[1:2])


@pytest.mark.parametrize("upper,left,unit", FLAGS)
def test_cpu_never_reads_other_triangle(gen, upper, left, unit):
    A, B = _system(gen, (2,), 9, 4, upper, left)
    out = OP(A, B, upper, left, unit)
    other = _other_triangle(9, upper)
    if unit:
        other |= torch.eye(9, dtype=torch.bool)
    assert torch.equal(OP(A.masked_fill(other, float("nan")), B, upper, left, unit), out)


def test_cpu_fixed_order(gen):
    # Bitwise the documented forward substitution, written out row by row.
    A, B = _system(gen, (), 8, 3, False, True)
    x = []
    for i in range(8):
        acc = B[i]
        for j in range(i):
            acc = acc - A[i, j] * x[j]
        x.append(acc / A[i, i])
    assert torch.equal(OP(A, B, False, True, False), torch.stack(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cpu_dtypes_and_broadcasting(gen, dtype):
    A, _ = _system(gen, (3, 1), 10, 4, False, True, dtype)
    B = torch.randn(4, 10, 5, generator=gen).to(dtype)  # batch (3, 1) x (4,) -> (3, 4)
    out = OP(A, B, False, True, False)
    ref = _ref(A, B, False, True, False)
    assert out.dtype == dtype and out.shape == ref.shape == (3, 4, 10, 5) and out.is_contiguous()
    assert rel_err(out, ref) < (1e-12 if dtype == torch.float64 else tol(dtype))


# ---------------------------------------------------------------------------------------------
# Triton launcher (interpreter on CPU, or the GPU)
# ---------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("upper,left,unit", FLAGS)
def test_triton_accurate_and_other_triangle_unread(gen, upper, left, unit):
    A, B = _system(gen, (2,), 20, 5, upper, left)
    out = st.triton_solve_triangular(A.to(LAUNCH_DEV), B.to(LAUNCH_DEV), upper, left, unit).cpu()
    assert out.shape == B.shape and rel_err(out, _ref(A, B, upper, left, unit)) < 1e-5
    other = _other_triangle(20, upper)
    if unit:
        other |= torch.eye(20, dtype=torch.bool)
    A_nan = A.masked_fill(other, float("nan"))
    assert torch.equal(st.triton_solve_triangular(A_nan.to(LAUNCH_DEV), B.to(LAUNCH_DEV), upper, left, unit).cpu(), out)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_batch_invariant(gen, dtype):
    # DeltaNet's 64 x 64 chunks; 70 columns: two column blocks.
    A0, B0 = _system(gen, (), 64, 70, False, True, dtype)
    fn = lambda A, B: st.triton_solve_triangular(A.to(LAUNCH_DEV), B.to(LAUNCH_DEV), False, True, True).cpu()  # noqa: E731
    ref = _check_batch_invariant(fn, A0, B0, gen, (2, 3))
    assert rel_err(ref, _ref(A0, B0, False, True, True)) < tol(dtype)


def test_block_sizes_follow_n_only():
    assert st.block_sizes(1) == (16, 64)
    assert st.block_sizes(64) == (64, 64)
    assert st.block_sizes(65) == (128, 32)
    with pytest.raises(_common.UnsupportedError, match="128"):
        st.block_sizes(129)


# ---------------------------------------------------------------------------------------------
# opcheck, errors
# ---------------------------------------------------------------------------------------------


def test_opcheck_cpu(gen):
    A, B = _system(gen, (2,), 6, 3, False, True)
    Au, Bu = _system(gen, (2,), 6, 3, True, False)
    for args in [(A, B, False, True, True), (Au, Bu, True, False, False), (A[0], B, False)]:
        torch.library.opcheck(OP.default, args)


def test_bad_inputs(gen):
    A, B = _system(gen, (2,), 6, 3, False, True)
    with pytest.raises(ValueError, match="square"):
        OP(A[..., :5], B, False)
    with pytest.raises(ValueError, match="must be 6"):
        OP(A, B[:, :5], False)
    with pytest.raises(_common.UnsupportedError, match="dtype"):
        OP(A, B.double(), False)
    with pytest.raises(_common.UnsupportedError, match="floating"):
        OP(A.long(), B.long(), False)


def test_triton_launcher_refuses_non_launchable(monkeypatch, gen):
    monkeypatch.setattr(_common, "triton_interpret", lambda: False)
    A, B = _system(gen, (), 4, 2, False, True)
    with pytest.raises(_common.UnsupportedError, match="Triton"):
        st.triton_solve_triangular(A, B, False)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_batch_invariant_across_cublas_switch(dtype):
    # ATen switches between looped and batched cuBLAS trsm at 8 matrices of size >= 64; the kernel doesn't.
    g = torch.Generator().manual_seed(0)
    A0, B0 = _system(g, (), 64, 128, False, True, dtype)
    A0, B0 = A0.cuda(), B0.cuda()
    ref = OP(A0[None], B0[None], False, True, True)[0]
    for bs in (1, 2, 7, 8, 9, 16, 64):
        A = A0.expand(bs, 64, 64).clone()
        B = torch.randn(bs, 64, 128, device="cuda").to(dtype)
        pos = (3 * bs) // 4
        B[pos] = B0
        assert torch.equal(OP(A, B, False, True, True)[pos], ref), f"batch {bs}"
    assert rel_err(ref.cpu(), _ref(A0.cpu(), B0.cpu(), False, True, True)) < tol(dtype)
    torch.library.opcheck(OP.default, (A0[None], B0[None], False, True, True))
