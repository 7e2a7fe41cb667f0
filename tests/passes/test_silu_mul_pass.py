"""The silu_mul pass: mul(silu(gate), up) -> detcompile.silu_mul, bitwise today's results; non-matching
variants left alone. Tiny models: test_fusion_models.py."""
import pytest
import torch
import torch.nn.functional as F

from detcompile.passes.silu_mul import silu_mul_pass

from ._util import aten_graph, run_pass, targets

aten = torch.ops.aten
SILU_MUL = torch.ops.detcompile.silu_mul.default


def _gate_up(gen, dtype=torch.float32, shape=(3, 5, 40)):
    return ((torch.randn(shape, generator=gen) * 3).to(dtype), torch.randn(shape, generator=gen).to(dtype))


def _cpu_silu(x):
    """silu as the graph computes it on the CPU without this pass (the cpu_pointwise op)."""
    return torch.ops.detcompile.cpu_pointwise(x, "silu", [])


@pytest.mark.parametrize("fn", [
    lambda g, u, silu=F.silu: silu(g) * u,
    lambda g, u, silu=F.silu: u * silu(g),  # Phi-3's order
    lambda g, u, silu=F.silu: silu(g) * g,
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rewritten_bitwise(fn, dtype, gen):
    g, u = _gate_up(gen, dtype)
    gm = aten_graph(lambda g, u: fn(g, u), g, u)
    report = run_pass(gm, silu_mul_pass)
    assert [r.new for r in report.rewrites] == ["detcompile.silu_mul.default"]
    assert aten.silu.default not in targets(gm) and SILU_MUL in targets(gm)
    out = gm(g, u)
    assert out.is_contiguous() and torch.equal(out, fn(g, u, silu=_cpu_silu))


def test_phi3_halves_of_one_projection(gen):
    def mlp(x, silu=F.silu):
        gate, up = x.chunk(2, dim=-1)
        return up * silu(gate)

    x = (torch.randn(2, 7, 64, generator=gen) * 3).bfloat16()
    gm = aten_graph(lambda x: mlp(x), x)
    assert len(run_pass(gm, silu_mul_pass).rewrites) == 1
    assert torch.equal(gm(x), mlp(x, silu=_cpu_silu))


@pytest.mark.parametrize("name, fn, make", [
    ("up broadcast", lambda g, u: F.silu(g) * u, lambda g, u: (g, u[0, 0])),
    ("gate broadcast", lambda g, u: F.silu(g) * u, lambda g, u: (g[:, :1], u)),
    ("dtype mixing", lambda g, u: F.silu(g) * u, lambda g, u: (g.bfloat16(), u)),
    ("silu used twice", lambda g, u: (F.silu(g) * u, F.silu(g).sum(0)), None),
    ("gelu (GeGLU)", lambda g, u: F.gelu(g, approximate="tanh") * u, None),
    ("silu times a scalar", lambda g, u: F.silu(g) * 2.0, None),
])
def test_non_matching_left_alone(name, fn, make, gen):
    g, u = _gate_up(gen)
    if make:
        g, u = make(g, u)
    if name == "silu used twice":
        def fn(g, u):  # noqa: F811  (one silu node, two users)
            s = F.silu(g)
            return s * u, s.sum(0)
    gm = aten_graph(fn, g, u)
    before = targets(gm)
    report = run_pass(gm, silu_mul_pass)
    assert not report.rewrites and targets(gm) == before, name
