import torch

from detcompile.passes.reductions import reductions_pass

from ._util import aten_graph, run_pass, targets

aten = torch.ops.aten
VARIANT = {
    aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.amax.default, aten.logsumexp.default,
    aten.var_mean.correction, aten.var.correction, aten.std.correction, aten.cumsum.default,
    aten.linalg_vector_norm.default,
}


def model_reductions(x):
    return (
        x.sum(-1),
        x.sum(),
        x.mean(dim=(0, 2), keepdim=True),
        x.amax(-1),
        torch.logsumexp(x, dim=1),
        torch.var_mean(x, dim=-1, correction=0),
        x.var(-1),
        x.std(1, keepdim=True),
        x.cumsum(-1),
        torch.linalg.vector_norm(x, dim=-1),
    )


def test_float_reductions_rewritten(gen):
    x = torch.randn(3, 5, 9, generator=gen)
    gm = aten_graph(model_reductions, x)
    assert len(VARIANT & targets(gm)) >= 8
    report = run_pass(gm, reductions_pass)
    left = VARIANT & targets(gm)
    assert not left, f"float reductions left: {left}"
    assert len(report.rewrites) >= 10
    flat = lambda t: [y for v in t for y in (v if isinstance(v, tuple) else (v,))]  # noqa: E731
    for o, r in zip(flat(gm(x)), flat(model_reductions(x))):
        assert o.shape == r.shape and o.dtype == r.dtype
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5)


def test_integer_reductions_left_alone():
    m = torch.ones(2, 7, dtype=torch.long)
    gm = aten_graph(lambda m: (m.cumsum(-1), m.sum(-1)), m)
    report = run_pass(gm, reductions_pass)
    assert not report.rewrites
    assert aten.cumsum.default in targets(gm)
