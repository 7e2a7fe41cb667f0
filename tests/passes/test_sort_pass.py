import pytest
import torch

from detcompile.passes.sort import sort_pass

from ._util import aten_graph, run_pass, targets

aten = torch.ops.aten


def test_topk_becomes_stable_sort_with_ties_to_the_lower_index():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.5, 0.5, 0.5, 0.5, 0.5]])
    fn = lambda x: torch.topk(x, 2)  # noqa: E731
    gm = aten_graph(fn, x)
    report = run_pass(gm, sort_pass)
    assert aten.topk.default not in targets(gm) and aten.sort.stable in targets(gm)
    assert [r.old for r in report.rewrites] == ["aten.topk.default"]
    values, indices = gm(x)
    assert torch.equal(indices, torch.tensor([[1, 2], [0, 1]]))  # ties: ascending index
    assert torch.equal(values, torch.topk(x, 2).values)
    assert values.is_contiguous() and indices.is_contiguous()


@pytest.mark.parametrize("largest", [True, False])
def test_topk_rewrite_matches_topk_without_ties(largest, gen):
    x = torch.randn(6, 33, generator=gen)
    fn = lambda x: torch.topk(x, 5, dim=-1, largest=largest)  # noqa: E731
    gm = aten_graph(fn, x)
    run_pass(gm, sort_pass)
    v, i = gm(x)
    ref = fn(x)
    assert torch.equal(v, ref.values) and torch.equal(i, ref.indices)


def test_unstable_sort_and_argsort_become_stable():
    x = torch.tensor([[2.0, 1.0, 2.0, 1.0]])
    fn = lambda x: (torch.sort(x, descending=True).indices, torch.argsort(x))  # noqa: E731
    gm = aten_graph(fn, x)
    run_pass(gm, sort_pass)
    sorts = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.sort.stable]
    assert sorts and all(n.kwargs["stable"] is True for n in sorts)
    assert aten.sort.default not in targets(gm)
    desc, asc = gm(x)
    assert torch.equal(desc, torch.tensor([[0, 2, 1, 3]])) and torch.equal(asc, torch.tensor([[1, 3, 0, 2]]))
