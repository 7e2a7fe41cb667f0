import torch

from detcompile.passes.group_norm import group_norm_pass
from detcompile.passes.layer_norm import layer_norm_pass

from ._util import aten_graph, run_pass, targets

aten = torch.ops.aten


def test_layer_norm_rewritten(gen):
    x = torch.randn(3, 5, 24, generator=gen)
    w, b = torch.randn(24, generator=gen), torch.randn(24, generator=gen)
    fn = lambda x, w, b: torch.nn.functional.layer_norm(x, (24,), w, b, 1e-5)  # noqa: E731
    gm = aten_graph(fn, x, w, b)
    assert aten.native_layer_norm.default in targets(gm)
    report = run_pass(gm, layer_norm_pass)
    assert aten.native_layer_norm.default not in targets(gm)
    assert torch.ops.detcompile.layer_norm.default in targets(gm)
    assert len(report.rewrites) == 1
    torch.testing.assert_close(gm(x, w, b), fn(x, w, b), rtol=1e-5, atol=1e-5)


def test_group_norm_rewritten(gen):
    x = torch.randn(2, 6, 10, generator=gen)
    w, b = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    fn = lambda x, w, b: torch.nn.functional.group_norm(x, 3, w, b, 1e-5)  # noqa: E731
    gm = aten_graph(fn, x, w, b)
    assert aten.native_group_norm.default in targets(gm)
    run_pass(gm, group_norm_pass)
    assert aten.native_group_norm.default not in targets(gm)
    assert torch.ops.detcompile.group_norm.default in targets(gm)
    torch.testing.assert_close(gm(x, w, b), fn(x, w, b), rtol=1e-5, atol=1e-5)
