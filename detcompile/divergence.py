"""``detcompile.audit``: run a model's graph at several batch compositions and find the first FX node
whose output bits for one row change with the rest of the batch.

    import detcompile
    result = detcompile.audit(model, ids[:1], batch_sizes=(1, 3, 8), rewrite=False)
    result.first_divergence  # NodeDivergence (op, shapes, model source line, pass coverage) or None

How it works (see docs/audit.md):

1. The target row (the example inputs, leading dim 1) is put alone and inside batches of the other
   ``batch_sizes`` at the position ``target_row`` picks, next to seeded random neighbours (different
   for each batch size).
2. The model runs through ``torch.compile`` with an audit backend (``dynamic=False``, so each batch size
   gets a static graph): AOTAutograd traces each Dynamo graph to aten ops; with ``rewrite=True`` the
   detcompile passes rewrite it exactly as ``backend="deterministic"`` does; the forward compiler then
   swaps the graph's forward for an FX Interpreter that records every node's output while the audit's
   recording flag is on.
3. For every node, the target row's slice of its output is compared bit for bit across the
   compositions; the first node in graph order whose bits differ is the first divergence.

Row slicing: a node's output is compared only when, in every composition, its leading dim is a multiple
of that composition's batch size B with the same quotient (``d0 == c * B``) and its other dims and dtype
are the same; it is then viewed as ``[B, -1]`` and row r's contiguous block is compared. This covers
``[B, L, D]`` activations and attention-internal ``[B * H, L, D]`` / ``[B, H, L, D]`` tensors (row r is
the block ``r*H .. r*H+H-1``). Tensors that do not scale with the batch (weights, rotary tables, masks
built for one row and broadcast) are skipped and counted as "not batch-scaled". A tensor whose batch dim
is not the leading one (e.g. ``[L, B, D]``) is skipped too.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .passes.classify import classify
from .passes.manager import by_precedence, op_name, source_line


def _pass_ops() -> dict[str, set[str]]:
    """The ops each pass rewrites, by overload packet name, from the passes' own declarations
    (``PassSpec.targets``). A hint: on stock graphs the audit runs the passes on a copy of the graph to
    see exactly which nodes each one rewrites (patterns, dtypes)."""
    from .passes import SPECS

    return {name: spec.op_names() for name, spec in SPECS.items()}


#: Input names that are the same for the target and its neighbours (a mask or positions of one row),
#: and names passed to every composition unchanged (not batched).
_REPEAT_KEYS = {"attention_mask", "position_ids", "token_type_ids", "decoder_attention_mask"}
_UNBATCHED_KEYS = {"cache_position"}


# ------------------------------------------------------------------------------------------------
# Result types
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class NodeDivergence:
    """One node whose target-row bits differ between compositions."""

    graph: int  #: index of the graph execution (0 for the first graph a run executes)
    node: str  #: FX node name in the reference (first batch size's) graph
    op: str  #: e.g. "aten.addmm.default"
    input_shapes: dict[int, list]  #: batch size -> shapes of the node's tensor inputs
    output_shapes: dict[int, list]  #: batch size -> shape(s) of its output
    source: str  #: model source line ("file:line in fn: code"), "" if unknown
    covered: bool  #: a detcompile pass rewrites this op (or it is a detcompile op)
    coverage: str  #: in words: which pass, or why none does
    differs_at: list[int]  #: batch sizes whose row differs from the reference (the first batch size)
    n_diff: int  #: elements of the row block whose bits differ (largest over the compositions)
    numel: int  #: elements in the row block
    max_abs_diff: float  #: largest |difference| over the compositions (nan if not finite)
    #: input node -> "equal" / "DIVERGENT" / "position-dependent" / "not batch-scaled" / "not compared"
    inputs: dict[str, str]

    @property
    def inputs_equal(self) -> bool:
        """Every input is bitwise equal or does not scale with the batch (a weight): the op itself
        introduced the difference."""
        return all(v in ("equal", "not batch-scaled") for v in self.inputs.values())

    @property
    def is_root(self) -> bool:
        """No input was found divergent (an input of a later graph inherits from an earlier graph)."""
        if self.op == "placeholder":
            return self.graph == 0
        return all(v != "DIVERGENT" for v in self.inputs.values())

    def format(self, ref_bs: int) -> str:
        shapes = lambda d: "  ".join(f"B={b}: {v}" for b, v in d.items())  # noqa: E731
        lines = [
            f"FIRST DIVERGENT NODE: graph {self.graph}, node '{self.node}' = {self.op}",
            f"  differs at batch size(s) {', '.join(map(str, self.differs_at))} (vs {ref_bs}): "
            f"{self.n_diff}/{self.numel} element(s) of the row, max |diff| {self.max_abs_diff:.3g}",
            f"  inputs:   {shapes(self.input_shapes)}",
            f"  output:   {shapes(self.output_shapes)}",
            f"  source:   {self.source or '(no stack trace)'}",
            f"  covered:  {'yes' if self.covered else 'NO'}: {self.coverage}",
        ]
        if self.inputs:
            ins = ", ".join(f"{k} ({v})" for k, v in self.inputs.items())
            unsure = [k for k, v in self.inputs.items() if v in ("not compared", "position-dependent")]
            if any(v == "DIVERGENT" for v in self.inputs.values()):
                verdict = "an input already differs: this node inherits the difference"
            elif unsure:
                verdict = (f"no input differs, but {', '.join(unsure)} could not be compared, so this node "
                           "may inherit a difference from there")
            else:
                verdict = ("every input is bitwise equal or a batch-independent tensor: "
                           "this op itself is batch-variant")
            lines.append(f"  its inputs: {ins}\n    -> {verdict}")
        return "\n".join(lines)


@dataclasses.dataclass
class AuditResult:
    rewrite: bool  #: True: the graph after detcompile's passes; False: the stock aten graph
    batch_sizes: list[int]
    rows: dict[int, int]  #: batch size -> the target row's position
    first_divergence: NodeDivergence | None
    divergences: list[NodeDivergence]  #: every divergent node, in graph order
    #: nodes, compared (= equal + divergent + position_dependent), not_batch_scaled, non_tensor, unaligned
    counts: dict[str, int]
    graphs: dict[int, int]  #: batch size -> number of graph executions recorded
    notes: list[str]  #: alignment problems and other caveats
    output_equal: bool | None  #: the model's own output row is bitwise equal (None: nothing to compare)
    reports: list = dataclasses.field(default_factory=list)  #: pass reports (rewrite=True)
    #: (graph, node, op, status) of every node of the reference run, in graph order; status is one of
    #: "equal", "DIVERGENT", "position-dependent", "not batch-scaled", "not compared"
    node_statuses: list = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No divergent node, and the model's output row is the same in every composition."""
        return self.first_divergence is None and self.output_equal is not False

    @property
    def roots(self) -> list[NodeDivergence]:
        """Divergent nodes none of whose inputs diverged: each is batch-variant on its own (the other
        divergent nodes only inherit a difference)."""
        return [d for d in self.divergences if d.is_root]

    @property
    def divergent_ops(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.divergences:
            out[d.op] = out.get(d.op, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def __str__(self) -> str:
        c = self.counts
        rows = ", ".join(f"B={b}: row {r}" for b, r in self.rows.items())
        graphs = "/".join(str(self.graphs.get(b, 0)) for b in self.batch_sizes)
        lines = [
            f"detcompile audit ({'graph after detcompile passes' if self.rewrite else 'stock aten graph'}): "
            f"batch sizes {', '.join(map(str, self.batch_sizes))} ({rows}); graph executions per run: {graphs}",
            f"nodes: {c['nodes']} | compared {c['compared']}: {c['equal']} equal, {c['divergent']} divergent,"
            f" {c['position_dependent']} position-dependent"
            f" | skipped: {c['not_batch_scaled']} not batch-scaled, {c['non_tensor']} non-tensor,"
            f" {c['unaligned']} unaligned",
            "model output row: " + {True: "bitwise equal", False: "DIFFERS", None: "not compared"}[self.output_equal],
        ]
        for note in self.notes:
            lines.append(f"note: {note}")
        if self.first_divergence is None:
            lines.append(
                "no divergent node: the target row's bits are the same in every composition"
                if self.output_equal is not False
                else "no divergent node found, but the output differs (see the notes)"
            )
        else:
            lines.append(self.first_divergence.format(self.batch_sizes[0]))
            roots: dict[str, int] = {}
            for d in self.roots:
                roots[d.op] = roots.get(d.op, 0) + 1
            lines.append(
                f"{len(self.roots)} divergent node(s) with no divergent input (batch-variant themselves): "
                + ", ".join(f"{op} x{n}" for op, n in sorted(roots.items(), key=lambda kv: -kv[1]))
            )
            lines.append(
                f"{len(self.divergences)} divergent node(s) in all, by op: "
                + ", ".join(f"{op} x{n}" for op, n in self.divergent_ops.items())
            )
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Recording
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Rec:
    """One node output of one run: shape, dtype and the target row's block (None if not sliceable)."""

    shape: tuple
    dtype: torch.dtype
    block: torch.Tensor | None


@dataclasses.dataclass
class _Exec:
    graph_id: int
    gm: fx.GraphModule
    order: list[str]
    targets: dict[str, str]
    values: dict[str, list[_Rec] | None]  # None: non-tensor output
    in_shapes: dict[str, list]


class _State:
    def __init__(self):
        self.recording = False
        self.batch = 1
        self.row = 0
        self.execs: list[_Exec] = []
        self.coverage: dict[int, dict[str, str]] = {}  # graph id -> node name -> pass name (stock graphs)
        self.reports: list = []
        self.disabled: tuple[str, ...] = ()  # options["disable_passes"] (rewrite=True)


def _row_block(t: torch.Tensor, b: int, r: int) -> torch.Tensor | None:
    # Parameters never scale with the batch: not copied (at B=1 every tensor would pass the test below).
    if isinstance(t, torch.nn.Parameter) or t.dim() == 0 or t.shape[0] % b != 0 or t.numel() % b != 0:
        return None
    return t.detach().reshape(b, -1)[r].clone()


def _record(value: Any, b: int, r: int) -> list[_Rec] | None:
    leaves = value if isinstance(value, (tuple, list)) else [value]
    if not leaves or not all(isinstance(v, torch.Tensor) or v is None for v in leaves):
        return None
    if not any(isinstance(v, torch.Tensor) for v in leaves):
        return None
    return [
        _Rec(tuple(v.shape), v.dtype, _row_block(v, b, r)) if isinstance(v, torch.Tensor) else None
        for v in leaves
    ]


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, state: _State, graph_id: int):
        super().__init__(gm)
        self.state = state
        self.exec = _Exec(graph_id, gm, [], {}, {}, {})

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op in ("placeholder", "call_function", "call_module", "call_method", "get_attr"):
            ex = self.exec
            ex.order.append(n.name)
            ex.targets[n.name] = op_name(n.target) if n.op == "call_function" else n.op
            ex.values[n.name] = _record(out, self.state.batch, self.state.row)
            ex.in_shapes[n.name] = [
                list(self.env[i].shape) for i in n.all_input_nodes
                if i in self.env and isinstance(self.env[i], torch.Tensor)
            ]
        return out

    def run(self, *args):
        out = super().run(*args)
        self.state.execs.append(self.exec)
        return out


def _pass_coverage(gm: fx.GraphModule) -> dict[str, str]:
    """Run the aten passes one by one on a copy of a stock graph: node name -> the pass that rewrites it."""
    from .backend import Options
    from .passes import ATEN_PASSES, PassContext, Report

    g = fx.Graph()
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    copy = fx.GraphModule(gm, g)
    copy.graph.eliminate_dead_code()
    covered: dict[str, str] = {}
    names = {n.name for n in copy.graph.nodes}
    ctx = PassContext(Options(), Report())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in ATEN_PASSES:
            if name == "audit":
                continue
            fn(copy, ctx)
            copy.graph.eliminate_dead_code()
            now = {n.name for n in copy.graph.nodes}
            for gone in names - now:
                covered.setdefault(gone, name)
            names = now
    return covered


def _make_backend(state: _State, rewrite: bool, options: dict | None) -> Callable:
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    from .backend import Options, rewrite_aten_graph, rewrite_torch_graph
    from .passes import Report

    options = dict(options or {})
    if options.pop("inductor", False):
        warnings.warn("detcompile.audit: options['inductor'] ignored: the audit interprets the FX graph", stacklevel=3)
    options["report_sink"] = state.reports.append
    opts = Options.from_user(None, options)
    state.disabled = opts.disable_passes if rewrite else ()
    graph_ids = itertools.count()

    def backend(gm: fx.GraphModule, example_inputs):
        pre_report = rewrite_torch_graph(gm, opts) if rewrite else Report()

        def fw_compiler(fx_gm: fx.GraphModule, fx_inputs):
            gid = next(graph_ids)
            if rewrite:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the audit reports what matters
                    rewrite_aten_graph(fx_gm, opts, before=pre_report)
            else:
                try:
                    state.coverage[gid] = _pass_coverage(fx_gm)
                except Exception as err:  # pragma: no cover - coverage is a hint; fall back to the tables
                    state.coverage[gid] = {}
                    warnings.warn(f"detcompile.audit: could not run the passes on a copy of graph {gid}: {err}")

            def run(*args):
                if state.recording:
                    return _Recorder(fx_gm, state, gid).run(*args)
                return fx_gm.forward(*args)

            return make_boxed_func(run)

        return aot_module_simplified(
            gm,
            example_inputs,
            fw_compiler=fw_compiler,
            bw_compiler=lambda g, _i: make_boxed_func(g.forward),
            inference_compiler=fw_compiler,
            keep_inference_input_mutations=True,
        )

    return backend


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------


def _row_rule(target_row: Any) -> Callable[[int], int]:
    if callable(target_row):
        return target_row
    if isinstance(target_row, dict):
        return lambda b: target_row.get(b, b // 2)
    if isinstance(target_row, int):
        return lambda b: min(target_row, b - 1) if target_row >= 0 else b + target_row
    rules = {"middle": lambda b: b // 2, "first": lambda b: 0, "last": lambda b: b - 1}
    if target_row not in rules:
        raise ValueError(
            "detcompile.audit: target_row must be 'middle', 'first', 'last', an int, a dict or a callable; "
            f"got {target_row!r}"
        )
    return rules[target_row]


def _default_neighbours(
    key: Any, target: torch.Tensor, n: int, gen: torch.Generator, vocab: int | None = None
) -> torch.Tensor:
    """``n`` random rows shaped like ``target`` ([1, ...]); masks and positions repeat the target."""
    shape = (n,) + tuple(target.shape[1:])
    if key in _REPEAT_KEYS or target.dtype == torch.bool:
        return target.expand(shape).clone()
    if target.is_floating_point() or target.is_complex():
        t = target.detach().float()
        std = t.std().item() if t.numel() > 1 else 1.0
        std = std if std > 0 and std == std else 1.0
        x = torch.randn(shape, generator=gen) * std + t.mean().item()
        return x.to(dtype=target.dtype, device=target.device)
    lo, hi = int(target.min()), int(target.max())
    if lo >= 0 and hi <= 1 and target.numel() > 1:
        return target.expand(shape).clone()  # looks like a 0/1 mask
    if vocab is not None and hi < vocab:
        hi = vocab - 1
    return torch.randint(lo, hi + 1, shape, generator=gen).to(dtype=target.dtype, device=target.device)


def _is_batched(key: Any, v: Any) -> bool:
    return isinstance(v, torch.Tensor) and key not in _UNBATCHED_KEYS and v.dim() >= 1 and v.shape[0] == 1


def _compose(inputs: dict, b: int, r: int, gen: torch.Generator, neighbours: Callable) -> dict:
    out = {}
    for key, v in inputs.items():
        if not _is_batched(key, v) or b == 1:
            out[key] = v
            continue
        others = neighbours(key, v, b - 1, gen)
        others = others.to(dtype=v.dtype, device=v.device)
        if tuple(others.shape) != (b - 1,) + tuple(v.shape[1:]):
            raise ValueError(f"detcompile.audit: neighbours for {key!r} have shape {tuple(others.shape)}, "
                             f"expected {(b - 1,) + tuple(v.shape[1:])}")
        out[key] = torch.cat([others[:r], v, others[r:]], 0)
    return out


def _output_rows(out: Any, b: int, r: int) -> list[_Rec]:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    leaves = [v for v in torch.utils._pytree.tree_leaves(out) if isinstance(v, torch.Tensor)]
    return [_Rec(tuple(v.shape), v.dtype, _row_block(v, b, r)) for v in leaves]


# ------------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------------


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.is_floating_point():
        return t.contiguous().view(_INT_OF_SIZE[t.element_size()])
    return t


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    """(elements whose bits differ, max |a - b|) of two blocks of equal shape and dtype; (0, 0.0) if equal."""
    if a.dtype == torch.bool:
        ne = a != b
        return int(ne.sum()), float(ne.any())
    ba, bb = _bits(a), _bits(b)
    ne = ba != bb
    if ne.dim() > a.dim():  # complex: real/imag pairs
        ne = ne.any(-1)
    n = int(ne.sum())
    if n == 0:
        return 0, 0.0
    d = (a.to(torch.complex128 if a.is_complex() else torch.float64)
         - b.to(torch.complex128 if b.is_complex() else torch.float64)).abs()
    return n, float(d[ne].max())


def _batch_scaled(recs: list[_Rec], sizes: list[int]) -> bool:
    """The tensor scales with the batch: ``d0 == c * B`` with the same c, and the same other dims and dtype."""
    per_row = set()
    for rec, b in zip(recs, sizes):
        if rec is None or rec.block is None or len(rec.shape) == 0 or rec.shape[0] % b:
            return False
        numel = 1
        for s in rec.shape:
            numel *= s
        per_row.add((rec.shape[0] // b, rec.shape[1:], numel // b, rec.dtype))
    return len(per_row) == 1


def _coverage(
    node: fx.Node, pass_name: str | None, rewrite: bool, on_cpu: bool, disabled: Sequence[str] = ()
) -> tuple[bool, str]:
    t = node.target
    if isinstance(t, torch._ops.OpOverload) and t.namespace == "detcompile":
        return True, (f"a detcompile op ({t}): its batch-invariant kernel itself gave different bits, "
                      "which is a detcompile bug")
    if node.op == "placeholder":
        return False, ("a graph input: the difference comes from outside the graph (an earlier graph's output, "
                       "or the composed inputs themselves)")
    tables = _pass_ops()
    name = t.overloadpacket.__name__ if isinstance(t, torch._ops.OpOverload) else None
    from .passes import SPECS

    device = "cpu" if on_cpu else "cuda"
    table_pass = next((s.name for s in by_precedence(SPECS.values())
                       if name in tables[s.name] and device in s.devices), None)
    reason = classify(node) if node.op == "call_function" else None
    why = (f"the audit pass reports it: {reason}" if reason
           else "the audit pass classifies it as batch-invariant, so no pass rewrites it")
    if pass_name is not None:
        verb = "rewrites" if not rewrite else "rewrote"
        return True, f"the '{pass_name}' pass {verb} this node into a batch-invariant detcompile op"
    if rewrite:
        if table_pass is not None and table_pass in disabled:
            return False, f"the '{table_pass}' pass, which handles {name}, is disabled (options['disable_passes'])"
        if table_pass is not None:
            return False, f"left in the rewritten graph although the '{table_pass}' pass handles {name} " \
                          f"(this instance did not match its pattern); {why}"
        return False, f"left in the rewritten graph: {why}"
    if table_pass == "sdpa":
        return True, ("the 'sdpa' pass (on the Dynamo graph, before AOTAutograd) rewrites attention into "
                      "detcompile.attention")
    if table_pass is not None:
        return False, f"the '{table_pass}' pass handles {name} but did not rewrite this node; {why}"
    return False, why


def _node_index(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


def _signature(ex: _Exec, name: str) -> tuple:
    """What must match for two nodes of two runs to be the same node: op, and per output its dtype and
    every dim but the leading (batch-carrying) one."""
    vals = ex.values[name]
    outs = None if vals is None else tuple(None if r is None else (r.dtype, r.shape[1:], len(r.shape)) for r in vals)
    return ex.targets[name], outs


def _align(ref: _Exec, other: _Exec) -> tuple[dict[str, str], bool]:
    """Map ref node names to other node names. By name when both graphs have the same nodes in the same
    order (the usual case); otherwise (a graph specialised for batch size 1 drops or adds a view, which
    shifts the name counters) by a longest-common-subsequence match of the node signatures."""
    a = [(n, _signature(ref, n)) for n in ref.order]
    b = [(n, _signature(other, n)) for n in other.order]
    if a == b:
        return {n: n for n in ref.order}, True
    import difflib

    sm = difflib.SequenceMatcher(None, [s for _, s in a], [s for _, s in b], autojunk=False)
    mapping = {}
    for i, j, size in sm.get_matching_blocks():
        for t in range(size):
            mapping[a[i + t][0]] = b[j + t][0]
    return mapping, False


def _shapes(recs: list) -> list:
    if len(recs) == 1:
        return list(recs[0].shape)
    return [list(r.shape) if r is not None else None for r in recs]


def _is_float(recs: list) -> bool:
    return any(r is not None and (r.dtype.is_floating_point or r.dtype.is_complex) for r in recs)


def _compare(runs: list[list[_Exec]], sizes: list[int], state: _State, rewrite: bool, on_cpu: bool):
    counts = dict(nodes=0, compared=0, equal=0, divergent=0, position_dependent=0, not_batch_scaled=0, non_tensor=0,
                  unaligned=0)
    notes: list[str] = []
    divergences: list[NodeDivergence] = []
    first_positional: str | None = None
    statuses: list[tuple[int, str, str, str]] = []
    n_exec = [len(r) for r in runs]
    if len(set(n_exec)) > 1:
        notes.append(
            "alignment: the runs executed different numbers of graphs ("
            + ", ".join(f"B={b}: {n}" for b, n in zip(sizes, n_exec))
            + f"); only the first {min(n_exec)} are compared, in order of execution"
        )
    for k in range(min(n_exec) if n_exec else 0):
        execs = [r[k] for r in runs]
        ref = execs[0]
        nodes = _node_index(ref.gm)
        maps, by_sequence = [], []
        for b, e in zip(sizes[1:], execs[1:]):
            mapping, by_name = _align(ref, e)
            maps.append(mapping)
            if not by_name:
                by_sequence.append(f"B={b} ({len(e.order)} nodes)")
        status: dict[str, str] = {}
        missing = []
        for name in ref.order:
            counts["nodes"] += 1
            node = nodes[name]
            others = [m.get(name) for m in maps]
            if any(o is None for o in others):
                counts["unaligned"] += 1
                status[name] = "not compared"
                missing.append(name)
                continue
            vals = [ref.values[name]] + [e.values[o] for e, o in zip(execs[1:], others)]
            if any(v is None for v in vals) or len({len(v) for v in vals}) != 1:
                counts["non_tensor"] += 1
                status[name] = "not compared"
                continue
            compared = False
            worst_n, worst_d, numel, differs = 0, 0.0, 0, set()
            for i in range(len(vals[0])):
                recs = [v[i] for v in vals]
                if not _batch_scaled(recs, sizes):
                    continue
                compared = True
                numel += recs[0].block.numel()
                for b, rec in zip(sizes[1:], recs[1:]):
                    n, d = _diff(recs[0].block, rec.block)
                    if n:
                        differs.add(b)
                        worst_n = max(worst_n, n)
                        worst_d = max(worst_d, d) if d == d else float("nan")
            if not compared:
                counts["not_batch_scaled"] += 1
                status[name] = "not batch-scaled"
                continue
            counts["compared"] += 1
            if not differs:
                counts["equal"] += 1
                status[name] = "equal"
                continue
            in_status = [status.get(i.name) for i in node.all_input_nodes]
            if node.op != "placeholder" and "DIVERGENT" not in in_status and (
                not _is_float(vals[0]) or "position-dependent" in in_status
            ):
                # Integer/bool ops are exact: with no divergent input, a difference encodes the row's
                # position or the batch size (arange(batch_size) for masks), not the neighbours. A node
                # fed by such an index (MoE token routing: hidden[perm]) holds rows of the whole batch in
                # a batch-dependent order, which cannot be sliced by row; it is compared again once the
                # rows are put back (index_add / scatter).
                counts["position_dependent"] += 1
                status[name] = "position-dependent"
                if first_positional is None and _is_float(vals[0]):
                    first_positional = f"graph {k}, node '{name}' = {ref.targets[name]} ({source_line(node)})"
                continue
            counts["divergent"] += 1
            status[name] = "DIVERGENT"
            pass_name = state.coverage.get(ref.graph_id, {}).get(name)
            covered, why = _coverage(node, pass_name, rewrite, on_cpu, state.disabled)
            divergences.append(NodeDivergence(
                graph=k,
                node=name,
                op=ref.targets[name],
                input_shapes={sizes[0]: ref.in_shapes[name]} | {
                    b: e.in_shapes[o] for b, e, o in zip(sizes[1:], execs[1:], others)
                },
                output_shapes={b: _shapes(v) for b, v in zip(sizes, vals)},
                source=source_line(node),
                covered=covered,
                coverage=why,
                differs_at=sorted(differs, key=sizes.index),
                n_diff=worst_n,
                numel=numel,
                max_abs_diff=worst_d,
                inputs={i.name: status.get(i.name, "not compared") for i in node.all_input_nodes},
            ))
        statuses.extend((k, n, ref.targets[n], status[n]) for n in ref.order)
        if by_sequence:
            notes.append(
                f"alignment: graph {k}: the B={sizes[0]} graph ({len(ref.order)} nodes) is not node for node the "
                f"graph of {', '.join(by_sequence)} (e.g. a graph specialised for batch size 1 has fewer views, "
                "which shifts the node names), so nodes were matched by op and shape sequence"
            )
        if missing:
            notes.append(
                f"alignment: graph {k}: {len(missing)} node(s) of the B={sizes[0]} graph have no counterpart "
                f"in every other run ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); "
                "they were not compared"
            )
    if first_positional is not None:
        notes.append(
            "some float nodes hold rows of the whole batch in a position-dependent order (fed by a batch-index "
            f"tensor, e.g. MoE token routing) and could not be sliced by row; the first: {first_positional}"
        )
    return divergences, counts, notes, statuses


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def audit(
    model: Callable,
    example_inputs: Any,
    *,
    batch_sizes: Sequence[int] = (1, 3, 8),
    target_row: Any = "middle",
    seed: int = 0,
    rewrite: bool = True,
    options: dict | None = None,
    neighbours: Callable | None = None,
    verbose: bool = True,
) -> AuditResult:
    """Find the first FX node whose output bits for one row depend on the rest of the batch.

    ``example_inputs`` are the target row's inputs: a tensor, a tuple/list of positional inputs or a dict
    of keyword inputs; tensors with leading dim 1 are batched (except ``cache_position``), anything else
    is passed unchanged to every composition. ``batch_sizes``: the compositions (the first is the
    reference; at least two). ``target_row``: where the target sits in a batch of size B: ``"middle"``
    (B // 2), ``"first"``, ``"last"``, an int (clamped to B - 1; negative counts from the end), a
    ``{B: row}`` dict or a callable ``B -> row``. ``seed`` seeds the neighbours (different for each B).
    ``rewrite``: False audits the stock aten graph (AOTAutograd, no detcompile pass); True the graph after
    detcompile's passes (``options`` as for the backend; Inductor is never used). ``neighbours``: optional
    ``(key, target [1, ...], n, generator) -> [n, ...]`` making the other rows (default: random ids in the
    target's range up to ``model.config.vocab_size``, Gaussian floats with the target's mean and std,
    masks and positions repeated).

    The model runs without gradients. Returns an ``AuditResult`` (printed when ``verbose``).
    """
    sizes = [int(b) for b in batch_sizes]
    if len(sizes) < 2 or any(b < 1 for b in sizes):
        raise ValueError(f"detcompile.audit: need at least two positive batch sizes, got {list(batch_sizes)}")
    rule = _row_rule(target_row)
    rows = {}
    for b in sizes:
        r = int(rule(b))
        if not 0 <= r < b:
            raise ValueError(f"detcompile.audit: target row {r} is out of range for batch size {b}")
        rows[b] = r

    if isinstance(example_inputs, dict):
        inputs, call = dict(example_inputs), (lambda m, d: m(**d))
    else:
        seq = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        inputs, call = dict(enumerate(seq)), (lambda m, d: m(*[d[i] for i in range(len(d))]))
    for key, v in inputs.items():
        if isinstance(v, torch.Tensor) and key not in _UNBATCHED_KEYS and v.dim() >= 2 and v.shape[0] != 1:
            raise ValueError(
                f"detcompile.audit: input {key!r} has shape {tuple(v.shape)}; pass the target row alone (leading dim 1)"
            )
    if not any(_is_batched(k, v) for k, v in inputs.items()):
        raise ValueError("detcompile.audit: no input tensor with leading dim 1 (the target row) to batch")

    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod  # audit the module itself, not an earlier torch.compile of it
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    make = neighbours or functools.partial(_default_neighbours, vocab=vocab)
    on_cpu = not any(isinstance(v, torch.Tensor) and v.device.type != "cpu" for v in inputs.values())

    state = _State()
    backend = _make_backend(state, rewrite, options)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    runs: list[list[_Exec]] = []
    outs: list[list[_Rec]] = []
    limit = max(64, 4 * len(sizes))
    dyn = torch._dynamo.config
    patch = {"recompile_limit": max(dyn.recompile_limit, limit)} if hasattr(dyn, "recompile_limit") else {
        "cache_size_limit": max(dyn.cache_size_limit, limit)}
    with dyn.patch(patch), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, b in enumerate(sizes):
            gen = torch.Generator().manual_seed(seed * 1000003 + 7919 * i + b)
            batch = _compose(inputs, b, rows[b], gen, make)
            state.batch, state.row, state.execs = b, rows[b], []
            state.recording = True
            try:
                out = call(compiled, batch)
            finally:
                state.recording = False
            runs.append(state.execs)
            outs.append(_output_rows(out, b, rows[b]))

    divergences, counts, notes, statuses = _compare(runs, sizes, state, rewrite, on_cpu)
    if any(len(r) == 0 for r in runs):
        notes.append("no graph ran for some batch size: Dynamo fell back to eager (recompile limit or a "
                     "compile error); nothing of that run was compared")
    output_equal = _compare_outputs(outs, sizes, notes)
    result = AuditResult(
        rewrite=rewrite,
        batch_sizes=sizes,
        rows=rows,
        first_divergence=divergences[0] if divergences else None,
        divergences=divergences,
        counts=counts,
        graphs={b: len(r) for b, r in zip(sizes, runs)},
        notes=notes,
        output_equal=output_equal,
        reports=state.reports,
        node_statuses=statuses,
    )
    if verbose:
        print(result)
    return result


def _compare_outputs(outs: list[list[_Rec]], sizes: list[int], notes: list[str]) -> bool | None:
    if len({len(o) for o in outs}) != 1:
        notes.append("the model returned a different number of tensors per batch size; outputs not compared")
        return None
    result = None
    for i in range(len(outs[0])):
        recs = [o[i] for o in outs]
        if not _batch_scaled(recs, sizes):
            continue
        same = all(_diff(recs[0].block, r.block)[0] == 0 for r in recs[1:])
        result = same if result is None else (result and same)
    return result
