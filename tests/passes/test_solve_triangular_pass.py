import pytest
import torch

from detcompile.passes import PassContext, Report
from detcompile.passes.classify import audit_pass
from detcompile.passes.solve_triangular import solve_triangular_pass

from ._util import aten_graph, run_pass, targets

aten = torch.ops.aten
SOLVE = torch.ops.detcompile.solve_triangular.default


def _tri(gen, *shape):
    a = torch.randn(*shape, generator=gen) * 0.1
    a.diagonal(dim1=-2, dim2=-1).add_(2.0)
    return a


@pytest.mark.parametrize("upper,left,unit", [(False, True, True), (True, False, False), (True, True, True)])
def test_solve_triangular_rewritten_with_its_flags(gen, upper, left, unit):
    A = _tri(gen, 2, 8, 8)
    B = torch.randn(2, 8, 3, generator=gen) if left else torch.randn(2, 3, 8, generator=gen)
    fn = lambda A, B: torch.linalg.solve_triangular(A, B, upper=upper, left=left, unitriangular=unit)  # noqa: E731
    gm = aten_graph(fn, A, B)
    assert aten.linalg_solve_triangular.default in targets(gm)
    report = run_pass(gm, solve_triangular_pass)
    assert aten.linalg_solve_triangular.default not in targets(gm) and SOLVE in targets(gm)
    assert len(report.rewrites) == 1
    torch.testing.assert_close(gm(A, B), fn(A, B), rtol=1e-5, atol=1e-5)


def test_unrewritten_solve_is_flagged_with_reason(gen):
    A, B = _tri(gen, 4, 4), torch.randn(4, 2, generator=gen)
    gm = aten_graph(lambda A, B: torch.linalg.solve_triangular(A, B, upper=False), A, B)
    report = Report()
    audit_pass(gm, PassContext(None, report))
    assert len(report.leftovers) == 1 and "trsm" in report.leftovers[0].reason


def ut_transform(k_beta, key, v_beta, decay):
    """Gated DeltaNet's chunk UT transform, as transformers writes it (qwen3_next)."""
    n = key.shape[-2]
    mask = torch.ones(n, n, dtype=torch.bool).triu(1)
    cum = decay.cumsum(-1)
    pair = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(mask, float("-inf")).exp()
    ut = (k_beta @ key.transpose(-1, -2)) * pair
    return torch.linalg.solve_triangular(ut, v_beta, upper=False, unitriangular=True)


def test_compiled_strict_ut_transform_bitwise_across_batches(gen):
    torch._dynamo.reset()
    compiled = torch.compile(ut_transform, backend="deterministic", options={"strict": True})
    shape = (6, 2, 16, 8)  # [batch, heads, chunk, head_dim]
    k_beta, key, v_beta = (torch.randn(shape, generator=gen) * 0.3 for _ in range(3))
    decay = -torch.rand(6, 2, 16, generator=gen)
    args = (k_beta, key, v_beta, decay)
    with torch.no_grad():
        ref = compiled(*(a[:1] for a in args))[0]
        for bs in (2, 3, 6):
            batch = [a[:bs].clone() for a in args]
            for b, a in zip(batch, args):
                b[bs - 1] = a[0]
            assert torch.equal(compiled(*batch)[bs - 1], ref), bs
        torch.testing.assert_close(ref, ut_transform(*(a[:1] for a in args))[0], rtol=1e-4, atol=1e-5)
