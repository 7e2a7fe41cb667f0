"""The rms_norm_weight pass: Hugging Face's RMSNorm tail -> detcompile.rms_norm_weight_after_cast,
bitwise today's graph; other norm tails left alone."""
import pytest
import torch

from detcompile.passes.rms_norm import rms_norm_pass
from detcompile.passes.rms_norm_weight import rms_norm_weight_pass

from ._util import aten_graph, run_pass, targets

FUSED = torch.ops.detcompile.rms_norm_weight_after_cast.default


def hf_rms_norm(x, w, eps=1e-6, weight_first=True):
    """transformers' LlamaRMSNorm.forward."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dtype) if weight_first else h.to(dtype) * w


def gemma_rms_norm(x, w, eps=1e-6):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + w.float())).to(x.dtype)


def norm_used_twice(x, w, eps=1e-6):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype), h.sum()


def _rewrite(fn, *inputs):
    gm = aten_graph(fn, *inputs)
    run_pass(gm, rms_norm_pass)
    before = gm(*inputs)
    return gm, run_pass(gm, rms_norm_weight_pass), before


@pytest.mark.parametrize("weight_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rewritten_bitwise(weight_first, dtype, gen):
    x = (torch.randn(2, 3, 64, generator=gen) * 2).to(dtype)
    w = torch.rand(64, generator=gen).to(dtype)
    gm, report, before = _rewrite(lambda x, w: hf_rms_norm(x, w, weight_first=weight_first), x, w)
    assert len(report.rewrites) == 1 and FUSED in targets(gm)
    assert torch.ops.detcompile.rms_norm.default not in targets(gm)
    assert torch.equal(gm(x, w), before)


@pytest.mark.parametrize("name, fn, dtype", [
    ("fp32 model", lambda x, w: hf_rms_norm(x, w), torch.float32),
    ("Gemma's 1 + w in fp32", lambda x, w: gemma_rms_norm(x, w), torch.bfloat16),
    ("norm used twice", lambda x, w: norm_used_twice(x, w), torch.bfloat16),
])
def test_non_matching_left_alone(name, fn, dtype, gen):
    x = (torch.randn(2, 3, 64, generator=gen) * 2).to(dtype)
    w = torch.rand(64, generator=gen).to(dtype)
    gm, report, before = _rewrite(fn, x, w)
    assert FUSED not in targets(gm) and not report.rewrites, name
    out = gm(x, w)
    assert all(torch.equal(a, b) for a, b in zip(out, before)) if isinstance(out, tuple) else torch.equal(out, before)
