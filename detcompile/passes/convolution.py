"""1-D convolutions -> ``detcompile.conv1d``.

Rewrites ``aten.convolution`` with a 3-D input ``[N, C, L]`` (one spatial dim), no transposition and a
float dtype the kernel takes on that device: the depthwise causal conv1d of Mamba/SSM/hybrid models,
and small grouped or dense conv1d. Bias, stride, padding, dilation and groups are passed through.
2-D/3-D and transposed convolutions are left for the audit, which names them.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..kernels import _common
from .manager import PassContext, PassSpec, is_call, meta_val, replace_with

aten = torch.ops.aten
_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")


def _args(node: fx.Node) -> dict:
    out = dict(zip(_ARGS, node.args))
    out.update(node.kwargs)
    return out


def _single_int(v) -> int | None:
    if isinstance(v, (list, tuple)) and len(v) == 1 and isinstance(v[0], int):
        return int(v[0])
    return None


def rewritable(node: fx.Node) -> bool:
    """Whether the pass rewrites this ``aten.convolution.default`` node (the audit uses it for its reason)."""
    a = _args(node)
    x, w, b = meta_val(a.get("input")), meta_val(a.get("weight")), meta_val(a.get("bias"))
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)):
        return False
    if x.dim() != 3 or w.dim() != 3 or a.get("transposed", False):
        return False
    allowed = _common.CPU_DTYPES if x.device.type == "cpu" else _common.GPU_DTYPES
    if x.device.type not in ("cpu", "cuda") or x.dtype not in allowed or w.dtype != x.dtype:
        return False
    if b is not None and (not isinstance(b, torch.Tensor) or b.dtype != x.dtype):
        return False
    if any(_single_int(a.get(k)) is None for k in ("stride", "padding", "dilation")):
        return False
    return isinstance(a.get("groups"), int)


def convolution_pass(gm: fx.GraphModule, ctx: PassContext) -> None:
    op = torch.ops.detcompile.conv1d.default
    for node in list(gm.graph.nodes):
        if not is_call(node, aten.convolution.default) or not rewritable(node):
            continue
        a = _args(node)
        args = (
            a["input"], a["weight"], a.get("bias"),
            _single_int(a["stride"]), _single_int(a["padding"]), _single_int(a["dilation"]), int(a["groups"]),
        )
        replace_with(gm, node, op, args, {}, ctx, "convolution")


SPEC = PassSpec(
    "convolution", convolution_pass,
    targets=("convolution",),
    into=("detcompile.conv1d",),
    when="one spatial dim, not transposed (Mamba/SSM causal conv1d, grouped or dense)",
)
