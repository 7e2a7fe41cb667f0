"""mm, addmm (GPT-2's Conv1D too), bmm, baddbmm, and linear/matmul if they survive -> ``detcompile.matmul``."""
from __future__ import annotations

import torch
import torch.fx as fx

from .manager import PassContext, PassSpec, _propagate_fake, is_float_node, replace_with

aten = torch.ops.aten


def matmul_pass(gm: fx.GraphModule, ctx: PassContext) -> None:
    mm = torch.ops.detcompile.matmul.default
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        t = node.target
        if t in (aten.mm.default, aten.bmm.default):
            a, b = node.args[:2]
            if is_float_node(a):
                replace_with(gm, node, mm, (a, b), {}, ctx, "matmul")
        elif t in (aten.addmm.default, aten.baddbmm.default):
            bias, a, b = node.args[:3]
            beta = node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1)
            alpha = node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1)
            if is_float_node(a):
                replace_with(
                    gm, node, mm, (a, b), {"bias": bias, "alpha": float(alpha), "beta": float(beta)}, ctx, "matmul"
                )
        elif t == aten.linear.default and is_float_node(node.args[0]):
            _rewrite_linear(gm, node, ctx)


def _rewrite_linear(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> None:
    # linear(x[..., K], W[N, K], b) == matmul(x.view(-1, K), W.t(), b).view(..., N)
    x, w = node.args[:2]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    g = gm.graph
    with g.inserting_before(node):
        x2 = g.call_function(aten.reshape.default, (x, [-1, x.meta["val"].shape[-1]]))
        wt = g.call_function(aten.t.default, (w,))
    for n in (x2, wt):
        n.meta["stack_trace"] = node.meta.get("stack_trace")
        _propagate_fake(n, "val")
    out2 = replace_with(gm, node, torch.ops.detcompile.matmul.default, (x2, wt), {"bias": bias}, ctx, "matmul")
    out_shape = list(x.meta["val"].shape[:-1]) + [w.meta["val"].shape[0]]
    with g.inserting_after(out2):
        view = g.call_function(aten.reshape.default, (out2, out_shape))
    out2.replace_all_uses_with(view, delete_user_cb=lambda u: u is not view)
    view.meta = dict(out2.meta)
    _propagate_fake(view, "val")


SPEC = PassSpec(
    "matmul", matmul_pass,
    targets=("mm", "addmm", "bmm", "baddbmm", "linear"),
    into=("detcompile.matmul",),
    when="float operands (addmm: GPT-2's Conv1D too; linear: any leading dims)",
)
