"""topk / sort / argsort -> a stable sort: ties go to the lower index, on every device.

Which of two equal values ``topk`` returns, and in which order an unstable ``sort`` leaves them, is
unspecified; on CUDA the kernel (single-block or multi-block top-k, bitonic or radix segmented sort)
is chosen by the number of rows and the row length, so the winner of a tie can change with the
batch. MoE routers do tie (16-bit router logits, softmax outputs). A stable sort's output is defined
by the row alone: values in order, equal values by ascending index. So:

* ``topk(x, k, dim, largest)`` becomes ``sort(x, stable=True, dim, descending=largest)[..., :k]``
  (values and indices, made contiguous like topk's outputs; ``sorted=False`` allows any order, so a
  sorted one is valid too);
* ``sort(x, dim, descending)`` without ``stable=True`` becomes the stable sort (a valid result of
  the unstable one). ``argsort`` reaches the graph as ``sort``.

On the CPU both are row-local and would be invariant anyway; the rewrite runs there too so that one
rule (lower index first) holds everywhere.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .manager import (
    GETITEM, NodeBuilder, PassContext, PassSpec, Rewrite, is_call, meta_val, node_arg, source_line,
)

aten = torch.ops.aten


def sort_pass(gm: fx.GraphModule, ctx: PassContext) -> None:
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(meta_val(node.args[0]) if node.args else None, torch.Tensor):
            continue
        if node.target == aten.topk.default:
            _topk(gm, node, ctx)
        elif node.target == aten.sort.default:
            dim, descending = node_arg(node, 1, "dim", -1), node_arg(node, 2, "descending", False)
            _restable(gm, node, ctx, dim, descending)
        elif node.target == aten.sort.stable and node_arg(node, 1, "stable") is not True:
            dim, descending = node_arg(node, 2, "dim", -1), node_arg(node, 3, "descending", False)
            _restable(gm, node, ctx, dim, descending)


def _restable(gm, node, ctx, dim, descending) -> None:
    old = str(node.target)
    node.target = aten.sort.stable
    node.args = (node.args[0],)
    node.kwargs = {"stable": True, "dim": dim, "descending": descending}
    ctx.report.rewrites.append(Rewrite("sort", old, "aten.sort.stable(stable=True)", source_line(node)))


def _topk(gm, node, ctx) -> None:
    x, k = node.args[0], node.args[1]
    dim, largest = node_arg(node, 2, "dim", -1), node_arg(node, 3, "largest", True)
    outs = {u.args[1]: u for u in node.users if is_call(u, GETITEM)}
    if len(outs) != len(node.users):
        return  # the tuple itself is used: leave it (the classifier reports it on CUDA)
    b = NodeBuilder(gm, node)
    s = b(aten.sort.stable, x, stable=True, dim=dim, descending=largest)
    for i, user in outs.items():
        part = b(GETITEM, s, i)
        top = b(aten.slice.Tensor, part, dim, 0, k)
        # topk returns fresh contiguous tensors; later views in the graph were traced on those.
        new = b(aten.clone.default, top, memory_format=torch.contiguous_format)
        user.replace_all_uses_with(new)
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    ctx.report.rewrites.append(
        Rewrite("sort", "aten.topk.default", "aten.sort.stable(stable=True)[:k]", source_line(node))
    )


SPEC = PassSpec(
    "sort", sort_pass,
    targets=("topk", "sort"),
    into=("aten.sort.stable(stable=True)",),
    when="every call (argsort arrives as sort); ties go to the lower index",
)
