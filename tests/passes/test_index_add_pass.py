import torch

from detcompile.passes.index_add import index_add_pass

from ._util import aten_graph, run_pass, targets

aten = torch.ops.aten


def moe_combine(out, idx, src, idx2, src2):
    # The Mixtral way: one index_add_ per expert into a zero buffer, then a scatter_add.
    out = out.clone()
    out.index_add_(0, idx, src)
    out = out.scatter_add(0, idx2, src2)
    out2 = out.clone()
    out2.index_put_((idx,), src, accumulate=True)
    return out, out2


def test_index_add_scatter_add_index_put_rewritten(gen):
    out = torch.zeros(6, 4)
    idx = torch.tensor([1, 3, 3, 0])
    src = torch.randn(4, 4, generator=gen)
    idx2 = torch.randint(0, 6, (5, 4), generator=gen)
    src2 = torch.randn(5, 4, generator=gen)
    gm = aten_graph(moe_combine, out, idx, src, idx2, src2)
    before = targets(gm)
    assert {aten.index_add.default, aten.scatter_add.default, aten.index_put.default} <= before
    report = run_pass(gm, index_add_pass)
    after = targets(gm)
    assert not after & {aten.index_add.default, aten.scatter_add.default, aten.index_put.default}
    assert {torch.ops.detcompile.index_add.default, torch.ops.detcompile.scatter_add.default} <= after
    assert len(report.rewrites) == 3
    for o, r in zip(gm(out, idx, src, idx2, src2), moe_combine(out, idx, src, idx2, src2)):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
