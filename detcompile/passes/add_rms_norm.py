"""The residual add before an RMSNorm -> ``detcompile.add_rms_norm_weight_after_cast`` (one kernel, not two).

A decoder layer ends ``h = residual + out`` and the next RMSNorm reads ``h``; after the rms_norm and
rms_norm_weight passes that is
    add(a, b) -> detcompile.rms_norm_weight_after_cast(add, weight, eps)
with the add also feeding the next residual. The fused op returns both ``a + b`` (eager add's bits:
the fp32 sum rounded once) and the norm of it, computed by the same rows kernel as the unfused norm,
so every consumer gets the bits it had. Matched for 16-bit a and b of the add's own shape and dtype
(no broadcast, no promotion, no ``alpha``) and hidden sizes whose rows run in one program
(``kernels.rms_norm.add_fusable``: every common size, <= 8192).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..kernels.rms_norm import add_fusable
from .manager import GETITEM, NodeBuilder, PassContext, PassSpec, Rewrite, is_call, meta_val, same_shape, source_line

aten = torch.ops.aten
PATTERN = "rms_norm_weight_after_cast(a + b) with a + b used elsewhere too"


def _match(norm: fx.Node, order: dict):
    if not is_call(norm, torch.ops.detcompile.rms_norm_weight_after_cast.default):
        return None
    add, weight = norm.args[0], norm.args[1]
    if not is_call(add, aten.add.Tensor) or len(add.args) != 2 or add.kwargs:
        return None
    if isinstance(weight, fx.Node) and order[weight] > order[add]:
        return None  # the fused op goes where the add is: its weight must exist there
    a, b = add.args
    vx = meta_val(add)
    if not all(isinstance(n, fx.Node) and isinstance(meta_val(n), torch.Tensor) for n in (a, b)):
        return None
    va, vb = meta_val(a), meta_val(b)
    if not (va.dtype == vb.dtype == vx.dtype and same_shape(va, vx) and same_shape(vb, vx)):
        return None
    hidden = vx.shape[-1]
    if not isinstance(hidden, int) or not add_fusable(hidden):
        return None
    return add, a, b


def add_rms_norm_pass(gm: fx.GraphModule, ctx: PassContext) -> None:
    op = torch.ops.detcompile.add_rms_norm_weight_after_cast.default
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for norm in list(gm.graph.nodes):
        found = _match(norm, order)
        if found is None:
            continue
        add, a, b = found
        _, weight, eps = norm.args
        build = NodeBuilder(gm, add)  # before the add: a, b and the weight are defined, nothing uses it yet
        fused = build(op, a, b, weight, eps)
        total, normed = build(GETITEM, fused, 0), build(GETITEM, fused, 1)
        ctx.report.rewrites.append(Rewrite("add_rms_norm", PATTERN, str(op), source_line(norm)))
        norm.replace_all_uses_with(normed)
        gm.graph.erase_node(norm)
        add.replace_all_uses_with(total)
        gm.graph.erase_node(add)


SPEC = PassSpec(
    "add_rms_norm", add_rms_norm_pass,
    targets=("add.Tensor",),
    into=("detcompile.add_rms_norm_weight_after_cast",),
    fusion=True,
    when="a residual add whose sum feeds rms_norm_weight_after_cast (16-bit, hidden <= 8192)",
)
