"""The FX passes, one per file, in the order they run.

``TORCH_PASSES`` run on the Dynamo graph (before AOTAutograd); ``ATEN_PASSES`` on the aten graph that
AOTAutograd hands to the compiler. The audit runs last and reports whatever is left. Each rewriting pass
declares what it rewrites in a ``PassSpec`` (``SPECS``); the classifier and ``detcompile.audit`` read
their coverage from there.
"""
from . import (
    convolution, cpu_pointwise, group_norm, grouped_mm, index_add, layer_norm, linear_group, linear_swiglu, matmul,
    reductions,
    rms_norm, rms_norm_weight, add_rms_norm,
    rotary, sdpa, silu_mul, softmax, solve_triangular, sort,
)
from .classify import NondeterminismError, audit_pass, classify
from .manager import Leftover, PassContext, PassManager, PassSpec, Report, Rewrite

TORCH_SPECS = [sdpa.SPEC]

ATEN_SPECS = [
    matmul.SPEC,
    linear_group.SPEC,  # right after matmul: it groups matmul's nodes
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
    rms_norm_weight.SPEC,  # the rms_norm op's cast and weight around it: after rms_norm
    add_rms_norm.SPEC,  # the residual add before that op: after rms_norm_weight
    rotary.SPEC,  # fusions of pointwise ops: nothing above rewrites these patterns' ops
    silu_mul.SPEC,  # before cpu_pointwise, which would take the silu
    linear_swiglu.SPEC,  # after linear_group and silu_mul: it fuses their nodes
    cpu_pointwise.SPEC,  # after the norms/softmax patterns, which read rsqrt/exp
]

#: Every rewriting pass by name, in the order they run.
SPECS: dict[str, PassSpec] = {s.name: s for s in TORCH_SPECS + ATEN_SPECS}

TORCH_PASSES = [(s.name, s.fn) for s in TORCH_SPECS]
ATEN_PASSES = [(s.name, s.fn) for s in ATEN_SPECS] + [("audit", audit_pass)]  # the audit always last


def coverage_table() -> str:
    """The passes' declarations as the markdown table of docs/design.md (a test keeps the two equal)."""
    def ops(names):
        return ", ".join(f"`{n}`" for n in names)

    rows = ["| pass | runs on | rewrites | into | which calls |", "| --- | --- | --- | --- | --- |"]
    for spec in SPECS.values():
        where = ("Dynamo graph" if spec.level == "torch" else "aten graph") + (
            "" if set(spec.devices) == {"cpu", "cuda"} else f", {'/'.join(spec.devices).upper()} only")
        rows.append(f"| `{spec.name}` | {where} | {ops(spec.targets)} | {ops(spec.into)} | {spec.when or 'all'} |")
    rows.append("| `audit` | aten graph, last | nothing: classifies every op left | report / warning / "
                "`NondeterminismError` | all |")
    return "\n".join(rows)


__all__ = [
    "ATEN_PASSES", "SPECS", "coverage_table", "TORCH_PASSES", "Leftover", "NondeterminismError", "PassContext", "PassManager",
    "PassSpec", "Report", "Rewrite", "classify",
]
