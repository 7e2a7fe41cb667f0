"""Tests for the CPU building blocks (detcompile/kernels/_cpu.py): the fixed-tile GEMM and the
fixed-order sums. Invariance is bitwise (torch.equal): a row (or column) moved around a batch of
random neighbours, with M, N and K not multiples of the tiles, must keep its bits; the tile GEMM is
also checked across thread counts and against a BLAS stand-in that is position-dependent (which the
runtime probe must catch)."""
import warnings

import pytest
import torch

from detcompile.kernels import _cpu

from ._util import rel_err

TILES = [(_cpu.TILE_M, _cpu.TILE_K, _cpu.TILE_N), (64, 16, 64), (64, 48, 64), (64, 64, 32), (64, 64, 128)]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def rnd(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


@pytest.mark.parametrize("tile", TILES[:2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N", [(1, 1), (37, 100), (128, 129), (300, 7)])
def test_row_moves_through_batches(gen, tile, dtype, K, N):
    # Every M from 1 to 70 plus a few past two tiles; the target first, in the middle, last.
    b = rnd(gen, K, N, dtype=dtype)
    x = rnd(gen, 1, K, dtype=dtype)
    alone = _cpu.tile_matmul(x, b, tile)
    for m in list(range(1, 71)) + [127, 129, 200]:
        a = rnd(gen, m, K, dtype=dtype)
        for pos in {0, m // 2, m - 1}:
            a[pos] = x[0]
            assert torch.equal(_cpu.tile_matmul(a, b, tile)[pos], alone[0]), (m, pos)
            a[pos] = rnd(gen, K, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_column_moves_through_widths(gen, dtype):
    # N varies with the batch where b is an activation (attention scores: N = keys).
    K = 45
    a = rnd(gen, 9, K, dtype=dtype)
    y = rnd(gen, K, 1, dtype=dtype)
    alone = _cpu.tile_matmul(a, y)
    for n in [1, 2, 63, 127, 128, 129, 300]:
        b = rnd(gen, K, n, dtype=dtype)
        for pos in {0, n // 2, n - 1}:
            b[:, pos] = y[:, 0]
            assert torch.equal(_cpu.tile_matmul(a, b)[:, pos], alone[:, 0]), (n, pos)
            b[:, pos] = rnd(gen, K, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_trailing_zeros_along_k(gen, dtype):
    # Attention P @ V through the matmul: probabilities 0 for padded keys, junk values there.
    a, b = rnd(gen, 9, 37, dtype=dtype), rnd(gen, 37, 24, dtype=dtype)
    want = _cpu.tile_matmul(a, b)
    for pad in (1, 91, 92, 300):
        ap = torch.cat([a, torch.zeros(9, pad, dtype=dtype)], 1)
        bp = torch.cat([b, rnd(gen, pad, 24, dtype=dtype)], 0)
        assert torch.equal(_cpu.tile_matmul(ap, bp), want), pad


def test_batched_and_broadcast(gen):
    # A batch element's product does not depend on how many others there are or where it sits.
    a, b = rnd(gen, 2, 3, 70, 40), rnd(gen, 2, 3, 40, 130)
    full = _cpu.tile_matmul(a, b)
    assert rel_err(full, a.double() @ b.double()) < 1e-6
    assert torch.equal(_cpu.tile_matmul(a[1:, 2:], b[1:, 2:]), full[1:, 2:])
    w = rnd(gen, 40, 130)
    shared = _cpu.tile_matmul(a, w)  # one weight for the whole batch (packed once)
    assert torch.equal(shared[1, 2], _cpu.tile_matmul(a[1, 2], w))


@pytest.mark.parametrize("tile", TILES)
def test_thread_count_does_not_change_bits(gen, tile):
    a, b = rnd(gen, 150, 300), rnd(gen, 300, 200)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _cpu.tile_matmul(a, b, tile)
        for n in (2, 4, 8):
            torch.set_num_threads(n)
            assert torch.equal(_cpu.tile_matmul(a, b, tile), one), n
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_accuracy(gen, dtype):
    a, b = rnd(gen, 70, 300, dtype=dtype), rnd(gen, 300, 130, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert rel_err(_cpu.tile_matmul(a, b), a.double() @ b.double()) < tol


def test_empty_and_k_zero(gen):
    assert _cpu.tile_matmul(rnd(gen, 0, 5), rnd(gen, 5, 3)).shape == (0, 3)
    assert torch.equal(_cpu.tile_matmul(rnd(gen, 4, 0), rnd(gen, 0, 3)), torch.zeros(4, 3))


def test_probe_passes_here():
    # The tiles the kernels use are verified on this machine (else the CPU path would be slow).
    for dt in (torch.float32, torch.float64):
        for tile in TILES:
            assert _cpu.tiles_invariant(dt, tile), (dt, tile)


def test_position_dependent_blas_is_caught(gen, monkeypatch):
    # A BLAS whose odd rows round differently (as a kernel with a separate tail path might): the
    # probe must refuse it, warn, and the matmul must fall back to the sequential loop.
    real_bmm = torch.bmm

    def odd_rows_differ(a, b):
        out = real_bmm(a, b)
        out[:, 1::2] = real_bmm(a[:, 1::2].double(), b.double()).to(out.dtype)
        return out

    monkeypatch.setattr(_cpu, "_VERIFIED", {})
    monkeypatch.setattr(torch, "bmm", odd_rows_differ)
    with pytest.warns(RuntimeWarning, match="position-dependent"):
        assert not _cpu.tiles_invariant(torch.float32)
    a, b = rnd(gen, 5, 37), rnd(gen, 37, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process, not per call
        assert torch.equal(_cpu.tile_matmul(a, b), _cpu.seq_matmul(a, b))


# ----------------------------------------------------------------------------------------------
# Sums
# ----------------------------------------------------------------------------------------------


def _pairwise(xs):
    """The documented tree, written out: zero-pad to a power of two, fold the upper half onto the
    lower one (x[i] + x[i + h]) until one element is left, in float32."""
    n = 1 << max(len(xs) - 1, 0).bit_length()
    v = [torch.tensor(x, dtype=torch.float32) for x in xs] + [torch.tensor(0.0)] * (n - len(xs))
    while len(v) > 1:
        h = len(v) // 2
        v = [v[i] + v[i + h] for i in range(h)]
    return v[0]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 100])
def test_tree_sum_order(gen, n):
    x = rnd(gen, n) * 1e3
    assert torch.equal(_cpu.tree_sum(x[None])[0], _pairwise(x.tolist()))


@pytest.mark.parametrize("n", [1, 5, 33, 128, 129])
def test_tree_sum_rows_and_trailing_zeros(gen, n):
    x = rnd(gen, n)
    alone = _cpu.tree_sum(x[None])[0]
    for rows in (2, 7, 64):
        batch = rnd(gen, rows, n)
        batch[rows - 1] = x
        assert torch.equal(_cpu.tree_sum(batch)[rows - 1], alone)
    for pad in (1, 3, n, 200):
        assert torch.equal(_cpu.tree_sum(torch.cat([x, torch.zeros(pad)])[None])[0], alone), pad
    assert rel_err(alone[None], x.double().sum()[None]) < 1e-6


def test_chunk_sum_whole_zero_chunks_are_free(gen):
    x = rnd(gen, 150)
    alone = _cpu.chunk_sum(x, 64)
    for lead in (0, 64, 128):
        for tail in (0, 1, 63, 64, 200):
            padded = torch.cat([torch.zeros(lead), x, torch.zeros(tail)])
            assert torch.equal(_cpu.chunk_sum(padded, 64), alone), (lead, tail)
    assert rel_err(alone[None], x.double().sum()[None]) < 1e-6
