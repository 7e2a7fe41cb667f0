"""detcompile::group_norm: bitwise batch invariance, accuracy vs float64 aten, opcheck, bad inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

from detcompile.kernels import _common
from detcompile.kernels.group_norm import BLOCK, triton_group_norm

from ._util import LAUNCH_DEV, needs_triton, rel_err

OP = torch.ops.detcompile.group_norm
EPS = 1e-5


def call(fn, x, w, b, group):
    n, c = x.shape[:2]
    return fn(x, w, b, n, c, math.prod(x.shape[2:]), group, EPS)


def check_all(outs, x, w, b, group, tol):
    out, mean, rstd = outs
    f = lambda t: None if t is None else t.double()  # noqa: E731
    ro, rm, rr = call(torch.ops.aten.native_group_norm, x.double(), f(w), f(b), group)
    assert torch.allclose(ro, F.group_norm(x.double(), group, f(w), f(b), EPS))  # sanity of the ref
    # Shapes and dtypes as aten's meta kernel gives them (statistics in x.dtype).
    g = lambda t: None if t is None else t.to("meta")  # noqa: E731
    metas = call(torch.ops.aten.native_group_norm, x.to("meta"), g(w), g(b), group)
    for got, meta in zip(outs, metas):
        assert got.shape == meta.shape and got.dtype == meta.dtype
    assert rel_err(out, ro) < tol
    assert rel_err(mean, rm) < tol and rel_err(rstd, rr) < tol


def make(n, c, spatial, gen, dtype, device="cpu"):
    return (torch.randn((n, c) + tuple(spatial), generator=gen) * 3 + 0.5).to(device=device, dtype=dtype)


def check_invariance(fn, dtype, c, group, spatial, max_n, gen, device="cpu"):
    target = make(1, c, spatial, gen, dtype, device)[0]
    w = (torch.rand(c, generator=gen) + 0.5).to(device=device, dtype=dtype)
    bias = torch.randn(c, generator=gen).to(device=device, dtype=dtype)
    first = None
    for n in range(1, max_n + 1):
        x = make(n, c, spatial, gen, dtype, device)
        pos = n // 2
        x[pos] = target
        out, mean, rstd = call(fn, x, w, bias, group)
        got = (out[pos], mean[pos], rstd[pos])
        first = got if first is None else first
        for g, f, name in zip(got, first, ("out", "mean", "rstd")):
            assert torch.equal(g, f), f"{name} changed at batch size {n} (C={c}, G={group}, {spatial}, {dtype})"


# ---------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "c,group,spatial",
    [(6, 3, (37,)), (12, 4, (5, 5)), (32, 8, (129,)), (64, 32, (2560,)), (10, 5, ())],
    ids=["L74", "L75", "L516", "L5120", "HxW1"],
)
def test_cpu_batch_invariant(dtype, c, group, spatial, gen):
    check_invariance(OP, dtype, c, group, spatial, 9, gen)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2), (torch.float64, 1e-12)])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_cpu_accuracy(dtype, tol, affine, gen):
    x = make(3, 12, (7, 9), gen, dtype)
    w = torch.randn(12, generator=gen).to(dtype) if affine != "none" else None
    b = torch.randn(12, generator=gen).to(dtype) if affine == "both" else None
    check_all(call(OP, x, w, b, 4), x, w, b, 4, tol)


def test_cpu_weight_none_equals_identity_affine(gen):
    x = make(2, 6, (11,), gen, torch.float32)
    plain = call(OP, x, None, None, 2)
    ident = call(OP, x, torch.ones(6), torch.zeros(6), 2)
    for p, i in zip(plain, ident):
        assert torch.equal(p, i)


def test_cpu_channel_mapping(gen):
    # Each channel gets its own weight/bias: compare against normalizing group by group by hand.
    x = make(2, 6, (4, 3), gen, torch.float32)
    w = torch.randn(6, generator=gen)
    b = torch.randn(6, generator=gen)
    out = call(OP, x, w, b, 3)[0]
    norm = call(OP, x, None, None, 3)[0]
    assert torch.equal(out, norm * w.view(1, 6, 1, 1) + b.view(1, 6, 1, 1))


@pytest.mark.parametrize("affine", [True, False])
def test_opcheck_cpu(affine, gen):
    x = make(3, 6, (5, 7), gen, torch.float32)
    w = torch.randn(6, generator=gen) if affine else None
    b = torch.randn(6, generator=gen) if affine else None
    torch.library.opcheck(OP.default, (x, w, b, 3, 6, 35, 2, EPS))
    torch.library.opcheck(OP.default, (x.bfloat16(), None, None, 3, 6, 35, 3, EPS))


def test_bad_inputs_cpu(gen):
    with pytest.raises(_common.UnsupportedError, match="floating point"):
        OP(torch.ones(2, 4, 3, dtype=torch.int32), None, None, 2, 4, 3, 2, EPS)
    x = make(2, 6, (5,), gen, torch.float32)
    with pytest.raises(ValueError, match="divisible"):
        OP(x, None, None, 2, 6, 5, 4, EPS)
    with pytest.raises(ValueError, match="does not match"):
        OP(x, None, None, 2, 6, 4, 3, EPS)
    with pytest.raises(ValueError, match="weight"):
        OP(x, torch.randn(5, generator=gen), None, 2, 6, 5, 3, EPS)


# ------------------------------------------------------------- Triton launcher (interpreter/GPU)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "c,group,spatial",
    [(6, 3, (37,)), (8, 2, (BLOCK // 4 + 1,))],  # one partial chunk; two chunks with a tail
    ids=["L74", "L1028"],
)
def test_triton_batch_invariant(dtype, c, group, spatial, gen):
    check_invariance(triton_group_norm, dtype, c, group, spatial, 5, gen, device=LAUNCH_DEV)


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_triton_accuracy(dtype, tol, affine, gen):
    x = make(2, 8, (17, 31), gen, dtype, LAUNCH_DEV)  # slices of 2 * 527 = 1054 elements
    w = torch.randn(8, generator=gen).to(LAUNCH_DEV, dtype) if affine != "none" else None
    b = torch.randn(8, generator=gen).to(LAUNCH_DEV, dtype) if affine == "both" else None
    check_all(call(triton_group_norm, x, w, b, 4), x, w, b, 4, tol)


@needs_triton
def test_triton_unaligned_and_channel_mapping(gen):
    buf = (torch.randn(3 * 6 * 13 + 1, generator=gen) + 0.5).to(LAUNCH_DEV)
    x = buf[1:].view(3, 6, 13)  # a view at a 4-byte offset
    w = torch.randn(6, generator=gen).to(LAUNCH_DEV)
    b = torch.randn(6, generator=gen).to(LAUNCH_DEV)
    outs = call(triton_group_norm, x, w, b, 3)
    check_all(outs, x, w, b, 3, 1e-5)
    for o, a in zip(outs, call(triton_group_norm, x.clone(), w, b, 3)):
        assert torch.equal(o, a)
    # Closeness, not equality: the GPU may fuse the affine multiply-add into one FMA.
    norm = call(triton_group_norm, x, None, None, 3)[0]
    torch.testing.assert_close(outs[0], norm * w.view(1, 6, 1) + b.view(1, 6, 1), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize(
    "c,group,spatial", [(6, 3, (37,)), (128, 32, (16, 16)), (320, 32, (24, 24))], ids=["L74", "L1024", "L5760"]
)
def test_gpu_batch_invariant_and_accurate(dtype, tol, c, group, spatial):
    g = torch.Generator(device="cuda").manual_seed(13)
    target = (torch.randn((c,) + spatial, generator=g, device="cuda") * 3 + 0.5).to(dtype)
    w = (torch.rand(c, generator=g, device="cuda") + 0.5).to(dtype)
    bias = torch.randn(c, generator=g, device="cuda").to(dtype)
    first = None
    for n in range(1, 65):
        x = (torch.randn((n, c) + spatial, generator=g, device="cuda") * 3 + 0.5).to(dtype)
        pos = n - 1 - n // 3  # the target moves around as the batch grows
        x[pos] = target
        runs = [call(OP, x, w, bias, group) for _ in range(3)]
        for r in runs[1:]:
            assert all(torch.equal(a, c_) for a, c_ in zip(runs[0], r)), "run-to-run change"
        got = tuple(t[pos] for t in runs[0])
        first = got if first is None else first
        assert all(torch.equal(a, c_) for a, c_ in zip(got, first)), f"sample changed at batch size {n}"
        if n in (1, 17, 64):
            check_all(runs[0], x, w, bias, group, tol)


@pytest.mark.gpu
def test_gpu_unaligned():
    g = torch.Generator(device="cuda").manual_seed(2)
    shape = (16, 64, 32, 32)
    numel = math.prod(shape)
    x = torch.randn(numel + 8, generator=g, device="cuda").half()[1 : 1 + numel].view(shape)
    w = torch.randn(64, generator=g, device="cuda").half()
    outs = call(OP, x, w, w.clone(), 32)
    for o, a in zip(outs, call(OP, x.clone(), w, w.clone(), 32)):
        assert torch.equal(o, a)


@pytest.mark.gpu
def test_gpu_opcheck():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 6, 5, 7, generator=g, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(6, generator=g, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(OP.default, (x, w, w.clone(), 3, 6, 35, 2, EPS))
    torch.library.opcheck(OP.default, (x.float(), None, None, 3, 6, 35, 3, EPS))


@pytest.mark.gpu
def test_gpu_bad_inputs():
    with pytest.raises(_common.UnsupportedError, match="float64"):
        OP(torch.randn(2, 4, 3, device="cuda", dtype=torch.float64), None, None, 2, 4, 3, 2, EPS)
    with pytest.raises(_common.UnsupportedError, match="floating point"):
        OP(torch.ones(2, 4, 3, device="cuda", dtype=torch.int64), None, None, 2, 4, 3, 2, EPS)
    with pytest.raises(_common.UnsupportedError, match="weight is on"):
        OP(torch.randn(2, 4, 3, device="cuda"), torch.randn(4), None, 2, 4, 3, 2, EPS)
