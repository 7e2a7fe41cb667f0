"""``aten._softmax`` / ``aten._log_softmax`` -> ``detcompile.softmax``."""
from __future__ import annotations

import torch
import torch.fx as fx

from .manager import PassContext, PassSpec, is_float_node, replace_with

aten = torch.ops.aten


def softmax_pass(gm: fx.GraphModule, ctx: PassContext) -> None:
    op = torch.ops.detcompile.softmax.default
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not is_float_node(node.args[0] if node.args else None):
            continue
        if node.target in (aten._softmax.default, aten._log_softmax.default):
            x, dim, half_to_float = node.args[:3]
            log = node.target == aten._log_softmax.default
            replace_with(gm, node, op, (x, int(dim), bool(half_to_float), log), {}, ctx, "softmax")
        elif node.target in (aten.softmax.int, aten.log_softmax.int):
            # Composite forms survive only with unusual decomposition tables; same semantics with a dtype cast.
            x, dim = node.args[:2]
            dtype = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
            log = node.target == aten.log_softmax.int
            if dtype is not None and dtype != x.meta["val"].dtype:
                continue  # left for the audit: a rare form
            replace_with(gm, node, op, (x, int(dim), False, log), {}, ctx, "softmax")


SPEC = PassSpec(
    "softmax", softmax_pass,
    targets=("_softmax", "_log_softmax", "softmax", "log_softmax"),
    into=("detcompile.softmax",),
)
