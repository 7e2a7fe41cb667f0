import operator

import pytest
import torch

from detcompile.backend import Options
from detcompile.passes import ATEN_PASSES, PassContext, PassManager, Report
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


def _pipeline_leftovers(fn, *inputs):
    """Every aten pass, the audit last, as the backend runs them."""
    gm = aten_graph(fn, *inputs)
    report = Report()
    PassManager(ATEN_PASSES).run(gm, PassContext(Options(), report))
    return report


def test_audit_passes_exact_pointwise_views_and_integer_reductions(gen):
    x = torch.randn(4, 8, generator=gen)
    m = torch.ones(4, 8, dtype=torch.long)

    def fn(x, m):
        pos = m.cumsum(-1) - 1  # integer: exact
        y = torch.where(x > 0, x * 2.0 + 1.0, -x.abs() / 3.0).clamp(-5, 5).sqrt()
        return y.view(2, 16).transpose(0, 1)[pos[0, :2]], x.amax(-1), torch.topk(x, 2).values

    report = _leftover_ops(fn, x, m)
    assert report.leftovers == [], [lo.op for lo in report.leftovers]


def test_cpu_transcendental_is_flagged_unless_rewritten(gen):
    # Flipped rule (#11): silu/exp are not exact per element on the CPU, so the audit alone flags them;
    # in the backend's pipeline the cpu_pointwise pass has rewritten them first.
    x = torch.randn(4, 8, generator=gen)
    fn = lambda x: torch.nn.functional.silu(x) * x.exp()  # noqa: E731
    flagged = sorted(lo.op for lo in _leftover_ops(fn, x).leftovers)
    assert flagged == ["aten.exp.default", "aten.silu.default"], flagged
    assert all("'cpu_pointwise' pass" in lo.reason for lo in _leftover_ops(fn, x).leftovers)
    assert _pipeline_leftovers(fn, x).leftovers == []
    # On CUDA (meta stands in: anything but the CPU) every element runs the same code.
    assert _leftover_ops(fn, x.to("meta")).leftovers == []


#: Measured position-dependent on the CPU (issue #11; tests/passes/cpu_exactness.py).
_POSITION_DEPENDENT = {
    "atan2": (lambda x: torch.atan2(x, x.flip(-1)), torch.float32),
    "logit": (lambda x: torch.logit(torch.sigmoid(x)), torch.float32),
    "sub_alpha_bf16": (lambda x: torch.sub(x, x.flip(-1), alpha=0.3), torch.bfloat16),
    "pow_tensor_exponent": (lambda x: torch.pow(x.abs() + 1, x), torch.float32),
    "atanh": (lambda x: torch.atanh(torch.tanh(x)), torch.float32),
    "celu": (lambda x: torch.nn.functional.celu(x), torch.float32),
    "selu": (lambda x: torch.nn.functional.selu(x), torch.float32),
}


@pytest.mark.parametrize("case", sorted(_POSITION_DEPENDENT))
def test_position_dependent_cpu_ops_are_rewritten_or_flagged(case, gen):
    fn, dtype = _POSITION_DEPENDENT[case]
    x = torch.randn(4, 8, generator=gen).to(dtype)
    report = _pipeline_leftovers(fn, x)
    rewritten = [r for r in report.rewrites if r.new == "detcompile.cpu_pointwise.default"]
    flagged = [lo for lo in report.leftovers if "not shown exact" in lo.reason]
    assert rewritten or flagged, (report.rewrites, report.leftovers)
    assert _pipeline_leftovers(fn, x.to("meta")).leftovers == []  # fine on CUDA


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


def test_scatter_with_reduce_is_flagged_plain_scatter_is_not(gen):
    x = torch.randn(4, 8, generator=gen)
    idx = torch.tensor([[0, 0], [1, 1], [2, 2], [3, 3]])
    for dev in ("cpu", "meta"):
        xd, i = x.to(dev), idx.to(dev)
        add = _pipeline_leftovers(lambda x, i: x.scatter(1, i, x[:, :2], reduce="add"), xd, i)
        assert [lo.op for lo in add.leftovers] == ["aten.scatter.reduce"], add.leftovers
        assert "reduce='add'" in add.leftovers[0].reason
        assert _pipeline_leftovers(lambda x, i: x.scatter(1, i, x[:, :2]), xd, i).leftovers == []
    ints = torch.zeros(4, 8, dtype=torch.long)
    assert _leftover_ops(lambda x, i: x.scatter(1, i, 1, reduce="add"), ints, idx).leftovers == []


def test_unsafe_index_put_accumulate_is_rewritten_or_flagged(gen):
    x = torch.randn(4, 8, generator=gen)
    idx = torch.tensor([0, 0, 1])
    put = lambda x, i: torch.ops.aten._unsafe_index_put(x, [i], x[:3] * 2, True)  # noqa: E731
    assert [lo.op for lo in _leftover_ops(put, x, idx).leftovers] == ["aten._unsafe_index_put.default"]
    report = _pipeline_leftovers(put, x, idx)
    assert report.leftovers == [] and any(r.new == "detcompile.index_add.default" for r in report.rewrites)
    # Two index tensors: no detcompile op takes it; the reason names the pass that handles the op.
    put2 = lambda x, i: torch.ops.aten._unsafe_index_put(x, [i, i], x[0, :3], True)  # noqa: E731
    left = _pipeline_leftovers(put2, x, idx).leftovers
    assert len(left) == 1 and "'index_add' pass" in left[0].reason, left
    plain = lambda x, i: torch.ops.aten._unsafe_index_put(x, [i], x[:3], False)  # noqa: E731
    assert _leftover_ops(plain, x, idx).leftovers == []


def test_topk_and_unstable_sort_flagged_on_cuda_only(gen):
    x = torch.randn(4, 8, generator=gen)
    fn = lambda x: (torch.topk(x, 3).indices, torch.argsort(x, -1), torch.sort(x, dim=-1, stable=True).values)  # noqa: E731
    assert _leftover_ops(fn, x).leftovers == []  # the CPU kernels sort each row on its own
    cuda = sorted(lo.op for lo in _leftover_ops(fn, x.to("meta")).leftovers)
    assert cuda == ["aten.sort.default", "aten.topk.default"], cuda
    assert _pipeline_leftovers(fn, x.to("meta")).leftovers == []  # the sort pass makes them stable


def test_every_pass_declares_its_targets_and_a_version():
    from detcompile.passes import SPECS

    names = [n for n, _ in ATEN_PASSES if n != "audit"]
    assert set(names) <= set(SPECS) and "sdpa" in SPECS
    for spec in SPECS.values():
        assert spec.targets and spec.into, spec.name
        assert len(spec.version) == 12 and int(spec.version, 16) >= 0
        for t in spec.targets:  # every declared target is a real op (or a custom op known by name)
            packet = t.split(".")[0]
            assert hasattr(torch.ops.aten, packet) or packet == "grouped_mm_fallback", (spec.name, t)
    aten = torch.ops.aten
    assert SPECS["index_add"].handles(aten._unsafe_index_put.default)
    assert SPECS["cpu_pointwise"].handles(aten.pow.Tensor_Scalar)
    assert not SPECS["cpu_pointwise"].handles(aten.pow.Tensor_Tensor)


def test_graph_constant_pointwise_is_exempt_unless_static_shapes(gen):
    # ALiBi slopes: pow of constants only, the same tensor in every call, so offsets cannot move.
    x = torch.randn(2, 8, generator=gen)

    def fn(x):
        slopes = torch.pow(torch.tensor(0.5), torch.arange(1, 9, dtype=torch.float32))
        return x * slopes, torch.pow(x.abs() + 1, x)  # the second depends on the input

    left = [lo.op for lo in _pipeline_leftovers(fn, x).leftovers]
    assert left == ["aten.pow.Tensor_Tensor"], left
    # dynamic=False bakes sizes taken from the batch into the graph: no exemption then.
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        left = [lo.op for lo in _pipeline_leftovers(fn, x).leftovers]
    assert left == ["aten.pow.Tensor_Tensor"] * 2, left


def test_design_doc_pass_table_is_the_declarations():
    import os

    from detcompile.passes import coverage_table

    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "design.md")
    text = open(path).read()
    block = text.split("<!-- pass-table:start -->\n", 1)[1].split("\n<!-- pass-table:end -->", 1)[0]
    assert block == coverage_table(), "regenerate the table in docs/design.md from coverage_table()"
