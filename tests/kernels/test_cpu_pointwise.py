import pytest
import torch

from detcompile.kernels.cpu_pointwise import FUNCTIONS


def _args(fn):
    return {"softplus": [1.0, 20.0], "elu": [1.0, 1.0, 1.0], "pow": [2.5]}.get(fn, [])


def _domain(fn, x):
    # Keep inputs where every function is defined and finite.
    if fn in ("log", "log2", "log10", "rsqrt", "pow"):
        return x.abs() + 0.1
    if fn in ("asin", "acos", "erfinv"):
        return x.tanh() * 0.9
    if fn == "log1p":
        return x.abs()
    return x


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_bitwise_at_any_position(fn, dtype, gen):
    # The same row must get the same bits first, last or in the middle of a batch of any size;
    # ATen's own CPU kernels fail this for several of these functions (vector body vs scalar tail).
    x = _domain(fn, torch.randn(40, 344, generator=gen)).to(dtype)
    op = lambda t: torch.ops.detcompile.cpu_pointwise(t, fn, _args(fn))  # noqa: E731
    ref = op(x[:1])[0]
    for bs in (2, 3, 7, 33):
        for pos in (0, bs - 1, bs // 2):
            batch = x[1 : bs + 1].clone()
            batch[pos] = x[0]
            assert torch.equal(op(batch)[pos], ref), f"{fn} row at {pos} of {bs}"


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_same_function_as_aten(fn, gen):
    from detcompile.kernels.cpu_pointwise import _FNS

    x = _domain(fn, torch.randn(5, 37, generator=gen))
    out = torch.ops.detcompile.cpu_pointwise(x, fn, _args(fn))
    torch.testing.assert_close(out, _FNS[fn](x, _args(fn)), rtol=1e-5, atol=1e-6, equal_nan=True)


def test_opcheck_and_bad_function(gen):
    x = torch.randn(3, 9, generator=gen)
    torch.library.opcheck(torch.ops.detcompile.cpu_pointwise.default, (x, "silu", []))
    with pytest.raises(Exception, match="unknown function"):
        torch.ops.detcompile.cpu_pointwise(x, "nope", [])
