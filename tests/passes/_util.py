"""Helpers for pass tests: trace a function to an aten graph with fake values, run one pass."""
from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from detcompile.passes import PassContext, Report


def aten_graph(fn, *inputs):
    """A functional aten-level GraphModule of ``fn`` whose nodes carry fake ``meta['val']`` (like AOT's)."""
    return make_fx(torch.func.functionalize(fn, remove="mutations"), tracing_mode="fake")(*inputs)


def run_pass(gm, pass_fn):
    report = Report()
    pass_fn(gm, PassContext(options=None, report=report))
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return report


def targets(gm) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def compiled_logits(model, ids, disable=(), **options):
    """(logits, {pass name: rewrites}) of ``model(ids)`` under the backend (strict), the passes in
    ``disable`` off."""
    reports = []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="deterministic",
                             options={"strict": True, "disable_passes": tuple(disable), "report_sink": reports.append,
                                      **options})
    with torch.no_grad():
        logits = compiled(ids).logits
    counts: dict = {}
    for report in reports:
        for r in report.rewrites:
            counts[r.pass_name] = counts.get(r.pass_name, 0) + 1
    return logits, counts
