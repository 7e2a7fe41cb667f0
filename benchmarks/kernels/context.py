"""What a section runner is given (device, timer, copy bandwidth) and memory housekeeping."""
from __future__ import annotations

import dataclasses
import gc
import sys
from typing import Callable

import torch

from benchmarks.kernels.measures import DTYPE
from benchmarks.kernels.timing import Timing


@dataclasses.dataclass
class Context:
    device: torch.device
    timer: Callable[..., Timing]
    copy_gbps: float
    show_progress: bool = True

    def progress(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="cell", file=sys.stderr, disable=not self.show_progress)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=DTYPE, device=self.device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def free_bytes(device: torch.device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
