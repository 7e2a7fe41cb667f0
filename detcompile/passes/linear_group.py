"""Sibling linears -> ``detcompile.linear_group`` (one launch for q/k/v, for gate/up).

Matches ``detcompile.matmul`` nodes (so this runs after the matmul pass) that multiply the same
input by the transpose of a 2-D weight, with no bias and alpha = beta = 1: an attention layer's
``q_proj(x), k_proj(x), v_proj(x)`` and an MLP's ``gate_proj(x), up_proj(x)``, as AOTAutograd writes
them (``mm(view(x, [T, K]), t(W))``, each linear with its own view of x). Members are taken in graph
order, up to three at a time; each keeps its bits (``kernels/linear_group.py``).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .manager import GETITEM, NodeBuilder, PassContext, PassSpec, Rewrite, is_call, meta_val, source_line

aten = torch.ops.aten
PATTERN = "matmul(x, W1.t()), matmul(x, W2.t()), ..."
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _input_key(a: fx.Node):
    """Views of one tensor to one shape count as one input (each linear views x itself)."""
    if is_call(a, *_VIEWS) and len(a.args) == 2:
        return a.args[0], tuple(str(s) for s in a.args[1])
    return a, None


def _weight(b) -> fx.Node | None:
    """W if ``b`` is W.t() of a 2-D row-major weight, else None."""
    if is_call(b, aten.t.default) or (is_call(b, aten.permute.default) and list(b.args[1]) == [1, 0]):
        w = b.args[0]
        v = meta_val(w)
        # a graph input (a parameter): defined before every member, whichever comes first
        if (isinstance(w, fx.Node) and w.op in ("placeholder", "get_attr") and isinstance(v, torch.Tensor)
                and v.dim() == 2 and v.is_contiguous()):
            return w
    return None


def _member(node: fx.Node, op) -> tuple | None:
    """(input key, weight) of a bias-free 2-D matmul of a weight transpose, else None."""
    if not is_call(node, op) or len(node.args) != 2:
        return None
    if node.kwargs.get("bias") is not None or node.kwargs.get("alpha", 1.0) != 1 or node.kwargs.get("beta", 1.0) != 1:
        return None
    a, b = node.args
    va = meta_val(a)
    w = _weight(b)
    if w is None or not isinstance(va, torch.Tensor) or va.dim() != 2 or va.dtype != meta_val(w).dtype:
        return None
    return _input_key(a), w


def linear_group_pass(gm: fx.GraphModule, ctx: PassContext) -> None:
    mm = torch.ops.detcompile.matmul.default
    op = torch.ops.detcompile.linear_group.default
    groups: dict = {}
    for node in gm.graph.nodes:
        found = _member(node, mm)
        if found is not None:
            groups.setdefault(found[0], []).append((node, found[1]))
    for members in groups.values():
        for i in range(0, len(members) - 1, 3):
            chunk = members[i:i + 3]
            if len(chunk) < 2:
                continue
            first = chunk[0][0]
            b = NodeBuilder(gm, first)
            new = b(op, first.args[0], [w for _, w in chunk])
            items = [b(GETITEM, new, k) for k in range(len(chunk))]  # all before the first member
            for (node, _), item in zip(chunk, items):
                node.replace_all_uses_with(item)
                gm.graph.erase_node(node)
            ctx.report.rewrites.append(Rewrite("linear_group", PATTERN, str(op), source_line(first)))


SPEC = PassSpec(
    "linear_group", linear_group_pass,
    targets=("mm",),  # as the matmul pass's detcompile.matmul nodes
    into=("detcompile.linear_group",),
    fusion=True,
    when="2-3 bias-free matmuls (after the matmul pass) of one input by weight transposes (q/k/v, gate/up)",
)
