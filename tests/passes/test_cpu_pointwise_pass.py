import torch
import torch.nn.functional as F

from detcompile.passes.cpu_pointwise import cpu_pointwise_pass

from ._util import aten_graph, run_pass, targets

aten = torch.ops.aten


def act(x):
    return F.silu(x) + F.gelu(x, approximate="tanh") + torch.sigmoid(x) + x.abs().log() + F.softplus(x) + x.pow(2) * x.abs().pow(1.5)


def test_risky_pointwise_ops_rewritten_on_cpu(gen):
    x = torch.randn(3, 50, generator=gen)
    gm = aten_graph(act, x)
    risky = {aten.silu.default, aten.gelu.default, aten.sigmoid.default, aten.log.default, aten.softplus.default}
    assert risky <= targets(gm)
    report = run_pass(gm, cpu_pointwise_pass)
    after = targets(gm)
    assert not risky & after
    assert torch.ops.detcompile.cpu_pointwise.default in after
    # pow(x, 2) is exact arithmetic and stays; pow(x, 1.5) goes through the op.
    assert sum(r.old == "aten.pow.Tensor_Scalar" for r in report.rewrites) == 1
    torch.testing.assert_close(gm(x), act(x), rtol=1e-5, atol=1e-5)
