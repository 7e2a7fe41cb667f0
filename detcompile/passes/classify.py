"""The static classifier: the last pass, which sorts every op left in the graph into batch-invariant or not.

Safe: detcompile ops; views and data movement; order-free selections (max/argmax, and sort/topk on the
CPU, where they are row-local); integer and bool arithmetic and reductions; and pointwise ops, with a
device rule. On CUDA every element of a pointwise kernel runs the same code, so pointwise ops are safe.
On the CPU, ATen's vector body, scalar tail and strided loop can round differently, so a floating
pointwise op is safe only if it is on ``CPU_EXACT`` (ops shown exact per element: correctly rounded
arithmetic, selections, sign and rounding ops; measured by ``tests/passes/cpu_exactness.py``); anything
else left on the CPU is flagged (the ``cpu_pointwise`` pass rewrites the common transcendental ones).

Flagged: floating-point reductions, matmuls, convolutions, norms and attention kernels no pass rewrote;
accumulating scatters; tie-dependent selections on CUDA (topk, unstable sort); random ops; and any op
this module does not know. A flagged op that a pass declares as a target (``PassSpec``) says which pass
handles it and why this call was left. Strict mode turns flags into a ``NondeterminismError``; the
default is a warning and the flagged ops run with their stock kernels (the documented fallback).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .manager import Leftover, PassContext, node_arg, source_line

# Reduce floating-point values across elements in an order the stock kernel chooses.
VARIANT = {
    "mm", "bmm", "addmm", "baddbmm", "addbmm", "addmv", "addr", "mv", "dot", "vdot", "matmul", "linear",
    "einsum", "tensordot", "_grouped_mm", "_scaled_mm", "_int_mm", "convolution", "_convolution",
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "cudnn_convolution",
    "sum", "mean", "var", "std", "var_mean", "std_mean", "prod", "nansum", "nanmean", "norm",
    "linalg_vector_norm", "frobenius_norm", "logsumexp", "cumsum", "cumprod", "logcumsumexp",
    "_softmax", "_log_softmax", "softmax", "log_softmax", "native_layer_norm", "layer_norm",
    "native_group_norm", "group_norm", "native_batch_norm", "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional", "batch_norm",
    "rms_norm", "_fused_rms_norm", "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math", "_flash_attention_forward",
    "_efficient_attention_forward", "index_add", "scatter_add", "scatter_reduce", "index_reduce",
    "embedding_bag", "_embedding_bag", "_embedding_bag_forward_only", "trace", "cdist",
    "_cdist_forward", "upsample_bilinear2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "_weight_norm_interface",
}
# Draw from a global generator: different on every call whatever the batch.
RANDOM = {
    "native_dropout", "dropout", "bernoulli", "rand", "randn", "rand_like", "randn_like", "randint",
    "randint_like", "multinomial", "normal", "uniform", "exponential", "randperm", "rrelu_with_noise",
}
# Data movement, factories, comparisons and order-free selections.
SAFE = {
    "embedding", "index", "index_select", "gather", "cat", "stack", "slice", "select", "expand", "clone",
    "_to_copy", "convert_element_type", "copy", "copy_", "arange", "full", "zeros", "ones", "empty", "empty_strided", "scalar_tensor",
    "where", "masked_fill", "new_ones", "new_zeros", "new_full", "new_empty", "new_empty_strided",
    "lift_fresh_copy", "alias", "max", "min", "amax", "amin", "argmax", "argmin",
    "aminmax", "triu", "tril", "constant_pad_nd", "pad", "repeat", "repeat_interleave", "roll", "flip",
    "split", "split_with_sizes", "unbind", "chunk", "squeeze", "unsqueeze", "view", "reshape", "permute",
    "transpose", "t", "_unsafe_view", "detach", "zeros_like", "ones_like", "full_like",
    "empty_like", "sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "nonzero", "unique",
    "_unique2", "unique_consecutive", "unique_dim", "searchsorted", "bucketize", "one_hot", "any", "all",
    "isin", "masked_scatter", "index_copy", "diagonal", "narrow", "slice_scatter", "select_scatter",
    "diagonal_scatter", "as_strided", "as_strided_scatter", "_local_scalar_dense", "item", "contiguous",
    "clamp", "view_as_real", "view_as_complex", "_assert_async", "_assert_scalar", "sym_constrain_range",
    "sym_constrain_range_for_size", "_functional_sym_constrain_range", "_functional_assert_async",
    "_make_dep_token", "resize_", "fill", "fill_", "zero", "zero_", "masked_select", "take", "meshgrid",
    "unfold", "expand_as", "view_as", "flatten", "unflatten", "movedim", "swapaxes", "_to_dtype", "to",
    "block_diag", "diag_embed", "tile", "broadcast_to", "index_fill", "count_nonzero", "_unsafe_index",
    "full_like", "linspace", "logspace", "eye", "tensor", "empty_permuted",
    "unfold_copy", "alias_copy", "view_copy", "permute_copy", "t_copy", "transpose_copy", "unsqueeze_copy",
    "squeeze_copy", "expand_copy", "slice_copy", "select_copy", "split_copy", "unbind_copy",
    "_reshape_alias", "_reshape_copy", "lift", "lift_fresh", "set_", "_foreach_copy",
    "_assert_tensor_metadata", "_print", "sym_is_contiguous",
    # histc's bins count whole numbers: exact in any order.
    "histc",
    # Packs two real tensors into a complex one: exact.
    "complex",
}
#: Elementwise ops that are not tagged pointwise: batch-invariant on CUDA (every element runs the same
#: code); on the CPU the cpu_pointwise pass rewrites them (vector body and scalar tail can round
#: differently), so one left there is flagged.
ELEMENTWISE_NOT_TAGGED = {"polar", "log_sigmoid_forward"}
#: Complex pointwise ops that are exact per component (add, subtract, negate, conjugate, copy).
#: Any other complex pointwise op on the CPU is flagged: measured with torch 2.13, ATen's complex
#: mul and div round differently in the vector body and the scalar tail.
COMPLEX_EXACT = {"add", "sub", "rsub", "neg", "conj_physical", "_conj", "conj", "clone", "where", "fill", "copy"}
EXACT_FOR_INTEGERS = VARIANT  # every reduction is exact on integers and bools


def _alpha_one(node: fx.Node) -> bool:
    # a + alpha * b rounds twice unless alpha is 1: measured offset-dependent in bf16/fp16 (fused or not).
    return node_arg(node, 2, "alpha", 1) == 1


def _exact_division(node: fx.Node) -> bool:
    # floor/trunc division of 16-bit floats rounds by offset (measured); true division is IEEE.
    return node_arg(node, 2, "rounding_mode") is None


def _exact_pow(node: fx.Node) -> bool:
    # x**e for these exponents is x*x, sqrt, 1/x in both paths; others are rewritten by cpu_pointwise.
    from .cpu_pointwise import _EXACT_POW

    t = node.target
    return t.overloadpacket.__name__ == "pow" and t._overloadname == "Tensor_Scalar" and node_arg(node, 1, "exponent") in _EXACT_POW


def _default_overload(node: fx.Node) -> bool:
    return node.target._overloadname == "default"


#: CPU floating pointwise ops shown exact per element (name -> extra condition on the call, or None).
#: Each is exact by construction (IEEE-correctly rounded +, -, *, /, sqrt, one multiply; or no rounding
#: at all: selections, comparisons, sign, rounding to integers) and measured so on torch 2.13 with the
#: AVX-512, AVX2 and default kernels, fp32/bf16/fp16/fp64, in the vector body, the scalar tail and the
#: strided loop (tests/passes/cpu_exactness.py; tests/passes/test_cpu_exact_ops.py re-measures them).
#: Not here although measured exact on these inputs: transcendental functions (approximations whose
#: vector and scalar versions differ for some inputs), lerp/addcmul/addcdiv/hardsigmoid/hardswish (fused
#: or reordered formulas), float remainder/floor_divide (bf16 floor division measured offset-dependent).
CPU_EXACT = {
    "add": _alpha_one, "sub": _alpha_one, "rsub": _alpha_one, "mul": None, "div": _exact_division,
    "true_divide": None, "reciprocal": None, "sqrt": None, "neg": None, "negative": None, "square": None,
    "pow": _exact_pow, "leaky_relu": None,
    "abs": None, "absolute": None, "sign": None, "sgn": None, "signbit": None, "copysign": None,
    "ceil": None, "floor": None, "round": _default_overload, "trunc": None, "fix": None, "frac": None,
    "fmod": None, "maximum": None, "minimum": None, "fmax": None, "fmin": None, "max": None, "min": None,
    "clamp": None, "clip": None, "clamp_min": None, "clamp_max": None, "relu": None, "hardtanh": None,
    "threshold": None, "hardshrink": None, "where": None, "masked_fill": None, "clone": None,
    "nan_to_num": None, "isnan": None, "isinf": None, "isfinite": None, "isposinf": None, "isneginf": None,
    "eq": None, "ne": None, "lt": None, "le": None, "gt": None, "ge": None,
    "logical_and": None, "logical_or": None, "logical_xor": None, "logical_not": None,
    # dtype conversion is correctly rounded (round to nearest even) in every loop: prims' spelling of
    # .to(dtype), which graphs traced with dynamic shapes carry (the engine's, for one)
    "convert_element_type": None,
}


class NondeterminismError(RuntimeError):
    """Strict mode found an op it cannot make batch-invariant."""


def _has_float_tensor_input(node: fx.Node) -> bool:
    from .manager import meta_val

    for a in torch.utils._pytree.tree_leaves((node.args, node.kwargs)):
        v = meta_val(a) if isinstance(a, fx.Node) else None
        if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()):
            return True
    return False


def _out_tensors(node: fx.Node) -> list:
    from .manager import meta_val

    return [v for v in torch.utils._pytree.tree_leaves(meta_val(node)) if isinstance(v, torch.Tensor)]


def _on_cpu(node: fx.Node) -> bool:
    outs = _out_tensors(node)
    return bool(outs) and all(v.device.type == "cpu" for v in outs)


def _complex_on_cpu(node: fx.Node) -> bool:
    return any(v.is_complex() and v.device.type == "cpu" for v in _out_tensors(node))


def _convolution_reason(node: fx.Node) -> str:
    from .convolution import rewritable
    from .manager import meta_val

    x = meta_val(node.args[0]) if node.args else None
    transposed = node.args[6] if len(node.args) > 6 else node.kwargs.get("transposed", False)
    if transposed:
        what = "transposed convolution"
    elif isinstance(x, torch.Tensor) and x.dim() != 3:
        what = f"{x.dim() - 2}-D convolution"
    elif isinstance(x, torch.Tensor) and not rewritable(node):
        what = f"1-D convolution with unsupported arguments or dtype ({x.dtype} on {x.device.type})"
    else:
        what = "convolution"
    return (
        f"{what} left to the stock kernel (its order can depend on the batch); detcompile.conv1d takes "
        "only non-transposed 1-D convolutions"
    )


def classify(node: fx.Node) -> str | None:
    """None if the op is batch-invariant, else the reason it is not."""
    t = node.target
    if not isinstance(t, torch._ops.OpOverload):
        if isinstance(t, torch._ops.HigherOrderOperator):
            return f"higher-order op {t.name()} (e.g. flex attention) is not rewritten"
        return None  # Python builtins on SymInts (getitem, operator.mul, ...)
    if t.namespace == "detcompile":
        return None
    name = t.overloadpacket.__name__
    # In-place variants (index_add_) classify like their functional op.
    base = name[:-1] if name.endswith("_") and not name.endswith("__") and name not in SAFE else name
    reason = _reason(node, t, base)
    if reason is None:
        return None
    spec = _declared_by(node)
    if spec is not None:
        when = f" ({spec.when})" if spec.when else ""
        reason += f"; the '{spec.name}' pass rewrites {base}{when}, but not this call"
    return reason


def _declared_by(node: fx.Node):
    """The first pass that declares this op as a target on the node's device, if any (fusions last)."""
    from . import SPECS  # the package imports this module: resolve at call time
    from .manager import by_precedence

    device = "cpu" if _on_cpu(node) else "cuda"
    return next((s for s in by_precedence(SPECS.values()) if device in s.devices and s.handles(node.target)), None)


def _reason(node: fx.Node, t, base: str) -> str | None:
    if base in RANDOM:
        return "draws from the global random generator"
    if base in VARIANT:
        if not _has_float_tensor_input(node):
            return None  # integer/bool arithmetic is exact in any order
        if base in ("convolution", "_convolution"):
            return _convolution_reason(node)
        return "floating-point reduction left to the stock kernel (its order can depend on the batch)"
    if base == "linalg_solve_triangular":
        if not _has_float_tensor_input(node):
            return None
        return (
            "triangular solve left to the stock kernel (on CUDA ATen picks a loop of cuBLAS trsm or the "
            "batched trsm by the batch count; detcompile.solve_triangular takes float matrices up to "
            "128 x 128 on CUDA, any size on the CPU)"
        )
    if base in ELEMENTWISE_NOT_TAGGED:
        if not _on_cpu(node):
            return None  # elementwise: the same code for every element on CUDA
        if base == "log_sigmoid_forward" and not any(
            u.op == "call_function" and u.args[1:2] == (0,) for u in node.users
        ):
            return None  # only its buffer (for the backward) is used; the output was rewritten
        return (
            f"{base} on the CPU: ATen's vector body and scalar tail can round differently, so an element's "
            "bits depend on its offset"
        )
    if base == "bincount":
        weights = node_arg(node, 1, "weights")
        return None if weights is None else "bincount with weights sums floats with atomics"
    if base in ("index_put", "_unsafe_index_put"):
        if node_arg(node, 3, "accumulate", False) and _has_float_tensor_input(node):
            return f"{base} with accumulate=True on floats (atomics on CUDA, an order the kernel picks)"
        return None  # a plain write (duplicate indices are unspecified anyway, batch or not)
    if base == "scatter":
        if node_arg(node, 4, "reduce") is not None and _has_float_tensor_input(node):
            return (f"scatter with reduce={node_arg(node, 4, 'reduce')!r} on floats (atomics on CUDA, an order "
                    "the kernel picks); scatter_add is rewritten, scatter(reduce=...) is not")
        return None
    if base in ("topk", "sort", "argsort", "msort"):
        if _on_cpu(node):
            return None  # the CPU kernels sort each row on its own: a function of the row
        if base in ("sort", "argsort") and node_arg(node, 1, "stable") is True and t._overloadname == "stable":
            return None  # ties by ascending index: defined by the row alone
        return (f"{base} on CUDA: which of equal values comes first is unspecified, and the kernel is "
                "chosen by the number of rows, so a tie can resolve differently with the batch")
    if torch.Tag.pointwise in t.tags and base not in COMPLEX_EXACT and _complex_on_cpu(node):
        return (
            f"complex {base} on the CPU: ATen's vector body and scalar tail round differently, so an "
            "element's bits depend on its offset"
        )
    if base in ("floor_divide", "remainder") and not _float_involved(node):
        return None  # integer arithmetic: exact
    cpu_float = _on_cpu(node) and _float_involved(node)
    if cpu_float and (torch.Tag.pointwise in t.tags or base in ("floor_divide", "remainder")):
        check = CPU_EXACT.get(base, False)
        if check is None or (check is not False and check(node)):
            return None
        if _graph_constant(node):
            return None  # e.g. ALiBi slopes, rotary frequencies: the same tensor in every call
        return (
            f"{t.overloadpacket.__name__}.{t._overloadname} on CPU floats is not shown exact per element: "
            "ATen's vector body, scalar tail and strided loop can round it differently, so an element's "
            "bits can depend on its offset, i.e. on the batch"
        )
    if torch.Tag.pointwise in t.tags or base in SAFE or t.overloadpacket.__name__ in SAFE:
        return None
    if base in ("floor_divide", "remainder"):
        return None  # elementwise: the same code for every element on CUDA
    if t.is_view:
        return None
    return "unknown op: not known to be batch-invariant"


def _graph_constant(node: fx.Node) -> bool:
    """No graph input among the node's ancestors: it computes the same tensor, of the same shape, in
    every call, so its elements cannot move with the batch. Not under a static-shape compile
    (``dynamic=False``): there a size taken from the batch is baked into the graph as a constant."""
    import torch._dynamo.config

    if not getattr(torch._dynamo.config, "automatic_dynamic_shapes", True):
        return False
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return False
        todo.extend(n.all_input_nodes)
    return True


def _float_involved(node: fx.Node) -> bool:
    return _has_float_tensor_input(node) or any(v.is_floating_point() for v in _out_tensors(node))


def audit_pass(gm: fx.GraphModule, ctx: PassContext) -> None:
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        reason = classify(node)
        if reason is not None:
            ctx.report.leftovers.append(Leftover(str(node.target), reason, source_line(node)))
