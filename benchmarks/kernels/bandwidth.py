"""The copy-bandwidth ceiling every GB/s figure is compared with."""
from __future__ import annotations

from typing import Callable

import torch

from benchmarks.kernels.measures import DTYPE, gbps
from benchmarks.kernels.timing import Timing


def measure_copy_bandwidth(timer: Callable[..., Timing], device: torch.device, nbytes: int) -> dict:
    # randn, not zeros: memory compression could make zeros cheaper to move.
    src = torch.randn(nbytes // 2, dtype=DTYPE, device=device)
    dst = torch.empty_like(src)
    t = timer(lambda s, d: d.copy_(s), src, dst)
    return {"bytes": nbytes, "seconds": t.seconds, "gbps": gbps(2 * nbytes, t.seconds), "graphed": t.graphed}
