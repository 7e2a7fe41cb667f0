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


def test_vector_norms_of_order_1_and_inf_rewritten(gen):
    # dbrx's router normalises with ord=1; inf/-inf are exact max/min of |x|.
    x = torch.randn(4, 6, 9, generator=gen)

    def fn(x):
        v = torch.linalg.vector_norm
        return (
            v(x, ord=1.0, dim=-1, keepdim=True), v(x, ord=1, dim=(0, 2)), v(x, ord=float("inf"), dim=1),
            v(x, ord=float("-inf"), dim=-1, keepdim=True), v(x, ord=1), v(x, ord=float("inf")),
        )

    gm = aten_graph(fn, x)
    report = run_pass(gm, reductions_pass)
    assert aten.linalg_vector_norm.default not in targets(gm)
    assert len(report.rewrites) == 6
    for out, ref in zip(gm(x), fn(x)):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # max/min of |x| are exact: the same bits as aten.
    assert torch.equal(gm(x)[2], fn(x)[2]) and torch.equal(gm(x)[3], fn(x)[3])
    # The 1-norm is a sequential sum of |x|: bitwise the row alone and in a batch.
    alone = gm(x[:1].clone())[0]
    assert torch.equal(alone, gm(x)[0][:1])


def test_other_vector_norm_orders_left_for_the_audit(gen):
    x = torch.randn(3, 5, generator=gen)
    gm = aten_graph(lambda x: (torch.linalg.vector_norm(x, ord=3, dim=-1), torch.linalg.vector_norm(x, ord=0.5)), x)
    report = run_pass(gm, reductions_pass)
    assert not report.rewrites and aten.linalg_vector_norm.default in targets(gm)
