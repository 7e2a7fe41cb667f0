"""RMSNorm -> ``detcompile.rms_norm``.

Matches RMSNorm as Hugging Face writes it out,
    var = x.pow(2).mean(-1, keepdim=True); y = x * torch.rsqrt(var + eps)
(``pow`` or ``x * x``), and ``aten.rms_norm`` / ``aten._fused_rms_norm`` from ``F.rms_norm``. Only the
normalisation is replaced; the model's own weight multiply and dtype casts stay in the graph as the
pointwise ops they are, so each architecture's variant (Llama, Gemma's ``1 + w``, cast before or after the
weight) keeps its own rounding. A partial match is left to the reduction pass (``mean`` alone).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .manager import PassContext, PassSpec, is_call, is_float_node, replace_with, GETITEM

aten = torch.ops.aten


def _square_of(node) -> fx.Node | None:
    """x if node computes x**2 (pow(x, 2) or mul(x, x)), else None."""
    if is_call(node, aten.pow.Tensor_Scalar) and node.args[1] == 2:
        return node.args[0]
    if is_call(node, aten.mul.Tensor) and node.args[0] is node.args[1]:
        return node.args[0]
    return None


def _last_dim_only(dims, ndim) -> bool:
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (-1, ndim - 1)


def rms_norm_pass(gm: fx.GraphModule, ctx: PassContext) -> None:
    op = torch.ops.detcompile.rms_norm.default
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten.mean.dim:
            _match_written_out(gm, node, op, ctx)
        elif node.target == aten.rms_norm.default and is_float_node(node.args[0]):
            x, shape = node.args[:2]
            weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
            eps = node.args[3] if len(node.args) > 3 else node.kwargs.get("eps")
            if len(shape) == 1:
                replace_with(gm, node, op, (x, weight, _eps(eps, x)), {}, ctx, "rms_norm")

    fused = getattr(aten, "_fused_rms_norm", None)
    if fused is None:
        return
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != fused.default or not is_float_node(node.args[0]):
            continue
        x, shape = node.args[:2]
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        eps = node.args[3] if len(node.args) > 3 else node.kwargs.get("eps")
        users = list(node.users)
        # Only the normalised output (getitem 0) can be replaced; rstd (getitem 1) is for backward.
        if len(shape) != 1 or any(not (is_call(u, GETITEM) and u.args[1] == 0) for u in users):
            continue
        for u in users:
            replace_with(gm, u, op, (x, weight, _eps(eps, x)), {}, ctx, "rms_norm")
        gm.graph.erase_node(node)


def _eps(eps, x) -> float:
    if eps is None:
        return float(torch.finfo(x.meta["val"].dtype).eps)
    return float(eps)


def _match_written_out(gm: fx.GraphModule, mean: fx.Node, op, ctx: PassContext) -> None:
    sq = mean.args[0]
    x = _square_of(sq)
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if x is None or not keepdim or not is_float_node(x) or mean.kwargs.get("dtype") is not None:
        return
    if not _last_dim_only(mean.args[1], x.meta["val"].dim()):
        return
    # mean -> add(eps) -> rsqrt -> mul(x, .)
    if len(mean.users) != 1:
        return
    add = next(iter(mean.users))
    if not (is_call(add, aten.add.Tensor, aten.add.Scalar) and add.args[0] is mean and isinstance(add.args[1], (int, float))):
        return
    if len(add.users) != 1:
        return
    rsqrt = next(iter(add.users))
    if not is_call(rsqrt, aten.rsqrt.default):
        return
    for mul in list(rsqrt.users):
        if not is_call(mul, aten.mul.Tensor):
            continue
        other = mul.args[0] if mul.args[1] is rsqrt else mul.args[1]
        if other is not x:
            continue
        if mul.meta["val"].dtype != x.meta["val"].dtype:
            continue  # a type-promoting multiply is not the plain normalisation
        replace_with(gm, mul, op, (x, None, float(add.args[1])), {}, ctx, "rms_norm")


SPEC = PassSpec(
    "rms_norm", rms_norm_pass,
    targets=("rms_norm", "_fused_rms_norm"),
    into=("detcompile.rms_norm",),
    when="also the written-out x * rsqrt(mean(x**2, -1, keepdim) + eps) (its mean, pow and rsqrt)",
)
