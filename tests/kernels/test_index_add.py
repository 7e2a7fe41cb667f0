"""detcompile::index_add: documented order rule (bitwise), duplicates, batch invariance of a
destination (Mixtral-like expert loop), accuracy, opcheck, errors; the sync-free Triton path (CUDA)
equal bit for bit to the round algorithm, and captured in a CUDA graph."""
import pytest
import torch

from detcompile.kernels import _common
from detcompile.kernels import index_add as ia

from ._host_sync import HostSyncRecorder
from ._util import capture_cuda_graph, rel_err, tol

CAN_INTERPRET = _common.triton_launchable(torch.empty(0))
needs_interp = pytest.mark.skipif(
    not CAN_INTERPRET, reason="Triton interpreter unavailable (needs triton and TRITON_INTERPRET=1)"
)

OP = torch.ops.detcompile.index_add


def sequential_ref(self, dim, index, source, alpha=1):
    """The documented rule, one contribution at a time in ascending source position:
    acc = self (fp32 / fp64); acc[index[i]] += alpha * source[i]; round once at the end."""
    acc_dt = _common.acc_dtype(self.dtype)
    acc = self.to(acc_dt).movedim(dim, 0).clone()
    src = source.to(acc_dt).movedim(dim, 0)
    if alpha != 1:
        src = src * alpha
    for i, d in enumerate(index.tolist()):
        acc[d] = acc[d] + src[i]
    return acc.movedim(0, dim).to(self.dtype)


def test_occurrence_rank(gen):
    keys = torch.randint(0, 6, (200,), generator=gen)
    rank = ia.occurrence_rank(keys)
    seen = {}
    for i, k in enumerate(keys.tolist()):
        assert rank[i].item() == seen.get(k, 0)
        seen[k] = seen.get(k, 0) + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("alpha", [1, 0.5, -3])
def test_cpu_order_rule_and_accuracy(gen, dtype, dim, alpha):
    self_ = torch.randn(7, 9, 5, generator=gen).to(dtype)
    n = 40
    index = torch.randint(0, self_.shape[dim], (n,), generator=gen)  # many duplicates
    shape = list(self_.shape)
    shape[dim] = n
    source = torch.randn(shape, generator=gen).to(dtype)
    out = OP(self_, dim, index, source, alpha)
    assert out.dtype == dtype and out.shape == self_.shape
    assert torch.equal(out, sequential_ref(self_, dim % 3, index, source, alpha))
    ref = torch.index_add(self_.double(), dim, index, source.double(), alpha=alpha)
    assert rel_err(out, ref) < tol(dtype)


def test_cpu_destination_invariant(gen):
    # A destination's bits depend only on its own contributions (in order), not on how many
    # other destinations / sources exist or where they sit.
    H = 33
    mine = torch.randn(5, H, generator=gen)  # 5 contributions to destination 0
    base = torch.randn(H, generator=gen)
    ref = None
    for n_other in range(0, 30, 3):
        n_dest = 1 + n_other // 2 + 1
        others = torch.randn(n_other, H, generator=gen)
        other_idx = torch.randint(1, n_dest, (n_other,), generator=gen)
        # interleave: my contributions keep their relative order at random positions
        perm = torch.randperm(5 + n_other, generator=gen)
        mine_pos = perm[:5].sort().values
        index = torch.empty(5 + n_other, dtype=torch.int64)
        source = torch.empty(5 + n_other, H)
        mask = torch.zeros(5 + n_other, dtype=torch.bool)
        mask[mine_pos] = True
        index[mask], source[mask] = 0, mine
        index[~mask], source[~mask] = other_idx, others
        self_ = torch.randn(n_dest, H, generator=gen)
        self_[0] = base
        out = OP(self_, 0, index, source)[0]
        ref = out if ref is None else ref
        assert torch.equal(out, ref), n_other


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_mixtral_like_expert_loop(gen, dtype):
    # For each expert: final = index_add(final, 0, token_idx, expert_out). A target token's row
    # must not change with the number of other tokens in the batch.
    H, E = 48, 4
    target_out = {e: torch.randn(H, generator=gen).to(dtype) for e in (1, 3)}  # its 2 experts
    ref = None
    for T in range(1, 10):
        pos = (3 * T) // 4
        final = torch.zeros(T, H, dtype=dtype)
        for e in range(E):
            toks = [t for t in range(T) if t != pos and torch.rand(1, generator=gen) < 0.5]
            if e in target_out:
                toks = sorted(toks + [pos])
            if not toks:
                continue
            idx = torch.tensor(toks, dtype=torch.int64)
            outs = torch.randn(len(toks), H, generator=gen).to(dtype)
            if e in target_out:
                outs[toks.index(pos)] = target_out[e]
            final = OP(final, 0, idx, outs)
        ref = final[pos] if ref is None else ref
        assert torch.equal(final[pos], ref), T


def test_cpu_integer_and_special(gen):
    x = torch.randint(0, 10, (5, 3), generator=gen)
    idx = torch.tensor([0, 4, 0, 2])
    src = torch.randint(0, 10, (4, 3), generator=gen)
    assert torch.equal(OP(x, 0, idx, src, 2), torch.index_add(x, 0, idx, src, alpha=2))
    # empty index: a copy of self, never self itself
    s = torch.randn(3, 2, generator=gen)
    out = OP(s, 0, torch.empty(0, dtype=torch.int64), torch.empty(0, 2))
    assert torch.equal(out, s) and out.data_ptr() != s.data_ptr()
    # int32 index and 0-d self
    out = OP(s, 1, torch.tensor([1, 1], dtype=torch.int32), torch.ones(3, 2))
    assert torch.equal(out, torch.index_add(s, 1, torch.tensor([1, 1]), torch.ones(3, 2)))
    z = OP(torch.tensor(1.5), 0, torch.tensor([0]), torch.tensor(2.0))
    assert z.shape == () and z.item() == 3.5


def test_opcheck_cpu(gen):
    s = torch.randn(6, 4, generator=gen)
    idx = torch.tensor([5, 0, 5, 2, 5])
    torch.library.opcheck(OP.default, (s, 0, idx, torch.randn(5, 4, generator=gen)))
    torch.library.opcheck(OP.default, (s.bfloat16(), 0, idx, torch.randn(5, 4).bfloat16(), 2.0))
    torch.library.opcheck(OP.default, (s, 1, torch.tensor([3, 3]), torch.randn(6, 2)))


def test_bad_inputs():
    s = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="same dtype"):
        OP(s, 0, torch.tensor([0]), torch.randn(1, 3).bfloat16())
    with pytest.raises(_common.UnsupportedError, match="int64 or int32"):
        OP(s, 0, torch.tensor([0.0]), torch.randn(1, 3))
    with pytest.raises(IndexError):
        OP(s, 2, torch.tensor([0]), torch.randn(1, 3))
    with pytest.raises(RuntimeError, match="index length"):
        OP(s, 0, torch.tensor([0, 1]), torch.randn(3, 3))
    with pytest.raises(IndexError, match="out of range"):
        OP(s, 0, torch.tensor([4]), torch.randn(1, 3))
    with pytest.raises(IndexError, match="out of range"):
        OP(s, 0, torch.tensor([-1]), torch.randn(1, 3))  # aten rejects negatives too
    with pytest.raises(RuntimeError, match="differ in dim 1"):
        OP(s, 0, torch.tensor([0]), torch.randn(1, 1))  # no silent broadcasting
    with pytest.raises(RuntimeError, match="same number of dims"):
        OP(s, 0, torch.tensor([0]), torch.randn(3))


def test_deterministic_algorithms_mode(gen):
    # The round algorithm uses no op that torch.use_deterministic_algorithms refuses.
    s = torch.randn(5, 4, generator=gen)
    idx = torch.tensor([1, 3, 1, 1])
    src = torch.randn(4, 4, generator=gen)
    expect = OP(s, 0, idx, src)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(OP(s, 0, idx, src), expect)
    finally:
        torch.use_deterministic_algorithms(prev)


# ---------------------------------------------------------------------------------------------
# Sync-free Triton path vs the round algorithm (interpreter on CPU: fp32 / fp16, since the
# interpreter truncates fp32 -> bf16 instead of rounding to nearest; bf16 runs on the GPU tests)
# ---------------------------------------------------------------------------------------------


def _case(gen, shape, dim, n, dtype, n_dest=None):
    self_ = torch.randn(shape, generator=gen).to(dtype)
    hi = self_.shape[dim] if self_.dim() else 1
    index = torch.randint(0, n_dest or hi, (n,), generator=gen)  # n_dest small: many repeats
    sshape = list(shape)
    if sshape:
        sshape[dim] = n
    else:
        sshape = [n]
    source = (torch.randn(sshape, generator=gen) * 4).to(dtype)
    return self_, index, source


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dim", [0, 1, 2])
@pytest.mark.parametrize("alpha", [1, 0.1, -3])
def test_interp_kernel_equals_rounds(gen, dtype, dim, alpha):
    for shape, n, n_dest in [((7, 9, 5), 40, None), ((6, 5, 4), 60, 2), ((4, 3, 2), 7, 1)]:
        self_, index, source = _case(gen, shape, dim, n, dtype, n_dest)
        got = ia.triton_index_add(self_, dim, index, source, alpha)
        assert torch.equal(got, ia.index_add_rounds(self_, dim, index, source, alpha)), (shape, n)
        assert torch.equal(got, sequential_ref(self_, dim, index, source, alpha))


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_kernel_special_shapes(gen, dtype):
    R = ia.index_add_rounds
    K = ia.triton_index_add
    # destination rows longer than one column block (1500 > 1024), int32 index
    s, idx, src = _case(gen, (5, 1500), 0, 30, dtype, 3)
    assert torch.equal(K(s, 0, idx.int(), src), R(s, 0, idx.int(), src))
    # empty index: a fresh copy of self
    s = torch.randn(3, 2, generator=gen).to(dtype)
    out = K(s, 0, torch.empty(0, dtype=torch.int64), torch.empty(0, 2, dtype=dtype))
    assert torch.equal(out, s) and out.data_ptr() != s.data_ptr()
    # 0-d and 1-d self
    z = K(torch.tensor(1.5, dtype=dtype), 0, torch.tensor([0, 0]), torch.tensor([2.0, 0.25], dtype=dtype))
    assert z.shape == () and z.item() == 3.75
    s, idx, src = _case(gen, (9,), 0, 20, dtype, 4)
    assert torch.equal(K(s, 0, idx, src), R(s, 0, idx, src))
    # empty self along dim / empty other dims
    assert K(torch.empty(0, 3, dtype=dtype), 1, torch.tensor([1]), torch.empty(0, 1, dtype=dtype)).shape == (0, 3)
    # integer tensors keep aten's exact path
    x = torch.randint(0, 10, (5, 3), generator=gen)
    assert torch.equal(K(x, 0, torch.tensor([0, 4, 0]), torch.ones(3, 3, dtype=torch.int64), 2),
                       torch.index_add(x, 0, torch.tensor([0, 4, 0]), torch.ones(3, 3, dtype=torch.int64), alpha=2))


@needs_interp
def test_interp_equality_check_sees_another_order(gen):
    # The bitwise comparisons above can fail: the same contributions added in descending source
    # order give other bits for this data.
    self_, index, source = _case(gen, (6, 64), 0, 80, torch.float32, 3)
    got = ia.triton_index_add(self_, 0, index, source)
    rev = sequential_ref(self_, 0, index.flip(0), source.flip(0))
    assert not torch.equal(got, rev)


@needs_interp
def test_interp_out_of_range_index_asserts(gen):
    # Checked on the device (_assert_async; on the CPU it raises at once, on CUDA it is a
    # device-side assert like aten's index_add).
    s = torch.randn(4, 3, generator=gen)
    for bad in (4, -1):
        with pytest.raises(RuntimeError):
            ia.triton_index_add(s, 0, torch.tensor([0, bad]), torch.randn(2, 3))


@needs_interp
def test_interp_no_host_sync(gen):
    self_, index, source = _case(gen, (6, 8), 0, 20, torch.float32, 3)
    with HostSyncRecorder() as rec:
        ia.triton_index_add(self_, 0, index, source, 0.5)
    assert rec.calls == []
    with HostSyncRecorder() as rec:  # the recorder does see the round algorithm's syncs
        ia.index_add_rounds(self_, 0, index, source, 0.5)
    assert "item" in rec.calls and "nonzero" in rec.calls


# ---------------------------------------------------------------------------------------------
# GPU (the Triton kernel)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_kernel_equals_rounds_bitwise(dtype):
    # The former CUDA algorithm (rounds of torch ops) is the reference, on every layout and with
    # heavy repeats; fp32 sources include subnormals (an FTZ add would show).
    g = torch.Generator().manual_seed(11)
    for shape, dim, n, n_dest in [((300, 4096), 0, 2000, None), ((64, 2048), 0, 512, 4),
                                  ((8, 50, 96), 1, 300, 7), ((6, 40, 33), 2, 100, None),
                                  ((1000,), 0, 5000, 10), ((17, 1), 0, 64, 1)]:
        self_, index, source = _case(g, shape, dim, n, dtype, n_dest)
        if dtype == torch.float32:
            source.view(-1)[::7] *= 1e-39
            self_.view(-1)[::5] *= 1e-39
        self_, index, source = self_.cuda(), index.cuda(), source.cuda()
        for alpha in (1, 0.5, 0.1):
            want = ia.index_add_rounds(self_, dim, index, source, alpha)
            assert torch.equal(OP(self_, dim, index, source, alpha), want), (shape, dim, alpha)
            assert torch.equal(ia.triton_index_add(self_, dim, index.int(), source, alpha), want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_cuda_graph_capture_replays_new_indices(dtype):
    # Captured once, replayed with other indices (other repeat patterns) and values in the same
    # buffers: the round algorithm's bits every time.
    g = torch.Generator().manual_seed(2)
    T, H, n = 48, 1024, 96
    final = torch.zeros(T, H, dtype=dtype, device="cuda")
    index = torch.randint(0, T, (n,), generator=g).cuda()
    source = torch.randn(n, H, generator=g).to(dtype).cuda()
    graph, out = capture_cuda_graph(lambda: OP(final, 0, index, source))
    for n_dest in (T, 5, 1, T):
        index.copy_(torch.randint(0, n_dest, (n,), generator=g))
        source.copy_(torch.randn(n, H, generator=g).to(dtype))
        final.copy_(torch.randn(T, H, generator=g).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ia.index_add_rounds(final, 0, index, source)), n_dest


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_matches_cpu_bitwise_and_repeats(dtype):
    # Every step is an exactly rounded elementwise op, so CUDA gives the CPU bits.
    g = torch.Generator().manual_seed(7)
    self_ = torch.randn(300, 4096, generator=g).to(dtype)
    index = torch.randint(0, 300, (2000,), generator=g)
    source = torch.randn(2000, 4096, generator=g).to(dtype)
    cpu = OP(self_, 0, index, source, 0.5)
    for _ in range(3):
        out = OP(self_.cuda(), 0, index.cuda(), source.cuda(), 0.5)
        assert torch.equal(out.cpu(), cpu)
    ref = torch.index_add(self_.double(), 0, index, source.double(), alpha=0.5)
    assert rel_err(cpu, ref) < tol(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_expert_loop_batch_invariant(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    H, E = 4096, 8
    target_out = {e: torch.randn(H, device="cuda", generator=g).to(dtype) for e in (2, 5)}
    ref = None
    for T in range(1, 65):
        pos = (3 * T) // 4
        final = torch.zeros(T, H, dtype=dtype, device="cuda")
        for e in range(E):
            sel = (torch.rand(T, device="cuda", generator=g) < 0.25).nonzero().squeeze(1)
            sel = sel[sel != pos]
            if e in target_out:
                sel = torch.cat([sel, torch.tensor([pos], device="cuda")]).sort().values
            if sel.numel() == 0:
                continue
            outs = torch.randn(sel.numel(), H, device="cuda", generator=g).to(dtype)
            if e in target_out:
                outs[(sel == pos).nonzero()[0, 0]] = target_out[e]
            final = OP(final, 0, sel, outs)
        ref = final[pos].clone() if ref is None else ref
        assert torch.equal(final[pos], ref), T


@pytest.mark.gpu
def test_gpu_opcheck_and_errors():
    s = torch.randn(6, 4, device="cuda")
    idx = torch.tensor([5, 0, 5, 2, 5], device="cuda")
    torch.library.opcheck(OP.default, (s, 0, idx, torch.randn(5, 4, device="cuda")))
    with pytest.raises(_common.UnsupportedError, match="float64"):
        OP(s.double(), 0, idx, torch.randn(5, 4, device="cuda").double())
    with pytest.raises(RuntimeError, match="one device"):
        OP(s, 0, idx.cpu(), torch.randn(5, 4, device="cuda"))
    src = torch.randn(5, 4, device="cuda")
    expect = OP(s, 0, idx, src)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # none of the ops used may be refused
    try:
        assert torch.equal(OP(s, 0, idx, src), expect)
    finally:
        torch.use_deterministic_algorithms(prev)
