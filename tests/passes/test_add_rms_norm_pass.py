"""The add_rms_norm pass: a residual add feeding Hugging Face's RMSNorm -> one op returning both,
bitwise the graph before; other adds left alone."""
import pytest
import torch

from detcompile.passes.add_rms_norm import add_rms_norm_pass
from detcompile.passes.rms_norm import rms_norm_pass
from detcompile.passes.rms_norm_weight import rms_norm_weight_pass

from ._util import aten_graph, run_pass, targets
from .test_rms_norm_weight_pass import hf_rms_norm

FUSED = torch.ops.detcompile.add_rms_norm_weight_after_cast.default
NORM = torch.ops.detcompile.rms_norm_weight_after_cast.default


def layer_tail(residual, out, w, w2):
    """A decoder layer's ``h = residual + out``, the next RMSNorm of h, and h reused as the residual."""
    h = residual + out
    n = hf_rms_norm(h, w)
    return h + n @ w2, n


def _rewrite(fn, *inputs):
    gm = aten_graph(fn, *inputs)
    run_pass(gm, rms_norm_pass)
    run_pass(gm, rms_norm_weight_pass)
    before = gm(*inputs)
    return gm, run_pass(gm, add_rms_norm_pass), before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rewritten_bitwise(dtype, gen):
    r, o = ((torch.randn(2, 3, 64, generator=gen) * 2).to(dtype) for _ in range(2))
    w, w2 = torch.rand(64, generator=gen).to(dtype), torch.randn(64, 64, generator=gen).to(dtype)
    gm, report, before = _rewrite(layer_tail, r, o, w, w2)
    assert len(report.rewrites) == 1 and FUSED in targets(gm) and NORM not in targets(gm)
    assert torch.ops.aten.add.Tensor in targets(gm)  # the second residual add stays (no norm after it)
    assert all(torch.equal(a, b) for a, b in zip(gm(r, o, w, w2), before))


def scaled_add(residual, out, w):
    return hf_rms_norm(torch.add(residual, out, alpha=2), w)


def broadcast_add(residual, bias, w):
    return hf_rms_norm(residual + bias, w)


@pytest.mark.parametrize("name, fn, shapes, hidden", [
    ("add with alpha", scaled_add, ((2, 3, 64), (2, 3, 64)), 64),
    ("broadcast bias", broadcast_add, ((2, 3, 64), (64,)), 64),
    ("rows too long for one program", lambda r, o, w: hf_rms_norm(r + o, w), ((1, 2, 16384), (1, 2, 16384)), 16384),
])
def test_non_matching_left_alone(name, fn, shapes, hidden, gen):
    a, b = (torch.randn(*s, generator=gen).to(torch.bfloat16) for s in shapes)
    w = torch.rand(hidden, generator=gen).to(torch.bfloat16)
    gm, report, before = _rewrite(fn, a, b, w)
    assert NORM in targets(gm), name  # the earlier passes did match: only this one declined
    assert FUSED not in targets(gm) and not report.rewrites, name
    assert torch.equal(gm(a, b, w), before)
