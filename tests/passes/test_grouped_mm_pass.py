import torch

from detcompile.passes.grouped_mm import grouped_mm_pass

from ..kernels._util import grouped_mm_ref
from ._util import aten_graph, run_pass, targets


def _check(fn, x, w, offs, target):
    gm = aten_graph(fn, x, w, offs)
    assert target in targets(gm)
    report = run_pass(gm, grouped_mm_pass)
    assert target not in targets(gm)
    assert torch.ops.detcompile.grouped_mm.default in targets(gm) and len(report.rewrites) == 1
    out, ref = gm(x, w, offs).double(), grouped_mm_ref(x, w, offs)
    assert (out - ref).norm() / ref.norm() < 1e-2


def test_transformers_fallback_rewritten(gen):
    import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.grouped_mm_fallback)

    x = torch.randn(9, 16, generator=gen)
    w = torch.randn(3, 16, 8, generator=gen)
    offs = torch.tensor([2, 6, 9], dtype=torch.int32)
    op = torch.ops.transformers.grouped_mm_fallback
    _check(lambda x, w, offs: op(x, w, offs=offs), x, w, offs, op.default)


def test_aten_grouped_mm_rewritten(gen):
    x = torch.randn(9, 16, generator=gen).to(torch.bfloat16)
    w = torch.randn(3, 16, 8, generator=gen).to(torch.bfloat16)
    offs = torch.tensor([2, 6, 9], dtype=torch.int32)
    _check(lambda x, w, offs: torch._grouped_mm(x, w, offs=offs), x, w, offs, torch.ops.aten._grouped_mm.default)
