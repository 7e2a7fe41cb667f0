"""detcompile::layer_norm: bitwise batch invariance, accuracy vs float64 aten, opcheck, bad inputs."""
import pytest
import torch

from detcompile.kernels import _common
from detcompile.kernels import layer_norm as ln
from detcompile.kernels.layer_norm import BLOCK, triton_layer_norm

from ._util import SMALL_PATHS, LAUNCH_DEV, needs_triton, rel_err
from ._util import SCHEDULE_PATHS, check_schedules, run_schedules, same_bits
from ._util import one_launch_row_sync, small_rows  # noqa: F401 (fixtures used by name)

pytestmark = pytest.mark.usefixtures("one_launch_row_sync")

OP = torch.ops.detcompile.layer_norm
EPS = 1e-5


def ref64(x, shape, w, b, eps=EPS):
    """float64 aten.native_layer_norm: (out, mean, rstd)."""
    f = lambda t: None if t is None else t.double()  # noqa: E731
    return torch.ops.aten.native_layer_norm(x.double(), shape, f(w), f(b), eps)


def check_all(outs, x, shape, w, b, tol):
    out, mean, rstd = outs
    ro, rm, rr = ref64(x, shape, w, b)
    # Shapes and dtypes as aten's meta kernel gives them (fp32 statistics for 16-bit x).
    mo, mm, mr = torch.ops.aten.native_layer_norm(
        x.to("meta"), shape, None if w is None else w.to("meta"), None if b is None else b.to("meta"), EPS
    )
    for got, meta in ((out, mo), (mean, mm), (rstd, mr)):
        assert got.shape == meta.shape and got.dtype == meta.dtype
    assert rel_err(out, ro) < tol
    # Statistics are fp32 (or fp64) whatever x is, so they are held to a tighter bound; the data
    # has a nonzero mean so the relative error of the mean is meaningful.
    stat_tol = 1e-12 if x.dtype == torch.float64 else 1e-5
    assert rel_err(mean, rm) < stat_tol and rel_err(rstd, rr) < stat_tol


def check_invariance(fn, dtype, hidden, max_b, gen, device="cpu"):
    target = (torch.randn(hidden, generator=gen) * 2 + 0.75).to(device=device, dtype=dtype)
    w = (torch.rand(hidden, generator=gen) + 0.5).to(device=device, dtype=dtype)
    bias = torch.randn(hidden, generator=gen).to(device=device, dtype=dtype)
    first = None
    for b in range(1, max_b + 1):
        x = (torch.randn(b, hidden, generator=gen) * 3 - 0.5).to(device=device, dtype=dtype)
        pos = b // 2
        x[pos] = target
        out, mean, rstd = fn(x, [hidden], w, bias, EPS)
        got = (out[pos], mean[pos], rstd[pos])
        first = got if first is None else first
        for g, f, name in zip(got, first, ("out", "mean", "rstd")):
            assert torch.equal(g, f), f"{name} changed at batch size {b} (hidden={hidden}, {dtype})"


# ---------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [37, 100, 129, 5120])
def test_cpu_batch_invariant(dtype, hidden, gen):
    check_invariance(OP, dtype, hidden, 9, gen)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2), (torch.float64, 1e-12)])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_cpu_accuracy(dtype, tol, affine, gen):
    x = (torch.randn(3, 4, 129, generator=gen) * 4 + 1).to(dtype)
    w = torch.randn(129, generator=gen).to(dtype) if affine != "none" else None
    b = torch.randn(129, generator=gen).to(dtype) if affine == "both" else None
    check_all(OP(x, [129], w, b, EPS), x, [129], w, b, tol)


def test_cpu_multidim_normalized_shape(gen):
    # normalized_shape [5, 7]: each [5, 7] slice is one row; stats shape [b, 3, 1, 1].
    shape = [5, 7]
    x = torch.randn(4, 3, 5, 7, generator=gen) + 0.5
    w = torch.randn(5, 7, generator=gen)
    b = torch.randn(5, 7, generator=gen)
    outs = OP(x, shape, w, b, EPS)
    check_all(outs, x, shape, w, b, 1e-5)
    # The slice [1, 2] alone gives the same bits as inside the batch.
    alone = OP(x[1:2, 2:3].clone(), shape, w, b, EPS)
    for o, a in zip(outs, alone):
        assert torch.equal(o[1:2, 2:3], a)


def test_cpu_weight_none_equals_identity_affine(gen):
    x = torch.randn(5, 37, generator=gen)
    plain = OP(x, [37], None, None, EPS)
    ident = OP(x, [37], torch.ones(37), torch.zeros(37), EPS)
    for p, i in zip(plain, ident):
        assert torch.equal(p, i)


def test_cpu_mixed_weight_dtype(gen):
    x = (torch.randn(4, 100, generator=gen) + 1).bfloat16()
    w = torch.randn(100, generator=gen)
    b = torch.randn(100, generator=gen)
    check_all(OP(x, [100], w, b, EPS), x, [100], w, b, 1e-2)


@pytest.mark.parametrize("affine", [True, False])
def test_opcheck_cpu(affine, gen):
    x = torch.randn(3, 5, 37, generator=gen)
    w = torch.randn(37, generator=gen) if affine else None
    b = torch.randn(37, generator=gen) if affine else None
    torch.library.opcheck(OP.default, (x, [37], w, b, EPS))
    torch.library.opcheck(OP.default, (x.bfloat16(), [5, 37], None, None, EPS))


def test_bad_inputs_cpu(gen):
    with pytest.raises(_common.UnsupportedError, match="floating point"):
        OP(torch.ones(2, 8, dtype=torch.int32), [8], None, None, EPS)
    with pytest.raises(ValueError, match="normalized_shape"):
        OP(torch.randn(2, 8, generator=gen), [7], None, None, EPS)
    with pytest.raises(ValueError, match="bias"):
        OP(torch.randn(2, 8, generator=gen), [8], None, torch.randn(7, generator=gen), EPS)


# ------------------------------------------------------------- Triton launcher (interpreter/GPU)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [37, BLOCK + 6])  # one partial chunk; two chunks with a tail
def test_triton_batch_invariant(dtype, hidden, gen):
    check_invariance(triton_layer_norm, dtype, hidden, 5, gen, device=LAUNCH_DEV)


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_triton_accuracy(dtype, tol, affine, gen):
    h = BLOCK + 6
    x = (torch.randn(2, 3, h, generator=gen) * 4 + 1).to(LAUNCH_DEV, dtype)
    w = torch.randn(h, generator=gen).to(LAUNCH_DEV, dtype) if affine != "none" else None
    b = torch.randn(h, generator=gen).to(LAUNCH_DEV, dtype) if affine == "both" else None
    check_all(triton_layer_norm(x, [h], w, b, EPS), x, [h], w, b, tol)


@needs_triton
def test_triton_multidim_and_unaligned(gen):
    shape = [5, 7]
    buf = (torch.randn(4 * 35 + 1, generator=gen) + 0.5).to(LAUNCH_DEV)
    x = buf[1:].view(4, 5, 7)  # a view at a 4-byte offset
    w = torch.randn(5, 7, generator=gen).to(LAUNCH_DEV)
    b = torch.randn(5, 7, generator=gen).to(LAUNCH_DEV)
    outs = triton_layer_norm(x, shape, w, b, EPS)
    check_all(outs, x, shape, w, b, 1e-5)
    for o, a in zip(outs, triton_layer_norm(x.clone(), shape, w, b, EPS)):
        assert torch.equal(o, a)


# ----------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("hidden", [37, 768, 4096, 5120])
def test_gpu_batch_invariant_and_accurate(dtype, tol, hidden):
    g = torch.Generator(device="cuda").manual_seed(11)
    target = (torch.randn(hidden, generator=g, device="cuda") * 2 + 0.75).to(dtype)
    w = (torch.rand(hidden, generator=g, device="cuda") + 0.5).to(dtype)
    bias = torch.randn(hidden, generator=g, device="cuda").to(dtype)
    first = None
    for b in range(1, 65):
        x = (torch.randn(b, hidden, generator=g, device="cuda") * 3 - 0.5).to(dtype)
        pos = b - 1 - b // 3  # the target moves around as the batch grows
        x[pos] = target
        runs = [OP(x, [hidden], w, bias, EPS) for _ in range(3)]
        for r in runs[1:]:
            assert all(torch.equal(a, c) for a, c in zip(runs[0], r)), "run-to-run change"
        got = tuple(t[pos] for t in runs[0])
        first = got if first is None else first
        assert all(torch.equal(a, c) for a, c in zip(got, first)), f"row changed at batch size {b}"
        if b in (1, 17, 64):
            check_all(runs[0], x, [hidden], w, bias, tol)


@pytest.mark.gpu
def test_gpu_many_rows_and_unaligned():
    g = torch.Generator(device="cuda").manual_seed(5)
    hidden = 4096
    buf = torch.randn(8192 * hidden + 8, generator=g, device="cuda").bfloat16()
    w = torch.randn(hidden, generator=g, device="cuda").bfloat16()
    b = torch.randn(hidden, generator=g, device="cuda").bfloat16()
    x = buf[1 : 1 + 8192 * hidden].view(8192, hidden)  # 2-byte offset
    outs = OP(x, [hidden], w, b, EPS)
    for o, a in zip(outs, OP(x.clone(), [hidden], w, b, EPS)):
        assert torch.equal(o, a)
    for o, a in zip(outs, OP(x[100:101].clone(), [hidden], w, b, EPS)):
        assert torch.equal(o[100:101], a)
    check_all(outs, x, [hidden], w, b, 1e-2)


@pytest.mark.gpu
def test_gpu_opcheck():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 5, 100, generator=g, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(100, generator=g, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(OP.default, (x, [100], w, w.clone(), EPS))
    torch.library.opcheck(OP.default, (x.float(), [5, 100], None, None, EPS))


@pytest.mark.gpu
def test_gpu_bad_inputs():
    with pytest.raises(_common.UnsupportedError, match="float64"):
        OP(torch.randn(2, 8, device="cuda", dtype=torch.float64), [8], None, None, EPS)
    with pytest.raises(_common.UnsupportedError, match="floating point"):
        OP(torch.ones(2, 8, device="cuda", dtype=torch.int64), [8], None, None, EPS)
    with pytest.raises(_common.UnsupportedError, match="weight is on"):
        OP(torch.randn(2, 8, device="cuda"), [8], torch.randn(8), None, EPS)


# ------------------------------------------- row plan paths (interpreter/GPU, tiny test constants:
# tests/kernels/_util.py small_rows)


@needs_triton
@pytest.mark.parametrize("hidden", SMALL_PATHS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
def test_triton_paths_batch_invariant_and_accurate(small_rows, monkeypatch, hidden, dtype, tol, gen):
    check_invariance(triton_layer_norm, dtype, hidden, 4, gen, device=LAUNCH_DEV)
    x = (torch.randn(3, hidden, generator=gen) * 4 + 1).to(LAUNCH_DEV, dtype)
    w = torch.randn(hidden, generator=gen).to(LAUNCH_DEV, dtype)
    b = torch.randn(hidden, generator=gen).to(LAUNCH_DEV, dtype)
    for weight, bias in ((w, b), (None, None)):
        outs = triton_layer_norm(x, [hidden], weight, bias, EPS)
        check_all(outs, x, [hidden], weight, bias, tol)
        monkeypatch.setenv("DETCOMPILE_ROW_SYNC", "0")  # two launches: the same bits
        for o, a in zip(outs, triton_layer_norm(x, [hidden], weight, bias, EPS)):
            assert torch.equal(o, a)
        monkeypatch.setenv("DETCOMPILE_ROW_SYNC", "1")


@needs_triton
def test_triton_split_rows_large_mean(small_rows, gen):
    # Chan's combination of segment statistics has no cancellation with a large mean: the error is
    # that of an fp32 mean (aten's fp32 kernel: 2.4e-5 here), not E[x^2] - mean^2 garbage.
    hidden = 100
    x = (torch.randn(4, hidden, generator=gen) + 1000.0).to(LAUNCH_DEV)
    out, mean, rstd = triton_layer_norm(x, [hidden], None, None, EPS)
    ro, rm, rr = ref64(x, [hidden], None, None)
    assert rel_err(out, ro) < 1e-4 and rel_err(mean, rm) < 1e-6 and rel_err(rstd, rr) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [4096, 128256])
def test_gpu_bf16_rows_invariant_and_accurate_wide(hidden):
    g = torch.Generator(device="cuda").manual_seed(hidden)
    target = (torch.randn(hidden, generator=g, device="cuda") * 2 + 0.75).bfloat16()
    w = (torch.rand(hidden, generator=g, device="cuda") + 0.5).bfloat16()
    bias = torch.randn(hidden, generator=g, device="cuda").bfloat16()
    ref = OP(target[None], [hidden], w, bias, EPS)
    for b in range(1, 65):
        x = (torch.randn(b, hidden, generator=g, device="cuda") * 3 - 0.5).bfloat16()
        pos = b - 1 - b // 3
        x[pos] = target
        outs = OP(x, [hidden], w, bias, EPS)
        for o, r in zip(outs, ref):
            assert torch.equal(o[pos : pos + 1], r), f"row changed at batch size {b}"
        if b in (1, 17, 64):
            for o, a in zip(outs, OP(x, [hidden], w, bias, EPS)):
                assert torch.equal(o, a), "run-to-run change"
            check_all(outs, x, [hidden], w, bias, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [8193, 16384, 128256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_split_schedules_agree(monkeypatch, hidden, dtype):
    from detcompile.kernels import row_kernels as rk

    g = torch.Generator(device="cuda").manual_seed(6)
    x = (torch.randn(37, hidden, generator=g, device="cuda") * 3 + 1).to(dtype)
    w = torch.randn(hidden, generator=g, device="cuda").to(dtype)
    b = torch.randn(hidden, generator=g, device="cuda").to(dtype)
    for weight, bias in ((w, b), (None, None)):
        a = OP(x, [hidden], weight, bias, EPS)
        monkeypatch.setattr(rk, "ROW_SYNC_TIMEOUT_NS", 0)  # most programs take the fallback
        c1 = OP(x, [hidden], weight, bias, EPS)
        monkeypatch.undo()
        monkeypatch.setenv("DETCOMPILE_ROW_SYNC", "0")  # two launches
        c2 = OP(x, [hidden], weight, bias, EPS)
        monkeypatch.undo()
        monkeypatch.setenv("DETCOMPILE_ROW_SYNC", "1")
        for t1, t2, t3 in zip(a, c1, c2):
            assert torch.equal(t1, t2) and torch.equal(t1, t3)
        check_all(a, x, [hidden], weight, bias, 1e-2 if dtype == torch.bfloat16 else 1e-5)


# ------------------------------------ split-row schedules: two launches, sync, row_loop (same bits)


@needs_triton
@pytest.mark.parametrize("hidden", SCHEDULE_PATHS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
def test_triton_row_loop_matches_other_schedules(small_rows, monkeypatch, hidden, dtype, tol, gen):
    from detcompile.kernels import row_kernels as rk

    T = 3
    x = (torch.randn(T, hidden, generator=gen) * 4 + 1).to(dtype)
    x[1, hidden // 2:] += 50.0  # segments with very different means (Chan's combination)
    w = torch.randn(hidden, generator=gen).to(dtype)
    b = torch.randn(hidden, generator=gen).to(dtype)
    warps = 16 if dtype == torch.float16 else None  # ROW_LOOP_NUM_WARPS, or 16 through row_schedule
    for weight, bias in ((w, b), (None, None)):
        def fn(x=x):
            dev = lambda t: None if t is None else t.to(LAUNCH_DEV)  # noqa: E731
            return tuple(t.cpu() for t in triton_layer_norm(dev(x), [hidden], dev(weight), dev(bias), EPS))

        outs = check_schedules(run_schedules(monkeypatch, ln, "_layer_norm_rows_kernel", fn, warps), T, hidden, warps)
        check_all(outs, x, [hidden], weight, bias, tol)
        with rk.row_schedule("row_loop"):  # one row alone: the bits it has in the batch
            assert same_bits(fn(x[1:2].clone()), tuple(t[1:2] for t in outs))


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [8193, 16384, 128256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_row_loop_matches_other_schedules(hidden, dtype):
    from detcompile.kernels import row_kernels as rk

    g = torch.Generator(device="cuda").manual_seed(9)
    x = (torch.randn(37, hidden, generator=g, device="cuda") * 3 + 1).to(dtype)
    w = torch.randn(hidden, generator=g, device="cuda").to(dtype)
    b = torch.randn(hidden, generator=g, device="cuda").to(dtype)
    for weight, bias in ((w, b), (None, None)):
        with rk.row_schedule("two_launch"):
            ref = OP(x, [hidden], weight, bias, EPS)
        with rk.row_schedule("sync"):
            assert same_bits(OP(x, [hidden], weight, bias, EPS), ref)
        for warps in (4, 8, 16):
            with rk.row_schedule("row_loop", row_loop_warps=warps):
                assert same_bits(OP(x, [hidden], weight, bias, EPS), ref), warps
                alone = OP(x[5:6].clone(), [hidden], weight, bias, EPS)
                assert same_bits(alone, tuple(t[5:6] for t in ref))
        check_all(ref, x, [hidden], weight, bias, 1e-2 if dtype == torch.bfloat16 else 1e-5)
