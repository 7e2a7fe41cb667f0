"""detcompile::softmax: bitwise batch invariance, right-padding invariance, accuracy, opcheck, errors."""
import pytest
import torch

from detcompile.kernels import _common
from detcompile.kernels import softmax as sm

from ._util import LAUNCH_DEV, check_batch_invariant, needs_triton, rel_err

OP = torch.ops.detcompile.softmax


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
