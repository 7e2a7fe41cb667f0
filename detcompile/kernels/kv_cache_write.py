"""A step's new keys and values into their cache slots: ``detcompile::kv_cache_write``.

``k_cache[slot[t]] = k[t]`` and ``v_cache[slot[t]] = v[t]`` for every new token t, caches viewed as
[slots, Hkv, D] (pages [num_pages, page_size, Hkv, D] with contiguous slots). A copy: no arithmetic,
so any kernel gives the same bits. Why a kernel of its own: the engine wrote K and V with two
``index_copy_`` launches per layer; at batch-1 decode of an 8B model each took 2.5 us plus its launch
gap, 64 a token (H200, 2026-12-03). One launch writes both.

CPU (and any device without Triton): the two ``index_copy_``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _common, _pdl

OP = "kv_cache_write"

if _common.HAS_TRITON:
    triton = _common.triton
    tl = _common.tl
    from ._pdl import start as pdl_start

    @triton.jit(do_not_specialize=["T"])
    def _kv_cache_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, T, HKV, D,
                               s_kt, s_kh, s_vt, s_vh, s_kc, s_vc,
                               BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
        """One program per token: its Hkv x D keys and values (last dims unit-stride)."""
        pdl_start(PDL)
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slots_ptr + t).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < HKV) & (d < D)
        k = tl.load(k_ptr + t * s_kt + h * s_kh + d, mask=mask)
        v = tl.load(v_ptr + t * s_vt + h * s_vh + d, mask=mask)
        tl.store(kc_ptr + slot * s_kc + h * D + d, k, mask=mask)
        tl.store(vc_ptr + slot * s_vc + h * D + d, v, mask=mask)


def _check(k_cache: Tensor, v_cache: Tensor, slots: Tensor, k: Tensor, v: Tensor) -> None:
    if k.dim() != 3 or v.dim() != 3 or k.shape[:2] != v.shape[:2]:
        raise ValueError(f"detcompile.{OP}: expected k, v [T, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    for name, cache, new in (("k", k_cache, k), ("v", v_cache, v)):
        if cache.dim() != 4 or cache.shape[2:] != new.shape[1:] or cache.dtype != new.dtype:
            raise ValueError(f"detcompile.{OP}: {name}_cache {tuple(cache.shape)} {cache.dtype} does not hold "
                             f"{name} {tuple(new.shape)} {new.dtype} (pages [num_pages, page_size, Hkv, D])")
    if slots.shape != (k.shape[0],) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"detcompile.{OP}: slots must be int32/int64 [T={k.shape[0]}], got {tuple(slots.shape)} "
                         f"{slots.dtype}")


def eager_kv_cache_write(k_cache: Tensor, v_cache: Tensor, slots: Tensor, k: Tensor, v: Tensor) -> None:
    """The two ``index_copy_`` (the definition)."""
    slots = slots.long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def _triton_ok(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor) -> bool:
    return (_common.HAS_TRITON and _common.triton_launchable(k)
            and all(c.is_contiguous() for c in (k_cache, v_cache))
            and k.stride(2) == 1 and v.stride(2) == 1)


def write_kv(k_cache: Tensor, v_cache: Tensor, slots: Tensor, k: Tensor, v: Tensor) -> None:
    """Write ``k``/``v`` [T, Hkv, D] (any token and head strides) into the caches at ``slots`` [T]:
    the kernel on CUDA, the two ``index_copy_`` elsewhere (CPU engines, also under the interpreter)."""
    _check(k_cache, v_cache, slots, k, v)
    if k.is_cuda and _triton_ok(k_cache, v_cache, k, v):
        _launch(k_cache, v_cache, slots, k, v)
    else:
        eager_kv_cache_write(k_cache, v_cache, slots, k, v)


def triton_kv_cache_write(k_cache: Tensor, v_cache: Tensor, slots: Tensor, k: Tensor, v: Tensor) -> None:
    """The kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    _check(k_cache, v_cache, slots, k, v)
    if not _triton_ok(k_cache, v_cache, k, v):
        raise _common.UnsupportedError(f"detcompile.{OP}: the kernel needs Triton here, contiguous caches and "
                                       "unit-stride head dims")
    _launch(k_cache, v_cache, slots, k, v)


def _launch(k_cache: Tensor, v_cache: Tensor, slots: Tensor, k: Tensor, v: Tensor) -> None:
    T, hkv, d = k.shape
    if T == 0:
        return
    with _common.on_device(k):
        _kv_cache_write_kernel[(T,)](
            k, v, k_cache, v_cache, slots, T, hkv, d,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(1), v_cache.stride(1),
            BLOCK_H=triton.next_power_of_2(hkv), BLOCK_D=triton.next_power_of_2(d), num_warps=4,
            **_pdl.launch_kwargs(_pdl.enabled(k)),
        )


@torch.library.custom_op(f"{_common.NAMESPACE}::{OP}", mutates_args=("k_cache", "v_cache"))
def kv_cache_write(k_cache: Tensor, v_cache: Tensor, slots: Tensor, k: Tensor, v: Tensor) -> None:
    """``k_cache[slots[t]] = k[t]``, ``v_cache[slots[t]] = v[t]`` (caches [num_pages, page_size, Hkv, D])."""
    write_kv(k_cache, v_cache, slots, k, v)
