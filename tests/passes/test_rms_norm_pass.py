import torch

from detcompile.passes.reductions import reductions_pass
from detcompile.passes.rms_norm import rms_norm_pass

from ._util import aten_graph, run_pass, targets

aten = torch.ops.aten


def hf_rms_norm(x, w):
    eps = 1e-6
    # Written out the way Llama/Qwen/Mistral do.
    dtype = x.dtype
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return w * h.to(dtype)


def gemma_rms_norm(x, w):
    eps = 1e-6
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + w.float())).type_as(x)


def test_written_out_rmsnorm_rewritten(gen):
    x = torch.randn(3, 7, 40, generator=gen).to(torch.bfloat16)
    w = torch.randn(40, generator=gen).to(torch.bfloat16)
    for fn in (hf_rms_norm, gemma_rms_norm):
        gm = aten_graph(fn, x, w)
        assert {aten.mean.dim, aten.rsqrt.default} <= targets(gm)
        report = run_pass(gm, rms_norm_pass)
        after = targets(gm)
        assert aten.mean.dim not in after and aten.rsqrt.default not in after
        assert torch.ops.detcompile.rms_norm.default in after
        assert [r.new for r in report.rewrites] == ["detcompile.rms_norm.default"]
        out, ref = gm(x, w).float(), fn(x, w).float()
        assert (out - ref).norm() / ref.norm() < 1e-2


def test_functional_rms_norm_rewritten(gen):
    x = torch.randn(5, 33, generator=gen)
    w = torch.randn(33, generator=gen)
    fn = lambda x, w: torch.nn.functional.rms_norm(x, (33,), w, 1e-5)  # noqa: E731
    gm = aten_graph(fn, x, w)
    run_pass(gm, rms_norm_pass)
    run_pass(gm, reductions_pass)  # whatever form F.rms_norm took, no float reduction may remain
    after = targets(gm)
    assert not after & {aten.mean.dim, aten.sum.dim_IntList, aten.rms_norm.default}
    torch.testing.assert_close(gm(x, w), fn(x, w), rtol=1e-5, atol=1e-5)


def test_partial_pattern_left_for_reductions(gen):
    # mean of squares without rsqrt is not an RMSNorm: the pass must leave it.
    x = torch.randn(4, 16, generator=gen)
    gm = aten_graph(lambda x: x.pow(2).mean(-1, keepdim=True) * 3.0, x)
    report = run_pass(gm, rms_norm_pass)
    assert not report.rewrites and aten.mean.dim in targets(gm)
