"""detcompile::softmax: bitwise batch invariance, right-padding invariance, accuracy, opcheck, errors."""
import pytest
import torch

from detcompile.kernels import _common
from detcompile.kernels import softmax as sm

from .._subset import cpu_subset
from ._util import SMALL_PATHS, LAUNCH_DEV, check_batch_invariant, needs_triton, rel_err
from ._util import SCHEDULE_PATHS, assert_close_to, check_schedules, run_schedules, same_bits
from ._util import one_launch_row_sync, small_rows  # noqa: F401 (fixtures used by name)

OP = torch.ops.detcompile.softmax
# The Triton interpreter evaluates masked -inf lanes with numpy, which warns (-inf - -inf, log(0)).
pytestmark = [
    pytest.mark.usefixtures("one_launch_row_sync"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]


def ref_softmax(x, dim, log):
    x = x.double()
    return torch.log_softmax(x, dim) if log else torch.softmax(x, dim)


# ---------------------------------------------------------------------------------------------
# CPU op
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R", [37, 100, 129])
@pytest.mark.parametrize("log", [False, True])
def test_cpu_batch_invariant_last_dim(gen, dtype, R, log):
    target = (torch.randn(R, generator=gen) * 3).to(dtype)
    ref = check_batch_invariant(lambda x: OP(x, -1, False, log), target, gen, range(1, 10))
    assert rel_err(ref, ref_softmax(target, -1, log)) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("log", [False, True])
def test_cpu_batch_invariant_middle_dim(gen, dtype, log):
    # softmax over dim 1 of [B, 37, 5]: the softmax dim is not the innermost one.
    target = (torch.randn(37, 5, generator=gen) * 3).to(dtype)
    check_batch_invariant(lambda x: OP(x, 1, False, log), target, gen, range(1, 10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("log", [False, True])
def test_cpu_right_padding_invariant(gen, dtype, log):
    real = 37
    x = (torch.randn(3, real, generator=gen) * 3).to(dtype)
    ref = OP(x, -1, False, log)
    for total in (38, 64, 100, 129):
        pad = torch.full((3, total - real), float("-inf"), dtype=dtype)
        out = OP(torch.cat([x, pad], -1), -1, False, log)
        assert torch.equal(out[:, :real], ref), f"padding to {total} changed the real part"
        fill = float("-inf") if log else 0.0
        assert torch.equal(out[:, real:], torch.full_like(out[:, real:], fill))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("log", [False, True])
def test_cpu_accuracy(gen, dtype, log):
    x = (torch.randn(6, 7, 129, generator=gen) * 4).to(dtype)
    for dim in (-1, 1, 0):
        out = OP(x, dim, False, log)
        assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
        tol = 1e-2 if dtype in _common.HALF_DTYPES else 1e-5
        assert rel_err(out, ref_softmax(x, dim, log)) < tol


def test_cpu_half_to_float(gen):
    x = torch.randn(4, 50, generator=gen).to(torch.bfloat16)
    out = OP(x, -1, True, False)
    assert out.dtype == torch.float32
    assert rel_err(out, ref_softmax(x, -1, False)) < 1e-6  # fp32 output: no bf16 rounding
    # fp32 input with half_to_float stays fp32
    assert OP(x.float(), -1, True, True).dtype == torch.float32


def test_cpu_special_values():
    x = torch.tensor([[float("-inf")] * 4, [0.0, float("-inf"), 1.0, float("-inf")]])
    out = OP(x, -1, False, False)
    ref = torch.softmax(x, -1)
    assert torch.isnan(out[0]).all() and torch.isnan(ref[0]).all()  # fully masked row: NaN like torch
    assert torch.allclose(out[1], ref[1])
    assert torch.equal(OP(torch.tensor(2.0), 0, False, False), torch.tensor(1.0))  # 0-d input


def test_cpu_output_is_fresh(gen):
    x = torch.randn(1, 1, generator=gen)
    out = OP(x, -1, False, True)
    assert out.data_ptr() != x.data_ptr()


# ---------------------------------------------------------------------------------------------
# Triton launcher (interpreter on CPU, or the GPU)
# ---------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("R", [37, 1100])  # 1100 > BLOCK: two chunks
@pytest.mark.parametrize("log", [False, True])
def test_triton_batch_invariant(gen, dtype, R, log):
    target = (torch.randn(R, generator=gen) * 3).to(dtype)

    def fn(x):
        return sm.triton_softmax(x.to(LAUNCH_DEV), -1, False, log).cpu()

    ref = check_batch_invariant(fn, target, gen, (1, 2, 3, 5))
    tol = 1e-2 if dtype == torch.float16 else 1e-5
    assert rel_err(ref, ref_softmax(target, -1, log)) < tol


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("log", [False, True])
def test_triton_right_padding_invariant(gen, dtype, log):
    real = 37
    x = (torch.randn(2, real, generator=gen) * 3).to(dtype)
    ref = sm.triton_softmax(x.to(LAUNCH_DEV), -1, False, log).cpu()
    for total in (48, 64, 1030):  # multiples of 16 (other specialisation) and a second chunk
        pad = torch.full((2, total - real), float("-inf"), dtype=dtype)
        out = sm.triton_softmax(torch.cat([x, pad], -1).to(LAUNCH_DEV), -1, False, log).cpu()
        assert torch.equal(out[:, :real], ref), f"padding to {total} changed the real part"


@needs_triton
@pytest.mark.parametrize("log", [False, True])
def test_triton_accuracy_and_layout(gen, log):
    x = torch.randn(3, 40, 2, generator=gen) * 4
    out = sm.triton_softmax(x.to(LAUNCH_DEV), 1, False, log).cpu()
    assert out.shape == x.shape and out.is_contiguous()
    assert rel_err(out, ref_softmax(x, 1, log)) < 1e-5
    xh = x.to(torch.float16)
    outh = sm.triton_softmax(xh.to(LAUNCH_DEV), -1, True, log).cpu()
    assert outh.dtype == torch.float32
    assert rel_err(outh, ref_softmax(xh, -1, log)) < 1e-5


# ---------------------------------------------------------------------------------------------
# opcheck, errors
# ---------------------------------------------------------------------------------------------


def test_opcheck_cpu(gen):
    x = torch.randn(3, 5, 7, generator=gen)
    for args in [(x, -1, False, False), (x, 1, False, True), (x.bfloat16(), 0, False, False)]:
        torch.library.opcheck(OP.default, args)


def test_bad_dtype():
    with pytest.raises(_common.UnsupportedError, match="floating"):
        OP(torch.arange(6).reshape(2, 3), -1, False, False)
    with pytest.raises(IndexError):
        OP(torch.randn(2, 3), 2, False, False)


def test_triton_launcher_refuses_non_launchable(monkeypatch):
    # Without CUDA and without the interpreter the Triton path cannot run: clear error, no crash.
    monkeypatch.setattr(_common, "triton_interpret", lambda: False)
    with pytest.raises(_common.UnsupportedError, match="Triton"):
        sm.triton_softmax(torch.randn(2, 3), -1)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("R", [131, 4096, 32000])
@pytest.mark.parametrize("log", [False, True])
def test_gpu_batch_invariant(dtype, R, log):
    g = torch.Generator(device="cuda").manual_seed(R)
    target = (torch.randn(R, device="cuda", generator=g) * 3).to(dtype)
    ref = OP(target[None], -1, False, log)[0]
    for b in range(1, 65):
        x = (torch.randn(b, R, device="cuda", generator=g) * 3).to(dtype)
        pos = (3 * b) // 4
        x[pos] = target
        for _ in range(3):
            out = OP(x, -1, False, log)
            assert torch.equal(out[pos], ref), f"batch {b}"
    tol = 1e-2 if dtype in _common.HALF_DTYPES else 1e-5
    assert rel_err(ref, ref_softmax(target, -1, log)) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_attention_shaped_padding_invariant(dtype):
    # [batch, heads, q, k] scores, right padded with -inf along k; different k lengths, odd and
    # multiples of 16, must leave the real part of each row unchanged.
    g = torch.Generator(device="cuda").manual_seed(0)
    real = 77
    x = (torch.randn(2, 8, 5, real, device="cuda", generator=g) * 3).to(dtype)
    ref = OP(x, -1, False, False)
    for total in (80, 96, 128, 1025, 2048):
        pad = torch.full((2, 8, 5, total - real), float("-inf"), device="cuda", dtype=dtype)
        out = OP(torch.cat([x, pad], -1), -1, False, False)
        assert torch.equal(out[..., :real], ref), total


@pytest.mark.gpu
def test_gpu_opcheck_and_errors():
    x = torch.randn(3, 5, 7, device="cuda")
    torch.library.opcheck(OP.default, (x, 1, False, False))
    torch.library.opcheck(OP.default, (x.half(), -1, True, True))
    with pytest.raises(_common.UnsupportedError, match="float64"):
        OP(x.double(), -1, False, False)
    # bf16 path agrees with the float64 reference
    xb = x.bfloat16()
    assert rel_err(OP(xb, -1, True, False).cpu(), ref_softmax(xb.cpu(), -1, False)) < 1e-5


# ---------------------------------------------------------------------------------------------
# Row plan: one-program rows, split rows (one launch or two), the chunk-loop kernel, reached at small
# row lengths through the tiny test-only constants of tests/kernels/_util.py (small_rows).
# ---------------------------------------------------------------------------------------------


def _sm(x, log, sync=True, monkeypatch=None):
    if not sync:
        monkeypatch.setenv("DETCOMPILE_ROW_SYNC", "0")
    try:
        return sm.triton_softmax(x.to(LAUNCH_DEV), -1, False, log).cpu()
    finally:
        if not sync:
            monkeypatch.setenv("DETCOMPILE_ROW_SYNC", "1")


@needs_triton
@pytest.mark.parametrize("R", SMALL_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("log", [False, True])
def test_triton_paths_batch_invariant_and_accurate(small_rows, monkeypatch, gen, R, dtype, log):
    target = (torch.randn(R, generator=gen) * 3).to(dtype)
    ref = check_batch_invariant(lambda x: _sm(x, log), target, gen, (1, 3, 6))
    tol = 1e-2 if dtype == torch.float16 else 1e-5
    assert rel_err(ref, ref_softmax(target, -1, log)) < tol
    # Split rows: one launch (programs exchange statistics; in the interpreter most of them time
    # out and compute the row's statistics themselves) and two launches give the same bits.
    x = (torch.randn(3, R, generator=gen) * 3).to(dtype)
    assert torch.equal(_sm(x, log), _sm(x, log, sync=False, monkeypatch=monkeypatch))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("real", cpu_subset([5, 20, 40], keep=[20]))
def test_triton_right_padding_across_paths(small_rows, gen, dtype, log, real):
    # -inf right padding leaves the real part's bits unchanged, also when the padded length moves
    # the row from one program to a split row, and across the segment boundaries of a split row.
    x = (torch.randn(3, real, generator=gen) * 3).to(dtype)
    x[1, real // 2:] = float("-inf")  # a row whose later segments are all -inf already
    ref = _sm(x, log)
    for total in (real + 1, 32, 33, 65, 200):
        if total <= real:
            continue
        pad = torch.full((3, total - real), float("-inf"), dtype=dtype)
        out = _sm(torch.cat([x, pad], -1), log)
        assert torch.equal(out[:, :real], ref), f"padding {real} -> {total} changed the real part"


@needs_triton
@pytest.mark.parametrize("R", [7, 40, 100])
def test_triton_paths_special_values(small_rows, R):
    x = torch.randn(4, R)
    x[0] = float("-inf")  # fully masked row: NaN, like torch
    x[1, 3] = float("nan")
    x[2, :] = 0.0
    x[3, R - 1] = float("inf")
    for log in (False, True):
        out = _sm(x, log)
        ref = torch.log_softmax(x.double(), -1) if log else torch.softmax(x.double(), -1)
        assert torch.isnan(out[0]).all() and torch.isnan(out[1]).all() and torch.isnan(out[3]).all()
        assert torch.isnan(ref[0]).all() and torch.isnan(ref[1]).all() and torch.isnan(ref[3]).all()
        assert rel_err(out[2], ref[2]) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("R", [4096, 128256])
@pytest.mark.parametrize("log", [False, True])
def test_gpu_bf16_rows_invariant_and_accurate(R, log):
    # [T, 4096] (one program per row) and [T, 128256] (16 cooperating programs per row).
    g = torch.Generator(device="cuda").manual_seed(R + int(log))
    target = (torch.randn(R, device="cuda", generator=g) * 3).bfloat16()
    ref = OP(target[None], -1, False, log)[0]
    for b in range(1, 65):
        x = (torch.randn(b, R, device="cuda", generator=g) * 3).bfloat16()
        pos = (3 * b) // 4
        x[pos] = target
        out = OP(x, -1, False, log)
        assert torch.equal(out[pos], ref), f"batch {b}"
        if b in (1, 17, 64):
            assert torch.equal(OP(x, -1, False, log), out), "run-to-run change"
            assert rel_err(out, ref_softmax(x, -1, log)) < 1e-2
            assert rel_err(OP(x, -1, True, log), ref_softmax(x, -1, log)) < 1e-5  # fp32 output


@pytest.mark.gpu
@pytest.mark.parametrize("R", [8193, 32000, 128256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_split_schedules_agree(monkeypatch, R, dtype):
    # One launch of cooperating programs; the same with a zero wait, so that most programs compute
    # their row's statistics themselves (the timeout fallback); two launches. Same bits.
    from detcompile.kernels import row_kernels as rk

    g = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(37, R, device="cuda", generator=g) * 3).to(dtype)
    for log in (False, True):
        a = OP(x, -1, False, log)
        monkeypatch.setattr(rk, "ROW_SYNC_TIMEOUT_NS", 0)
        b = OP(x, -1, False, log)
        monkeypatch.undo()
        monkeypatch.setenv("DETCOMPILE_ROW_SYNC", "0")
        c = OP(x, -1, False, log)
        monkeypatch.undo()
        monkeypatch.setenv("DETCOMPILE_ROW_SYNC", "1")
        assert torch.equal(a, b) and torch.equal(a, c)
        assert rel_err(a, ref_softmax(x, -1, log)) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_padding_across_split(dtype):
    # Right padding with -inf from a one-program row (R <= 8192) to split rows, and from a split
    # row to more segments: the real part keeps its bits.
    g = torch.Generator(device="cuda").manual_seed(2)
    for real, totals in ((3000, (4096, 8192, 8193, 16384, 20000, 128256)), (9000, (9001, 16385, 40000))):
        x = (torch.randn(2, 3, real, device="cuda", generator=g) * 3).to(dtype)
        for log in (False, True):
            ref = OP(x, -1, False, log)
            for total in totals:
                pad = torch.full((2, 3, total - real), float("-inf"), device="cuda", dtype=dtype)
                out = OP(torch.cat([x, pad], -1), -1, False, log)
                assert torch.equal(out[..., :real], ref), (real, total, log)


# ---------------------------------------------------------------------------------------------
# Split-row schedules: two launches, one launch of cooperating programs (sync), one program per row
# (row_loop) give the same bits (row_kernels.choose_schedule).
# ---------------------------------------------------------------------------------------------


@needs_triton
def test_triton_sync_spin_wait_path(small_rows, monkeypatch, gen):
    # Without tl.atomic_poll (Triton 3.6, the GPU machine's) the one-launch schedule waits in a
    # bounded loop of acquire loads. The interpreter runs programs one at a time, so the loop
    # gives up at once and each program computes its row's statistics itself: the bits of two
    # launches. (A wait that wrongly reported success would read an unfilled workspace.)
    from detcompile.kernels import row_kernels as rk

    monkeypatch.setattr(rk, "HAS_ATOMIC_POLL", False)
    monkeypatch.setattr(rk, "_HAS_ATOMIC_POLL_C", _common.tl.constexpr(False))
    x = torch.randn(3, 129, generator=gen)  # 5 segments under small_rows
    outs = {}
    for name in ("sync", "two_launch"):
        with rk.row_schedule(name):
            outs[name] = sm.triton_softmax(x.to(LAUNCH_DEV), -1, False, True).cpu()
    assert same_bits(outs["sync"], outs["two_launch"])
    assert_close_to(outs["sync"], ref_softmax(x, -1, True), 1e-5)


@needs_triton
@pytest.mark.parametrize("R", SCHEDULE_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_row_loop_matches_other_schedules(small_rows, monkeypatch, gen, R, dtype):
    from detcompile.kernels import row_kernels as rk

    T = 4
    x = (torch.randn(T, R, generator=gen) * 3).to(dtype)
    x[0, ::7] = float("-inf")  # scattered -inf
    x[1, R // 2:] = float("-inf")  # later segments all -inf
    x[2, : R // 3] = float("-inf")  # leading -inf (the whole first segment for R = 96, 129)
    x[3] = float("-inf")  # a fully masked row: NaN in every schedule
    warps = 16 if dtype == torch.float16 else None  # ROW_LOOP_NUM_WARPS, or 16 through row_schedule
    tol = 1e-2 if dtype == torch.float16 else 1e-5
    for log, half_to_float in ((False, False), (True, dtype == torch.float16)):
        def fn(x=x):
            return sm.triton_softmax(x.to(LAUNCH_DEV), -1, half_to_float, log).cpu()

        out = check_schedules(run_schedules(monkeypatch, sm, "_softmax_rows_kernel", fn, warps), T, R, warps)
        assert out.dtype == (torch.float32 if half_to_float else dtype)
        assert torch.isnan(out[3]).all()
        assert_close_to(out[:3], ref_softmax(x[:3], -1, log), 1e-5 if half_to_float else tol)
        with rk.row_schedule("row_loop"):  # one row alone: the bits it has in the batch
            assert same_bits(fn(x[2:3].clone()), out[2:3])


@pytest.mark.gpu
@pytest.mark.parametrize("R", [8193, 32000, 128256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_row_loop_matches_other_schedules(R, dtype):
    from detcompile.kernels import row_kernels as rk

    g = torch.Generator(device="cuda").manual_seed(5)
    x = (torch.randn(37, R, device="cuda", generator=g) * 3).to(dtype)
    x[1, R // 2:] = float("-inf")
    x[2, ::5] = float("-inf")
    x[3, :8192] = float("-inf")  # a whole segment
    for log in (False, True):
        for half_to_float in (False, dtype == torch.bfloat16):
            with rk.row_schedule("two_launch"):
                ref = OP(x, -1, half_to_float, log)
            with rk.row_schedule("sync"):
                assert same_bits(OP(x, -1, half_to_float, log), ref)
            for warps in (4, 8, 16):
                with rk.row_schedule("row_loop", row_loop_warps=warps):
                    assert same_bits(OP(x, -1, half_to_float, log), ref), (log, warps)
                    assert same_bits(OP(x[5:6].clone(), -1, half_to_float, log), ref[5:6])
            tol = 1e-2 if dtype == torch.bfloat16 and not half_to_float else 1e-5
            assert_close_to(ref, ref_softmax(x, -1, log), tol)
