"""index_add / scatter_add / index_put(accumulate=True) (and ``_unsafe_index_put``, its unchecked twin
from decompositions) on floats -> ``detcompile.index_add`` / ``detcompile.scatter_add``.

MoE layers combine expert outputs with these. On CUDA the stock kernels use atomics, so even run-to-run
results can differ; the detcompile ops add each destination's contributions in source order.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .manager import PassContext, PassSpec, is_float_node, replace_with

aten = torch.ops.aten


def index_add_pass(gm: fx.GraphModule, ctx: PassContext) -> None:
    index_add = torch.ops.detcompile.index_add.default
    scatter_add = torch.ops.detcompile.scatter_add.default
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not node.args or not is_float_node(node.args[0]):
            continue
        t = node.target
        if t == aten.index_add.default:
            self_, dim, index, source = node.args[:4]
            alpha = node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1)
            replace_with(gm, node, index_add, (self_, int(dim), index, source), {"alpha": alpha}, ctx, "index_add")
        elif t == aten.scatter_add.default:
            self_, dim, index, src = node.args[:4]
            replace_with(gm, node, scatter_add, (self_, int(dim), index, src), {}, ctx, "index_add")
        elif t in (aten.index_put.default, aten._unsafe_index_put.default):
            _index_put(gm, node, index_add, ctx)


def _index_put(gm: fx.GraphModule, node: fx.Node, index_add, ctx: PassContext) -> None:
    # x.index_put_((idx,), values, accumulate=True) with one 1-D integer index on dim 0 and values of
    # shape [len(idx), *x.shape[1:]] is index_add(x, 0, idx, values).
    self_, indices, values = node.args[:3]
    accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
    if not accumulate or len(indices) != 1 or indices[0] is None:
        return
    idx = indices[0].meta["val"]
    sv, vv = self_.meta["val"], values.meta["val"]
    if idx.dim() != 1 or idx.dtype in (torch.bool, torch.uint8):
        return
    if tuple(vv.shape) != (idx.shape[0], *sv.shape[1:]):
        return
    replace_with(gm, node, index_add, (self_, 0, indices[0], values), {}, ctx, "index_add")


SPEC = PassSpec(
    "index_add", index_add_pass,
    targets=("index_add", "scatter_add", "index_put", "_unsafe_index_put"),
    into=("detcompile.index_add", "detcompile.scatter_add"),
    when="float inputs; index_put only with accumulate=True and one 1-D integer index on dim 0",
)
