"""detcompile::cumsum: batch invariance, padding invariance, aten dtype semantics, accuracy,
opcheck, errors."""
import pytest
import torch

from detcompile.kernels import _common
from detcompile.kernels import cumsum as cs

from ._util import LAUNCH_DEV, check_batch_invariant, needs_triton, rel_err, tol

OP = torch.ops.detcompile.cumsum


# ---------------------------------------------------------------------------------------------
# CPU op
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R", [37, 100, 129])
def test_cpu_batch_invariant_last_dim(gen, dtype, R):
    target = (torch.randn(R, generator=gen) * 3).to(dtype)
    ref = check_batch_invariant(lambda x: OP(x, -1), target, gen, range(1, 10))
    assert rel_err(ref, target.double().cumsum(0)) < tol(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_batch_invariant_other_dims(gen, dtype):
    target = (torch.randn(37, 5, generator=gen) * 3).to(dtype)
    check_batch_invariant(lambda x: OP(x, 1), target, gen, range(1, 10), bdim=0)
    # scan along dim 0 with the batch along dim 1
    target = (torch.randn(100, generator=gen) * 3).to(dtype)
    check_batch_invariant(lambda x: OP(x, 0), target, gen, range(1, 10), bdim=1)


def test_cpu_padding_invariant(gen):
    x = torch.randn(3, 37, generator=gen)
    ref = OP(x, -1)
    for total in (38, 64, 129):
        out = OP(torch.cat([x, torch.randn(3, total - 37, generator=gen)], -1), -1)
        assert torch.equal(out[:, :37], ref)  # a prefix sum never looks ahead


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cpu_accuracy_and_layout(gen, dtype):
    x = torch.randn(4, 33, 6, generator=gen).to(dtype)
    for dim in (0, 1, -1):
        out = OP(x, dim)
        assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
        assert rel_err(out, x.double().cumsum(dim)) < tol(dtype)
    assert torch.equal(OP(torch.tensor(2.5), 0), torch.tensor(2.5))  # 0-d


@pytest.mark.parametrize(
    "xdtype,dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float64),
        (torch.int32, torch.float32),
        (torch.int32, None),
        (torch.bool, None),
        (torch.int64, torch.int32),
    ],
)
def test_cpu_dtype_kwarg(gen, xdtype, dtype):
    x = (torch.randn(3, 50, generator=gen) * 10).to(xdtype)
    out = OP(x, 1, dtype)
    expect = torch.cumsum(x, 1, dtype=dtype)
    assert out.dtype == expect.dtype and out.shape == expect.shape
    if out.dtype.is_floating_point:
        # aten converts the input to dtype= first
        assert rel_err(out, torch.cumsum(x.to(out.dtype).double(), 1)) < tol(out.dtype)
    else:
        assert torch.equal(out, expect)


def test_cpu_sequential_order(gen):
    # The CPU path adds left to right: compare with a Python loop, bitwise.
    x = torch.randn(4, 23, generator=gen)
    acc = torch.zeros(4)
    cols = []
    for j in range(23):
        acc = acc + x[:, j]
        cols.append(acc)
    assert torch.equal(OP(x, 1), torch.stack(cols, 1))


# ---------------------------------------------------------------------------------------------
# Triton launcher (interpreter on CPU, or the GPU)
# ---------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("R", [37, 2100])  # 2100: three chunks with a carry
def test_triton_batch_invariant(gen, dtype, R):
    target = (torch.randn(R, generator=gen) * 3).to(dtype)
    ref = check_batch_invariant(
        lambda x: cs.triton_cumsum(x.to(LAUNCH_DEV), -1).cpu(), target, gen, (1, 2, 3, 5)
    )
    assert rel_err(ref, target.double().cumsum(0)) < tol(dtype)


@needs_triton
def test_triton_padding_and_misaligned_input(gen):
    x = torch.randn(2, 37, generator=gen)
    ref = cs.triton_cumsum(x.to(LAUNCH_DEV), -1).cpu()
    for total in (48, 1030):
        tail = torch.randn(2, total - 37, generator=gen)
        out = cs.triton_cumsum(torch.cat([x, tail], -1).to(LAUNCH_DEV), -1).cpu()
        assert torch.equal(out[:, :37], ref), total
    # A contiguous view whose data pointer is not 16-byte aligned gives the same bits.
    buf = torch.randn(1 + 2 * 37, generator=gen)
    buf[1:].copy_(x.reshape(-1))
    view = buf.to(LAUNCH_DEV)[1:].view(2, 37)
    assert torch.equal(cs.triton_cumsum(view, -1).cpu(), ref)


@needs_triton
def test_triton_semantics(gen):
    x = torch.randn(3, 40, 2, generator=gen)
    out = cs.triton_cumsum(x.to(LAUNCH_DEV), 1).cpu()
    assert out.shape == x.shape and out.is_contiguous()
    assert rel_err(out, x.double().cumsum(1)) < 1e-5
    outh = cs.triton_cumsum(x.half().to(LAUNCH_DEV), 0, torch.float32).cpu()
    assert outh.dtype == torch.float32
    assert rel_err(outh, x.half().double().cumsum(0)) < 1e-5
    xi = torch.randint(0, 5, (3, 7), generator=gen)
    assert torch.equal(cs.triton_cumsum(xi.to(LAUNCH_DEV), 1).cpu(), xi.cumsum(1))


# ---------------------------------------------------------------------------------------------
# opcheck, errors
# ---------------------------------------------------------------------------------------------


def test_opcheck_cpu(gen):
    x = torch.randn(3, 5, 7, generator=gen)
    for args in [(x, -1), (x, 1), (x.bfloat16(), 0, torch.float32), (x, 2, torch.bfloat16)]:
        torch.library.opcheck(OP.default, args)


def test_bad_inputs():
    with pytest.raises(IndexError):
        OP(torch.randn(2, 3), 2)
    with pytest.raises(_common.UnsupportedError, match="complex"):
        OP(torch.randn(2, 3, dtype=torch.complex64), 1)


def test_triton_launcher_refuses_non_launchable(monkeypatch):
    monkeypatch.setattr(_common, "triton_interpret", lambda: False)
    with pytest.raises(_common.UnsupportedError, match="Triton"):
        cs.triton_cumsum(torch.randn(2, 3), 1)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("R", [131, 4096, 32000])
def test_gpu_batch_invariant(dtype, R):
    g = torch.Generator(device="cuda").manual_seed(R)
    target = torch.randn(R, device="cuda", generator=g).to(dtype)
    ref = OP(target[None], -1)[0]
    for b in range(1, 65):
        x = torch.randn(b, R, device="cuda", generator=g).to(dtype)
        pos = (3 * b) // 4
        x[pos] = target
        for _ in range(3):
            assert torch.equal(OP(x, -1)[pos], ref), f"batch {b}"
    assert rel_err(ref, target.double().cumsum(0)) < tol(dtype)


@pytest.mark.gpu
def test_gpu_padding_dims_and_opcheck():
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(4, 77, device="cuda", generator=g)
    ref = OP(x, -1)
    for total in (80, 96, 128, 1025, 2048):
        tail = torch.randn(4, total - 77, device="cuda", generator=g)
        assert torch.equal(OP(torch.cat([x, tail], -1), -1)[:, :77], ref), total
    y = torch.randn(8, 300, 16, device="cuda", generator=g).bfloat16()
    for b in (2, 5, 8):  # the first and the last row of each batch keep their bits
        out = OP(y[:b], 1)
        assert torch.equal(out[:1], OP(y[:1], 1)) and torch.equal(out[b - 1 :], OP(y[b - 1 : b], 1)), b
    torch.library.opcheck(OP.default, (y, 1))
    torch.library.opcheck(OP.default, (y, 0, torch.float32))
    with pytest.raises(_common.UnsupportedError, match="float64"):
        OP(x.double(), 1)
