import torch

from detcompile.passes.softmax import softmax_pass

from ._util import aten_graph, run_pass, targets

aten = torch.ops.aten


def test_softmax_and_log_softmax_rewritten(gen):
    x = torch.randn(3, 4, 37, generator=gen).to(torch.bfloat16)
    fn = lambda x: (torch.softmax(x, -1, dtype=torch.float32), torch.log_softmax(x.float(), 1))  # noqa: E731
    gm = aten_graph(fn, x)
    before = targets(gm)
    assert {aten._softmax.default, aten._log_softmax.default} <= before
    report = run_pass(gm, softmax_pass)
    after = targets(gm)
    assert not after & {aten._softmax.default, aten._log_softmax.default}
    assert torch.ops.detcompile.softmax.default in after and len(report.rewrites) == 2
    for o, r in zip(gm(x), fn(x)):
        assert o.dtype == r.dtype and o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
