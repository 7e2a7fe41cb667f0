import torch

from detcompile.passes.matmul import matmul_pass

from ._util import aten_graph, run_pass, targets

aten = torch.ops.aten


def _check(fn, *inputs, gone):
    gm = aten_graph(fn, *inputs)
    assert gone & targets(gm), "the graph before the pass must hold the targeted op"
    report = run_pass(gm, matmul_pass)
    after = targets(gm)
    assert not (gone & after), f"targeted ops left: {gone & after}"
    assert torch.ops.detcompile.matmul.default in after
    assert report.rewrites and all(r.new == "detcompile.matmul.default" for r in report.rewrites)
    out, ref = gm(*inputs), fn(*inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_linear_with_and_without_bias(gen):
    x = torch.randn(3, 5, 16, generator=gen)
    w = torch.randn(24, 16, generator=gen)
    b = torch.randn(24, generator=gen)
    _check(lambda x, w, b: torch.nn.functional.linear(x, w, b), x, w, b, gone={aten.addmm.default})
    _check(lambda x, w: torch.nn.functional.linear(x, w), x, w, gone={aten.mm.default})


def test_gpt2_conv1d_addmm(gen):
    x = torch.randn(7, 16, generator=gen)
    w = torch.randn(16, 24, generator=gen)  # Conv1D keeps the weight as [in, out]
    b = torch.randn(24, generator=gen)
    _check(lambda x, w, b: torch.addmm(b, x, w), x, w, b, gone={aten.addmm.default})


def test_bmm_baddbmm_and_matmul(gen):
    a = torch.randn(4, 6, 8, generator=gen)
    b = torch.randn(4, 8, 5, generator=gen)
    c = torch.randn(4, 6, 5, generator=gen)
    _check(lambda a, b: torch.bmm(a, b), a, b, gone={aten.bmm.default})
    _check(lambda c, a, b: torch.baddbmm(c, a, b, beta=0.5, alpha=2.0), c, a, b, gone={aten.baddbmm.default})
    q = torch.randn(2, 3, 6, 8, generator=gen)
    k = torch.randn(2, 3, 8, 6, generator=gen)
    _check(lambda q, k: torch.matmul(q, k), q, k, gone={aten.bmm.default})


def test_integer_matmul_left_alone():
    a = torch.randint(0, 5, (4, 4))
    gm = aten_graph(lambda a: a @ a, a)
    run_pass(gm, matmul_pass)
    assert aten.mm.default in targets(gm)


def test_surviving_aten_linear_rewritten(gen):
    # Pre-dispatch graphs keep aten.linear whole; the pass splits it into reshape + matmul + reshape.
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w, b = torch.randn(2, 3, 8, generator=gen), torch.randn(5, 8, generator=gen), torch.randn(5, generator=gen)
    gm = make_fx(lambda x, w, b: aten.linear(x, w, b), tracing_mode="fake", pre_dispatch=True)(x, w, b)
    assert aten.linear.default in targets(gm)
    run_pass(gm, matmul_pass)
    assert aten.linear.default not in targets(gm)
    assert torch.ops.detcompile.matmul.default in targets(gm)
    torch.testing.assert_close(gm(x, w, b), torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
