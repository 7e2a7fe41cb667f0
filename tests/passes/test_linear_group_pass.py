"""The linear_group pass: bias-free sibling matmuls of one input -> detcompile.linear_group, bitwise
today's results; other matmuls left alone."""
import torch
import torch.nn.functional as F

from detcompile.passes.linear_group import linear_group_pass
from detcompile.passes.matmul import matmul_pass

from ._util import aten_graph, run_pass, targets

GROUP = torch.ops.detcompile.linear_group.default
MATMUL = torch.ops.detcompile.matmul.default


def _rewrite(fn, *inputs):
    gm = aten_graph(fn, *inputs)
    run_pass(gm, matmul_pass)
    before = gm(*inputs)
    report = run_pass(gm, linear_group_pass)
    return gm, report, before


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def test_qkv_and_gate_up_grouped_bitwise(gen):
    def layer(x, wq, wk, wv, wg, wu):
        q, k, v = F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)
        h = (q[..., :8] * k[..., :8] + v[..., :8]).repeat(1, 1, 4)
        return F.linear(h, wg) * F.linear(h, wu)

    x = torch.randn(2, 5, 32, generator=gen)
    ws = [torch.randn(n, k, generator=gen) for n, k in ((32, 32), (8, 32), (8, 32), (24, 32), (24, 32))]
    gm, report, before = _rewrite(layer, x, *ws)
    assert len(report.rewrites) == 2 and _count(gm, GROUP) == 2 and _count(gm, MATMUL) == 0
    assert torch.equal(gm(x, *ws), before)


def test_more_than_three_in_chunks(gen):
    x = torch.randn(4, 16, generator=gen)
    ws = [torch.randn(8, 16, generator=gen) for _ in range(5)]
    gm, report, before = _rewrite(lambda x, *ws: [F.linear(x, w) for w in ws], x, *ws)
    assert _count(gm, GROUP) == 2 and _count(gm, MATMUL) == 0  # 3 + 2
    assert all(torch.equal(a, b) for a, b in zip(gm(x, *ws), before))


def test_non_matching_left_alone(gen):
    x, y = torch.randn(4, 16, generator=gen), torch.randn(4, 16, generator=gen)
    w1, w2, b = torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen), torch.randn(8, generator=gen)
    cases = [
        (lambda x, y, w1, w2, b: (F.linear(x, w1), F.linear(y, w2))),  # other inputs
        (lambda x, y, w1, w2, b: (F.linear(x, w1, b), F.linear(x, w2, b))),  # biases
    ]
    for fn in cases:
        gm, report, before = _rewrite(fn, x, y, w1, w2, b)
        assert not report.rewrites and GROUP not in targets(gm)
        assert all(torch.equal(a, c) for a, c in zip(gm(x, y, w1, w2, b), before))
