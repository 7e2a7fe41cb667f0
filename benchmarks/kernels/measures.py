"""Arithmetic and bitwise checks shared by the sections (pure: tested on the CPU)."""
from __future__ import annotations

import math
from typing import Iterable

import torch


DTYPE = torch.bfloat16
GB = 1e9


def geomean(values: Iterable[float | None]) -> float | None:
    """Geometric mean of the values that are not None; None when there are none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    if any(v <= 0 for v in vals):
        raise ValueError(f"geomean needs positive values, got {vals}")
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def speed_ratio(ours_s: float, baseline_s: float) -> float:
    """Our speed relative to the baseline's (> 1: ours is faster), from the two times."""
    return baseline_s / ours_s


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / GB


def tflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12


_INT_OF_ITEMSIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: the claim detcompile makes. Unlike torch.equal, -0.0 and 0.0 differ and two
    NaNs with the same bits are equal."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    as_int = _INT_OF_ITEMSIZE[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def row0_matches(batched: torch.Tensor, alone: torch.Tensor) -> bool:
    """Whether row 0 (index 0 of dim 0) of a batched result has the bits of that row computed alone
    (``alone`` keeps its leading dim of size 1)."""
    return same_bits(batched[:1], alone)
