"""An MLP's gate/up group and its SwiGLU -> ``detcompile.linear_swiglu`` (one launch at decode).

Matches ``silu_mul(view(linear_group(x, [W0, W1])[i]), view(...[j]))`` (so this runs after the
``linear_group`` and ``silu_mul`` passes): Llama/Mistral/Qwen's ``act_fn(gate_proj(x)) * up_proj(x)``.
The group must have exactly these two weights and its outputs no other use, and both views must
give the same shape (or both be absent). The op gives the unfused ops' bits
(``kernels/linear_swiglu.py``); it runs them unfused wherever its kernel does not apply (prefill,
the CPU).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .manager import GETITEM, NodeBuilder, PassContext, PassSpec, Rewrite, is_call, meta_val, same_shape, source_line

aten = torch.ops.aten
PATTERN = "silu_mul(linear_group(x, [Wg, Wu]))"
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _output(arg, group_op) -> tuple | None:
    """(group node, output index, view node or None) if ``arg`` is a group output, maybe viewed,
    used only on this path."""
    view = None
    if is_call(arg, *_VIEWS) and len(arg.args) == 2 and len(arg.users) == 1:
        view, arg = arg, arg.args[0]
    if not (is_call(arg, GETITEM) and len(arg.users) == 1 and is_call(arg.args[0], group_op)):
        return None
    return arg.args[0], arg.args[1], view


def _same_view(v0: fx.Node | None, v1: fx.Node | None) -> bool:
    """Both outputs unviewed, or viewed to one shape (the fused output takes the gate's view)."""
    if v0 is None or v1 is None:
        return v0 is v1
    return list(v0.args[1]) == list(v1.args[1])


def linear_swiglu_pass(gm: fx.GraphModule, ctx: PassContext) -> None:
    group_op = torch.ops.detcompile.linear_group.default
    silu_mul = torch.ops.detcompile.silu_mul.default
    op = torch.ops.detcompile.linear_swiglu.default
    for node in list(gm.graph.nodes):
        if not is_call(node, silu_mul) or len(node.args) != 2:
            continue
        gate, up = (_output(a, group_op) for a in node.args)
        if gate is None or up is None or gate[0] is not up[0] or {gate[1], up[1]} != {0, 1}:
            continue
        group = gate[0]
        x, weights = group.args
        if len(weights) != 2 or len(group.users) != 2:
            continue
        if not _same_view(gate[2], up[2]):
            continue
        b = NodeBuilder(gm, node)
        new = b(op, x, weights[gate[1]], weights[up[1]])
        out = new if gate[2] is None else b(gate[2].target, new, gate[2].args[1])
        vo, vn = meta_val(out), meta_val(node)
        if not (isinstance(vo, torch.Tensor) and same_shape(vo, vn) and vo.is_contiguous() == vn.is_contiguous()):
            b.undo()
            continue
        node.replace_all_uses_with(out)
        ctx.report.rewrites.append(Rewrite("linear_swiglu", PATTERN, str(op), source_line(node)))
        # users before producers: the SwiGLU, the views, the group's getitems, the group
        for n in [node] + [v for v in (gate[2], up[2]) if v is not None] + list(group.users) + [group]:
            gm.graph.erase_node(n)


SPEC = PassSpec(
    "linear_swiglu", linear_swiglu_pass,
    targets=("mm", "silu", "mul.Tensor"),  # as the linear_group and silu_mul passes' nodes
    into=("detcompile.linear_swiglu",),
    fusion=True,
    when="silu_mul of a two-weight linear_group's outputs, used nowhere else (an MLP's gate/up and SwiGLU)",
)
