"""``aten.native_layer_norm`` -> ``detcompile.layer_norm`` (same three outputs: out, mean, rstd)."""
from __future__ import annotations

import torch
import torch.fx as fx

from .manager import PassContext, PassSpec, is_float_node, replace_with

aten = torch.ops.aten


def layer_norm_pass(gm: fx.GraphModule, ctx: PassContext) -> None:
    op = torch.ops.detcompile.layer_norm.default
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == aten.native_layer_norm.default and is_float_node(node.args[0]):
            x, shape, weight, bias, eps = node.args[:5]
            replace_with(gm, node, op, (x, list(shape), weight, bias, float(eps)), {}, ctx, "layer_norm")


SPEC = PassSpec("layer_norm", layer_norm_pass, targets=("native_layer_norm",), into=("detcompile.layer_norm",))
