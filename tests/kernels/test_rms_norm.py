"""detcompile::rms_norm: bitwise batch invariance, accuracy vs float64, opcheck, bad inputs."""
import pytest
import torch
import torch.nn.functional as F

from detcompile.kernels import _common
from detcompile.kernels import rms_norm as rn
from detcompile.kernels.rms_norm import BLOCK, triton_rms_norm

from ._util import SMALL_PATHS, LAUNCH_DEV, needs_triton, rel_err
from ._util import SCHEDULE_PATHS, assert_close_to, check_schedules, run_schedules, same_bits
from ._util import one_launch_row_sync, small_rows  # noqa: F401 (fixtures used by name)

pytestmark = pytest.mark.usefixtures("one_launch_row_sync")

OP = torch.ops.detcompile.rms_norm
EPS = 1e-6


def ref64(x, w, eps=EPS):
    return F.rms_norm(x.double(), (x.shape[-1],), None if w is None else w.double(), eps)


def batch_with_row(target, b, gen, pos=None):
    """A [b, H] batch of fresh random rows with `target` at row `pos` (default: the middle)."""
    x = torch.randn((b,) + tuple(target.shape), generator=gen, dtype=torch.float32) * 3 + 0.5
    x = x.to(device=target.device, dtype=target.dtype)
    pos = b // 2 if pos is None else pos
    x[pos] = target
    return x, pos


def check_invariance(fn, dtype, hidden, max_b, gen, device="cpu", weight=True):
    target = (torch.randn(hidden, generator=gen) * 2 + 0.25).to(device=device, dtype=dtype)
    w = (torch.rand(hidden, generator=gen) + 0.5).to(device=device, dtype=dtype) if weight else None
    first = None
    for b in range(1, max_b + 1):
        x, pos = batch_with_row(target, b, gen)
        row = fn(x, w, EPS)[pos]
        if first is None:
            first = row
        assert torch.equal(row, first), f"row changed at batch size {b} (hidden={hidden}, {dtype})"
    return first


# ---------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [37, 100, 129, 5120])
def test_cpu_batch_invariant(dtype, hidden, gen):
    check_invariance(OP, dtype, hidden, 9, gen)


def test_cpu_batch_invariant_3d_and_position(gen):
    # Leading dims [B, S]: the target token must not change with B, S or its position.
    hidden = 100
    target = torch.randn(hidden, generator=gen)
    w = torch.randn(hidden, generator=gen)
    first = None
    for b, s in [(1, 1), (2, 3), (4, 5), (3, 7)]:
        x = torch.randn(b, s, hidden, generator=gen)
        for i, j in [(0, 0), (b - 1, s - 1), (b // 2, s // 2)]:
            x2 = x.clone()
            x2[i, j] = target
            row = OP(x2, w, EPS)[i, j]
            first = row if first is None else first
            assert torch.equal(row, first)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2), (torch.float64, 1e-12)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_cpu_accuracy(dtype, tol, with_weight, gen):
    x = (torch.randn(7, 129, generator=gen) * 4 + 1).to(dtype)
    w = (torch.randn(129, generator=gen)).to(dtype) if with_weight else None
    out = OP(x, w, EPS)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, ref64(x, w)) < tol


def test_cpu_weight_none_equals_ones(gen):
    x = torch.randn(5, 37, generator=gen)
    assert torch.equal(OP(x, None, EPS), OP(x, torch.ones(37), EPS))


def test_cpu_mixed_weight_dtype(gen):
    # bf16 activations with an fp32 weight: output stays bf16, weight is applied in fp32.
    x = torch.randn(4, 100, generator=gen).bfloat16()
    w = torch.randn(100, generator=gen)
    out = OP(x, w, EPS)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref64(x, w)) < 1e-2


def test_cpu_noncontiguous_input(gen):
    x = torch.randn(37, 6, generator=gen).t()  # [6, 37], non-contiguous
    w = torch.randn(37, generator=gen)
    out = OP(x, w, EPS)
    assert out.is_contiguous()
    assert torch.equal(out, OP(x.contiguous(), w, EPS))


@pytest.mark.parametrize("with_weight", [True, False])
def test_opcheck_cpu(with_weight, gen):
    x = torch.randn(3, 5, 37, generator=gen)
    w = torch.randn(37, generator=gen) if with_weight else None
    torch.library.opcheck(OP.default, (x, w, EPS))


def test_bad_dtype_cpu():
    with pytest.raises(_common.UnsupportedError, match="floating point"):
        OP(torch.ones(2, 8, dtype=torch.int32), None, EPS)


def test_bad_weight_shape_cpu(gen):
    with pytest.raises(ValueError, match="weight"):
        OP(torch.randn(2, 8, generator=gen), torch.randn(7, generator=gen), EPS)


# ------------------------------------------------------------- Triton launcher (interpreter/GPU)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [37, BLOCK + 6])  # one partial chunk; two chunks with a tail
def test_triton_batch_invariant(dtype, hidden, gen):
    check_invariance(triton_rms_norm, dtype, hidden, 5, gen, device=LAUNCH_DEV)


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_triton_accuracy(dtype, tol, with_weight, gen):
    x = (torch.randn(4, BLOCK + 6, generator=gen) * 4 + 1).to(LAUNCH_DEV, dtype)
    w = (torch.randn(BLOCK + 6, generator=gen)).to(LAUNCH_DEV, dtype) if with_weight else None
    out = triton_rms_norm(x, w, EPS)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, ref64(x, w)) < tol


@needs_triton
def test_triton_unaligned_view_matches(gen):
    # A view at a 4-byte offset must give the same bits as an aligned copy of it.
    hidden = 100
    buf = torch.randn(3 * hidden + 1, generator=gen).to(LAUNCH_DEV)
    x = buf[1:].view(3, hidden)
    w = torch.randn(hidden, generator=gen).to(LAUNCH_DEV)
    assert torch.equal(triton_rms_norm(x, w, EPS), triton_rms_norm(x.clone(), w, EPS))


# ----------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("hidden", [37, 4096, 5120, 8192])
def test_gpu_batch_invariant_and_accurate(dtype, tol, hidden):
    g = torch.Generator(device="cuda").manual_seed(7)
    target = (torch.randn(hidden, generator=g, device="cuda") * 2 + 0.25).to(dtype)
    w = (torch.rand(hidden, generator=g, device="cuda") + 0.5).to(dtype)
    first = None
    for b in range(1, 65):
        x = (torch.randn(b, hidden, generator=g, device="cuda") * 3).to(dtype)
        pos = b - 1 - b // 3  # the target moves around as the batch grows
        x[pos] = target
        outs = [OP(x, w, EPS) for _ in range(3)]
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]), "run-to-run change"
        row = outs[0][pos]
        first = row if first is None else first
        assert torch.equal(row, first), f"row changed at batch size {b}"
        if b in (1, 17, 64):
            assert rel_err(outs[0], ref64(x, w)) < tol


@pytest.mark.gpu
def test_gpu_many_rows_and_unaligned():
    g = torch.Generator(device="cuda").manual_seed(3)
    hidden = 4096
    buf = torch.randn(8192 * hidden + 8, generator=g, device="cuda").bfloat16()
    w = torch.randn(hidden, generator=g, device="cuda").bfloat16()
    x_unaligned = buf[1 : 1 + 8192 * hidden].view(8192, hidden)  # 2-byte offset
    out = OP(x_unaligned, w, EPS)
    assert torch.equal(out, OP(x_unaligned.clone(), w, EPS))
    assert torch.equal(out[100:101], OP(x_unaligned[100:101].clone(), w, EPS))
    assert rel_err(out, ref64(x_unaligned, w)) < 1e-2


@pytest.mark.gpu
def test_gpu_opcheck():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 5, 100, generator=g, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(100, generator=g, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(OP.default, (x, w, EPS))
    torch.library.opcheck(OP.default, (x, None, EPS))


@pytest.mark.gpu
def test_gpu_bad_inputs():
    with pytest.raises(_common.UnsupportedError, match="float64"):
        OP(torch.randn(2, 8, device="cuda", dtype=torch.float64), None, EPS)
    with pytest.raises(_common.UnsupportedError, match="floating point"):
        OP(torch.ones(2, 8, device="cuda", dtype=torch.int64), None, EPS)
    with pytest.raises(_common.UnsupportedError, match="weight is on"):
        OP(torch.randn(2, 8, device="cuda"), torch.randn(8), EPS)


# ------------------------------------------- row plan paths (interpreter/GPU, tiny test constants:
# tests/kernels/_util.py small_rows)


@needs_triton
@pytest.mark.parametrize("hidden", SMALL_PATHS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
def test_triton_paths_batch_invariant_and_accurate(small_rows, monkeypatch, hidden, dtype, tol, gen):
    first = check_invariance(triton_rms_norm, dtype, hidden, 4, gen, device=LAUNCH_DEV)
    assert first.shape == (hidden,)
    x = (torch.randn(3, hidden, generator=gen) * 4 + 1).to(LAUNCH_DEV, dtype)
    w = torch.randn(hidden, generator=gen).to(LAUNCH_DEV, dtype)
    for weight in (w, None):
        out = triton_rms_norm(x, weight, EPS)
        assert rel_err(out, ref64(x, weight)) < tol
        monkeypatch.setenv("DETCOMPILE_ROW_SYNC", "0")  # two launches: the same bits
        assert torch.equal(triton_rms_norm(x, weight, EPS), out)
        monkeypatch.setenv("DETCOMPILE_ROW_SYNC", "1")


@needs_triton
def test_triton_many_small_rows_per_program(gen):
    # R = 40: several rows per program (a function of R only); the rows past T are masked.
    hidden = 40
    x = torch.randn(37, hidden, generator=gen).to(LAUNCH_DEV)
    w = torch.randn(hidden, generator=gen).to(LAUNCH_DEV)
    out = triton_rms_norm(x, w, EPS)
    for i in (0, 17, 36):
        assert torch.equal(out[i : i + 1], triton_rms_norm(x[i : i + 1].clone(), w, EPS))
    assert rel_err(out, ref64(x, w)) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [4096, 128256])
def test_gpu_bf16_rows_invariant_and_accurate_wide(hidden):
    # [T, 4096]: one program per row; [T, 128256]: 16 cooperating programs per row.
    g = torch.Generator(device="cuda").manual_seed(hidden)
    target = (torch.randn(hidden, generator=g, device="cuda") * 2 + 0.25).bfloat16()
    w = (torch.rand(hidden, generator=g, device="cuda") + 0.5).bfloat16()
    ref = OP(target[None], w, EPS)[0]
    for b in range(1, 65):
        x = (torch.randn(b, hidden, generator=g, device="cuda") * 3).bfloat16()
        pos = b - 1 - b // 3
        x[pos] = target
        out = OP(x, w, EPS)
        assert torch.equal(out[pos], ref), f"row changed at batch size {b}"
        if b in (1, 17, 64):
            assert torch.equal(OP(x, w, EPS), out), "run-to-run change"
            assert rel_err(out, ref64(x, w)) < 1e-2
            assert rel_err(OP(x.float(), w.float(), EPS), ref64(x.float(), w.float())) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [8193, 16384, 128256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_split_schedules_agree(monkeypatch, hidden, dtype):
    # One launch; one launch with a zero wait (most programs take the timeout fallback and compute
    # the row's statistics themselves); two launches. Same bits.
    from detcompile.kernels import row_kernels as rk

    g = torch.Generator(device="cuda").manual_seed(4)
    x = (torch.randn(37, hidden, generator=g, device="cuda") * 3).to(dtype)
    w = torch.randn(hidden, generator=g, device="cuda").to(dtype)
    for weight in (w, None):
        a = OP(x, weight, EPS)
        monkeypatch.setattr(rk, "ROW_SYNC_TIMEOUT_NS", 0)
        b = OP(x, weight, EPS)
        monkeypatch.undo()
        monkeypatch.setenv("DETCOMPILE_ROW_SYNC", "0")
        c = OP(x, weight, EPS)
        monkeypatch.undo()
        monkeypatch.setenv("DETCOMPILE_ROW_SYNC", "1")
        assert torch.equal(a, b) and torch.equal(a, c)
        assert rel_err(a, ref64(x, weight)) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


# ------------------------------------ split-row schedules: two launches, sync, row_loop (same bits)


@needs_triton
@pytest.mark.parametrize("hidden", SCHEDULE_PATHS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
def test_triton_row_loop_matches_other_schedules(small_rows, monkeypatch, hidden, dtype, tol, gen):
    from detcompile.kernels import row_kernels as rk

    T = 3
    x = (torch.randn(T, hidden, generator=gen) * 4 + 1).to(dtype)
    x[1, hidden // 2:] = 0.0  # zero later segments
    w = torch.randn(hidden, generator=gen).to(dtype)
    warps = 16 if dtype == torch.float16 else None  # ROW_LOOP_NUM_WARPS, or 16 through row_schedule
    for weight in (w, None):
        def fn(x=x):
            return triton_rms_norm(x.to(LAUNCH_DEV), None if weight is None else weight.to(LAUNCH_DEV), EPS).cpu()

        out = check_schedules(run_schedules(monkeypatch, rn, "_rms_norm_rows_kernel", fn, warps), T, hidden, warps)
        assert_close_to(out, ref64(x, weight), tol)
        with rk.row_schedule("row_loop"):  # one row alone: the bits it has in the batch
            assert same_bits(fn(x[1:2].clone()), out[1:2])


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [8193, 16384, 128256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_row_loop_matches_other_schedules(hidden, dtype):
    from detcompile.kernels import row_kernels as rk

    g = torch.Generator(device="cuda").manual_seed(8)
    x = (torch.randn(37, hidden, generator=g, device="cuda") * 3).to(dtype)
    w = torch.randn(hidden, generator=g, device="cuda").to(dtype)
    for weight in (w, None, w.float()):
        with rk.row_schedule("two_launch"):
            ref = OP(x, weight, EPS)
        with rk.row_schedule("sync"):
            assert same_bits(OP(x, weight, EPS), ref)
        for warps in (4, 8, 16):
            with rk.row_schedule("row_loop", row_loop_warps=warps):
                assert same_bits(OP(x, weight, EPS), ref), warps
                assert same_bits(OP(x[5:6].clone(), weight, EPS), ref[5:6])
        assert_close_to(ref, ref64(x, weight), 1e-2 if dtype == torch.bfloat16 else 1e-5)
