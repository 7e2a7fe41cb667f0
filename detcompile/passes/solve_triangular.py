"""Triangular solves -> ``detcompile.solve_triangular``.

Rewrites ``aten.linalg_solve_triangular`` on float inputs (gated-DeltaNet's UT transform calls it with
``upper=False, unitriangular=True`` on ``[..., 64, 64]`` chunks). On CUDA, ATen picks a loop of cuBLAS
``trsm`` or the batched ``trsmBatched`` by the batch count; the kernel solves every matrix in one fixed
order. On CUDA only matrices up to ``kernels.solve_triangular.MAX_N`` are taken; larger ones are left
for the audit.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..kernels import _common
from ..kernels.solve_triangular import MAX_N
from .manager import PassContext, PassSpec, is_call, meta_val, node_arg, replace_with

aten = torch.ops.aten


def rewritable(node: fx.Node) -> bool:
    A, B = meta_val(node_arg(node, 0, "self")), meta_val(node_arg(node, 1, "B"))
    if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)):
        return False
    dev = A.device.type
    allowed = _common.CPU_DTYPES if dev == "cpu" else _common.GPU_DTYPES
    if dev not in ("cpu", "cuda") or A.dtype not in allowed or B.dtype != A.dtype:
        return False
    return dev == "cpu" or A.shape[-1] <= MAX_N


def solve_triangular_pass(gm: fx.GraphModule, ctx: PassContext) -> None:
    op = torch.ops.detcompile.solve_triangular.default
    for node in list(gm.graph.nodes):
        if not is_call(node, aten.linalg_solve_triangular.default) or not rewritable(node):
            continue
        args = (
            node_arg(node, 0, "self"), node_arg(node, 1, "B"), bool(node_arg(node, 2, "upper")),
            bool(node_arg(node, 3, "left", True)), bool(node_arg(node, 4, "unitriangular", False)),
        )
        replace_with(gm, node, op, args, {}, ctx, "solve_triangular")


SPEC = PassSpec(
    "solve_triangular", solve_triangular_pass,
    targets=("linalg_solve_triangular",),
    into=("detcompile.solve_triangular",),
    when="float matrices (on CUDA up to 128 x 128)",
)
