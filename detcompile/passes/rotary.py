"""Rotary position embedding -> ``detcompile.rotary_embedding`` (one kernel for a layer's q and k).

Matches Hugging Face's ``apply_rotary_pos_emb`` as AOT traces it, for each of q and k:

    x * cos + cat([-x[..., D/2:], x[..., :D/2]], -1) * sin
    add(mul(x, cos), mul(cat([neg(slice(x, -1, D/2, end)), slice(x, -1, 0, D/2)], -1), sin))

with either operand order of the add and of each mul, any sizes (symbolic ones too), cos/sin broadcast to
x (``[1 or B, 1, T, D]`` against ``[B, H, T, D]``). The rotated slice of a partial rotary (GPT-NeoX's
``rotary_pct``, Phi) is such an ``x`` and is matched too; interleaved rotary (GPT-J, Cohere:
``stack`` of the even and odd lanes) and complex-number rotary (Llama 4) are not this pattern and are left
alone. Everything must be exactly this: one dtype throughout (no promotion), the products and the
rotated half used only here, D even and static, and the eager add's output layout one the op gives
(x's, or row-major).
Two matches that share cos and sin (a layer's q and k) become one call.

The op gives the unfused ops' bits (see ``kernels/rotary_embedding.py``); on the CPU it is the same torch
ops, so CPU graphs keep their bits and tests exercise the pass on every device.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from .manager import (
    NodeBuilder, PassContext, PassSpec, Rewrite, is_call, kernel_dtype, meta_val, same_layout, same_shape,
    source_line, static_eq,
)

aten = torch.ops.aten
_INT_MAX = 2**63 - 1
PATTERN = "x * cos + rotate_half(x) * sin"


@dataclasses.dataclass
class Match:
    add: fx.Node
    x: fx.Node
    cos: fx.Node
    sin: fx.Node


def _arg(node: fx.Node, i: int, name: str, default):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _last_dim(dim, ndim: int) -> bool:
    return isinstance(dim, int) and dim in (-1, ndim - 1)


def _slice_of(node):
    """(source, start, end) of a last-dim, step-1 slice with int bounds, else None."""
    if not is_call(node, aten.slice.Tensor) or len(node.users) != 1:
        return None
    src = node.args[0]
    v = meta_val(src)
    if not isinstance(v, torch.Tensor) or not _last_dim(_arg(node, 1, "dim", 0), v.dim()):
        return None
    start, end, step = _arg(node, 2, "start", None), _arg(node, 3, "end", None), _arg(node, 4, "step", 1)
    start = 0 if start is None else start
    end = _INT_MAX if end is None else end
    if not all(isinstance(b, int) for b in (start, end, step)) or step != 1:
        return None
    return src, start, end


def _rotate_half_of(cat) -> fx.Node | None:
    """x if ``cat`` is ``cat([-x[..., D/2:], x[..., :D/2]], -1)`` with D even and static, else None."""
    if not is_call(cat, aten.cat.default) or len(cat.users) != 1:
        return None
    parts = cat.args[0]
    if not isinstance(parts, (list, tuple)) or len(parts) != 2:
        return None
    neg, lo = parts
    if not is_call(neg, aten.neg.default) or len(neg.users) != 1:
        return None
    hi, lo = _slice_of(neg.args[0]), _slice_of(lo)
    if hi is None or lo is None or hi[0] is not lo[0]:
        return None
    x = hi[0]
    v = meta_val(x)
    D = v.shape[-1]
    if not isinstance(D, int) or D % 2 or not _last_dim(_arg(cat, 1, "dim", 0), v.dim()):
        return None
    h = D // 2
    if lo[1:] != (0, h) or hi[1] != h or hi[2] < D:
        return None
    return x


def _operands(mul) -> list[tuple]:
    """Both orders of a two-tensor ``mul`` used once, else []."""
    if not is_call(mul, aten.mul.Tensor) or len(mul.args) != 2 or mul.kwargs or len(mul.users) != 1:
        return []
    a, b = mul.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return []
    return [(a, b), (b, a)]


def _broadcasts_to(c: torch.Tensor, x: torch.Tensor) -> bool:
    """c broadcasts to x's shape without changing it, and has x's last dim."""
    if c.dim() > x.dim() or not static_eq(c.shape[-1], x.shape[-1]):
        return False
    return all(static_eq(n, 1) or static_eq(n, m) for n, m in zip(reversed(c.shape), reversed(x.shape)))


def match(add: fx.Node) -> Match | None:
    """The rotary pattern ending at ``add``, if it is exactly that."""
    if not is_call(add, aten.add.Tensor) or len(add.args) != 2 or _arg(add, 2, "alpha", 1) != 1:
        return None
    for p_cos, p_sin in (add.args, add.args[::-1]):
        for rot, sin in _operands(p_sin):
            x = _rotate_half_of(rot)
            if x is None:
                continue
            for xx, cos in _operands(p_cos):
                if xx is x and _plain(add, x, cos, sin, (p_cos, p_sin, rot)):
                    return Match(add, x, cos, sin)
    return None


def _plain(add, x, cos, sin, inner) -> bool:
    """One float dtype and device throughout, cos and sin broadcast to x, the result x's shape."""
    vx, vc, vs, vo = meta_val(x), meta_val(cos), meta_val(sin), meta_val(add)
    if not all(isinstance(v, torch.Tensor) for v in (vx, vc, vs, vo)) or not kernel_dtype(vx):
        return False
    if cos is x or sin is x:
        return False
    if any(v.dtype != vx.dtype or v.device != vx.device for v in [vc, vs, vo] + [meta_val(n) for n in inner]):
        return False
    return _broadcasts_to(vc, vx) and _broadcasts_to(vs, vx) and same_shape(vo, vx)


def rotary_pass(gm: fx.GraphModule, ctx: PassContext) -> None:
    adds = [m.add for m in (match(n) for n in list(gm.graph.nodes)) if m is not None]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    i = 0
    while i < len(adds):
        # Matched again now: an earlier rewrite may have replaced this one's x (a rotary of a rotary).
        pair = [match(a) for a in adds[i:i + 2]]
        if pair[0] is None:
            i += 1
            continue
        anchor = _anchor(pair, order) if len(pair) == 2 and pair[1] is not None else None
        if anchor is not None and _rewrite(gm, pair, anchor, ctx):
            i += 2
            continue
        _rewrite(gm, pair[:1], pair[0].add, ctx)
        i += 1


def _anchor(pair: list[Match], order: dict) -> fx.Node | None:
    """Where one call for both can go: before the first user of either result, if every input of both
    is defined before it; None if the two do not share cos and sin or there is no such place."""
    a, b = pair
    if a.cos is not b.cos or a.sin is not b.sin or meta_val(a.x).dim() != meta_val(b.x).dim():
        return None
    users = [u for m in pair for u in m.add.users]
    inputs = (a.x, b.x, a.cos, a.sin)
    if not users or not all(n in order for n in users + list(inputs)):  # nodes made by this pass: no
        return None
    first = min(users, key=order.__getitem__)
    return first if max(order[n] for n in inputs) < order[first] else None


def _rewrite(gm: fx.GraphModule, group: list[Match], anchor: fx.Node, ctx: PassContext) -> bool:
    """One ``rotary_embedding`` call for the group, before ``anchor``, its outputs in x's layout or
    row-major, whichever the adds it replaces have; False (graph unchanged) if neither."""
    op = torch.ops.detcompile.rotary_embedding.default
    for contiguous in (False, True):
        b = NodeBuilder(gm, anchor)
        call = b(op, [m.x for m in group], group[0].cos, group[0].sin, contiguous)
        outs = [b(operator.getitem, call, k) for k in range(len(group))]
        if all(same_layout(meta_val(o), meta_val(m.add)) for o, m in zip(outs, group)):
            break
        b.undo()
    else:
        return False
    for o, m in zip(outs, group):
        o.meta["stack_trace"] = m.add.meta.get("stack_trace")
        m.add.replace_all_uses_with(o)
        ctx.report.rewrites.append(Rewrite("rotary", PATTERN, str(op), source_line(m.add)))
    return True


SPEC = PassSpec(
    "rotary", rotary_pass,
    targets=("add.Tensor", "mul.Tensor", "neg", "cat"),
    into=("detcompile.rotary_embedding",),
    fusion=True,
    when="x * cos + rotate_half(x) * sin (rotate_half = cat(-x2, x1) on the last dim; apply_rotary_pos_emb): "
         "one dtype, cos/sin broadcast to x; a layer's q and k in one call",
)
