"""The FX passes, one per file, in the order they run.

``TORCH_PASSES`` run on the Dynamo graph (before AOTAutograd); ``ATEN_PASSES`` on the aten graph that
AOTAutograd hands to the compiler. The audit runs last and reports whatever is left. Each rewriting pass
declares what it rewrites in a ``PassSpec`` (``SPECS``); the classifier and ``detcompile.audit`` read
their coverage from there.
"""
from . import (
    convolution, cpu_pointwise, group_norm, grouped_mm, index_add, layer_norm, matmul, reductions, rms_norm,
    sdpa, softmax, solve_triangular, sort,
)
from .classify import NondeterminismError, audit_pass, classify
from .manager import Leftover, PassContext, PassManager, PassSpec, Report, Rewrite

TORCH_SPECS = [sdpa.SPEC]

ATEN_SPECS = [
    matmul.SPEC,
    grouped_mm.SPEC,
    rms_norm.SPEC,  # before reductions: it needs to see the written-out mean
    layer_norm.SPEC,
    group_norm.SPEC,
    softmax.SPEC,
    reductions.SPEC,
    index_add.SPEC,
    convolution.SPEC,
    solve_triangular.SPEC,
    sort.SPEC,
    cpu_pointwise.SPEC,  # after the norms/softmax patterns, which read rsqrt/exp
]

#: Every rewriting pass by name, in the order they run.
SPECS: dict[str, PassSpec] = {s.name: s for s in TORCH_SPECS + ATEN_SPECS}

TORCH_PASSES = [(s.name, s.fn) for s in TORCH_SPECS]
ATEN_PASSES = [(s.name, s.fn) for s in ATEN_SPECS] + [("audit", audit_pass)]  # the audit always last

__all__ = [
    "ATEN_PASSES", "SPECS", "TORCH_PASSES", "Leftover", "NondeterminismError", "PassContext", "PassManager",
    "PassSpec", "Report", "Rewrite", "classify",
]
