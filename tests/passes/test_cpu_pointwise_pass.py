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


# ------------------------------------------------------------------------------------------------
# log_sigmoid_forward, polar and complex mul (CPU): elementwise, but ATen's CPU kernels round the
# vector body and the scalar tail differently for complex mul (and log_sigmoid is transcendental).
# ------------------------------------------------------------------------------------------------


def rotary_complex(x, freqs):
    """Rotary embedding written with complex numbers (DeepSeek-V2, Llama 4): polar, then complex mul."""
    cis = torch.polar(torch.ones_like(freqs), freqs) * 0.75  # attention_scaling
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * cis[:, :, None, :]).flatten(3)


def _rows_bitwise_at_any_position(fn, make, gen, sizes=range(1, 10)):
    """fn's row for a target must be bitwise the same at every position of batches of every size."""
    target = make(1)
    ref = fn(*target)[0]
    for bs in sizes:
        for pos in sorted({0, bs // 2, bs - 1}):
            batch = make(bs)
            for b, t in zip(batch, target):
                b[pos] = t[0]
            assert torch.equal(fn(*batch)[pos], ref), f"row at {pos} of {bs}"
    return ref


def test_polar_and_complex_mul_rewritten_on_cpu(gen):
    x, freqs = torch.randn(2, 5, 2, 6, generator=gen), torch.randn(2, 5, 3, generator=gen)
    gm = aten_graph(rotary_complex, x, freqs)
    assert {aten.polar.default, aten.mul.Tensor} <= targets(gm)
    report = run_pass(gm, cpu_pointwise_pass)
    assert aten.polar.default not in targets(gm)
    olds = sorted(r.old for r in report.rewrites if r.new == "aten.complex.default")
    assert olds == ["aten.mul.Tensor", "aten.mul.Tensor", "aten.polar.default"]
    # No complex mul left: every remaining mul has real operands.
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == aten.mul.Tensor:
            assert not n.meta["val"].is_complex()
    torch.testing.assert_close(gm(x, freqs), rotary_complex(x, freqs), rtol=1e-6, atol=1e-6)
    assert audit_leftovers(gm) == []


def test_complex_mul_variants_exact_formula(gen):
    # complex * complex, complex * real tensor, real tensor * complex, complex * Python complex.
    z = torch.randn(4, 7, dtype=torch.complex64, generator=gen)
    w = torch.randn(4, 7, dtype=torch.complex64, generator=gen)
    r = torch.randn(4, 7, generator=gen)

    def fn(z, w, r):
        return z * w, z * r, r * w, z * (0.5 - 2j)

    gm = aten_graph(fn, z, w, r)
    run_pass(gm, cpu_pointwise_pass)
    zr, wr = torch.view_as_real(z), torch.view_as_real(w)
    a, b, c, d = zr[..., 0], zr[..., 1], wr[..., 0], wr[..., 1]
    expect = (
        torch.complex(a * c - b * d, a * d + b * c),
        torch.complex(a * r, b * r),
        torch.complex(r * c, r * d),
        torch.complex(a * 0.5 - b * -2.0, a * -2.0 + b * 0.5),
    )
    for out, e, ref in zip(gm(z, w, r), expect, fn(z, w, r)):
        assert torch.equal(out, e)
        torch.testing.assert_close(out, ref)


def test_compiled_complex_rotary_rows_bitwise_at_any_position(gen):
    torch._dynamo.reset()
    compiled = torch.compile(rotary_complex, backend="deterministic", options={"strict": True})

    def make(bs):  # 5 x 1 x 3 complex per row: rows start at every offset mod the vector width
        return [torch.randn(bs, 5, 1, 6, generator=gen), torch.randn(bs, 5, 3, generator=gen)]

    ref = _rows_bitwise_at_any_position(compiled, make, gen)
    assert ref.shape == (5, 1, 6)


def test_log_sigmoid_rewritten_and_rows_bitwise(gen):
    fn = lambda x: torch.nn.functional.logsigmoid(x) * 2  # noqa: E731
    x = torch.randn(3, 37, generator=gen)
    gm = aten_graph(fn, x)
    assert aten.log_sigmoid_forward.default in targets(gm)
    report = run_pass(gm, cpu_pointwise_pass)
    assert aten.log_sigmoid_forward.default not in targets(gm)
    assert [r.old for r in report.rewrites] == ["aten.log_sigmoid_forward.default"]
    torch.testing.assert_close(gm(x), fn(x), rtol=1e-6, atol=1e-6)
    assert audit_leftovers(gm) == []

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="deterministic", options={"strict": True})
    for dtype in (torch.float32, torch.bfloat16):
        ref = _rows_bitwise_at_any_position(compiled, lambda bs: [(torch.randn(bs, 37, generator=gen) * 4).to(dtype)], gen)
        assert ref.dtype == dtype


def audit_leftovers(gm):
    from detcompile.passes import PassContext, Report
    from detcompile.passes.classify import audit_pass

    report = Report()
    audit_pass(gm, PassContext(None, report))
    return [lo.op for lo in report.leftovers]
