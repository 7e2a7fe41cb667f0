"""detcompile.tp.row_parallel: the row-parallel linear gives the same bits at TP = 1, 2 and 4 (gloo
process groups on the CPU; TP = 8's order is the tree test's), and for a row alone as in a batch; its
pieces (chunk bounds, chunk ownership, the tree) checked directly."""
import os

import pytest
import torch
import torch.distributed as dist

from detcompile.tp import MAX_TP, chunk_bounds, owned_chunks, row_parallel_linear, tree_sum

from ._util import run_ranks

M, N, K = 5, 24, 8 * 24  # K: 8 chunks of 24


def _data(dtype):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(M, K, generator=g) * 3).to(dtype)
    w = (torch.randn(N, K, generator=g) * 0.1).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    return x, w, b


DTYPES = (torch.bfloat16, torch.float32)
WORLD = 4  # one spawn: TP = 4 is the world, TP = 2 two groups of two (spawning is the slow part)


def _worker(rank, out_dir):
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    for tp, group in ((2, pairs[rank // 2]), (WORLD, None)):
        r = rank % tp
        for dtype in DTYPES:
            x, w, b = _data(dtype)
            cols = slice(r * K // tp, (r + 1) * K // tp)
            y = row_parallel_linear(x[:, cols], w[:, cols], b, rank=r, tp=tp, group=group)
            torch.save(y, os.path.join(out_dir, f"tp{tp}_rank{rank}_{str(dtype)[6:]}.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    run_ranks(_worker, WORLD, str(out))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bits_at_every_tp_size(results, dtype):
    """TP = 1 (this process), 2 (both groups, both ranks) and 4 (every rank): one result, bit for bit."""
    x, w, b = _data(dtype)
    want = row_parallel_linear(x, w, b)
    ints = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for tp in (2, WORLD):
        for rank in range(WORLD):
            y = torch.load(results / f"tp{tp}_rank{rank}_{str(dtype)[6:]}.pt")
            assert y.dtype == dtype and y.shape == (M, N)
            assert torch.equal(y.view(ints), want.view(ints)), (tp, rank)
    ref = x.double() @ w.double().t() + b.double()
    assert ((want.double() - ref).norm() / ref.norm()).item() < (1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_a_row_alone_equals_its_row_in_the_batch():
    x, w, b = _data(torch.bfloat16)
    full = row_parallel_linear(x, w, b)
    for i in range(M):
        assert torch.equal(row_parallel_linear(x[i:i + 1], w, b)[0], full[i])


def test_the_tree_is_the_one_order():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(3, generator=g) * 10 ** (i % 4) for i in range(MAX_TP)]
    want = ((parts[0] + parts[1]) + (parts[2] + parts[3])) + ((parts[4] + parts[5]) + (parts[6] + parts[7]))
    assert torch.equal(tree_sum(parts), want)
    # each rank's subtree, then the top: the same additions at every TP size
    for tp in (1, 2, 4, 8):
        subtrees = [tree_sum([parts[c] for c in owned_chunks(r, tp)]) for r in range(tp)]
        assert torch.equal(tree_sum(subtrees), want), tp
    with pytest.raises(ValueError, match="power-of-two"):
        tree_sum(parts[:3])


def test_chunks_and_ownership():
    assert chunk_bounds(16) == [(2 * c, 2 * c + 2) for c in range(8)]
    assert list(owned_chunks(1, 2)) == [4, 5, 6, 7] and list(owned_chunks(3, 4)) == [6, 7]
    with pytest.raises(ValueError, match="multiple of 8"):
        chunk_bounds(12)
    for bad in (3, 16):
        with pytest.raises(ValueError, match="power of two"):
            owned_chunks(0, bad)
    with pytest.raises(ValueError, match="rank 2 out of range"):
        owned_chunks(2, 2)
    with pytest.raises(ValueError, match=r"x_local \[M, k\]"):
        row_parallel_linear(torch.ones(2, 8), torch.ones(3, 16))
