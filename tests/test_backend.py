"""The backend's contract: entry point, options, strict mode, fallback warning, explain."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import detcompile
from detcompile.backend import Options
from detcompile.passes import NondeterminismError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.down = torch.nn.Linear(32, 8)

    def forward(self, x):
        return torch.log_softmax(self.down(torch.nn.functional.gelu(self.norm(self.up(x)))), -1)


def test_backend_found_through_entry_point_without_import():
    # A fresh interpreter that never imports detcompile itself: torch finds it via the entry point.
    code = (
        "import sys, torch\n"
        "f = torch.compile(lambda a, b: (a @ b).softmax(-1), backend='deterministic')\n"
        "a = torch.randn(5, 7); b = torch.randn(7, 3)\n"
        "out = f(a, b)\n"
        "assert 'detcompile' in sys.modules\n"
        "assert torch.allclose(out, (a @ b).softmax(-1), atol=1e-5)\n"
        "print('OK')\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


def test_mlp_rows_bitwise_across_batch_sizes(gen):
    model = TinyMLP().eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="deterministic", options={"strict": True})
    x = torch.randn(64, 16, generator=gen)
    with torch.no_grad():
        ref = compiled(x[:1])[0]
        for bs in (2, 3, 5, 17, 64):
            assert torch.equal(compiled(x[:bs])[0], ref)
        torch.testing.assert_close(ref, model(x[:1])[0], rtol=1e-5, atol=1e-5)


def test_inductor_path_warns_and_is_batch_invariant_on_this_mlp(gen):
    model = TinyMLP().eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="deterministic", options={"inductor": True})
    x = torch.randn(9, 16, generator=gen)
    with torch.no_grad(), pytest.warns(UserWarning, match="not proven batch-invariant"):
        ref = compiled(x[:1])[0]
    with torch.no_grad():
        for bs in (3, 9):
            assert torch.equal(compiled(x[:bs])[0], ref)
        torch.testing.assert_close(ref, model(x[:1])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra", [{}, {"cudagraphs": True}])
def test_strict_refuses_inductor(extra):
    # docs/inductor.md: GPT-2 changed bits on the GPU through Inductor; strict cannot promise it.
    # (torch.compile takes mode or options, not both: CUDA graphs come from options["cudagraphs"].)
    torch._dynamo.reset()
    opts = {"inductor": True, "strict": True, **extra}
    f = torch.compile(lambda x: x @ x, backend="deterministic", options=opts)
    with pytest.raises(NondeterminismError, match="inductor.*refused"):
        f(torch.randn(2, 2))
    with pytest.raises(NondeterminismError, match="refused"):  # the mode spelling, as the backend gets it
        Options.from_user("reduce-overhead", {"inductor": True, "strict": True})


def _cumprod_model(x):
    return torch.cumprod(x, -1) @ x.t()  # cumprod on floats: no detcompile op for it


def test_strict_mode_names_op_and_source_line(gen):
    torch._dynamo.reset()
    f = torch.compile(_cumprod_model, backend="deterministic", options={"strict": True})
    with pytest.raises(detcompile.NondeterminismError) as info:  # itself, not Dynamo's wrapper
        f(torch.randn(4, 4, generator=gen))
    assert info.type.__mro__[1] is NondeterminismError or info.type is NondeterminismError
    msg = str(info.value)
    assert "cumprod" in msg and "test_backend.py" in msg


def test_default_mode_warns_and_falls_back(gen):
    torch._dynamo.reset()
    f = torch.compile(_cumprod_model, backend="deterministic")
    x = torch.randn(4, 4, generator=gen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = f(x)
    msgs = [str(w.message) for w in caught if "detcompile" in str(w.message)]
    assert any("cumprod" in m for m in msgs), msgs
    torch.testing.assert_close(out, _cumprod_model(x), rtol=1e-5, atol=1e-5)


def test_bad_options_and_modes_are_clear_errors():
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown option"):
        torch.compile(lambda x: x @ x, backend="deterministic", options={"strcit": True})(torch.randn(2, 2))
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="autotun"):
        torch.compile(lambda x: x @ x, backend="deterministic", mode="max-autotune")(torch.randn(2, 2))


def test_disable_passes_from_the_environment(monkeypatch):
    monkeypatch.setenv("DETCOMPILE_DISABLE_PASSES", " linear_swiglu, rotary ")
    assert Options.from_user(None, {"disable_passes": ["silu_mul"]}).disable_passes == (
        "silu_mul", "linear_swiglu", "rotary")
    assert Options.from_user(None, None).disable_passes == ("linear_swiglu", "rotary")
    monkeypatch.setenv("DETCOMPILE_DISABLE_PASSES", "linear_swigul")
    with pytest.raises(ValueError, match="linear_swigul.*DETCOMPILE_DISABLE_PASSES"):
        Options.from_user(None, None)
    monkeypatch.setenv("DETCOMPILE_DISABLE_PASSES", "")
    assert Options.from_user(None, None).disable_passes == ()


def test_explain_reports_rewrites_and_leftovers(capsys, gen):
    model = TinyMLP().eval()
    torch._dynamo.reset()
    result = detcompile.explain(model, torch.randn(3, 16, generator=gen))
    printed = capsys.readouterr().out
    assert result.ok
    new_ops = {r.new for r in result.rewrites}
    assert {"detcompile.matmul.default", "detcompile.layer_norm.default", "detcompile.softmax.default"} <= new_ops
    assert "detcompile.matmul.default" in printed and "batch-invariant" in printed
    assert "matmul@" + detcompile.passes.SPECS["matmul"].version in printed  # which pass version rewrote it
    torch._dynamo.reset()
    bad = detcompile.explain(_cumprod_model, torch.randn(4, 4, generator=gen), verbose=False)
    assert not bad.ok and any("cumprod" in lo.op for lo in bad.leftovers)
