"""Floating-point reductions -> ``detcompile.reduce`` / ``var_mean`` / ``cumsum``.

sum, mean, amax, amin, logsumexp, var, std, var_mean, cumsum and vector norms (``linalg_vector_norm``) of
order 2 (``sqrt(sum(x*x))``), 1 (``sum(|x|)``) and +-inf (``amax``/``amin`` of ``|x|``, exact in any order).
Integer and bool reductions are exact in any order and stay as they are (the audit knows this).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .manager import PassContext, PassSpec, _propagate_fake, is_float_node, node_arg, replace_with

aten = torch.ops.aten


#: vector-norm orders rewritten, and the reduction over x*x (ord 2, then sqrt) or |x| each needs.
_NORM_ORDS = {2: "sum", 1: "sum", float("inf"): "amax", float("-inf"): "amin"}


def _dims(d):
    if d is None:
        return None
    if isinstance(d, int):
        return [d]
    return list(d)


def reductions_pass(gm: fx.GraphModule, ctx: PassContext) -> None:
    reduce = torch.ops.detcompile.reduce.default
    var_mean = torch.ops.detcompile.var_mean.default
    cumsum = torch.ops.detcompile.cumsum.default
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_function" or not node.args or not is_float_node(node.args[0]):
            continue
        t = node.target
        x = node.args[0]
        if t in (aten.sum.dim_IntList, aten.mean.dim):
            kind = "sum" if t == aten.sum.dim_IntList else "mean"
            dims = _dims(node_arg(node, 1, "dim"))
            keepdim = bool(node_arg(node, 2, "keepdim", False))
            replace_with(gm, node, reduce, (x, dims, keepdim, kind), {"dtype": node.kwargs.get("dtype")}, ctx, "reductions")
        elif t in (aten.sum.default, aten.mean.default):
            kind = "sum" if t == aten.sum.default else "mean"
            replace_with(gm, node, reduce, (x, None, False, kind), {"dtype": node.kwargs.get("dtype")}, ctx, "reductions")
        elif t in (aten.amax.default, aten.amin.default):
            kind = "amax" if t == aten.amax.default else "amin"
            dims = _dims(node_arg(node, 1, "dim", []))
            keepdim = bool(node_arg(node, 2, "keepdim", False))
            replace_with(gm, node, reduce, (x, dims, keepdim, kind), {}, ctx, "reductions")
        elif t == aten.logsumexp.default:
            dims = _dims(node_arg(node, 1, "dim"))
            keepdim = bool(node_arg(node, 2, "keepdim", False))
            replace_with(gm, node, reduce, (x, dims, keepdim, "logsumexp"), {}, ctx, "reductions")
        elif t == aten.var_mean.correction:
            dims, corr, keepdim = _var_args(node)
            replace_with(gm, node, var_mean, (x, dims, corr, keepdim), {}, ctx, "reductions")
        elif t in (aten.var.correction, aten.std.correction):
            dims, corr, keepdim = _var_args(node)
            with g.inserting_before(node):
                vm = g.call_function(var_mean, (x, dims, corr, keepdim))
                vm.meta["stack_trace"] = node.meta.get("stack_trace")
                _propagate_fake(vm, "val")
            target_args = (vm, 0)
            if t == aten.var.correction:
                replace_with(gm, node, operator.getitem, target_args, {}, ctx, "reductions")
            else:
                with g.inserting_before(node):
                    var = g.call_function(operator.getitem, target_args)
                    var.meta["val"] = vm.meta["val"][0] if "val" in vm.meta else None
                replace_with(gm, node, aten.sqrt.default, (var,), {}, ctx, "reductions")
        elif t == aten.cumsum.default:
            dim = int(node_arg(node, 1, "dim"))
            replace_with(gm, node, cumsum, (x, dim), {"dtype": node.kwargs.get("dtype")}, ctx, "reductions")
        elif t == aten.linalg_vector_norm.default:
            ord_ = node_arg(node, 1, "ord", 2)
            if node.kwargs.get("dtype") is not None or isinstance(ord_, bool) or ord_ not in _NORM_ORDS:
                continue  # left for the audit
            dims = _dims(node_arg(node, 2, "dim"))
            keepdim = bool(node_arg(node, 3, "keepdim", False))
            with g.inserting_before(node):
                if ord_ == 2:
                    term = g.call_function(aten.mul.Tensor, (x, x))
                else:
                    term = g.call_function(aten.abs.default, (x,))
                _propagate_fake(term, "val")
            if ord_ == 2:  # sqrt(sum(x * x))
                with g.inserting_before(node):
                    s = g.call_function(reduce, (term, dims, keepdim, "sum"))
                    s.meta["stack_trace"] = node.meta.get("stack_trace")
                    _propagate_fake(s, "val")
                replace_with(gm, node, aten.sqrt.default, (s,), {}, ctx, "reductions")
            else:  # sum(|x|); max / min of |x| (exact in any order)
                kind = _NORM_ORDS[ord_]
                replace_with(gm, node, reduce, (term, dims, keepdim, kind), {}, ctx, "reductions")


def _var_args(node: fx.Node):
    dims = _dims(node_arg(node, 1, "dim"))
    corr = node.kwargs.get("correction")
    corr = 1.0 if corr is None else float(corr)
    keepdim = bool(node.kwargs.get("keepdim", False))
    return dims, corr, keepdim


SPEC = PassSpec(
    "reductions", reductions_pass,
    targets=("sum", "mean", "amax", "amin", "logsumexp", "var", "std", "var_mean", "cumsum", "linalg_vector_norm"),
    into=("detcompile.reduce", "detcompile.var_mean", "detcompile.cumsum"),
    when="float inputs; vector norms of order 2, 1 and +-inf",
)
