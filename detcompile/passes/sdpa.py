"""Dynamo-level pass: ``F.scaled_dot_product_attention`` -> ``detcompile.attention``.

It runs on the Dynamo graph, before AOTAutograd, because AOT lowers SDPA to a device-specific kernel
(flash / efficient / cuDNN / math) with different signatures; at this level it is one call with the
user's arguments. ``detcompile.attention`` has an autograd formula, so a training-style forward works.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .manager import Leftover, PassContext, PassSpec, meta_val, replace_with, source_line

_SDPA_TARGETS = {torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _bind(node: fx.Node) -> dict:
    bound = dict(zip(_PARAMS, node.args))
    bound.update(node.kwargs)
    return bound


def sdpa_pass(gm: fx.GraphModule, ctx: PassContext) -> None:
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA_TARGETS:
            continue
        a = _bind(node)
        dropout = a.get("dropout_p", 0.0)
        if isinstance(dropout, fx.Node) or (dropout or 0.0) != 0.0:
            # Dropout draws from the global generator: nothing to make invariant. Leave it to the audit.
            ctx.report.leftovers.append(
                Leftover(str(node.target), "attention dropout_p != 0 (training dropout) is not supported", source_line(node))
            )
            continue
        flags = (a.get("is_causal"), a.get("enable_gqa"), a.get("scale"))
        if any(isinstance(f, fx.Node) for f in flags):
            # A traced flag or scale (not a Python constant) cannot become the op's constant argument.
            ctx.report.leftovers.append(
                Leftover(str(node.target), "is_causal/enable_gqa/scale computed at run time", source_line(node))
            )
            continue
        args = (a["query"], a["key"], a["value"])
        enable_gqa = bool(a.get("enable_gqa", False))
        qv, kv = meta_val(a["query"]), meta_val(a["key"])
        if not enable_gqa and qv is not None and kv is not None and qv.dim() == kv.dim() >= 3:
            # SDPA broadcasts a single K/V head over all query heads (Falcon's MQA); that is GQA
            # with one group, which is how detcompile.attention spells it.
            if kv.shape[-3] == 1 and qv.shape[-3] != 1:
                enable_gqa = True
        kwargs = {
            "attn_mask": a.get("attn_mask"),
            "is_causal": bool(a.get("is_causal", False)),
            "scale": a.get("scale"),
            "enable_gqa": enable_gqa,
        }
        backend = getattr(ctx.options, "attention_backend", "triton")
        if backend != "triton":  # options={"attention_backend": ...}: the op's FA3 / FlashInfer path
            kwargs["backend"] = backend
        replace_with(gm, node, torch.ops.detcompile.attention.default, args, kwargs, ctx, "sdpa", meta_key="example_value")


SPEC = PassSpec(
    "sdpa", sdpa_pass,
    # F.scaled_dot_product_attention on the Dynamo graph, i.e. what AOTAutograd would lower to these.
    targets=("scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math"),
    into=("detcompile.attention",),
    when="F.scaled_dot_product_attention on the Dynamo graph (the aten names are what AOT would lower it to); "
         "no dropout",
    level="torch",
)
