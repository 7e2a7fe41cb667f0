"""CPU only: transcendental pointwise ops -> ``detcompile.cpu_pointwise``.

On the CPU, ATen rounds some pointwise ops differently in its vector body and scalar tail (see
``detcompile/kernels/cpu_pointwise.py``), so an element's bits would depend on its offset in the
tensor, i.e. on the batch. Exactly rounded ops (+, -, *, /, sqrt, comparisons, where) are left alone.
Also, on the CPU only:

* ``log_sigmoid_forward`` (``F.logsigmoid``): its output goes through ``cpu_pointwise("log_sigmoid")``;
* ``polar(abs, angle)`` becomes ``complex(abs * cos(angle), abs * sin(angle))``, cos and sin through
  ``cpu_pointwise``;
* complex multiplication (``mul`` with a complex result; rotary embeddings written with complex
  numbers): ATen's complex ``mul`` gives different bits in the vector body and the scalar tail (measured
  with torch 2.13, complex64 and complex128), so it is written out in real arithmetic,
  ``(ar*br - ai*bi) + i (ar*bi + ai*br)``, each op exactly rounded.

On CUDA every element runs the same code, so this pass changes nothing there.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .manager import GETITEM, NodeBuilder, PassContext, PassSpec, is_call, meta_val, replace_with

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
        elif name == "celu" and overload == "default":
            # ATen defines celu(x, a) as elu(x, alpha=a, scale=1, input_scale=1/a).
            alpha = float(node.args[1]) if len(node.args) > 1 else float(node.kwargs.get("alpha", 1.0))
            replace_with(gm, node, op, (x, "elu", [alpha, 1.0, 1.0 / alpha]), {}, ctx, "cpu_pointwise")
        elif name == "pow" and overload == "Tensor_Scalar":
            e = node.args[1]
            if isinstance(e, (int, float)) and e not in _EXACT_POW:
                replace_with(gm, node, op, (x, "pow", [float(e)]), {}, ctx, "cpu_pointwise")

    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not _on_cpu(node):
            continue
        if node.target == aten.log_sigmoid_forward.default and _on_cpu_float(node):
            _log_sigmoid(gm, node, op, ctx)
        elif node.target == aten.polar.default:
            _polar(gm, node, op, ctx)
        elif node.target in (aten.mul.Tensor, aten.mul.Scalar) and _complex_out(node):
            _complex_mul(gm, node, ctx)


def _on_cpu(node: fx.Node) -> bool:
    v = meta_val(node)
    return isinstance(v, (torch.Tensor, tuple)) and all(
        t.device.type == "cpu" for t in torch.utils._pytree.tree_leaves(v) if isinstance(t, torch.Tensor)
    )


def _complex_out(node: fx.Node) -> bool:
    v = meta_val(node)
    return isinstance(v, torch.Tensor) and v.dtype in (torch.complex64, torch.complex128)


def _log_sigmoid(gm, node, op, ctx) -> None:
    """Output 0 (the result) -> cpu_pointwise; output 1 (a buffer for the backward) stays with ATen."""
    x = node.args[0]
    for u in list(node.users):
        if is_call(u, GETITEM) and u.args[1] == 0:
            replace_with(gm, u, op, (x, "log_sigmoid", []), {}, ctx, "cpu_pointwise")
            ctx.report.rewrites[-1].old = "aten.log_sigmoid_forward.default"


def _polar(gm, node, op, ctx) -> None:
    """polar(abs, angle) = complex(abs * cos(angle), abs * sin(angle))."""
    absv, angle = node.args[0], node.args[1]
    if not all(isinstance(meta_val(a), torch.Tensor) and meta_val(a).is_floating_point() for a in (absv, angle)):
        return
    b = NodeBuilder(gm, node)
    re = b(aten.mul.Tensor, absv, b(op, angle, "cos", []))
    im = b(aten.mul.Tensor, absv, b(op, angle, "sin", []))
    _finish(gm, node, b, re, im, ctx)


def _parts(b: NodeBuilder, v):
    """(real, imag) of a mul operand; imag is None for a real one. None if not handled."""
    if isinstance(v, fx.Node):
        t = meta_val(v)
        if not isinstance(t, torch.Tensor):
            return None
        if t.is_complex():
            if t.is_conj() or t.dtype not in (torch.complex64, torch.complex128):
                return None
            r = b(aten.view_as_real.default, v)
            return b(aten.select.int, r, -1, 0), b(aten.select.int, r, -1, 1)
        return (v, None) if t.is_floating_point() else None
    if isinstance(v, complex):
        return v.real, v.imag
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v), None
    return None


def _mul(b: NodeBuilder, x, y):
    """x * y where at least one side is a node."""
    if isinstance(x, fx.Node):
        return b(aten.mul.Tensor, x, y)
    return b(aten.mul.Tensor, y, x)


def _complex_mul(gm, node, ctx) -> None:
    if len(node.args) != 2 or node.kwargs:
        return
    b = NodeBuilder(gm, node)
    pa, pb = _parts(b, node.args[0]), _parts(b, node.args[1])
    if pa is None or pb is None or not (isinstance(node.args[0], fx.Node) or isinstance(node.args[1], fx.Node)):
        b.undo()
        return
    (ar, ai), (br, bi) = pa, pb
    if not isinstance(ar, fx.Node):  # keep the node on the left: scalar * scalar never happens here
        (ar, ai), (br, bi) = (br, bi), (ar, ai)
    if ai is not None and bi is not None:  # (ar + i ai)(br + i bi)
        re = b(aten.sub.Tensor, _mul(b, ar, br), _mul(b, ai, bi))
        im = b(aten.add.Tensor, _mul(b, ar, bi), _mul(b, ai, br))
    elif ai is not None:  # complex * real
        re, im = _mul(b, ar, br), _mul(b, ai, br)
    elif bi is not None:  # real * complex
        re, im = _mul(b, ar, br), _mul(b, ar, bi)
    else:
        b.undo()
        return
    _finish(gm, node, b, re, im, ctx)


def _finish(gm, node, b: NodeBuilder, re, im, ctx) -> None:
    """Replace node by complex(re, im) if that has node's dtype and shape, else undo."""
    want, vr, vi = meta_val(node), meta_val(re), meta_val(im)
    ok = (
        isinstance(want, torch.Tensor) and isinstance(vr, torch.Tensor) and isinstance(vi, torch.Tensor)
        and vr.dtype == vi.dtype and vr.shape == vi.shape == want.shape
        and {torch.float32: torch.complex64, torch.float64: torch.complex128}.get(vr.dtype) == want.dtype
    )
    if not ok:
        b.undo()
        return
    replace_with(gm, node, aten.complex.default, (re, im), {}, ctx, "cpu_pointwise")


SPEC = PassSpec(
    "cpu_pointwise", cpu_pointwise_pass,
    targets=tuple(sorted(_NO_ARGS)) + ("gelu", "softplus", "elu", "celu", "pow.Tensor_Scalar", "log_sigmoid_forward", "polar", "mul"),
    into=("detcompile.cpu_pointwise", "aten.complex"),
    when="on the CPU: float input, plain call; pow with a scalar exponent; mul of complex numbers",
    devices=("cpu",),
)
