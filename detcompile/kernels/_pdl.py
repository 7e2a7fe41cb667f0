"""Programmatic dependent launch (PDL, Hopper and newer), on by default; ``DETCOMPILE_PDL=0`` turns it off.

At batch-1 decode an 8B model runs ~12 small kernels a layer; the GPU idles ~1 us between two of them
(H200, 2026-12-03: a step's CUDA-graph replay took ~0.5 ms more than its kernels). With PDL a kernel
is launched while the previous one still runs, its programs wait at ``start`` (``griddepcontrol.wait``:
until the previous kernel has finished and its writes are visible), then let the next kernel launch
(``griddepcontrol.launch_dependents``). Nothing is read or written before the wait, so the data and
the arithmetic are those of a plain launch: the bits cannot change, only the gaps.

Used by: rms_norm's rows kernel, matmul's pointer and TMA kernels, linear_group, rotary_embedding,
kv_cache_write, the attention kernel and its split merge, silu_mul. H200, 2026-12-03: batch-1 decode of
an 8B model 178.4 -> 180.8 tok/s, a step's graph replay 5.26 -> 5.18 ms; the engine's GPU tests passed
either way. Letting the next launch start before the wait, so the decode matmuls could prefetch their
weights into L2 meanwhile, was slower (H200, 2026-12-03: batch-1 179.5 -> 165.5 tok/s at 4 MB a launch,
152.3 at 32 MB) and was removed.
The interpreter never uses it (the instructions are inline PTX).
"""
from __future__ import annotations

import os

import torch

from . import _common

ENV = "DETCOMPILE_PDL"


def enabled(t: torch.Tensor) -> bool:
    """Launch with PDL: not turned off, a CUDA tensor on a Hopper or newer GPU, not the interpreter."""
    return (os.environ.get(ENV, "1") not in ("", "0") and t.is_cuda and _common.HAS_TRITON
            and not _common.triton_interpret() and _common.cuda_capability(t.device)[0] >= 9)


def launch_kwargs(on: bool) -> dict:
    """A launch's keywords: the kernel's ``PDL`` constexpr, and Triton's ``launch_pdl`` only when on
    (the interpreter takes no such option)."""
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


if _common.HAS_TRITON:
    triton = _common.triton
    tl = _common.tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def start(PDL: tl.constexpr):
        """First thing in a kernel launched with ``launch_kwargs``: wait for the previous kernel, then
        let the next one launch. A no-op without PDL."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
