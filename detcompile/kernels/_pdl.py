"""Programmatic dependent launch (PDL, Hopper and newer), on by default; ``DETCOMPILE_PDL=0`` turns it off.

At batch-1 decode an 8B model runs ~12 small kernels a layer; the GPU idles ~1 us between two of them
(H200, 2026-12-03: a step's CUDA-graph replay took ~0.5 ms more than its kernels). With PDL a kernel
is launched while the previous one still runs, its programs wait at ``start`` (``griddepcontrol.wait``:
until the previous kernel has finished and its writes are visible), then let the next kernel launch
(``griddepcontrol.launch_dependents``). Nothing is read or written before the wait, so the data and
the arithmetic are those of a plain launch: the bits cannot change, only the gaps.

Used by: rms_norm's rows kernel, matmul's pointer and TMA kernels, linear_group, rotary_embedding,
kv_cache_write, the attention kernel and its split merge, silu_mul, linear_swiglu. H200, 2026-12-03: batch-1 decode of
an 8B model 178.4 -> 180.8 tok/s, a step's graph replay 5.26 -> 5.18 ms; the engine's GPU tests passed
either way.

Experimental, off unless ``DETCOMPILE_PDL_PREFETCH_MB`` is set: the decode matmuls prefetch the start
of their weight rows into L2 *before* they wait, so a weight read starts while the kernel before runs
(attention, norms, rotary: latency-bound, the memory mostly idle). A first version also let every
kernel trigger the next launch before its own wait; that launched kernels far ahead, whose waiting
programs held SMs and whose prefetches crowded L2 (H200, 2026-12-03: batch 1 179.5 -> 165.5 tok/s at
4 MB, 152.3 at 32 MB). Now the order stays wait-then-trigger everywhere, so only the next kernel is
resident early, and only the matmuls prefetch.
The interpreter never uses it (the instructions are inline PTX).
"""
from __future__ import annotations

import os

import torch

from . import _common

ENV = "DETCOMPILE_PDL"
#: Experimental, off unless set (MB a launch, e.g. 4): the decode matmuls prefetch up to this much of
#: their weight rows into L2 before they wait (``start_with_prefetch``). Prefetching changes no data
#: and no arithmetic: the bits stay.
PREFETCH_ENV = "DETCOMPILE_PDL_PREFETCH_MB"


def enabled(t: torch.Tensor) -> bool:
    """Launch with PDL: not turned off, a CUDA tensor on a Hopper or newer GPU, not the interpreter."""
    return (os.environ.get(ENV, "1") not in ("", "0") and t.is_cuda and _common.HAS_TRITON
            and not _common.triton_interpret() and _common.cuda_capability(t.device)[0] >= 9)


def prefetch_bytes() -> int:
    """Bytes of weights a decode matmul launch may prefetch into L2 before it waits (0: none)."""
    try:
        mb = float(os.environ.get(PREFETCH_ENV, "0") or 0)
    except ValueError:
        raise ValueError(f"{PREFETCH_ENV} must be a number of MB, got {os.environ[PREFETCH_ENV]!r}") from None
    return max(0, int(mb * 2**20))


def launch_kwargs(on: bool) -> dict:
    """A launch's keywords: the kernel's ``PDL`` constexpr, and Triton's ``launch_pdl`` only when on
    (the interpreter takes no such option)."""
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


def row_prefetch_bytes(on: bool, row_bytes: int, rows: int, aligned: bool) -> int:
    """Bytes to prefetch from the start of each of ``rows`` weight rows (``row_bytes`` long, contiguous,
    16-byte aligned when ``aligned``): the budget spread evenly, in whole 16-byte units (the bulk
    prefetch's granule), 0 when PDL is off or there is no budget."""
    budget = prefetch_bytes() if on and aligned and rows > 0 else 0
    return min(row_bytes, budget // rows) // 16 * 16


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

    @triton.jit
    def start_with_prefetch(PDL: tl.constexpr, rows_ptrs, nbytes):
        """``start`` for a kernel that reads weight rows at ``rows_ptrs`` (each contiguous, 16-byte
        aligned): with ``nbytes`` > 0, the first ``nbytes`` of each row are prefetched into L2 before
        the wait. The kernel never wrote the weights, and every write lands in L2, so a line fetched
        early holds what a late read would see; the kernel's own loads still come after the wait."""
        if PDL:
            if nbytes > 0:
                tl.inline_asm_elementwise(
                    "{ cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }", "=r,l,r",
                    [rows_ptrs, tl.zeros(rows_ptrs.shape, dtype=tl.int32) + nbytes],
                    dtype=tl.int32, is_pure=False, pack=1)
        start(PDL)
