"""The linear_swiglu pass: an MLP's gate/up group and its SwiGLU -> detcompile.linear_swiglu, bitwise
today's results; groups whose outputs are used elsewhere left alone."""
import torch
import torch.nn.functional as F

from detcompile.passes.linear_group import linear_group_pass
from detcompile.passes.linear_swiglu import linear_swiglu_pass
from detcompile.passes.matmul import matmul_pass
from detcompile.passes.silu_mul import silu_mul_pass

from ._util import aten_graph, run_pass, targets

FUSED = torch.ops.detcompile.linear_swiglu.default
GROUP = torch.ops.detcompile.linear_group.default
SILU_MUL = torch.ops.detcompile.silu_mul.default


def _rewrite(fn, *inputs):
    gm = aten_graph(fn, *inputs)
    for p in (matmul_pass, linear_group_pass, silu_mul_pass):
        run_pass(gm, p)
    before = gm(*inputs)
    report = run_pass(gm, linear_swiglu_pass)
    return gm, report, before


def _mlp(x, wg, wu, wd):
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def test_llama_mlp_fused_bitwise(gen):
    x = torch.randn(2, 5, 32, generator=gen)  # [B, T, K]: the group works on a [B*T, K] view
    wg, wu = torch.randn(24, 32, generator=gen), torch.randn(24, 32, generator=gen)
    wd = torch.randn(32, 24, generator=gen)
    gm, report, before = _rewrite(_mlp, x, wg, wu, wd)
    assert len(report.rewrites) == 1
    assert FUSED in targets(gm) and not {GROUP, SILU_MUL} & targets(gm)
    assert torch.equal(gm(x, wg, wu, wd), before)


def test_up_first_and_two_dim_input(gen):
    """up * silu(gate) with up_proj traced first: the weights are taken by role, not by position."""
    x = torch.randn(6, 16, generator=gen)
    wg, wu = torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)

    def fn(x, wg, wu):
        up = F.linear(x, wu)
        return up * F.silu(F.linear(x, wg))

    gm, report, before = _rewrite(fn, x, wg, wu)
    assert len(report.rewrites) == 1 and FUSED in targets(gm)
    assert torch.equal(gm(x, wg, wu), before)


def test_outputs_used_elsewhere_left_alone(gen):
    x = torch.randn(4, 16, generator=gen)
    wg, wu = torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)
    cases = [
        lambda x, wg, wu: (lambda g: (F.silu(g) * F.linear(x, wu), g))(F.linear(x, wg)),  # the gate returned too
        lambda x, wg, wu: (F.silu(F.linear(x, wg)) * F.linear(x, wu), F.linear(x, wu)),  # a third member
    ]
    for fn in cases:
        gm, report, before = _rewrite(fn, x, wg, wu)
        assert not report.rewrites and FUSED not in targets(gm)
        after = gm(x, wg, wu)
        assert all(torch.equal(a, b) for a, b in zip(after, before)) if isinstance(before, (tuple, list)) \
            else torch.equal(after, before)
