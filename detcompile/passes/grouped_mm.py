"""Grouped matmuls of MoE experts (``aten._grouped_mm``, transformers' ``grouped_mm_fallback``)
-> ``detcompile.grouped_mm``."""
from __future__ import annotations

import torch
import torch.fx as fx

from .manager import PassContext, PassSpec, is_float_node, replace_with


def _targets():
    out = []
    if hasattr(torch.ops.aten, "_grouped_mm"):
        out.append(torch.ops.aten._grouped_mm.default)
    try:  # registered by transformers.integrations.moe when it is imported
        out.append(torch.ops.transformers.grouped_mm_fallback.default)
    except (AttributeError, RuntimeError):
        pass
    return out


def grouped_mm_pass(gm: fx.GraphModule, ctx: PassContext) -> None:
    targets = _targets()
    op = torch.ops.detcompile.grouped_mm.default
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in targets or not is_float_node(node.args[0]):
            continue
        x, w = node.args[:2]
        offs = node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
        bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
        out_dtype = node.args[4] if len(node.args) > 4 else node.kwargs.get("out_dtype")
        xv, wv = x.meta["val"], w.meta["val"]
        if offs is None or bias is not None or xv.dim() != 2 or wv.dim() != 3:
            continue  # other layouts are left for the audit
        if out_dtype is not None and out_dtype != xv.dtype:
            continue
        replace_with(gm, node, op, (x, w, offs), {}, ctx, "grouped_mm")


SPEC = PassSpec(
    "grouped_mm", grouped_mm_pass,
    targets=("_grouped_mm", "grouped_mm_fallback"),
    into=("detcompile.grouped_mm",),
    when="2-D input, 3-D expert weights, offsets, no bias (MoE experts; transformers' grouped_mm_fallback)",
)
