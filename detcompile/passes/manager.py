"""A small pass manager: an explicit, ordered list of graph passes and a report of what they did.

Each pass is a function ``(gm, ctx) -> None`` that rewrites nodes in place and records every rewrite in
``ctx.report``. Passes run in the order given; there is no dependency solver, so the order in
``detcompile.passes.ATEN_PASSES`` is the order (the RMSNorm pass must, for instance, see ``mean`` before
the generic reduction pass turns it into ``detcompile.reduce``).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import operator
import re
from typing import Any, Callable

import torch
import torch.fx as fx


@dataclasses.dataclass
class Rewrite:
    pass_name: str
    old: str
    new: str
    source: str


@dataclasses.dataclass
class Leftover:
    op: str
    reason: str
    source: str


@dataclasses.dataclass
class Report:
    """What the passes did to one graph."""

    rewrites: list[Rewrite] = dataclasses.field(default_factory=list)
    leftovers: list[Leftover] = dataclasses.field(default_factory=list)
    graph_id: int = 0
    #: pass name -> PassSpec.version of each rewriting pass that ran (which rewrite produced the graph)
    pass_versions: dict[str, str] = dataclasses.field(default_factory=dict)

    def counts(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for r in self.rewrites:
            out[(r.old, r.new)] = out.get((r.old, r.new), 0) + 1
        return out

    def format(self) -> str:
        lines = [f"graph {self.graph_id}: {len(self.rewrites)} op(s) rewritten, {len(self.leftovers)} left"]
        for (old, new), n in sorted(self.counts().items()):
            lines.append(f"  rewritten  {n:4d} x {old} -> {new}")
        for lo in self.leftovers:
            lines.append(f"  LEFT       {lo.op}: {lo.reason}")
            if lo.source:
                lines.append(f"             at {lo.source}")
        return "\n".join(lines)


@dataclasses.dataclass
class PassContext:
    options: Any
    report: Report


PassFn = Callable[[fx.GraphModule, PassContext], None]


@dataclasses.dataclass(frozen=True)
class PassSpec:
    """What a pass declares about itself. The classifier's reasons, ``detcompile.audit``'s coverage
    table and the docs' pass table come from these declarations, so they cannot drift from the passes.

    ``targets`` are op names as the classifier sees them: an aten overload packet (``"mm"``: every
    overload) or one overload (``"pow.Tensor_Scalar"``); a torch-level pass also lists the aten ops its
    target would lower to, since the audit looks at aten graphs. ``when`` says in words which calls
    of a target are rewritten (dtype, arguments, pattern); a call the pass leaves is classified like any
    other op.
    """

    name: str
    fn: PassFn
    targets: tuple[str, ...]
    into: tuple[str, ...]
    when: str = ""
    devices: tuple[str, ...] = ("cpu", "cuda")
    level: str = "aten"  #: "aten" (after AOTAutograd) or "torch" (the Dynamo graph)
    #: A fusion: the targets are rewritten only together, as one pattern (rotary, SwiGLU). Such a pass is
    #: named for a left op only when no other pass declares that op (``by_precedence``).
    fusion: bool = False

    @functools.cached_property
    def version(self) -> str:
        """A hash of the pass's module source: which version of the rewrite produced a graph."""
        module = inspect.getmodule(self.fn)
        text = inspect.getsource(module) if module is not None else self.fn.__qualname__
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def handles(self, target: Any) -> bool:
        """Whether ``target`` (an OpOverload) is one of the declared targets."""
        if not isinstance(target, torch._ops.OpOverload):
            return False
        packet = target.overloadpacket.__name__
        return packet in self.targets or f"{packet}.{target._overloadname}" in self.targets

    def op_names(self) -> set[str]:
        """The targets' overload packet names."""
        return {t.split(".")[0] for t in self.targets}


def by_precedence(specs) -> list[PassSpec]:
    """The specs in pass order, fusions last: which pass to name for an op none of them rewrote."""
    return sorted(specs, key=lambda s: s.fusion)


class PassManager:
    def __init__(self, passes: list[tuple[str, PassFn]]):
        self.passes = list(passes)

    def names(self) -> list[str]:
        return [name for name, _ in self.passes]

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Report:
        for _name, fn in self.passes:
            fn(gm, ctx)
            gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        return ctx.report


# ------------------------------------------------------------------------------------------------
# Helpers shared by the passes.
# ------------------------------------------------------------------------------------------------

_FRAME_RE = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def source_line(node: fx.Node) -> str:
    """The innermost model source line of a node ("file:line in fn: code"), from its stack trace."""
    trace = node.meta.get("stack_trace") or ""
    frames = _FRAME_RE.findall(trace)
    if not frames:
        return ""
    # The last frame is the innermost call; skip frames inside torch itself.
    for path, line, fn, code in reversed(frames):
        if "/torch/" not in path:
            return f"{path}:{line} in {fn}: {code.strip()}"
    path, line, fn, code = frames[-1]
    return f"{path}:{line} in {fn}: {code.strip()}"


def op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    if isinstance(target, torch._ops.OpOverloadPacket):
        return str(target)
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def meta_val(arg: Any) -> Any:
    """The fake value FX stored for an argument (post-AOT: 'val'; Dynamo graphs: 'example_value')."""
    if isinstance(arg, fx.Node):
        if "val" in arg.meta:
            return arg.meta["val"]
        return arg.meta.get("example_value")
    if isinstance(arg, (list, tuple)):
        return type(arg)(meta_val(a) for a in arg)
    return arg


def node_arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Argument ``i`` of a call node, passed by position or by keyword ``name`` (else ``default``)."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def is_float_node(arg: Any) -> bool:
    v = meta_val(arg)
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def replace_with(
    gm: fx.GraphModule,
    node: fx.Node,
    target: Any,
    args: tuple,
    kwargs: dict | None,
    ctx: PassContext,
    pass_name: str,
    meta_key: str = "val",
) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` before ``node``, move node's users onto it, record the rewrite."""
    kwargs = kwargs or {}
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args, kwargs)
    new.meta = dict(node.meta)
    _propagate_fake(new, meta_key)
    node.replace_all_uses_with(new)
    ctx.report.rewrites.append(Rewrite(pass_name, op_name(node.target), op_name(target), source_line(node)))
    gm.graph.erase_node(node)
    return new


def _propagate_fake(node: fx.Node, meta_key: str) -> None:
    """Recompute the node's fake value with the op's fake implementation (Inductor reads meta['val'])."""
    from torch._guards import detect_fake_mode

    args = fx.node.map_arg(node.args, meta_val)
    kwargs = fx.node.map_arg(node.kwargs, meta_val)
    flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    # The values' own fake mode: Dynamo hands the backend a tracing context with a fresh one.
    modes = [a.fake_mode for a in flat if isinstance(a, torch._subclasses.FakeTensor)]
    mode = modes[0] if modes else detect_fake_mode(flat)
    if mode is None:
        return
    with mode:
        node.meta[meta_key] = node.target(*args, **kwargs)


class NodeBuilder:
    """Inserts nodes before ``anchor`` with the anchor's stack trace and fake values; ``undo`` erases them."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node):
        self.gm, self.anchor, self.nodes = gm, anchor, []

    def __call__(self, target, *args, **kwargs) -> fx.Node:
        with self.gm.graph.inserting_before(self.anchor):
            n = self.gm.graph.call_function(target, args, kwargs)
        n.meta["stack_trace"] = self.anchor.meta.get("stack_trace")
        _propagate_fake(n, "val")
        self.nodes.append(n)
        return n

    def undo(self) -> None:
        for n in reversed(self.nodes):
            self.gm.graph.erase_node(n)


def users_of(node: fx.Node, target: Any) -> list[fx.Node]:
    return [u for u in node.users if u.op == "call_function" and u.target == target]


def is_call(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


GETITEM = operator.getitem


def static_eq(a: Any, b: Any) -> bool:
    """``a == b`` for ints or SymInts, known without adding a guard (False when it cannot be told)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b))


def same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(static_eq(x, y) for x, y in zip(a.shape, b.shape))


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same stride in every dim that can have more than one element."""
    return same_shape(a, b) and all(
        static_eq(n, 1) or static_eq(sa, sb) for n, sa, sb in zip(a.shape, a.stride(), b.stride())
    )


def kernel_dtype(v: torch.Tensor) -> bool:
    """A floating dtype the detcompile kernels take on v's device (float64 on the CPU only)."""
    from ..kernels import _common

    return v.dtype in (_common.GPU_DTYPES if v.device.type == "cuda" else _common.CPU_DTYPES)
