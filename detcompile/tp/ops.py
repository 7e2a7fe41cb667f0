"""The collectives of a tensor-parallel forward as ``detcompile`` ops, so that the deterministic
compile keeps them inside its graph (opaque, no graph break) and its audit knows them:

- ``detcompile::tp_row_parallel_linear``: ``row_parallel.row_parallel_linear`` (the fixed chunk tree);
- ``detcompile::tp_all_gather_last``: each rank's slice along the last dim, gathered in rank order (a
  copy: the vocab-parallel lm_head's logits).

Process groups are passed by a name registered with ``register_group`` (an op takes no group object).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..kernels._common import NAMESPACE
from .row_parallel import row_parallel_linear

#: name -> process group ("" is the default group).
_GROUPS: dict = {}


def register_group(name: str, group) -> str:
    """Make ``group`` reachable from the ops as ``name``; returns the name."""
    if not name:
        raise ValueError("detcompile.tp: a group name must not be empty ('' is the default group)")
    _GROUPS[name] = group
    return name


def _group(name: str):
    if not name:
        return None
    if name not in _GROUPS:
        raise ValueError(f"detcompile.tp: no process group registered as {name!r}")
    return _GROUPS[name]


@torch.library.custom_op(f"{NAMESPACE}::tp_row_parallel_linear", mutates_args=())
def tp_row_parallel_linear(x: Tensor, w: Tensor, bias: Optional[Tensor], rank: int, tp: int, group: str) -> Tensor:
    lead = x.shape[:-1]
    y = row_parallel_linear(x.reshape(-1, x.shape[-1]), w, bias, rank=rank, tp=tp, group=_group(group))
    return y.reshape(*lead, w.shape[0])


@tp_row_parallel_linear.register_fake
def _(x, w, bias, rank, tp, group):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.custom_op(f"{NAMESPACE}::tp_all_gather_last", mutates_args=())
def tp_all_gather_last(x: Tensor, tp: int, group: str) -> Tensor:
    if tp == 1:
        return x.clone()
    parts = [torch.empty_like(x) for _ in range(tp)]
    dist.all_gather(parts, x.contiguous(), group=_group(group))
    return torch.cat(parts, dim=-1)


@tp_all_gather_last.register_fake
def _(x, tp, group):
    return x.new_empty((*x.shape[:-1], x.shape[-1] * tp))
