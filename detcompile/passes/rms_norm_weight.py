"""Hugging Face's RMSNorm tail -> ``detcompile.rms_norm_weight_after_cast`` (one kernel instead of four).

After the rms_norm pass, a Llama/Mistral/Qwen RMSNorm of 16-bit hidden states reads
    mul(weight, _to_copy(detcompile.rms_norm(_to_copy(x, float32), None, eps), x.dtype))
(``self.weight * hidden_states.to(input_dtype)``; either operand order). The op computes exactly
that: the norm of ``x.float()``, rounded to x's dtype, times the weight with one rounding (the product
of two 16-bit values is exact in fp32). Matched only when the norm and the cast back are used by
this mul alone and the weight is a [hidden] vector of x's dtype; Gemma's ``(1 + w)`` in fp32 and
fp32 models are other patterns, left as they are.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .manager import NodeBuilder, PassContext, PassSpec, Rewrite, is_call, meta_val, same_shape, source_line, static_eq

aten = torch.ops.aten
PATTERN = "weight * rms_norm(x.float()).to(x.dtype)"
_HALF = (torch.float16, torch.bfloat16)


def _cast_only(node, dtype) -> bool:
    """A plain dtype cast (no device, layout or memory-format change)."""
    return is_call(node, aten._to_copy.default) and set(node.kwargs) <= {"dtype"} and node.kwargs.get("dtype") == dtype


def _match(mul: fx.Node):
    if not is_call(mul, aten.mul.Tensor) or len(mul.args) != 2 or mul.kwargs:
        return None
    for w, back in (mul.args, mul.args[::-1]):
        if not isinstance(back, fx.Node) or not isinstance(w, fx.Node) or len(back.users) != 1:
            continue
        vw, vb = meta_val(w), meta_val(back)
        if not (isinstance(vw, torch.Tensor) and isinstance(vb, torch.Tensor)) or vb.dtype not in _HALF:
            continue
        if not _cast_only(back, vb.dtype):
            continue
        norm = back.args[0]
        if not is_call(norm, torch.ops.detcompile.rms_norm.default) or len(norm.users) != 1:
            continue
        up, weight, eps = norm.args
        if weight is not None or not _cast_only(up, torch.float32):
            continue
        x = up.args[0]
        vx = meta_val(x)
        if not isinstance(vx, torch.Tensor) or vx.dtype != vb.dtype:
            continue
        if vw.dtype != vx.dtype or vw.dim() != 1 or not static_eq(vw.shape[0], vx.shape[-1]):
            continue
        if not same_shape(meta_val(mul), vx):
            continue
        return x, w, eps
    return None


def rms_norm_weight_pass(gm: fx.GraphModule, ctx: PassContext) -> None:
    op = torch.ops.detcompile.rms_norm_weight_after_cast.default
    for node in list(gm.graph.nodes):
        found = _match(node)
        if found is None:
            continue
        x, w, eps = found
        new = NodeBuilder(gm, node)(op, x, w, eps)
        node.replace_all_uses_with(new)
        ctx.report.rewrites.append(Rewrite("rms_norm_weight", PATTERN, str(op), source_line(node)))


SPEC = PassSpec(
    "rms_norm_weight", rms_norm_weight_pass,
    targets=("mul.Tensor", "_to_copy"),
    into=("detcompile.rms_norm_weight_after_cast",),
    fusion=True,
    when="weight * rms_norm(x.float()).to(x.dtype), x and weight 16-bit (Hugging Face's RMSNorm)",
)
