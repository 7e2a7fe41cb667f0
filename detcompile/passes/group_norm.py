"""``aten.native_group_norm`` -> ``detcompile.group_norm`` (same three outputs: out, mean, rstd)."""
from __future__ import annotations

import torch
import torch.fx as fx

from .manager import PassContext, PassSpec, is_float_node, replace_with

aten = torch.ops.aten


def group_norm_pass(gm: fx.GraphModule, ctx: PassContext) -> None:
    op = torch.ops.detcompile.group_norm.default
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == aten.native_group_norm.default and is_float_node(node.args[0]):
            x, weight, bias, n, c, hxw, group, eps = node.args[:8]
            replace_with(gm, node, op, (x, weight, bias, n, c, hxw, int(group), float(eps)), {}, ctx, "group_norm")


SPEC = PassSpec("group_norm", group_norm_pass, targets=("native_group_norm",), into=("detcompile.group_norm",))
