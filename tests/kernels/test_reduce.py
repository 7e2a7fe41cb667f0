"""detcompile::reduce and detcompile::var_mean: batch invariance, padding invariance, aten
dtype/shape semantics, accuracy, opcheck, errors."""
import pytest
import torch

from detcompile.kernels import _common
from detcompile.kernels import reduce as rd

from ._util import LAUNCH_DEV, check_batch_invariant, needs_triton, tol

OP = torch.ops.detcompile.reduce
VM = torch.ops.detcompile.var_mean
KINDS = ["sum", "mean", "amax", "amin", "logsumexp"]


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    n = ref.norm()
    return ((out - ref).norm() / (n if n > 0 else 1)).item()


def aten_ref(x, dim, keepdim, kind, dtype=None):
    """The corresponding aten op (on whatever x is: float64 for references)."""
    a = torch.ops.aten
    if kind == "sum":
        return a.sum.dim_IntList(x, dim, keepdim, dtype=dtype)
    if kind == "mean":
        return a.mean.dim(x, dim, keepdim, dtype=dtype)
    if kind == "amax":
        return a.amax(x, dim or [], keepdim)
    if kind == "amin":
        return a.amin(x, dim or [], keepdim)
    return a.logsumexp(x, dim if dim else list(range(x.dim())), keepdim)


# Layouts: (shape of one batch element, reduced dims of the batched tensor, batch dim)
LAYOUTS = {
    "last": ((129,), [-1], 0),
    "middle": ((37, 5), [1], 0),
    "multi": ((13, 11), [1, 2], 0),
    "first": ((100,), [0], 1),  # reduce dim 0, batch along dim 1
}


# ---------------------------------------------------------------------------------------------
# CPU op
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cpu_batch_invariant(gen, dtype, kind, layout):
    shape, dims, bdim = LAYOUTS[layout]
    target = (torch.randn(shape, generator=gen) * 3).to(dtype)
    # The output's dim 0 indexes the batch in every layout (a leading reduced dim is dropped).
    ref = check_batch_invariant(lambda x: OP(x, dims, False, kind), target, gen, range(1, 10), bdim, out_dim=0)
    expect = aten_ref(target.double().unsqueeze(bdim), dims, False, kind).select(0, 0)
    assert rel_err(ref, expect) < tol(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["last", "multi", "first"])
def test_cpu_var_mean_batch_invariant(gen, dtype, layout):
    shape, dims, bdim = LAYOUTS[layout]
    target = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype)
    for i in range(2):  # check var and mean
        ref = check_batch_invariant(
            lambda x: VM(x, dims, 1.0, False)[i], target, gen, range(1, 10), bdim, out_dim=0
        )
        expect = torch.var_mean(target.double().unsqueeze(bdim), dims, correction=1)[i].select(0, 0)
        assert rel_err(ref, expect) < tol(dtype)


@pytest.mark.parametrize("kind", ["sum", "amax", "logsumexp"])
def test_cpu_padding_invariant(gen, kind):
    # sum ignores trailing zeros, amax / logsumexp ignore trailing -inf: same bits.
    fill = 0.0 if kind == "sum" else float("-inf")
    x = torch.randn(3, 37, generator=gen) * 3
    ref = OP(x, [-1], False, kind)
    for total in (38, 64, 129):
        pad = torch.full((3, total - 37), fill)
        assert torch.equal(OP(torch.cat([x, pad], -1), [-1], False, kind), ref), total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim", [None, [], [0], [-1], [0, 2], [2, 1, 0]])
@pytest.mark.parametrize("keepdim", [False, True])
def test_cpu_accuracy_and_semantics(gen, dtype, kind, dim, keepdim):
    x = (torch.randn(4, 9, 33, generator=gen) * 2).to(dtype)
    out = OP(x, dim, keepdim, kind)
    expect = aten_ref(x, dim, keepdim, kind)  # dtype and shape must match aten's
    assert out.dtype == expect.dtype and out.shape == expect.shape
    assert rel_err(out, aten_ref(x.double(), dim, keepdim, kind)) < tol(dtype)


@pytest.mark.parametrize(
    "xdtype,dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.float64),
        (torch.float32, torch.float64),
        (torch.int32, torch.float32),
        (torch.int64, torch.int32),
    ],
)
@pytest.mark.parametrize("kind", ["sum", "mean"])
def test_cpu_dtype_kwarg(gen, xdtype, dtype, kind):
    if kind == "mean" and not dtype.is_floating_point:
        pytest.skip("aten mean needs a floating dtype")
    x = (torch.randn(5, 77, generator=gen) * 10).to(xdtype)
    out = OP(x, [1], False, kind, dtype)
    expect = aten_ref(x, [1], False, kind, dtype)
    assert out.dtype == expect.dtype == dtype and out.shape == expect.shape
    if dtype.is_floating_point:
        # aten converts the input to dtype= first; compare with that, computed in float64.
        ref = aten_ref(x.to(dtype).double(), [1], False, kind)
        assert rel_err(out, ref) < tol(dtype)
    else:
        assert torch.equal(out, expect)


def test_cpu_integer_inputs(gen):
    x = torch.randint(-50, 50, (4, 7), generator=gen, dtype=torch.int32)
    for kind in ("sum", "amax", "amin"):
        out, expect = OP(x, [1], False, kind), aten_ref(x, [1], False, kind)
        assert out.dtype == expect.dtype and torch.equal(out, expect)
    out = OP(x > 0, None, False, "sum")
    assert out.dtype == torch.int64 and torch.equal(out, (x > 0).sum())
    lse = OP(x, [1], True, "logsumexp")
    assert lse.dtype == torch.get_default_dtype()
    assert rel_err(lse, torch.logsumexp(x.double(), 1, True)) < 1e-5
    with pytest.raises(RuntimeError, match="mean"):
        OP(x, [1], False, "mean")


def test_cpu_special_values():
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[-inf, -inf, -inf], [1.0, inf, 2.0], [1.0, nan, 2.0]])
    lse = OP(x, [1], False, "logsumexp")
    assert torch.equal(lse[:2], torch.tensor([-inf, inf])) and torch.isnan(lse[2])
    assert torch.isnan(OP(x, [1], False, "amax")[2]) and torch.isnan(OP(x, [1], False, "amin")[2])
    assert torch.isnan(OP(torch.empty(2, 0), [1], False, "mean")).all()
    assert torch.equal(OP(torch.empty(2, 0), [1], False, "sum"), torch.zeros(2))
    s = OP(torch.tensor(3.0), [0], True, "sum")  # 0-d input, dim 0
    assert s.shape == () and s.item() == 3.0


def test_cpu_var_mean_semantics(gen):
    x = torch.randn(4, 9, 33, generator=gen, dtype=torch.float64)
    for dim in (None, [1], [0, -1]):
        for corr in (0.0, 1.0, 2.5):
            for keepdim in (False, True):
                v, m = VM(x, dim, corr, keepdim)
                ev, em = torch.var_mean(x, dim, correction=corr, keepdim=keepdim)
                assert v.shape == ev.shape and m.shape == em.shape and v.dtype == ev.dtype
                assert rel_err(v, ev) < 1e-12 and rel_err(m, em) < 1e-12
    v, m = VM(torch.randn(3, 1, generator=gen), [1], 1.0, False)  # n - correction = 0
    assert torch.isnan(v).all() or torch.isinf(v).all()
    # large mean, small spread: the two-pass variance keeps its accuracy
    y = torch.randn(2, 500, generator=gen) + 1000.0
    v, _ = VM(y, [1], 1.0, False)
    assert rel_err(v, torch.var(y.double(), 1)) < 1e-4


# ---------------------------------------------------------------------------------------------
# Triton launcher (interpreter on CPU, or the GPU)
# ---------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("R", [37, 1100])
def test_triton_batch_invariant(gen, dtype, kind, R):
    target = (torch.randn(R, generator=gen) * 3).to(dtype)

    def fn(x):
        return rd.triton_reduce(x.to(LAUNCH_DEV), [-1], False, kind).cpu()

    ref = check_batch_invariant(fn, target, gen, (1, 2, 3, 5), 0)
    expect = aten_ref(target.double(), [-1], False, kind)
    assert rel_err(ref, expect) < tol(dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_var_mean_batch_invariant(gen, dtype):
    target = (torch.randn(1100, generator=gen) * 3 + 2).to(dtype)
    for i in range(2):
        ref = check_batch_invariant(
            lambda x: rd.triton_var_mean(x.to(LAUNCH_DEV), [-1], 1.0, False)[i].cpu(),
            target, gen, (1, 2, 4), 0,
        )
        assert rel_err(ref, torch.var_mean(target.double(), correction=1)[i]) < tol(dtype)


@needs_triton
@pytest.mark.parametrize("kind", ["sum", "amax", "logsumexp"])
def test_triton_padding_invariant(gen, kind):
    fill = 0.0 if kind == "sum" else float("-inf")
    x = torch.randn(2, 37, generator=gen) * 3
    ref = rd.triton_reduce(x.to(LAUNCH_DEV), [-1], False, kind).cpu()
    for total in (48, 64, 1030):
        pad = torch.full((2, total - 37), fill)
        out = rd.triton_reduce(torch.cat([x, pad], -1).to(LAUNCH_DEV), [-1], False, kind).cpu()
        assert torch.equal(out, ref), total


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
def test_triton_semantics(gen, kind):
    x = torch.randn(3, 6, 5, generator=gen) * 2
    for dim, keepdim in (([1], True), ([0, 2], False), (None, False)):
        out = rd.triton_reduce(x.to(LAUNCH_DEV), dim, keepdim, kind).cpu()
        expect = aten_ref(x.double(), dim, keepdim, kind)
        assert out.shape == expect.shape and out.dtype == torch.float32
        assert rel_err(out, expect) < 1e-5
    if kind in ("sum", "mean"):
        out = rd.triton_reduce(x.half().to(LAUNCH_DEV), [1], False, kind, torch.float32).cpu()
        assert out.dtype == torch.float32
        assert rel_err(out, aten_ref(x.half().double(), [1], False, kind)) < 1e-5
        out = rd.triton_reduce(x.to(LAUNCH_DEV), [1], False, kind, torch.float64).cpu()  # fp64 acc
        assert out.dtype == torch.float64
        assert rel_err(out, aten_ref(x.double(), [1], False, kind)) < 1e-12
    v, m = rd.triton_var_mean(x.to(LAUNCH_DEV), [0, 2], 0.0, True)
    ev, em = torch.var_mean(x.double(), [0, 2], correction=0, keepdim=True)
    assert v.shape == ev.shape and rel_err(v.cpu(), ev) < 1e-5 and rel_err(m.cpu(), em) < 1e-5


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in the interpreter: log(0), NaN max
def test_triton_special_values():
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[-inf, -inf, -inf], [1.0, inf, 2.0], [1.0, nan, 2.0]]).to(LAUNCH_DEV)
    lse = rd.triton_reduce(x, [1], False, "logsumexp").cpu()
    assert torch.equal(lse[:2], torch.tensor([-inf, inf])) and torch.isnan(lse[2])
    assert torch.isnan(rd.triton_reduce(x, [1], False, "amax")[2])
    assert torch.isnan(rd.triton_reduce(x, [1], False, "amin")[2])


# ---------------------------------------------------------------------------------------------
# opcheck, errors
# ---------------------------------------------------------------------------------------------


def test_opcheck_cpu(gen):
    x = torch.randn(3, 5, 7, generator=gen)
    for args in [
        (x, [1], False, "sum"),
        (x, None, True, "mean"),
        (x, [], False, "amax"),
        (x, [0, -1], True, "amin"),
        (x, [2], False, "logsumexp"),
        (x.bfloat16(), [1], False, "sum", torch.float32),
    ]:
        torch.library.opcheck(OP.default, args)
    torch.library.opcheck(VM.default, (x, [1, 2], 1.0, False))
    torch.library.opcheck(VM.default, (x, None, 0.0, True))


def test_bad_inputs():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="kind"):
        OP(x, [1], False, "median")
    with pytest.raises(RuntimeError, match="multiple times"):
        OP(x, [1, -1], False, "sum")
    with pytest.raises(IndexError):
        OP(x, [2], False, "sum")
    with pytest.raises(IndexError, match="non-zero size"):
        OP(torch.empty(2, 0), [1], False, "amax")
    with pytest.raises(_common.UnsupportedError, match="complex"):
        OP(torch.randn(2, 3, dtype=torch.complex64), [1], False, "sum")
    with pytest.raises(RuntimeError, match="floating"):
        VM(torch.arange(6).reshape(2, 3), [1], 1.0, False)


def test_triton_launcher_refuses_non_launchable(monkeypatch):
    monkeypatch.setattr(_common, "triton_interpret", lambda: False)
    with pytest.raises(_common.UnsupportedError, match="Triton"):
        rd.triton_reduce(torch.randn(2, 3), [1], False, "sum")
    with pytest.raises(_common.UnsupportedError, match="Triton"):
        rd.triton_var_mean(torch.randn(2, 3), [1], 1.0, False)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", KINDS + ["var", "mean_of_var_mean"])
@pytest.mark.parametrize("R", [131, 4096, 32000])
def test_gpu_batch_invariant(dtype, kind, R):
    g = torch.Generator(device="cuda").manual_seed(R)
    target = (torch.randn(R, device="cuda", generator=g) * 3).to(dtype)

    def fn(x):
        if kind == "var":
            return VM(x, [-1], 1.0, False)[0]
        if kind == "mean_of_var_mean":
            return VM(x, [-1], 1.0, False)[1]
        return OP(x, [-1], False, kind)

    ref = fn(target[None])[0]
    for b in range(1, 65):
        x = (torch.randn(b, R, device="cuda", generator=g) * 3).to(dtype)
        pos = (3 * b) // 4
        x[pos] = target
        for _ in range(3):
            assert torch.equal(fn(x)[pos], ref), f"batch {b}"
    t64 = target.double()
    expect = {
        "var": lambda: t64.var(),
        "mean_of_var_mean": lambda: t64.mean(),
    }.get(kind, lambda: aten_ref(t64, [-1], False, kind))()
    assert rel_err(ref, expect) < tol(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_non_last_and_multi_dims(dtype):
    # [B, 64, 4096] reduced over dim 1 and over (1, 2); rows per batch element must not move.
    g = torch.Generator(device="cuda").manual_seed(1)
    target = (torch.randn(64, 4096, device="cuda", generator=g)).to(dtype)
    for dims in ([1], [1, 2]):
        for kind in KINDS:
            ref = OP(target[None], dims, True, kind)[0]
            for b in (1, 2, 7, 33, 64):
                x = torch.randn(b, 64, 4096, device="cuda", generator=g).to(dtype)
                x[b - 1] = target
                assert torch.equal(OP(x, dims, True, kind)[b - 1], ref), (dims, kind, b)
            expect = aten_ref(target.double()[None], dims, True, kind)[0]
            assert rel_err(ref, expect) < tol(dtype)


@pytest.mark.gpu
def test_gpu_padding_invariant():
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(4, 77, device="cuda", generator=g)
    for kind, fill in (("sum", 0.0), ("amax", float("-inf")), ("logsumexp", float("-inf"))):
        ref = OP(x, [-1], False, kind)
        for total in (80, 96, 128, 1025, 2048):
            pad = torch.full((4, total - 77), fill, device="cuda")
            assert torch.equal(OP(torch.cat([x, pad], -1), [-1], False, kind), ref), (kind, total)


@pytest.mark.gpu
def test_gpu_opcheck_and_errors():
    x = torch.randn(3, 5, 7, device="cuda")
    torch.library.opcheck(OP.default, (x, [1], False, "sum"))
    torch.library.opcheck(OP.default, (x.bfloat16(), None, True, "mean", torch.float32))
    torch.library.opcheck(OP.default, (x, [0, 2], False, "logsumexp"))
    torch.library.opcheck(VM.default, (x, [1, 2], 1.0, False))
    with pytest.raises(_common.UnsupportedError, match="float64"):
        OP(x.double(), [1], False, "sum")
    with pytest.raises(_common.UnsupportedError, match="float64"):
        VM(x.double(), [1], 1.0, False)
    xi = torch.randint(0, 9, (3, 5), device="cuda")
    assert torch.equal(OP(xi, [1], False, "sum"), xi.sum(1))
