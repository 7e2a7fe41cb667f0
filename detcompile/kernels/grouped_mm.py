"""Batch-invariant grouped matmul for MoE experts: ``detcompile::grouped_mm(x, w, offs)``.

``x`` [S, K] holds rows sorted by group; rows ``offs[g-1] <= r < offs[g]`` are multiplied by ``w[g]``
([G, K, N]); rows past ``offs[-1]`` are zero. Semantics of ``aten._grouped_mm`` (2-D x 3-D) and of
transformers' ``grouped_mm_fallback``.

Why it is batch-invariant: each group is one ``detcompile::matmul`` launch (Triton on CUDA, the
sequential CPU path on CPU), whose per-row reduction over K has a fixed order whatever M is; so a
token's expert output does not depend on how many other tokens chose the same expert. The group
sizes are read on the host (one sync), which is fine inside an opaque custom op.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _common
from .matmul import cpu_matmul, triton_matmul

OP = "grouped_mm"


def _check(x: Tensor, w: Tensor, offs: Tensor) -> None:
    _common.check_inputs(OP, x, w)
    if x.dim() != 2 or w.dim() != 3:
        raise _common.UnsupportedError(f"detcompile.{OP}: expects x [S, K] and w [G, K, N], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise _common.UnsupportedError(f"detcompile.{OP}: K mismatch {x.shape[1]} vs {w.shape[1]}")
    if offs.dim() != 1 or offs.shape[0] != w.shape[0] or offs.is_floating_point():
        raise _common.UnsupportedError(f"detcompile.{OP}: offs must be an integer vector of length G={w.shape[0]}")
    if x.dtype != w.dtype:
        raise _common.UnsupportedError(f"detcompile.{OP}: x and w dtypes differ ({x.dtype}, {w.dtype})")


def _grouped(x: Tensor, w: Tensor, offs: Tensor, mm) -> Tensor:
    _check(x, w, offs)
    out = torch.zeros(x.shape[0], w.shape[2], dtype=x.dtype, device=x.device)
    start = 0
    for g, end in enumerate(offs.tolist()):
        end = min(int(end), x.shape[0])
        if end > start:
            out[start:end] = mm(x[start:end], w[g])
        start = max(start, end)
    return out


@torch.library.custom_op(f"{_common.NAMESPACE}::{OP}", mutates_args=())
def grouped_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    raise _common.UnsupportedError(f"detcompile.{OP}: device {x.device.type!r} is not supported (cpu, cuda)")


@grouped_mm.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[2])


@grouped_mm.register_kernel("cpu")
def _(x, w, offs):
    return _grouped(x, w, offs, cpu_matmul)


@grouped_mm.register_kernel("cuda")
def _(x, w, offs):
    return _grouped(x, w, offs, triton_matmul)
