import pytest
import torch
import torch.nn.functional as F

from detcompile.passes import PassContext, Report
from detcompile.passes.classify import audit_pass
from detcompile.passes.convolution import convolution_pass

from ._util import aten_graph, run_pass, targets

aten = torch.ops.aten
CONV1D = torch.ops.detcompile.conv1d.default


def mamba_mixer(h, w, b):
    """Mamba's causal depthwise conv: [B, L, C] -> conv over L -> cut to L."""
    x = h.transpose(1, 2)
    return F.conv1d(x, w, b, padding=w.shape[-1] - 1, groups=x.shape[1])[..., : h.shape[1]]


def test_depthwise_causal_conv_rewritten(gen):
    h = torch.randn(3, 11, 16, generator=gen)
    w, b = torch.randn(16, 1, 4, generator=gen), torch.randn(16, generator=gen)
    gm = aten_graph(mamba_mixer, h, w, b)
    assert aten.convolution.default in targets(gm)
    report = run_pass(gm, convolution_pass)
    assert aten.convolution.default not in targets(gm) and CONV1D in targets(gm)
    assert [(r.old, r.new) for r in report.rewrites] == [("aten.convolution.default", "detcompile.conv1d.default")]
    torch.testing.assert_close(gm(h, w, b), mamba_mixer(h, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(groups=3), dict(stride=2, padding=2, dilation=2), dict(padding=1)])
def test_grouped_strided_dense_conv_rewritten_without_bias(gen, kw):
    g = kw.get("groups", 1)
    x = torch.randn(2, 6, 17, generator=gen)
    w = torch.randn(9, 6 // g, 3, generator=gen)
    fn = lambda x, w: F.conv1d(x, w, None, **kw)  # noqa: E731
    gm = aten_graph(fn, x, w)
    run_pass(gm, convolution_pass)
    assert CONV1D in targets(gm) and aten.convolution.default not in targets(gm)
    torch.testing.assert_close(gm(x, w), fn(x, w), rtol=1e-5, atol=1e-5)


def _leftovers(gm):
    report = Report()
    audit_pass(gm, PassContext(None, report))
    return report.leftovers


def test_2d_and_transposed_convs_left_and_named(gen):
    x2, w2 = torch.randn(1, 2, 5, 5, generator=gen), torch.randn(3, 2, 3, 3, generator=gen)
    x1, wt = torch.randn(1, 2, 7, generator=gen), torch.randn(2, 3, 3, generator=gen)
    fn = lambda x2, w2, x1, wt: (F.conv2d(x2, w2), F.conv_transpose1d(x1, wt))  # noqa: E731
    gm = aten_graph(fn, x2, w2, x1, wt)
    report = run_pass(gm, convolution_pass)
    assert not report.rewrites
    reasons = sorted(lo.reason for lo in _leftovers(gm))
    assert len(reasons) == 2
    assert "2-D convolution" in reasons[0] and "transposed convolution" in reasons[1]
    assert all("detcompile.conv1d" in r for r in reasons)


def test_compiled_strict_mamba_block_bitwise_across_batches(gen):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(24, 24, 4, groups=24, padding=3)
            self.out = torch.nn.Linear(24, 8)

        def forward(self, h):
            x = self.conv(h.transpose(1, 2))[..., : h.shape[1]]
            return self.out(F.silu(x).transpose(1, 2))

    torch.manual_seed(0)
    model = Block().eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="deterministic", options={"strict": True})
    h = torch.randn(9, 10, 24, generator=gen)
    with torch.no_grad():
        ref = compiled(h[:1])[0]
        for bs in (2, 3, 9):
            batch = h[:bs].clone()
            batch[bs - 1] = h[0]
            assert torch.equal(compiled(batch)[bs - 1], ref), bs
        torch.testing.assert_close(ref, model(h[:1])[0], rtol=1e-5, atol=1e-5)
