"""Position-invariant transcendental pointwise ops on the CPU: ``detcompile::cpu_pointwise``.

ATen's CPU pointwise kernels run a vectorised body and a scalar tail, and split big tensors across
threads; for several ops the two paths round differently (measured with torch 2.13: silu, sigmoid,
gelu(tanh), log, softplus in float32; log, rsqrt in bfloat16). Which path an element takes depends on
its offset in the flattened tensor, i.e. on the batch size. Here the op runs on fixed 8192-element
blocks (zero-padded at the end): below ATen's parallel grain size, so one thread, and a multiple of
every SIMD width, so no scalar tail; every element goes through the same vector code.

CUDA needs none of this (every element runs the same code), so this op is CPU-only.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _common

OP = "cpu_pointwise"
BLOCK = 8192

#: aten op name -> how to call it with the op's extra scalar arguments.
_FNS = {
    "exp": lambda x, a: torch.exp(x), "exp2": lambda x, a: torch.exp2(x), "expm1": lambda x, a: torch.expm1(x),
    "log": lambda x, a: torch.log(x), "log2": lambda x, a: torch.log2(x), "log10": lambda x, a: torch.log10(x),
    "log1p": lambda x, a: torch.log1p(x), "sigmoid": lambda x, a: torch.sigmoid(x),
    "silu": lambda x, a: torch.nn.functional.silu(x), "tanh": lambda x, a: torch.tanh(x),
    "sin": lambda x, a: torch.sin(x), "cos": lambda x, a: torch.cos(x), "tan": lambda x, a: torch.tan(x),
    "erf": lambda x, a: torch.erf(x), "erfc": lambda x, a: torch.erfc(x), "erfinv": lambda x, a: torch.erfinv(x),
    "rsqrt": lambda x, a: torch.rsqrt(x), "atan": lambda x, a: torch.atan(x), "asin": lambda x, a: torch.asin(x),
    "acos": lambda x, a: torch.acos(x), "sinh": lambda x, a: torch.sinh(x), "cosh": lambda x, a: torch.cosh(x),
    "mish": lambda x, a: torch.nn.functional.mish(x),
    "gelu": lambda x, a: torch.nn.functional.gelu(x),
    "gelu_tanh": lambda x, a: torch.nn.functional.gelu(x, approximate="tanh"),
    "softplus": lambda x, a: torch.nn.functional.softplus(x, beta=a[0], threshold=a[1]),
    "log_sigmoid": lambda x, a: torch.nn.functional.logsigmoid(x),
    "elu": lambda x, a: torch.ops.aten.elu(x, a[0], a[1], a[2]),
    "pow": lambda x, a: torch.pow(x, a[0]),
}
FUNCTIONS = tuple(_FNS)


@torch.library.custom_op(f"{_common.NAMESPACE}::{OP}", mutates_args=(), schema="(Tensor x, str fn, float[] args) -> Tensor")
def cpu_pointwise(x: Tensor, fn: str, args: list[float]) -> Tensor:
    if fn not in _FNS:
        raise _common.UnsupportedError(f"detcompile.{OP}: unknown function {fn!r}")
    _common.check_inputs(OP, x)
    if x.device.type != "cpu":
        # Every element runs the same code on CUDA: the plain op is already invariant.
        return _FNS[fn](x, args)
    return blocked(x, fn, args)


def blocked(x: Tensor, fn: str, args=()) -> Tensor:
    """``fn`` on the CPU over fixed zero-padded BLOCK-element blocks (a fresh tensor, x's shape)."""
    n = x.numel()
    if n == 0:
        return _FNS[fn](x, args).clone()
    flat = x.reshape(-1)
    if n % BLOCK:
        flat = torch.nn.functional.pad(flat, (0, BLOCK - n % BLOCK))
    out = torch.cat([_FNS[fn](blk, args) for blk in flat.split(BLOCK)])
    return out[:n].view(x.shape)


@cpu_pointwise.register_fake
def _(x, fn, args):
    if fn not in _FNS:
        raise _common.UnsupportedError(f"detcompile.{OP}: unknown function {fn!r}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)
