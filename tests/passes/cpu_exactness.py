"""Measure which CPU pointwise ops give an element the same bits wherever it sits in the tensor.

ATen's CPU pointwise kernels run a vectorised body and a scalar tail; an element's path depends on its
offset, so an op whose two paths round differently makes a row's bits depend on the batch; a strided
(non-contiguous) input takes a third, scalar path, and whether a view is contiguous can itself depend
on the batch (a [1, ...] tensor is contiguous more often). For each case this computes the op on a whole
tensor and compares every element's bits with: the element alone, the tensor read through a stride of
2, the tensor shifted by 1..63 leading elements and cut short by 1..63 trailing ones (so each element
sits in the body, the tail and various lanes). NaNs count as equal to each other (torch.equal never
calls NaN equal anyway); signed zeros do not (-0.0 and 0.0 are different bits).

    python -m tests.passes.cpu_exactness          # table for this machine (also: ATEN_CPU_CAPABILITY=avx2)

The audit's CPU safe list (``detcompile.passes.classify.CPU_EXACT``) is built from this and
``tests/passes/test_cpu_exact_ops.py`` re-measures it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

N = 1031
SHIFTS = range(1, 64)  # covers two AVX-512 vectors of bf16 (32 lanes each)


def _values(domain: str, n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Inputs in an op's domain: mixed scales, exact integers and a few special values."""
    base = torch.randn(n, generator=gen, dtype=torch.float64)
    scale = torch.tensor([1e-3, 0.3, 1.0, 3.0, 30.0], dtype=torch.float64)[torch.randint(0, 5, (n,), generator=gen)]
    x = base * scale
    if domain == "pos":
        x = x.abs() + 1e-6
    elif domain == "unit":  # open interval (-1, 1)
        x = torch.tanh(x)
    elif domain == "prob":  # open interval (0, 1)
        x = torch.sigmoid(x * 3)
    elif domain == "ge1":
        x = 1 + x.abs()
    elif domain == "any":
        x[:8] = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0, 0.5, math.inf, -math.inf], dtype=torch.float64)
    return x.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    if t.is_floating_point():
        t = torch.where(torch.isnan(t), torch.full_like(t, math.nan), t)
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def position_dependent(fn, domains: tuple[str, ...], dtype: torch.dtype, seed: int = 0) -> int:
    """How many elements of an ``N``-element input get different bits by position (0: exact per element).

    ``fn`` takes one tensor per entry of ``domains`` (all of the same length) and works elementwise.
    """
    gen = torch.Generator().manual_seed(seed)
    xs = [_values(d, N, dtype, gen) for d in domains]
    whole = _bits(fn(*xs))
    bad = torch.zeros(N, dtype=torch.bool)
    for i in range(N):
        alone = _bits(fn(*[x[i : i + 1] for x in xs]))
        bad[i] |= bool((alone != whole[i : i + 1]).any())
    strided = _bits(fn(*[torch.stack([x, x], 1)[:, 0] for x in xs]))
    bad |= strided != whole
    pads = [_values(d, SHIFTS[-1], dtype, gen) for d in domains]
    for s in SHIFTS:
        shifted = _bits(fn(*[torch.cat([p[:s], x]) for p, x in zip(pads, xs)]))[s:]
        bad |= shifted != whole
        cut = _bits(fn(*[x[: N - s] for x in xs]))
        bad[: N - s] |= cut != whole[: N - s]
    return int(bad.sum())


# (label, aten op name, fn, input domains). One case per way a model calls the op; the label says which.
_u = lambda f, d="any": (f, (d,))  # noqa: E731
_b = lambda f, d="any", e="any": (f, (d, e))  # noqa: E731

CASES: list[tuple[str, str, object, tuple[str, ...]]] = [
    (label, name, *spec)
    for label, name, spec in [
        # Exactly rounded arithmetic (IEEE +, -, *, /, sqrt), sign and rounding ops, comparisons.
        ("add", "add", _b(torch.add)),
        ("add(scalar)", "add", _u(lambda x: x + 0.1)),
        ("add(alpha=0.3)", "add", _b(lambda x, y: torch.add(x, y, alpha=0.3))),
        ("sub", "sub", _b(torch.sub)),
        ("sub(scalar)", "sub", _u(lambda x: x - 0.1)),
        ("sub(alpha=0.3)", "sub", _b(lambda x, y: torch.sub(x, y, alpha=0.3))),
        ("rsub(scalar)", "rsub", _u(lambda x: 1.0 - x)),
        ("mul", "mul", _b(torch.mul)),
        ("convert(bf16)", "convert_element_type", _u(lambda x: torch.ops.prims.convert_element_type(x, torch.bfloat16))),
        ("convert(fp16)", "convert_element_type", _u(lambda x: torch.ops.prims.convert_element_type(x, torch.float16))),
        ("convert(fp64)", "convert_element_type", _u(lambda x: torch.ops.prims.convert_element_type(x, torch.float64))),
        ("mul(scalar)", "mul", _u(lambda x: x * 0.1)),
        ("div", "div", _b(torch.div, "any", "pos")),
        ("div(scalar)", "div", _u(lambda x: x / 3.0)),
        ("div(floor)", "div", _b(lambda x, y: torch.div(x, y, rounding_mode="floor"), "any", "pos")),
        ("div(trunc)", "div", _b(lambda x, y: torch.div(x, y, rounding_mode="trunc"), "any", "pos")),
        ("reciprocal", "reciprocal", _u(torch.reciprocal)),
        ("sqrt", "sqrt", _u(torch.sqrt, "pos")),
        ("neg", "neg", _u(torch.neg)),
        ("abs", "abs", _u(torch.abs)),
        ("sign", "sign", _u(torch.sign)),
        ("sgn", "sgn", _u(torch.sgn)),
        ("ceil", "ceil", _u(torch.ceil)),
        ("floor", "floor", _u(torch.floor)),
        ("round", "round", _u(torch.round)),
        ("round(decimals=2)", "round", _u(lambda x: torch.round(x, decimals=2))),
        ("trunc", "trunc", _u(torch.trunc)),
        ("frac", "frac", _u(torch.frac)),
        ("square", "square", _u(torch.square)),
        ("pow(2)", "pow", _u(lambda x: torch.pow(x, 2))),
        ("pow(0.5)", "pow", _u(lambda x: torch.pow(x, 0.5), "pos")),
        ("pow(-1)", "pow", _u(lambda x: torch.pow(x, -1))),
        ("pow(3)", "pow", _u(lambda x: torch.pow(x, 3))),
        ("pow(-2)", "pow", _u(lambda x: torch.pow(x, -2))),
        ("pow(-0.5)", "pow", _u(lambda x: torch.pow(x, -0.5), "pos")),
        ("pow(tensor)", "pow", _b(torch.pow, "pos", "any")),
        ("pow(scalar base)", "pow", _u(lambda x: torch.pow(10000.0, x))),
        ("maximum", "maximum", _b(torch.maximum)),
        ("minimum", "minimum", _b(torch.minimum)),
        ("fmax", "fmax", _b(torch.fmax)),
        ("fmin", "fmin", _b(torch.fmin)),
        ("clamp", "clamp", _u(lambda x: torch.clamp(x, -1.0, 2.0))),
        ("clamp_min", "clamp_min", _u(lambda x: torch.clamp_min(x, 0.1))),
        ("clamp_max", "clamp_max", _u(lambda x: torch.clamp_max(x, 0.1))),
        ("clamp(tensor)", "clamp", _b(lambda x, y: torch.clamp(x, min=y))),
        ("relu", "relu", _u(torch.relu)),
        ("hardtanh", "hardtanh", _u(F.hardtanh)),
        ("leaky_relu", "leaky_relu", _u(lambda x: F.leaky_relu(x, 0.01))),
        ("threshold", "threshold", _u(lambda x: F.threshold(x, 0.1, 20.0))),
        ("hardsigmoid", "hardsigmoid", _u(F.hardsigmoid)),
        ("hardswish", "hardswish", _u(F.hardswish)),
        ("hardshrink", "hardshrink", _u(F.hardshrink)),
        ("softshrink", "softshrink", _u(F.softshrink)),
        ("where", "where", _b(lambda x, y: torch.where(x > 0, x, y))),
        ("eq", "eq", _b(torch.eq)),
        ("lt", "lt", _b(torch.lt)),
        ("ge(scalar)", "ge", _u(lambda x: x >= 0.5)),
        ("isnan", "isnan", _u(torch.isnan)),
        ("isinf", "isinf", _u(torch.isinf)),
        ("nan_to_num", "nan_to_num", _u(torch.nan_to_num)),
        ("copysign", "copysign", _b(torch.copysign)),
        ("fmod", "fmod", _b(torch.fmod, "any", "pos")),
        ("remainder", "remainder", _b(torch.remainder, "any", "pos")),
        ("lerp(scalar)", "lerp", _b(lambda x, y: torch.lerp(x, y, 0.3))),
        ("lerp(tensor)", "lerp", (lambda x, y, w: torch.lerp(x, y, w), ("any", "any", "prob"))),
        ("addcmul", "addcmul", (lambda x, y, z: torch.addcmul(x, y, z), ("any", "any", "any"))),
        ("addcmul(value=0.3)", "addcmul", (lambda x, y, z: torch.addcmul(x, y, z, value=0.3), ("any",) * 3)),
        ("addcdiv", "addcdiv", (lambda x, y, z: torch.addcdiv(x, y, z), ("any", "any", "pos"))),
        ("to(float64)", "_to_copy", _u(lambda x: x.to(torch.float64))),
        ("to(bfloat16)", "_to_copy", _u(lambda x: x.to(torch.bfloat16))),
        ("to(float16)", "_to_copy", _u(lambda x: x.to(torch.float16))),
        ("to(float32)", "_to_copy", _u(lambda x: x.to(torch.float32))),
        ("to(int64)", "_to_copy", _u(lambda x: (x * 100).clamp(-1e6, 1e6).to(torch.int64))),
        # Transcendental: rewritten by the cpu_pointwise pass where a model is likely to use them.
        ("exp", "exp", _u(torch.exp)),
        ("exp2", "exp2", _u(torch.exp2)),
        ("expm1", "expm1", _u(torch.expm1)),
        ("log", "log", _u(torch.log, "pos")),
        ("log2", "log2", _u(torch.log2, "pos")),
        ("log10", "log10", _u(torch.log10, "pos")),
        ("log1p", "log1p", _u(torch.log1p, "pos")),
        ("rsqrt", "rsqrt", _u(torch.rsqrt, "pos")),
        ("sigmoid", "sigmoid", _u(torch.sigmoid)),
        ("logit", "logit", _u(torch.logit, "prob")),
        ("silu", "silu", _u(F.silu)),
        ("gelu", "gelu", _u(F.gelu)),
        ("gelu(tanh)", "gelu", _u(lambda x: F.gelu(x, approximate="tanh"))),
        ("mish", "mish", _u(F.mish)),
        ("softplus", "softplus", _u(F.softplus)),
        ("elu", "elu", _u(F.elu)),
        ("celu", "celu", _u(F.celu)),
        ("selu", "selu", _u(F.selu)),
        ("tanh", "tanh", _u(torch.tanh)),
        ("sin", "sin", _u(torch.sin)),
        ("cos", "cos", _u(torch.cos)),
        ("tan", "tan", _u(torch.tan)),
        ("asin", "asin", _u(torch.asin, "unit")),
        ("acos", "acos", _u(torch.acos, "unit")),
        ("atan", "atan", _u(torch.atan)),
        ("sinh", "sinh", _u(torch.sinh)),
        ("cosh", "cosh", _u(torch.cosh)),
        ("asinh", "asinh", _u(torch.asinh)),
        ("acosh", "acosh", _u(torch.acosh, "ge1")),
        ("atanh", "atanh", _u(torch.atanh, "unit")),
        ("atan2", "atan2", _b(torch.atan2)),
        ("hypot", "hypot", _b(torch.hypot)),
        ("erf", "erf", _u(torch.erf)),
        ("erfc", "erfc", _u(torch.erfc)),
        ("erfinv", "erfinv", _u(torch.erfinv, "unit")),
        ("lgamma", "lgamma", _u(torch.lgamma, "pos")),
        ("digamma", "digamma", _u(torch.digamma, "pos")),
        ("sinc", "sinc", _u(torch.sinc)),
        ("logaddexp", "logaddexp", _b(torch.logaddexp)),
        ("xlogy", "xlogy", _b(torch.xlogy, "any", "pos")),
        ("float_power", "float_power", _b(torch.float_power, "pos", "any")),
    ]
]


def measure(dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64)) -> dict[str, dict]:
    """label -> {dtype: number of position-dependent elements (or "error")}."""
    out: dict[str, dict] = {}
    for label, _name, fn, domains in CASES:
        row = {}
        for dt in dtypes:
            try:
                row[dt] = position_dependent(fn, domains, dt)
            except Exception as err:  # an op without a kernel for the dtype
                row[dt] = f"error: {type(err).__name__}"
        out[label] = row
    return out


if __name__ == "__main__":  # pragma: no cover
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, N={N}")
    res = measure()
    dts = list(next(iter(res.values())))
    print(f"{'case':<22}" + "".join(f"{str(d).replace('torch.', ''):>10}" for d in dts))
    for label, row in res.items():
        print(f"{label:<22}" + "".join(f"{str(row[d])[:9]:>10}" for d in dts))
