"""The CPU safe list is evidence, not belief: whatever the classifier lets through on the CPU is measured
exact per element, and every op measured position-dependent is flagged or rewritten (issue #11)."""
import warnings

import pytest
import torch

from detcompile import NondeterminismError
from detcompile.passes import PassContext, Report
from detcompile.passes.classify import CPU_EXACT, audit_pass

from . import cpu_exactness as ce
from ._util import aten_graph

DTYPES = (torch.float32, torch.bfloat16)


def _classified_safe(fn, domains, dtype) -> bool:
    gen = torch.Generator().manual_seed(0)
    xs = [ce._values(d, 16, dtype, gen) for d in domains]
    report = Report()
    audit_pass(aten_graph(lambda *a: fn(*a), *xs), PassContext(None, report))  # builtins: no fixed arity
    return not report.leftovers


def _has_kernel(fn, domains, dtype) -> bool:
    try:
        fn(*[torch.ones(2, dtype=dtype) for _ in domains])
        return True
    except RuntimeError:  # e.g. no fp16 -> int64 cast here
        return False


def _cases():
    return [pytest.param(fn, domains, id=label) for label, _name, fn, domains in ce.CASES]


@pytest.mark.parametrize("fn,domains", _cases())
def test_what_the_cpu_audit_calls_safe_is_exact_per_element(fn, domains):
    for dtype in DTYPES:
        if _has_kernel(fn, domains, dtype) and _classified_safe(fn, domains, dtype):
            assert ce.position_dependent(fn, domains, dtype) == 0, f"{dtype}: classified safe but position-dependent"


def test_every_listed_op_has_a_measured_case_classified_safe():
    measured = {name for _label, name, fn, d in ce.CASES if _classified_safe(fn, d, torch.float32)}
    untested = set(CPU_EXACT) - measured - {
        # Aliases and selections with no arithmetic (same kernels as a measured op, or no rounding):
        "true_divide", "negative", "absolute", "fix", "clip", "max", "min", "clone", "masked_fill",
        "signbit", "isfinite", "isposinf", "isneginf", "ne", "le", "gt",
        "logical_and", "logical_or", "logical_xor", "logical_not",
    }
    assert not untested, sorted(untested)


def test_measurement_finds_a_known_position_dependent_op():
    # The harness itself can fail: fp32 atan2 rounds by offset on the CPU (torch 2.13, measured).
    assert ce.position_dependent(torch.atan2, ("any", "any"), torch.float32) > 0


class Atan2(torch.nn.Module):
    def forward(self, x):
        return torch.atan2(x, x.flip(-1))


def test_strict_refuses_cpu_atan2_default_warns(gen):
    torch._dynamo.reset()
    f = torch.compile(Atan2(), backend="deterministic", options={"strict": True})
    with pytest.raises(NondeterminismError, match="atan2"):
        f(torch.randn(3, 37, generator=gen))
    torch._dynamo.reset()
    f = torch.compile(Atan2(), backend="deterministic")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f(torch.randn(3, 37, generator=gen))
    assert any("atan2" in str(w.message) for w in caught)
