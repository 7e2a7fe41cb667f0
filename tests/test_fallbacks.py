"""Code that runs outside the backend (graph breaks, recompile-limit fallbacks) is an error under strict
and a warning by default, never silent (issue #11, item 1)."""
import warnings

import pytest
import torch

from detcompile import NondeterminismError, fallbacks


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Strict mode sets Dynamo's fail_on_recompile_limit_hit for the process: restore it per test."""
    torch._dynamo.reset()
    fallbacks._warned.clear()
    saved = torch._dynamo.config.fail_on_recompile_limit_hit
    torch._dynamo.config.fail_on_recompile_limit_hit = False  # an earlier strict test may have set it
    yield
    torch._dynamo.config.fail_on_recompile_limit_hit = saved
    torch._dynamo.reset()


@torch._dynamo.disable
def _eager_matmul(x):
    return x @ x.t()  # runs with the stock (batch-variant) mm: Dynamo never shows it to the backend


def _break_in_middle(x):
    y = x.sin()
    return _eager_matmul(y).cos()


def _break_first(x):
    return _eager_matmul(x).cos()  # nothing before the break: only the resumed code reaches the backend


def _per_batch_size(x):
    for i in range(x.shape[0]):  # unrolled: one recompile per batch size
        x = x + i
    return x @ x.t()


def _detcompile_warnings(caught):
    return [str(w.message) for w in caught if "detcompile" in str(w.message)]


@pytest.mark.parametrize("fn", [_break_in_middle, _break_first])
def test_strict_graph_break_is_an_error_naming_it(fn, gen):
    f = torch.compile(fn, backend="deterministic", options={"strict": True})
    with pytest.raises(NondeterminismError) as info:  # itself, not wrapped in BackendCompilerFailed
        f(torch.randn(4, 3, generator=gen))
    msg = str(info.value)
    assert "graph break" in msg and "test_fallbacks.py" in msg, msg


def test_default_graph_break_warns_naming_the_call(gen):
    f = torch.compile(_break_in_middle, backend="deterministic")
    x = torch.randn(4, 3, generator=gen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = f(x)
    msgs = _detcompile_warnings(caught)
    assert any("graph break" in m and "_eager_matmul(y)" in m for m in msgs), msgs
    assert torch.equal(out, _break_in_middle(x))  # same ops eagerly: the fallback still computes


def test_strict_recompile_limit_is_an_error(gen):
    f = torch.compile(_per_batch_size, backend="deterministic", options={"strict": True})
    with torch._dynamo.config.patch(recompile_limit=2), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(Exception) as info:
            for bs in (1, 2, 3, 4):
                f(torch.randn(bs, 3, generator=gen))
    err = info.value
    while not isinstance(err, torch._dynamo.exc.FailOnRecompileLimitHit) and err.__cause__ is not None:
        err = err.__cause__
    assert isinstance(err, torch._dynamo.exc.FailOnRecompileLimitHit), repr(info.value)
    assert any("_per_batch_size" in m for m in _detcompile_warnings(caught))


def test_default_recompile_limit_warns_once_naming_the_function(gen):
    f = torch.compile(_per_batch_size, backend="deterministic")
    with torch._dynamo.config.patch(recompile_limit=2), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for bs in (1, 2, 3, 4, 5):
            f(torch.randn(bs, 3, generator=gen))
    msgs = [m for m in _detcompile_warnings(caught) if "recompile_limit" in m]
    assert len(msgs) == 1 and "_per_batch_size" in msgs[0] and "EAGERLY" in msgs[0], msgs


def test_batch_sizes_share_one_dynamic_graph(gen):
    # Automatic dynamic shapes: a static graph for the first batch size, then one symbolic graph for
    # all others. A pass or fake kernel that guarded on the batch would recompile per batch size and
    # reach the recompile limit.
    reports = []
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8)).eval()
    f = torch.compile(model, backend="deterministic", options={"strict": True, "report_sink": reports.append})
    x = torch.randn(40, 16, generator=gen)
    with torch.no_grad():
        ref = f(x[:1])[0]
        for bs in (2, 3, 5, 8, 9, 13, 17, 33, 40):
            assert torch.equal(f(x[:bs])[0], ref), bs
    assert len(reports) <= 2, len(reports)
