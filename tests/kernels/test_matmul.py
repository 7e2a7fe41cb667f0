"""Tests for detcompile::matmul: bitwise batch invariance (torch.equal) and accuracy vs float64."""
import pytest
import torch

from detcompile.kernels import _common
from detcompile.kernels import matmul as mm
from detcompile.kernels.matmul import BLOCK_K_16BIT, BLOCK_K_FP32, fit_stages, select_config, triton_matmul
from detcompile.kernels._common import UnsupportedError

op = torch.ops.detcompile.matmul

CPU = torch.device("cpu")
CAN_INTERPRET = _common.triton_launchable(torch.empty(0))
needs_interp = pytest.mark.skipif(
    not CAN_INTERPRET, reason="Triton interpreter unavailable (needs triton and TRITON_INTERPRET=1)"
)
gpu = pytest.mark.gpu


def rnd(gen, *shape, dtype=torch.float32, device=CPU):
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)


def reference(a, b, bias=None, alpha=1.0, beta=1.0):
    """float64 ground truth (torch.mm on float64 is only a reference, never the tested path)."""
    ref = alpha * torch.matmul(a.double(), b.double())
    if bias is not None and beta != 0:
        ref = ref + beta * bias.double()
    return ref


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def assert_row_invariant(fn, gen, dtype, device, K, N, batch_sizes, w=None, bias=None, **kw):
    """The target row's output is bitwise identical whatever rows surround it and however many."""
    x = rnd(gen, 1, K, dtype=dtype, device=device)
    w = rnd(gen, K, N, dtype=dtype, device=device) if w is None else w
    expected = fn(x, w, bias, **kw)
    for bs in batch_sizes:
        pos = bs // 2  # the target sits at different positions (and tile offsets) as bs grows
        a = rnd(gen, bs, K, dtype=dtype, device=device)
        a[pos] = x[0]
        out = fn(a, w, bias, **kw)
        assert out.shape == (bs, N) and out.dtype == dtype
        assert torch.equal(out[pos : pos + 1], expected), f"row changed at batch size {bs}"
    return expected


def op_fn(a, b, bias=None, **kw):
    return op(a, b, bias, **kw)


def triton_fn(a, b, bias=None, **kw):
    return triton_matmul(a, b, bias, **kw)


# ----------------------------------------------------------------------------------------------
# CPU op
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,N", [(37, 100), (100, 129), (129, 37)])
def test_cpu_row_invariance(gen, dtype, K, N):
    assert_row_invariant(op_fn, gen, dtype, CPU, K, N, range(1, 10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_row_invariance_addmm_transposed_weight(gen, dtype):
    # nn.Linear: x @ W.t() + bias, W [N, K] so b is a stride-(1, K) view.
    K, N = 100, 129
    W = rnd(gen, N, K, dtype=dtype)
    bias = rnd(gen, N, dtype=dtype)
    assert_row_invariant(op_fn, gen, dtype, CPU, K, N, range(1, 10), w=W.t(), bias=bias, alpha=0.5, beta=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_row_moves_first_middle_last_m_1_to_70(gen, dtype):
    # M from 1 to 70 and past two 64-row tiles, K and N not multiples of the 128 tiles, with a
    # transposed nn.Linear weight and a bias: the target row first, in the middle and last.
    K, N = 200, 150
    W, bias = rnd(gen, N, K, dtype=dtype), rnd(gen, N, dtype=dtype)
    x = rnd(gen, 1, K, dtype=dtype)
    alone = op(x, W.t(), bias)
    for m in list(range(1, 71)) + [128, 129, 131]:
        a = rnd(gen, m, K, dtype=dtype)
        for pos in {0, m // 2, m - 1}:
            a[pos] = x[0]
            assert torch.equal(op(a, W.t(), bias)[pos : pos + 1], alone), (m, pos)
            a[pos] = rnd(gen, K, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_accuracy(gen, dtype):
    a, b, bias = rnd(gen, 37, 129, dtype=dtype), rnd(gen, 129, 100, dtype=dtype), rnd(gen, 100, dtype=dtype)
    for args in [(a, b, None, 1.0, 1.0), (a, b, bias, 1.0, 1.0), (a, b, bias, -0.5, 3.0)]:
        out = op(*args)
        assert out.dtype == dtype and out.shape == (37, 100)
        assert rel_err(out, reference(*args)) < TOL[dtype]


def test_cpu_bmm_baddbmm(gen):
    Bt, M, K, N = 5, 7, 37, 20
    a, b = rnd(gen, Bt, M, K), rnd(gen, Bt, K, N)
    bias = rnd(gen, Bt, 1, N)
    out = op(a, b, bias, alpha=1.5, beta=0.25)
    assert out.shape == (Bt, M, N)
    assert rel_err(out, reference(a, b, bias, 1.5, 0.25)) < 1e-5
    # Batch element 0 does not depend on how many other batch elements there are.
    for nb in range(1, Bt + 1):
        assert torch.equal(op(a[:nb], b[:nb], bias[:nb], alpha=1.5, beta=0.25)[0], out[0])


def test_cpu_k_zero_padding(gen):
    # Attention P@V case: zero probabilities at the end of K with arbitrary values in V.
    M, K, N, pad = 9, 37, 24, 11
    a, b = rnd(gen, M, K), rnd(gen, K, N)
    ap = torch.cat([a, torch.zeros(M, pad)], dim=1)
    bp = torch.cat([b, rnd(gen, pad, N)], dim=0)
    assert torch.equal(op(ap, bp), op(a, b))


@pytest.mark.parametrize("bias_shape", [(24,), (9, 24), (1, 24), (9, 1)])
def test_cpu_bias_shapes(gen, bias_shape):
    a, b, bias = rnd(gen, 9, 37), rnd(gen, 37, 24), rnd(gen, *bias_shape)
    out = op(a, b, bias)
    assert rel_err(out, reference(a, b, bias)) < 1e-5


def test_cpu_beta_zero_ignores_nan_bias(gen):
    a, b = rnd(gen, 5, 16), rnd(gen, 16, 8)
    bias = torch.full((8,), float("nan"))
    out = op(a, b, bias, beta=0.0)
    assert torch.equal(out, op(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_empty_dims(gen, dtype):
    b = rnd(gen, 16, 8, dtype=dtype)
    assert op(rnd(gen, 0, 16, dtype=dtype), b).shape == (0, 8)
    assert op(rnd(gen, 4, 16, dtype=dtype), rnd(gen, 16, 0, dtype=dtype)).shape == (4, 0)
    a0, b0 = rnd(gen, 4, 0, dtype=dtype), rnd(gen, 0, 8, dtype=dtype)
    assert torch.equal(op(a0, b0), torch.zeros(4, 8, dtype=dtype))
    bias = rnd(gen, 8, dtype=dtype)
    assert torch.equal(op(a0, b0, bias, beta=2.0), (2.0 * bias.float()).to(dtype).expand(4, 8))


def test_cpu_output_is_fresh(gen):
    a, b = rnd(gen, 1, 1), rnd(gen, 1, 1)
    out = op(a, b)
    assert out.data_ptr() not in (a.data_ptr(), b.data_ptr())


# ----------------------------------------------------------------------------------------------
# opcheck and bad inputs
# ----------------------------------------------------------------------------------------------


def _opcheck_cases(gen, device, dtype=torch.float32):
    r = lambda *s: rnd(gen, *s, dtype=dtype, device=device)  # noqa: E731
    W = r(24, 37)
    return [
        (r(9, 37), r(37, 24)),
        (r(9, 37), W.t(), r(24)),
        (r(9, 37), W.t(), r(24), 0.5, 2.0),
        (r(3, 9, 37), r(3, 37, 24), r(3, 1, 24)),
        (r(3, 9, 37), r(3, 37, 24)),
    ]


def test_opcheck_cpu(gen):
    for args in _opcheck_cases(gen, CPU):
        torch.library.opcheck(op.default, args)


def test_bad_inputs():
    f = torch.ones(4, 4)
    with pytest.raises(UnsupportedError, match="floating"):
        op(torch.ones(4, 4, dtype=torch.int32), torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(UnsupportedError, match="same dtype"):
        op(f, f.half())
    with pytest.raises(UnsupportedError, match="one device"):
        op(f, torch.ones(4, 4, device="meta"))
    with pytest.raises(UnsupportedError, match=r"a \[M, K\]"):
        op(torch.ones(4), f)
    with pytest.raises(RuntimeError, match="inner dims"):
        op(f, torch.ones(5, 4))
    with pytest.raises(UnsupportedError, match="broadcast"):
        op(f, f, torch.ones(3))
    with pytest.raises(UnsupportedError, match="bias must be floating"):
        op(f, f, torch.ones(4, dtype=torch.int64))


@needs_interp
def test_interp_rejects_float64():
    # float64 is a CPU-op-only dtype; the Triton kernel refuses it with a clear message.
    with pytest.raises(UnsupportedError, match="float64"):
        triton_matmul(torch.ones(4, 4, dtype=torch.float64), torch.ones(4, 4, dtype=torch.float64))


def test_fake_symbolic_shapes(gen):
    # The fake impl must handle symbolic sizes (dynamic-shape tracing through torch.compile).
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv())
    a = mode.from_tensor(rnd(gen, 5, 7), static_shapes=False)
    b = mode.from_tensor(rnd(gen, 7, 3), static_shapes=False)
    with mode:
        out = op(a, b)
    assert out.dim() == 2 and isinstance(out.shape[0], torch.SymInt)


# ----------------------------------------------------------------------------------------------
# Triton launcher under the interpreter (CPU tensors); fp32 and fp16 only (bf16 dot is broken
# in the Triton interpreter, it is covered by the GPU tests).
# ----------------------------------------------------------------------------------------------

INTERP_DTYPES = [torch.float32, torch.float16]


@needs_interp
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_interp_row_invariance_and_accuracy(gen, dtype):
    K, N = 100, 37  # K spans several BLOCK_K chunks with a ragged tail
    W = rnd(gen, N, K, dtype=dtype)
    bias = rnd(gen, N, dtype=dtype)
    assert_row_invariant(triton_fn, gen, dtype, CPU, K, N, [1, 2, 3, 5, 9], w=W.t(), bias=bias)
    a = rnd(gen, 9, K, dtype=dtype)
    for args in [(a, W.t(), None, 1.0, 1.0), (a, W.t(), bias, 0.5, 2.0)]:
        assert rel_err(triton_matmul(*args), reference(*args)) < TOL[dtype]


@needs_interp
def test_interp_row_moves_m_1_to_70(gen):
    # The target first, in the middle and last of every M from 1 to 70 (past two 32-row tiles).
    K, N = 70, 20
    b = rnd(gen, K, N)
    x = rnd(gen, 1, K)
    alone = triton_matmul(x, b)
    for m in range(1, 71):
        a = rnd(gen, m, K)
        for pos in {0, m // 2, m - 1}:
            a[pos] = x[0]
            assert torch.equal(triton_matmul(a, b)[pos : pos + 1], alone), (m, pos)
            a[pos] = rnd(gen, K)


@needs_interp
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("K,pad", [(37, 5), (30, 40)])
def test_interp_k_zero_padding(gen, dtype, K, pad):
    M, N = 9, 24
    a, b = rnd(gen, M, K, dtype=dtype), rnd(gen, K, N, dtype=dtype)
    ap = torch.cat([a, torch.zeros(M, pad, dtype=dtype)], dim=1)
    bp = torch.cat([b, rnd(gen, pad, N, dtype=dtype)], dim=0)
    assert torch.equal(triton_matmul(ap, bp), triton_matmul(a, b))


@needs_interp
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_interp_bmm(gen, dtype):
    Bt, M, K, N = 6, 5, 40, 24
    a, b, bias = rnd(gen, Bt, M, K, dtype=dtype), rnd(gen, Bt, K, N, dtype=dtype), rnd(gen, Bt, 1, N, dtype=dtype)
    out = triton_matmul(a, b, bias, alpha=0.5, beta=1.5)
    assert out.shape == (Bt, M, N) and out.is_contiguous()
    assert rel_err(out, reference(a, b, bias, 0.5, 1.5)) < TOL[dtype]
    for nb in (1, 2, 5):  # batch element 0 is the same whatever the batch count
        assert torch.equal(triton_matmul(a[:nb], b[:nb], bias[:nb], alpha=0.5, beta=1.5)[0], out[0])
    # Transposed batched operand (K-major b, as in q @ k.transpose(-1, -2)).
    bt = b.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(triton_matmul(a, bt, bias, alpha=0.5, beta=1.5), out)


@needs_interp
def test_interp_gpt2_conv1d_and_bias_shapes(gen):
    # GPT-2 Conv1D: addmm(bias, x, W) with W [in, out] contiguous (not transposed).
    a, W = rnd(gen, 9, 48), rnd(gen, 48, 40)
    for bias in [rnd(gen, 40), rnd(gen, 9, 40), rnd(gen, 9, 1), rnd(gen, 40)[None].expand(9, 40)]:
        out = triton_matmul(a, W, bias)
        assert rel_err(out, reference(a, W, bias)) < 1e-5
    nan_bias = torch.full((40,), float("nan"))
    assert torch.equal(triton_matmul(a, W, nan_bias, beta=0.0), triton_matmul(a, W))


@needs_interp
def test_interp_multi_tile_persistent(gen):
    # More tiles than programs (num_sms is 4 in the interpreter): each program loops over tiles.
    M, K, N = 300, 40, 260
    a, b = rnd(gen, M, K), rnd(gen, K, N)
    cfg = select_config(M, N, torch.float32, _common.num_sms(CPU))
    assert _common.num_sms(CPU) < (-(-M // cfg["BLOCK_M"])) * (-(-N // cfg["BLOCK_N"]))
    out = triton_matmul(a, b)
    assert rel_err(out, reference(a, b)) < 1e-5
    assert torch.equal(out[257:260], triton_matmul(a[257:260], b))


@needs_interp
def test_interp_empty_dims(gen):
    b = rnd(gen, 16, 8)
    assert triton_matmul(rnd(gen, 0, 16), b).shape == (0, 8)
    assert triton_matmul(rnd(gen, 3, 0, 16), rnd(gen, 3, 16, 8)).shape == (3, 0, 8)
    a0, b0, bias = rnd(gen, 4, 0), rnd(gen, 0, 8), rnd(gen, 8)
    assert torch.equal(triton_matmul(a0, b0), torch.zeros(4, 8))
    assert torch.equal(triton_matmul(a0, b0, bias, beta=2.0), (2.0 * bias).expand(4, 8))


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("K", [7, 100, 256, 327, 520])
def test_interp_k_unroll_runs_the_same_chunks_in_the_same_order(gen, dtype, K):
    # K_UNROLL walks whole BLOCK_K chunks several per iteration (no K mask), the rest one by one:
    # the same dots in the same order, so exactly K_UNROLL=1's bits, for K below one group, whole
    # groups, and groups plus whole and partial leftover chunks. A skipped or repeated chunk fails.
    a, w = rnd(gen, 3, K, dtype=dtype), rnd(gen, 40, K, dtype=dtype)
    ref = triton_matmul(a, w.t(), _config=dict(K_UNROLL=1))
    assert rel_err(ref, reference(a, w.t())) < (1e-5 if dtype == torch.float32 else 2e-3)
    for unroll in (2, 3, 4):
        assert torch.equal(triton_matmul(a, w.t(), _config=dict(K_UNROLL=unroll)), ref), unroll


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_block_k_fixed_by_dtype(dtype):
    # The reduction chunk is a per-dtype constant (the batch-invariance contract): whatever tile
    # the M bucket picks, BLOCK_K never changes with M, N or the SM count.
    want = BLOCK_K_FP32 if dtype == torch.float32 else BLOCK_K_16BIT
    picked = set()
    for M in (1, 2, 15, 16, 17, 63, 64, 65, 255, 256, 1000, 1024, 4096, 8192, 100000):
        for N in (8, 4096, 6144, 14336, 28672, 128256):
            for sms in (4, 78, 132):
                cfg = select_config(M, N, dtype, sms)
                assert cfg["BLOCK_K"] == want
                picked.add((cfg["BLOCK_M"], cfg["BLOCK_N"]))
    # The 16-bit buckets really do pick different tiles (else this test would prove nothing).
    assert len(picked) >= (1 if dtype == torch.float32 else 4)


H200_SMEM = 232448  # shared_memory_per_block_optin of the H100 and the H200


def _all_configs(dtype, sms=132):
    for M in (1, 16, 17, 64, 65, 256, 896, 1024, 4096, 8192):
        for N in (64, 4096, 4864, 14336, 32000):
            yield select_config(M, N, dtype, sms)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("limit", [H200_SMEM, 101376, 49152])  # H200, sm_86/89 (99 KiB), 48 KiB
@pytest.mark.parametrize("has_bias", [False, True])
def test_fit_stages_changes_only_the_depth(dtype, limit, has_bias):
    es = torch.empty(0, dtype=dtype).element_size()
    for cfg in _all_configs(dtype):
        fit = fit_stages(cfg, limit, es, es, has_bias)
        assert {k: v for k, v in fit.items() if k != "num_stages"} == {k: v for k, v in cfg.items() if k != "num_stages"}
        assert 1 <= fit["num_stages"] <= cfg["num_stages"]
        if fit["num_stages"] < cfg["num_stages"]:  # lowered only as far as needed
            assert mm.smem_estimate(fit, es, es, has_bias) <= limit or fit["num_stages"] == 1
            assert mm.smem_estimate(dict(fit, num_stages=fit["num_stages"] + 1), es, es, has_bias) > limit
        else:
            assert mm.smem_estimate(cfg, es, es, has_bias) <= limit
    assert fit_stages(cfg, None, es, es, has_bias) == cfg  # the interpreter: no limit


def test_fit_stages_h200_failures():
    # The configs that died on the H200 (6-stage 128x128 bf16 tiles, with a bias): the estimate
    # covers what Triton asked for (237616 and 245784 bytes), so the depth is lowered; without a
    # bias the depth measured on the H100 (6) is kept.
    tile = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=6, TMA=True)
    assert mm.smem_estimate(tile, 2, 2, True) >= 245784
    assert fit_stages(tile, H200_SMEM, 2, 2, True)["num_stages"] == 5
    assert fit_stages(tile, H200_SMEM, 2, 2, False)["num_stages"] == 6
    assert any(c["num_stages"] == 6 and c["BLOCK_M"] == 128 for c in _all_configs(torch.bfloat16))


@needs_interp
def test_interp_launch_retries_one_stage_shallower(gen, monkeypatch):
    # Triton refuses a launch whose shared memory does not fit (it raises before running): the
    # launcher retries one stage shallower, remembers the depth, and the bits are the same.
    a, b, bias = rnd(gen, 37, 70), rnd(gen, 70, 20), rnd(gen, 20)
    want = triton_matmul(a, b, bias)
    real = mm._matmul_kernel
    tried = []

    class TooDeep:
        def __getitem__(self, grid):
            def run(*args, **kw):
                tried.append(kw["num_stages"])
                if kw["num_stages"] > 2:
                    raise mm.OutOfResources(300000, H200_SMEM, "shared memory")
                return real[grid](*args, **kw)
            return run

    monkeypatch.setattr(mm, "_matmul_kernel", TooDeep())
    monkeypatch.setattr(mm, "_STAGE_CAP", {})
    assert torch.equal(triton_matmul(a, b, bias), want)
    assert tried == [3, 2]
    tried.clear()
    assert torch.equal(triton_matmul(a, b, bias), want)
    assert tried == [2]  # the depth that fitted is remembered

    class NoThreads:
        def __getitem__(self, grid):
            def run(*args, **kw):
                raise mm.OutOfResources(2048, 1024, "threads")
            return run

    monkeypatch.setattr(mm, "_matmul_kernel", NoThreads())
    with pytest.raises(mm.OutOfResources):  # only shared memory is worth a shallower pipeline
        triton_matmul(a, b, bias)


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
CUDA = torch.device("cuda")


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("K,N", [(4096, 4096), (4096, 6144), (1000, 300), (64, 129)])
def test_gpu_row_invariance_1_to_64(gen, dtype, K, N):
    W = rnd(gen, N, K, dtype=dtype, device=CUDA)
    bias = rnd(gen, N, dtype=dtype, device=CUDA)
    for w, bb in [(W.t(), None), (W.t().contiguous(), bias)]:  # nn.Linear view and GPT-2 layout
        assert_row_invariant(op_fn, gen, dtype, CUDA, K, N, range(1, 65), w=w, bias=bb)
        x = rnd(gen, 64, K, dtype=dtype, device=CUDA)
        outs = [op(x, w, bb) for _ in range(3)]  # run-to-run determinism
        assert all(torch.equal(o, outs[0]) for o in outs)
        assert rel_err(outs[0], reference(x, w, bb)) < TOL[dtype]


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("M", [1, 7, 64, 300])
@pytest.mark.parametrize("N", [4096, 6144])
def test_gpu_accuracy_llama_shapes(gen, dtype, M, N):
    K = 4096
    a, W = rnd(gen, M, K, dtype=dtype, device=CUDA), rnd(gen, N, K, dtype=dtype, device=CUDA)
    out = op(a, W.t())
    ref = reference(a, W.t())
    assert rel_err(out, ref) < TOL[dtype]
    if dtype != torch.float32:
        assert rel_err(out, torch.mm(a, W.t()).double()) < 1e-2
    # Rows first, in the middle and last of the batch equal their M=1 results bitwise.
    for r in {0, M // 2, M - 1}:
        assert torch.equal(out[r : r + 1], op(a[r : r + 1], W.t())), r


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_k_zero_padding_and_bmm(gen, dtype):
    Bt, M, K, N = 8, 77, 200, 64
    for pad in (1, 56, 300):
        a, b = rnd(gen, Bt, M, K, dtype=dtype, device=CUDA), rnd(gen, Bt, K, N, dtype=dtype, device=CUDA)
        ap = torch.cat([a, torch.zeros(Bt, M, pad, dtype=dtype, device=CUDA)], dim=2)
        bp = torch.cat([b, rnd(gen, Bt, pad, N, dtype=dtype, device=CUDA)], dim=1)
        out = op(a, b)
        assert torch.equal(op(ap, bp), out)
        assert rel_err(out, reference(a, b)) < TOL[dtype]
        for nb in range(1, Bt + 1):
            sub = op(a[:nb], b[:nb])
            assert torch.equal(sub[0], out[0]) and torch.equal(sub[nb - 1], out[nb - 1]), nb
    bias = rnd(gen, Bt, 1, N, dtype=dtype, device=CUDA)
    out = op(a, b, bias, alpha=0.5, beta=2.0)
    assert rel_err(out, reference(a, b, bias, 0.5, 2.0)) < TOL[dtype]
    assert torch.equal(op(a[:1], b[:1], bias[:1], alpha=0.5, beta=2.0)[0], out[0])
    assert torch.equal(op(a[-1:], b[-1:], bias[-1:], alpha=0.5, beta=2.0)[0], out[-1])


@gpu
def test_gpu_fp32_tf32_mode_is_invariant(gen):
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert_row_invariant(op_fn, gen, torch.float32, CUDA, 1024, 512, [1, 2, 17, 64])
    finally:
        torch.set_float32_matmul_precision(old)


@gpu
def test_gpu_empty_and_misc(gen):
    b = rnd(gen, 16, 8, device=CUDA)
    assert op(rnd(gen, 0, 16, device=CUDA), b).shape == (0, 8)
    a0, b0, bias = rnd(gen, 4, 0, device=CUDA), rnd(gen, 0, 8, device=CUDA), rnd(gen, 8, device=CUDA)
    assert torch.equal(op(a0, b0, bias, beta=2.0), (2.0 * bias).expand(4, 8))
    nan_bias = torch.full((8,), float("nan"), device=CUDA)
    a = rnd(gen, 5, 16, device=CUDA)
    assert torch.equal(op(a, b, nan_bias, beta=0.0), op(a, b))


@gpu
def test_opcheck_cuda(gen):
    for dtype in GPU_DTYPES:
        for args in _opcheck_cases(gen, CUDA, dtype):
            torch.library.opcheck(op.default, args)


@gpu
def test_gpu_bad_dtype():
    with pytest.raises(UnsupportedError, match="float64"):
        op(torch.ones(4, 4, device=CUDA, dtype=torch.float64), torch.ones(4, 4, device=CUDA, dtype=torch.float64))
    with pytest.raises(UnsupportedError):
        op(torch.ones(4, 4, device=CUDA, dtype=torch.int32), torch.ones(4, 4, device=CUDA, dtype=torch.int32))
    with pytest.raises(UnsupportedError, match="one device"):
        op(torch.ones(4, 4, device=CUDA), torch.ones(4, 4))


@gpu
@pytest.mark.parametrize("N,K", [(4096, 14336), (1024, 4096), (300, 1000)])
def test_gpu_k_unroll_keeps_the_bits(gen, N, K):
    # The decode tiles (M <= 16) with their K chunks walked 1, 2 or 4 per loop iteration: the same
    # dots in the same order, so the bits of one chunk per iteration and of the M = 64 (wgmma) rows.
    W = rnd(gen, N, K, dtype=torch.bfloat16, device=CUDA)
    a = rnd(gen, 64, K, dtype=torch.bfloat16, device=CUDA)
    wide = op(a, W.t())
    for M in (1, 2, 16):
        ref = triton_matmul(a[:M], W.t(), _config=dict(K_UNROLL=1))
        assert torch.equal(ref, wide[:M]), M
        for unroll in (2, 4):
            for stages in (2, 4):
                got = triton_matmul(a[:M], W.t(), _config=dict(K_UNROLL=unroll, num_stages=stages))
                assert torch.equal(got, ref), (M, unroll, stages)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K", [(6144, 4096), (4096, 14336), (28672, 4096), (300, 1000)])
def test_gpu_rows_same_bits_across_m_buckets(gen, dtype, N, K):
    # M from 1 to 8192 crosses every tile bucket (16-row mma.sync tiles, 64-row and 128-row wgmma
    # tiles, TMA and pointer loads): the rows first, in the middle and last (in a ragged last tile)
    # must keep the bits they get alone in all of them.
    W = rnd(gen, N, K, dtype=dtype, device=CUDA)
    a = rnd(gen, 8192, K, dtype=dtype, device=CUDA)
    sms = torch.cuda.get_device_properties(CUDA).multi_processor_count
    configs = set()
    for M in (1, 2, 16, 17, 64, 65, 256, 1000, 1024, 4096, 8192):
        cfg = select_config(M, N, dtype, sms)
        configs.add((cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["TMA"]))
        out = op(a[:M], W.t())
        for r in {0, M // 2, M - 1}:
            assert torch.equal(out[r : r + 1], op(a[r : r + 1], W.t())), (M, r, cfg)
    assert len(configs) >= 3


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_tma_and_pointer_kernels_agree(gen, dtype):
    # The Hopper TMA kernel only moves data differently: forced pointer loads give the same bits,
    # for both weight layouts, with bias/alpha/beta, and with ragged M, N, K tails.
    if torch.cuda.get_device_capability(CUDA)[0] < 9:
        pytest.skip("TMA needs sm_90+")
    for M, N, K in [(300, 6144, 4096), (64, 4096, 4096), (1000, 520, 1000), (129, 264, 72)]:
        a = rnd(gen, M, K, dtype=dtype, device=CUDA)
        W = rnd(gen, N, K, dtype=dtype, device=CUDA)
        bias = rnd(gen, N, dtype=dtype, device=CUDA)
        for w in (W.t(), W.t().contiguous()):
            for bb, alpha, beta in [(None, 1.0, 1.0), (bias, 0.5, 2.0)]:
                got = triton_matmul(a, w, bb, alpha, beta, _config={"TMA": True})
                ptr = triton_matmul(a, w, bb, alpha, beta, _config={"TMA": False})
                assert torch.equal(got, ptr), (M, N, K, w.stride(), bb is None)
                assert rel_err(got, reference(a, w, bb, alpha, beta)) < TOL[dtype]


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("has_bias", [False, True])
def test_gpu_fitted_depth_keeps_bits(gen, dtype, has_bias):
    # Item 5 of issue #11: configs deeper than the device's shared memory are run shallower. A
    # shape that selects the 6-stage 128x128 tile (ctrl/xlnet/trocr died there with a bias), and a
    # config forced far too deep, must run and give the bits of a shallow config and of M=1 rows.
    props = torch.cuda.get_device_properties(CUDA)
    limit = _common.shared_memory_limit(CUDA)
    assert limit is not None and limit > 0
    N, K = 4864, 1280
    es = torch.empty(0, dtype=dtype).element_size()
    M = next((m for m in range(128, 8192, 128)
              if select_config(m, N, dtype, props.multi_processor_count)["num_stages"] == 6
              and select_config(m, N, dtype, props.multi_processor_count)["BLOCK_M"] == 128), 896)
    cfg = select_config(M, N, dtype, props.multi_processor_count)
    a = rnd(gen, M, K, dtype=dtype, device=CUDA)
    W = rnd(gen, N, K, dtype=dtype, device=CUDA)
    bias = rnd(gen, N, dtype=dtype, device=CUDA) if has_bias else None
    out = op(a, W.t(), bias)
    shallow = triton_matmul(a, W.t(), bias, _config=dict(BLOCK_M=64, BLOCK_N=128, num_stages=2))
    assert torch.equal(out, shallow)
    too_deep = triton_matmul(a, W.t(), bias, _config=dict(BLOCK_M=128, BLOCK_N=256, num_stages=12))
    assert torch.equal(too_deep, out)
    for r in (0, M // 2, M - 1):
        assert torch.equal(out[r : r + 1], op(a[r : r + 1], W.t(), bias)), r
    assert rel_err(out, reference(a, W.t(), bias)) < TOL[dtype]
    if dtype != torch.float32 and has_bias and limit < 246784:
        # The shape really exercised the lowered depth on this device.
        assert cfg["num_stages"] == 6 and fit_stages(cfg, limit, es, es, True)["num_stages"] < 6
