"""detcompile::conv1d: batch and length invariance, fixed order, accuracy vs float64, aten argument
semantics (stride, padding, dilation, groups, bias), opcheck, errors."""
import pytest
import torch
import torch.nn.functional as F

from detcompile.kernels import _common
from detcompile.kernels import conv1d as cv

from ._util import LAUNCH_DEV, check_batch_invariant, needs_triton, rel_err, tol

OP = torch.ops.detcompile.conv1d

#: (C_in, C_out, K, stride, padding, dilation, groups): depthwise causal (Mamba), grouped (Zaya),
#: dense, strided/dilated.
CONFIGS = [
    (24, 24, 4, 1, 3, 1, 24),
    (12, 6, 2, 1, 0, 1, 3),
    (5, 7, 3, 1, 1, 1, 1),
    (6, 4, 3, 2, 2, 2, 2),
]


def _params(gen, cin, cout, k, groups, dtype, bias=True):
    w = (torch.randn(cout, cin // groups, k, generator=gen) / k).to(dtype)
    b = torch.randn(cout, generator=gen).to(dtype) if bias else None
    return w, b


def _ref(x, w, b, s, p, d, g):
    return F.conv1d(x.double(), w.double(), None if b is None else b.double(), s, p, d, g)


# ---------------------------------------------------------------------------------------------
# CPU op
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_cpu_batch_invariant_and_accurate(gen, dtype, cfg):
    cin, cout, k, s, p, d, g = cfg
    w, b = _params(gen, cin, cout, k, g, dtype)
    target = (torch.randn(cin, 37, generator=gen) * 3).to(dtype)
    fn = lambda x: OP(x, w, b, s, p, d, g)  # noqa: E731
    ref = check_batch_invariant(fn, target, gen, (2, 3, 5, 8, 17))
    assert rel_err(ref, _ref(target[None], w, b, s, p, d, g)[0]) < tol(dtype)


def test_cpu_causal_output_independent_of_later_positions(gen):
    # Right padding / longer neighbours: a causal conv's output at t reads only x[..., :t+1].
    w, b = _params(gen, 16, 16, 4, 16, torch.float32)
    x = torch.randn(2, 16, 13, generator=gen)
    ref = OP(x, w, b, 1, 3, 1, 16)[..., :13]
    for total in (14, 16, 40):
        longer = torch.cat([x, torch.randn(2, 16, total - 13, generator=gen)], -1)
        assert torch.equal(OP(longer, w, b, 1, 3, 1, 16)[..., :13], ref), total


def test_cpu_fixed_order(gen):
    # Bitwise the documented loop: acc = 0; for ci, for k: acc = acc + x_tap * w; acc + bias.
    cin, cout, k, g = 6, 4, 3, 2
    w, b = _params(gen, cin, cout, k, g, torch.float32)
    x = torch.randn(3, cin, 11, generator=gen)
    xp = F.pad(x, (1, 1))
    out = torch.zeros(3, cout, 11)
    for co in range(cout):
        grp = co // (cout // g)
        acc = torch.zeros(3, 11)
        for ci in range(cin // g):
            for kk in range(k):
                acc = acc + xp[:, grp * (cin // g) + ci, kk : kk + 11] * w[co, ci, kk]
        out[:, co] = acc + b[co]
    assert torch.equal(OP(x, w, b, 1, 1, 1, g), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_cpu_semantics_all_dtypes(gen, dtype, cfg):
    cin, cout, k, s, p, d, g = cfg
    for bias in (True, False):
        w, b = _params(gen, cin, cout, k, g, dtype, bias)
        x = torch.randn(2, cin, 19, generator=gen).to(dtype)
        out = OP(x, w, b, s, p, d, g)
        ref = _ref(x, w, b, s, p, d, g)
        assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
        assert rel_err(out, ref) < (1e-12 if dtype == torch.float64 else tol(dtype))


def test_cpu_non_contiguous_input(gen):
    # Mamba passes hidden_states.transpose(1, 2).
    w, b = _params(gen, 8, 8, 4, 8, torch.float32)
    h = torch.randn(2, 10, 8, generator=gen)
    assert torch.equal(OP(h.transpose(1, 2), w, b, 1, 3, 1, 8), OP(h.transpose(1, 2).contiguous(), w, b, 1, 3, 1, 8))


# ---------------------------------------------------------------------------------------------
# Triton launcher (interpreter on CPU, or the GPU)
# ---------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[1], CONFIGS[3]])
def test_triton_batch_invariant_and_accurate(gen, dtype, cfg):
    cin, cout, k, s, p, d, g = cfg
    w, b = _params(gen, cin, cout, k, g, dtype)
    wd, bd = w.to(LAUNCH_DEV), b.to(LAUNCH_DEV)
    target = (torch.randn(cin, 70, generator=gen) * 3).to(dtype)  # 70: two position blocks
    fn = lambda x: cv.triton_conv1d(x.to(LAUNCH_DEV), wd, bd, s, p, d, g).cpu()  # noqa: E731
    ref = check_batch_invariant(fn, target, gen, (2, 3))
    assert rel_err(ref, _ref(target[None], w, b, s, p, d, g)[0]) < tol(dtype)


@needs_triton
def test_triton_no_bias_and_length_invariance(gen):
    w, _ = _params(gen, 20, 20, 4, 20, torch.float32, bias=False)
    x = torch.randn(2, 20, 13, generator=gen)
    ref = cv.triton_conv1d(x.to(LAUNCH_DEV), w.to(LAUNCH_DEV), None, 1, 3, 1, 20).cpu()
    assert rel_err(ref, _ref(x, w, None, 1, 3, 1, 20)) < 1e-5
    longer = torch.cat([x, torch.randn(2, 20, 60, generator=gen)], -1)
    out = cv.triton_conv1d(longer.to(LAUNCH_DEV), w.to(LAUNCH_DEV), None, 1, 3, 1, 20).cpu()
    assert torch.equal(out[..., :13], ref[..., :13])


# ---------------------------------------------------------------------------------------------
# opcheck, errors
# ---------------------------------------------------------------------------------------------


def test_opcheck_cpu(gen):
    x = torch.randn(2, 6, 9, generator=gen)
    w, b = _params(gen, 6, 6, 4, 6, torch.float32)
    w2, _ = _params(gen, 6, 4, 3, 2, torch.float32)
    for args in [(x, w, b, 1, 3, 1, 6), (x, w2, None, 2, 1, 2, 2), (x.bfloat16(), w.bfloat16(), None, 1, 0, 1, 6)]:
        torch.library.opcheck(OP.default, args)


def test_bad_inputs(gen):
    x = torch.randn(2, 6, 9, generator=gen)
    w = torch.randn(6, 1, 4, generator=gen)
    with pytest.raises(_common.UnsupportedError, match="3-D"):
        OP(x[None], w, None, 1, 3, 1, 6)  # a 2-D convolution's input
    with pytest.raises(_common.UnsupportedError, match="dtype"):
        OP(x, w.double(), None, 1, 3, 1, 6)
    with pytest.raises(ValueError, match="groups"):
        OP(x, w, None, 1, 3, 1, 4)
    with pytest.raises(ValueError, match="stride"):
        OP(x, w, None, 0, 3, 1, 6)
    with pytest.raises(ValueError, match="shorter"):
        OP(x[..., :2], w, None, 1, 0, 1, 6)
    with pytest.raises(ValueError, match="bias"):
        OP(x, w, torch.randn(5), 1, 3, 1, 6)


def test_triton_launcher_refuses_non_launchable(monkeypatch, gen):
    monkeypatch.setattr(_common, "triton_interpret", lambda: False)
    with pytest.raises(_common.UnsupportedError, match="Triton"):
        cv.triton_conv1d(torch.randn(1, 2, 5), torch.randn(2, 1, 2), None, 1, 1, 1, 2)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_gpu_batch_invariant(dtype, cfg):
    cin, cout, k, s, p, d, g = cfg
    gc = torch.Generator(device="cuda").manual_seed(cin)
    w = (torch.randn(cout, cin // g, k, device="cuda", generator=gc) / k).to(dtype)
    b = torch.randn(cout, device="cuda", generator=gc).to(dtype)
    target = torch.randn(cin, 300, device="cuda", generator=gc).to(dtype)
    ref = OP(target[None], w, b, s, p, d, g)[0]
    for bs in range(1, 65):
        x = torch.randn(bs, cin, 300, device="cuda", generator=gc).to(dtype)
        pos = (3 * bs) // 4
        x[pos] = target
        assert torch.equal(OP(x, w, b, s, p, d, g)[pos], ref), f"batch {bs}"
    assert rel_err(ref, _ref(target[None], w, b, s, p, d, g)[0]) < tol(dtype)


@pytest.mark.gpu
def test_gpu_opcheck_and_float64_refused():
    x = torch.randn(2, 8, 33, device="cuda")
    w = torch.randn(8, 1, 4, device="cuda")
    torch.library.opcheck(OP.default, (x, w, None, 1, 3, 1, 8))
    with pytest.raises(_common.UnsupportedError, match="float64"):
        OP(x.double(), w.double(), None, 1, 3, 1, 8)
