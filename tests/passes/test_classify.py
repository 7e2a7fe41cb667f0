import operator

import torch

from detcompile.passes import PassContext, Report
from detcompile.passes.classify import audit_pass, classify

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


def _node(target, val, *args):
    g = torch.fx.Graph()
    n = g.call_function(target, args)
    n.meta["val"] = val
    return n


def test_polar_and_log_sigmoid_safe_on_gpu_flagged_on_cpu_if_left():
    aten = torch.ops.aten
    for dev in ("meta", "cpu"):  # meta stands in for CUDA: anything but the CPU
        polar = _node(aten.polar.default, torch.empty(3, dtype=torch.complex64, device=dev))
        out = (torch.empty(3, device=dev), torch.empty(0, device=dev))
        logsig = _node(aten.log_sigmoid_forward.default, out)
        logsig.graph.call_function(operator.getitem, (logsig, 0))
        if dev == "cpu":
            assert "cpu_pointwise" in classify(polar) and "cpu_pointwise" in classify(logsig)
        else:
            assert classify(polar) is None and classify(logsig) is None


def test_complex_arithmetic_on_cpu(gen):
    z = torch.randn(3, 4, dtype=torch.complex64, generator=gen)
    report = _leftover_ops(lambda z: ((z + z) - z.conj() * 1j, z / (1 + 2j)), z)
    ops = sorted(lo.op for lo in report.leftovers)
    # add/sub are exact per component; stock complex mul and div round by offset on the CPU.
    assert ops == ["aten.div.Tensor", "aten.mul.Tensor"], ops
    assert all("complex" in lo.reason for lo in report.leftovers)
