"""CPU only: transcendental pointwise ops -> ``detcompile.cpu_pointwise``.

On the CPU, ATen rounds some pointwise ops differently in its vector body and scalar tail (see
``detcompile/kernels/cpu_pointwise.py``), so an element's bits would depend on its offset in the
tensor, i.e. on the batch. Exactly rounded ops (+, -, *, /, sqrt, comparisons, where) are left alone.
On CUDA every element runs the same code, so this pass changes nothing there.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .manager import PassContext, meta_val, replace_with

aten = torch.ops.aten

_NO_ARGS = {
    "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sigmoid", "silu", "tanh", "sin", "cos", "tan",
    "erf", "erfc", "erfinv", "rsqrt", "atan", "asin", "acos", "sinh", "cosh", "mish",
}
# pow(x, e) for these exponents is computed with exact arithmetic (x*x, sqrt, 1/x) in both paths.
_EXACT_POW = {1, 1.0, 2, 2.0, 0.5, -1, -1.0}


def _on_cpu_float(node: fx.Node) -> bool:
    v = meta_val(node.args[0]) if node.args else None
    return isinstance(v, torch.Tensor) and v.is_floating_point() and v.device.type == "cpu"


def cpu_pointwise_pass(gm: fx.GraphModule, ctx: PassContext) -> None:
    op = torch.ops.detcompile.cpu_pointwise.default
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if not _on_cpu_float(node):
            continue
        name = node.target.overloadpacket.__name__
        overload = node.target._overloadname
        x = node.args[0]
        if name in _NO_ARGS and overload == "default" and len(node.args) == 1 and not node.kwargs:
            replace_with(gm, node, op, (x, name, []), {}, ctx, "cpu_pointwise")
        elif name == "gelu" and overload == "default":
            approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            replace_with(gm, node, op, (x, "gelu_tanh" if approx == "tanh" else "gelu", []), {}, ctx, "cpu_pointwise")
        elif name == "softplus" and overload == "default":
            beta = float(node.args[1]) if len(node.args) > 1 else 1.0
            threshold = float(node.args[2]) if len(node.args) > 2 else 20.0
            replace_with(gm, node, op, (x, "softplus", [beta, threshold]), {}, ctx, "cpu_pointwise")
        elif name == "elu" and overload == "default":
            a = [float(v) for v in node.args[1:4]] + [1.0, 1.0, 1.0][len(node.args[1:4]) :]
            replace_with(gm, node, op, (x, "elu", a), {}, ctx, "cpu_pointwise")
        elif name == "pow" and overload == "Tensor_Scalar":
            e = node.args[1]
            if isinstance(e, (int, float)) and e not in _EXACT_POW:
                replace_with(gm, node, op, (x, "pow", [float(e)]), {}, ctx, "cpu_pointwise")
