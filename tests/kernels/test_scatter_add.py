"""detcompile::scatter_add: documented order rule (bitwise), duplicates, index smaller than src,
batch invariance of a destination, accuracy, opcheck, errors; the sync-free CUDA path (index_add's
Triton kernel on the flattened output) equal bit for bit to the round algorithm, and captured in a
CUDA graph."""
import itertools

import pytest
import torch

from detcompile.kernels import _common
from detcompile.kernels import scatter_add as sa

from ._host_sync import HostSyncRecorder
from ._util import capture_cuda_graph, rel_err, tol

CAN_INTERPRET = _common.triton_launchable(torch.empty(0))
needs_interp = pytest.mark.skipif(
    not CAN_INTERPRET, reason="Triton interpreter unavailable (needs triton and TRITON_INTERPRET=1)"
)

OP = torch.ops.detcompile.scatter_add


def sequential_ref(self, dim, index, src):
    """The documented rule: acc = self (fp32 / fp64); for every index element in ascending
    position along dim, acc[dest] += src[pos]; round once at the end."""
    acc = self.to(_common.acc_dtype(self.dtype)).clone()
    srca = src.to(acc.dtype)
    dim = dim % self.dim()
    others = [range(s) for d, s in enumerate(index.shape) if d != dim]
    for rest in itertools.product(*others):
        for i in range(index.shape[dim]):
            pos = list(rest)
            pos.insert(dim, i)
            dest = list(rest)
            dest.insert(dim, index[tuple(pos)].item())
            acc[tuple(dest)] = acc[tuple(dest)] + srca[tuple(pos)]
    return acc.to(self.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_cpu_order_rule_and_accuracy(gen, dtype, dim):
    self_ = torch.randn(5, 6, 4, generator=gen).to(dtype)
    src = torch.randn(7, 8, 7, generator=gen).to(dtype)
    # index smaller than src everywhere and than self outside dim; values repeat a lot
    ishape = [4, 5, 3]
    ishape[dim] = 6
    index = torch.randint(0, self_.shape[dim], ishape, generator=gen)
    out = OP(self_, dim, index, src)
    assert out.dtype == dtype and out.shape == self_.shape
    assert torch.equal(out, sequential_ref(self_, dim, index, src))
    ref = torch.scatter_add(self_.double(), dim, index, src.double())
    assert rel_err(out, ref) < tol(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_batch_invariant(gen, dtype):
    # scatter_add along dim 1 of [B, 37] -> [B, 11]: a batch row's result must not depend on the
    # other rows.
    src_t = torch.randn(37, generator=gen).to(dtype)
    idx_t = torch.randint(0, 11, (37,), generator=gen)
    self_t = torch.randn(11, generator=gen).to(dtype)
    ref = OP(self_t[None], 1, idx_t[None], src_t[None])[0]
    for b in range(1, 10):
        pos = (3 * b) // 4
        s = torch.randn(b, 11, generator=gen).to(dtype)
        src = torch.randn(b, 37, generator=gen).to(dtype)
        idx = torch.randint(0, 11, (b, 37), generator=gen)
        s[pos], src[pos], idx[pos] = self_t, src_t, idx_t
        assert torch.equal(OP(s, 1, idx, src)[pos], ref), b
    assert rel_err(ref, torch.scatter_add(self_t.double(), 0, idx_t, src_t.double())) < tol(dtype)


def test_cpu_destination_invariant_dim0(gen):
    # scatter along dim 0 ("tokens"): destination row 0 gets 4 contributions; more tokens going
    # elsewhere must not change its bits.
    H = 16
    mine = torch.randn(4, H, generator=gen)
    ref = None
    for n_other in range(0, 20, 4):
        n = 4 + n_other
        keep = torch.randperm(n, generator=gen)[:4].sort().values
        index = torch.randint(1, 6, (n, H), generator=gen)
        src = torch.randn(n, H, generator=gen)
        index[keep] = 0
        src[keep] = mine
        self_ = torch.randn(6, H, generator=gen)
        self_[0] = 1.0
        out = OP(self_, 0, index, src)[0]
        ref = out if ref is None else ref
        assert torch.equal(out, ref), n_other


def test_cpu_integer_and_special(gen):
    x = torch.randint(0, 10, (4, 3), generator=gen)
    idx = torch.randint(0, 4, (5, 3), generator=gen)
    src = torch.randint(0, 10, (5, 3), generator=gen)
    assert torch.equal(OP(x, 0, idx, src), torch.scatter_add(x, 0, idx, src))
    s = torch.randn(3, 2, generator=gen)
    out = OP(s, 0, torch.empty(0, 2, dtype=torch.int64), torch.empty(0, 2))
    assert torch.equal(out, s) and out.data_ptr() != s.data_ptr()
    z = OP(torch.tensor(1.5), 0, torch.tensor(0), torch.tensor(2.0))
    assert z.shape == () and z.item() == 3.5


def test_opcheck_cpu(gen):
    s = torch.randn(6, 4, generator=gen)
    idx = torch.randint(0, 6, (9, 3), generator=gen)
    torch.library.opcheck(OP.default, (s, 0, idx, torch.randn(9, 4, generator=gen)))
    torch.library.opcheck(OP.default, (s.bfloat16(), 0, idx, torch.randn(9, 4).bfloat16()))
    idx1 = torch.randint(0, 4, (6, 7), generator=gen)
    torch.library.opcheck(OP.default, (s, 1, idx1, torch.randn(6, 7, generator=gen)))


def test_bad_inputs():
    s = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="same dtype"):
        OP(s, 0, torch.zeros(1, 3, dtype=torch.int64), torch.randn(1, 3).bfloat16())
    with pytest.raises(_common.UnsupportedError, match="int64"):
        OP(s, 0, torch.zeros(1, 3, dtype=torch.int32), torch.randn(1, 3))
    with pytest.raises(IndexError, match="out of bounds"):
        OP(s, 0, torch.full((1, 3), 4), torch.randn(1, 3))
    with pytest.raises(IndexError, match="out of bounds"):
        OP(s, 0, torch.full((1, 3), -1), torch.randn(1, 3))
    with pytest.raises(RuntimeError, match="larger"):
        OP(s, 0, torch.zeros(2, 3, dtype=torch.int64), torch.randn(1, 3))
    with pytest.raises(RuntimeError, match="number of dims"):
        OP(s, 0, torch.zeros(3, dtype=torch.int64), torch.randn(3))
    with pytest.raises(IndexError):
        OP(s, 2, torch.zeros(1, 3, dtype=torch.int64), torch.randn(1, 3))


# ---------------------------------------------------------------------------------------------
# The sync-free path in the interpreter (fp32 / fp16)
# ---------------------------------------------------------------------------------------------


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_interp_kernel_equals_rounds(gen, dtype, dim):
    # index smaller than src everywhere and than self outside dim; heavy repeats; a 3-D self
    # seen through a non-contiguous view
    self_ = torch.randn(4, 6, 5, generator=gen).to(dtype).transpose(0, 2).contiguous().transpose(0, 2)
    src = torch.randn(10, 10, 10, generator=gen).to(dtype)
    for n_dest in (self_.shape[dim], 2, 1):
        ishape = [3, 5, 4]
        ishape[dim] = 9
        index = torch.randint(0, n_dest, ishape, generator=gen)
        got = sa.triton_scatter_add(self_, dim, index, src)
        assert torch.equal(got, sa.scatter_add_rounds(self_, dim, index, src)), n_dest
        assert torch.equal(got, sequential_ref(self_, dim, index, src))


@needs_interp
def test_interp_special_shapes_and_errors(gen):
    z = sa.triton_scatter_add(torch.tensor(1.5), 0, torch.tensor(0), torch.tensor(2.0))
    assert z.shape == () and z.item() == 3.5
    s = torch.randn(3, 2, generator=gen)
    out = sa.triton_scatter_add(s, 0, torch.empty(0, 2, dtype=torch.int64), torch.empty(0, 2))
    assert torch.equal(out, s) and out.data_ptr() != s.data_ptr()
    x = torch.randint(0, 10, (4, 3), generator=gen)
    idx = torch.randint(0, 4, (5, 3), generator=gen)
    assert torch.equal(sa.triton_scatter_add(x, 0, idx, x.new_ones(5, 3)), torch.scatter_add(x, 0, idx, x.new_ones(5, 3)))
    # out of range along dim, even where the flat offset would land inside the output: checked on
    # the device (_assert_async: raises at once on the CPU, a device-side assert on CUDA)
    for bad in (2, -1):
        with pytest.raises(RuntimeError):
            sa.triton_scatter_add(torch.randn(4, 2), 1, torch.tensor([[0, bad]]), torch.randn(1, 2))


@needs_interp
def test_interp_no_host_sync(gen):
    self_ = torch.randn(6, 8, generator=gen)
    index = torch.randint(0, 6, (20, 8), generator=gen)
    src = torch.randn(20, 8, generator=gen)
    with HostSyncRecorder() as rec:
        sa.triton_scatter_add(self_, 0, index, src)
    assert rec.calls == []
    with HostSyncRecorder() as rec:  # the recorder does see the round algorithm's syncs
        sa.scatter_add_rounds(self_, 0, index, src)
    assert "item" in rec.calls and "nonzero" in rec.calls


# ---------------------------------------------------------------------------------------------
# GPU (the sync-free path: index_add's Triton kernel on the flattened output)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dim", [0, 1])
def test_gpu_matches_cpu_bitwise_and_repeats(dtype, dim):
    g = torch.Generator().manual_seed(11)
    self_ = torch.randn(64, 512, generator=g).to(dtype)
    ishape = [1000, 512] if dim == 0 else [64, 3000]
    index = torch.randint(0, self_.shape[dim], ishape, generator=g)
    src = torch.randn(ishape, generator=g).to(dtype)
    cpu = OP(self_, dim, index, src)
    for _ in range(3):
        assert torch.equal(OP(self_.cuda(), dim, index.cuda(), src.cuda()).cpu(), cpu)
    ref = torch.scatter_add(self_.double(), dim, index, src.double())
    assert rel_err(cpu, ref) < tol(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_batch_invariant(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    R, D = 4096, 257
    src_t = torch.randn(R, device="cuda", generator=g).to(dtype)
    idx_t = torch.randint(0, D, (R,), device="cuda", generator=g)
    self_t = torch.randn(D, device="cuda", generator=g).to(dtype)
    ref = OP(self_t[None], 1, idx_t[None], src_t[None])[0]
    for b in range(1, 65):
        pos = (3 * b) // 4
        s = torch.randn(b, D, device="cuda", generator=g).to(dtype)
        src = torch.randn(b, R, device="cuda", generator=g).to(dtype)
        idx = torch.randint(0, D, (b, R), device="cuda", generator=g)
        s[pos], src[pos], idx[pos] = self_t, src_t, idx_t
        assert torch.equal(OP(s, 1, idx, src)[pos], ref), b


@pytest.mark.gpu
def test_gpu_opcheck_and_errors():
    s = torch.randn(6, 4, device="cuda")
    idx = torch.randint(0, 6, (9, 4), device="cuda")
    torch.library.opcheck(OP.default, (s, 0, idx, torch.randn(9, 4, device="cuda")))
    with pytest.raises(_common.UnsupportedError, match="float64"):
        OP(s.double(), 0, idx, torch.randn(9, 4, device="cuda").double())
    src = torch.randn(9, 4, device="cuda")
    expect = OP(s, 0, idx, src)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # none of the ops used may be refused
    try:
        assert torch.equal(OP(s, 0, idx, src), expect)
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_kernel_equals_rounds_bitwise(dtype):
    g = torch.Generator().manual_seed(12)
    for shape, dim, ishape, n_dest in [((64, 512), 0, (1000, 512), None), ((64, 512), 1, (64, 3000), 3),
                                       ((8, 50, 96), 1, (8, 300, 90), None), ((6, 40, 33), 2, (5, 40, 100), 1)]:
        self_ = torch.randn(shape, generator=g).to(dtype).cuda()
        index = torch.randint(0, n_dest or shape[dim], ishape, generator=g).cuda()
        src = torch.randn(ishape, generator=g).to(dtype).cuda()
        want = sa.scatter_add_rounds(self_, dim, index, src)
        assert torch.equal(OP(self_, dim, index, src), want), (shape, dim)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_cuda_graph_capture_replays_new_indices(dtype):
    g = torch.Generator().manual_seed(3)
    self_ = torch.zeros(48, 256, dtype=dtype, device="cuda")
    index = torch.randint(0, 48, (96, 256), generator=g).cuda()
    src = torch.randn(96, 256, generator=g).to(dtype).cuda()
    graph, out = capture_cuda_graph(lambda: OP(self_, 0, index, src))
    for n_dest in (48, 5, 1, 48):
        index.copy_(torch.randint(0, n_dest, (96, 256), generator=g))
        src.copy_(torch.randn(96, 256, generator=g).to(dtype))
        self_.copy_(torch.randn(48, 256, generator=g).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, sa.scatter_add_rounds(self_, 0, index, src)), n_dest
