"""Programmatic dependent launch (PDL, Hopper and newer), opt-in with ``DETCOMPILE_PDL=1``.

At batch-1 decode an 8B model runs ~12 small kernels a layer; the GPU idles ~1 us between two of them
(H200, 2026-12-03: a step's CUDA-graph replay took ~0.5 ms more than its kernels). With PDL a kernel
is launched while the previous one still runs, its programs wait at ``start`` (``griddepcontrol.wait``:
until the previous kernel has finished and its writes are visible), then let the next kernel launch
(``griddepcontrol.launch_dependents``). Nothing is read or written before the wait, so the data and
the arithmetic are those of a plain launch: the bits cannot change, only the gaps.

Used by: rms_norm's rows kernel, matmul's pointer kernel (M <= 16), linear_group, rotary_embedding,
kv_cache_write, the attention kernel and its split merge, silu_mul. Off by default until measured on the GPU (``python -m benchmarks.engine --parts decode1`` with and
without the variable). The interpreter never uses it (the instructions are inline PTX).
"""
from __future__ import annotations

import os

import torch

from . import _common

ENV = "DETCOMPILE_PDL"


def enabled(t: torch.Tensor) -> bool:
    """Launch with PDL: asked for, a CUDA tensor on a Hopper or newer GPU, not the interpreter."""
    return (os.environ.get(ENV, "0") not in ("", "0") and t.is_cuda and _common.HAS_TRITON
            and not _common.triton_interpret() and _common.cuda_capability(t.device)[0] >= 9)


def launch_kwargs(on: bool) -> dict:
    """A launch's keywords: the kernel's ``PDL`` constexpr, and Triton's ``launch_pdl`` only when on (the
    interpreter takes no such option)."""
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


if _common.HAS_TRITON:
    triton = _common.triton
    tl = _common.tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def start(PDL: tl.constexpr):
        """First thing in a kernel launched with ``launch_kwargs``: wait for the previous kernel,
        then let the next one launch. A no-op when PDL is False."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
