"""SwiGLU: ``silu(gate) * up`` -> ``detcompile.silu_mul`` (one kernel instead of two).

Matches ``mul(silu(gate), up)`` in either operand order (Llama/Mistral/Qwen's
``act_fn(gate_proj(x)) * up_proj(x)``, Phi-3's ``up * act_fn(gate)`` on the two halves of one
projection), where the silu is used only by this mul, gate and up have one float dtype, one device and
one shape (no broadcasting), and the product has the (row-major) layout the op returns. GeGLU
(``gelu(gate) * up``: Gemma) is not this pattern.

The op gives the unfused ops' bits on CUDA (``kernels/silu_mul.py``); on the CPU it is today's graph
(silu through ``cpu_pointwise``, then ``mul``), which is why this pass runs before ``cpu_pointwise``.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .manager import (
    NodeBuilder, PassContext, PassSpec, Rewrite, is_call, kernel_dtype, meta_val, same_layout, same_shape, source_line,
)

aten = torch.ops.aten
PATTERN = "silu(gate) * up"


def _gate_up(mul: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    if not is_call(mul, aten.mul.Tensor) or len(mul.args) != 2 or mul.kwargs:
        return None
    for s, up in (mul.args, mul.args[::-1]):
        if (is_call(s, aten.silu.default) and len(s.args) == 1 and not s.kwargs and len(s.users) == 1
                and isinstance(up, fx.Node) and up is not s):
            gate = s.args[0]
            vg, vu, vo = meta_val(gate), meta_val(up), meta_val(mul)
            if not all(isinstance(v, torch.Tensor) for v in (vg, vu, vo)) or not kernel_dtype(vg):
                continue
            if any(v.dtype != vg.dtype or v.device != vg.device for v in (vu, vo, meta_val(s))):
                continue
            if same_shape(vg, vu) and same_shape(vg, vo):
                return gate, up
    return None


def silu_mul_pass(gm: fx.GraphModule, ctx: PassContext) -> None:
    op = torch.ops.detcompile.silu_mul.default
    for node in list(gm.graph.nodes):
        found = _gate_up(node)
        if found is None:
            continue
        b = NodeBuilder(gm, node)
        new = b(op, *found)
        if not same_layout(meta_val(new), meta_val(node)):
            b.undo()
            continue
        node.replace_all_uses_with(new)
        ctx.report.rewrites.append(Rewrite("silu_mul", PATTERN, str(op), source_line(node)))


SPEC = PassSpec(
    "silu_mul", silu_mul_pass,
    targets=("silu", "mul.Tensor"),
    into=("detcompile.silu_mul",),
    fusion=True,
    when="mul(silu(gate), up) (SwiGLU): the silu used only there, gate and up of one dtype and shape",
)
