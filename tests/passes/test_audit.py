import torch

from detcompile.passes import PassContext, Report
from detcompile.passes.audit import audit_pass, classify

from ._util import aten_graph


def _leftover_ops(fn, *inputs):
    gm = aten_graph(fn, *inputs)
    report = Report()
    audit_pass(gm, PassContext(None, report))
    return report


def test_audit_flags_float_reductions_and_matmuls(gen):
    x = torch.randn(4, 8, generator=gen)
    report = _leftover_ops(lambda x: (x @ x.t()).sum(-1).cumprod(0), x)
    ops = {lo.op for lo in report.leftovers}
    assert {"aten.mm.default", "aten.sum.dim_IntList", "aten.cumprod.default"} <= ops
    assert all(lo.reason for lo in report.leftovers)


def test_audit_passes_pointwise_views_and_integer_reductions(gen):
    x = torch.randn(4, 8, generator=gen)
    m = torch.ones(4, 8, dtype=torch.long)

    def fn(x, m):
        pos = m.cumsum(-1) - 1  # integer: exact
        y = torch.nn.functional.silu(x) * x.exp()
        return y.view(2, 16).transpose(0, 1)[pos[0, :2]], x.amax(-1), torch.topk(x, 2).values

    report = _leftover_ops(fn, x, m)
    assert report.leftovers == [], [lo.op for lo in report.leftovers]


def test_audit_flags_random_ops_and_names_source_line(gen):
    x = torch.randn(4, 8, generator=gen)
    report = _leftover_ops(lambda x: torch.nn.functional.dropout(x, 0.5, training=True), x)
    assert any("random" in lo.reason for lo in report.leftovers)


def test_classify_detcompile_ops_are_safe(gen):
    a = torch.randn(3, 4, generator=gen)
    gm = aten_graph(lambda a: torch.ops.detcompile.matmul(a, a.t()), a)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert nodes and all(classify(n) is None for n in nodes)
