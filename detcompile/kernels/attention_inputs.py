"""Inputs of the attention ops (``attention``, ``paged_attention``, ``paged_attention_varlen``),
shared by the Triton and the CPU paths: argument checks and normalisation, and mask analysis.

The mask analysis is part of what makes a row's result batch-invariant: ``segment_origins`` gives
each query row of a masked self-attention the start of its own segment (packed sequences, left
padding, sliding windows), and both paths align their key tiles (GPU, ``attention_triton``) or key
chunks (CPU, ``attention_cpu``) at that origin, so such a row reduces its keys exactly as the
sequence alone would. It is integer-only, hence deterministic. ``_visible`` decides which keys a
bool or additive float mask shows (``<= finfo.min`` and ``-inf`` count as masked).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _common
from ._common import UnsupportedError

OP = "attention"
PAGED_OP = "paged_attention"
VARLEN_OP = "paged_attention_varlen"
#: log2(e): the Triton kernel's scores (exp2 domain) and the CPU exp's range reduction use it.
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Argument checks and normalisation (shared by every path).
# ----------------------------------------------------------------------------------------------


def _default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)


def _check_scale_softcap(op: str, scale, softcap) -> None:
    if softcap < 0 or not math.isfinite(softcap):
        raise ValueError(f"detcompile.{op}: softcap must be finite and >= 0 (0 disables it); got {softcap}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"detcompile.{op}: scale must be finite; got {scale}")


def _validate(q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap):
    """Clear errors for inputs torch would also reject (ValueError) or that we do not support
    (UnsupportedError). Returns 4-D views (3-D inputs get a leading batch of 1)."""
    _common.check_inputs(OP, q, k, v, attn_mask)
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        raise UnsupportedError(
            f"detcompile.{OP}: q, k, v must all be 4-D [B, H, L, D] (or all 3-D [H, L, D]); "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(
            f"detcompile.{OP}: q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    devs = {t.device for t in (q, k, v, attn_mask) if t is not None}
    if len(devs) != 1:
        raise ValueError(f"detcompile.{OP}: all tensors must be on one device; got {sorted(map(str, devs))}")
    if q.dim() == 3:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    B, Hq, Lq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"detcompile.{OP}: batch sizes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    Hkv, Lk = k.shape[1], k.shape[2]
    if k.shape[3] != D or v.shape[1] != Hkv or v.shape[2] != Lk:
        raise ValueError(
            f"detcompile.{OP}: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if enable_gqa:
        if Hkv == 0 or Hq % Hkv != 0:
            raise ValueError(f"detcompile.{OP}: enable_gqa needs Hq % Hkv == 0; got Hq={Hq}, Hkv={Hkv}")
    elif Hq != Hkv:
        raise ValueError(
            f"detcompile.{OP}: q has {Hq} heads but k/v have {Hkv}; pass enable_gqa=True for grouped-query attention"
        )
    _check_scale_softcap(OP, scale, softcap)
    if attn_mask is not None:
        if is_causal:
            raise ValueError(f"detcompile.{OP}: attn_mask and is_causal=True cannot be used together (like torch)")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise UnsupportedError(
                f"detcompile.{OP}: attn_mask must be bool (True = visible) or floating (additive); got {attn_mask.dtype}"
            )
        if attn_mask.dim() > 4:
            raise ValueError(f"detcompile.{OP}: attn_mask has {attn_mask.dim()} dims; at most 4 are allowed")
        m4 = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        target = (B, Hq, Lq, Lk)
        if any(m4.shape[i] not in (1, target[i]) for i in range(4)):
            raise ValueError(
                f"detcompile.{OP}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                f"[B, Hq, Lq, Lk] = {list(target)}"
            )
        attn_mask = m4
    return q, k, v, attn_mask


def _validate_paged(q, k_cache, v_cache, block_table, kv_lens, scale, softcap, window=0, sinks=None):
    _common.check_inputs(PAGED_OP, q, k_cache, v_cache)
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(
            f"detcompile.{PAGED_OP}: expected q [B, Hq, Lq, D] and k_cache/v_cache [num_pages, page_size, Hkv, D]; "
            f"got {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or not q.is_floating_point():
        raise ValueError(
            f"detcompile.{PAGED_OP}: q and the caches must share one floating dtype; got "
            f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    B, Hq, Lq, D = q.shape
    P, page, Hkv, Dk = k_cache.shape
    if Dk != D or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(
            f"detcompile.{PAGED_OP}: cache shapes do not match q: q {tuple(q.shape)}, k_cache "
            f"{tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"detcompile.{PAGED_OP}: Hq ({Hq}) must be a multiple of the cache's Hkv ({Hkv})")
    for name, t in (("block_table", block_table), ("kv_lens", kv_lens)):
        if t.dtype != torch.int32:
            raise ValueError(f"detcompile.{PAGED_OP}: {name} must be int32; got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"detcompile.{PAGED_OP}: {name} is on {t.device}, q on {q.device}")
    if block_table.dim() != 2 or block_table.shape[0] != B or kv_lens.shape != (B,):
        raise ValueError(
            f"detcompile.{PAGED_OP}: expected block_table [B, max_pages] and kv_lens [B] with B = {B}; "
            f"got {tuple(block_table.shape)} and {tuple(kv_lens.shape)}"
        )
    _check_scale_softcap(PAGED_OP, scale, softcap)
    if window < 0:
        raise ValueError(f"detcompile.{PAGED_OP}: window must be >= 0 (0: no sliding window); got {window}")
    if sinks is not None and (sinks.shape != (Hq,) or not sinks.is_floating_point() or sinks.device != q.device):
        raise ValueError(f"detcompile.{PAGED_OP}: sinks must be a float vector of the {Hq} query heads on {q.device}; "
                         f"got {tuple(sinks.shape)} {sinks.dtype} on {sinks.device}")


def _validate_varlen(q, k_cache, v_cache, block_table, kv_lens, q_start, q_lens, tiles, scale, softcap, window=0,
                     sinks=None):
    """The checks of ``paged_attention`` (q seen as one row [1, Hq, T, D]) plus the ragged layout's."""
    if q.dim() != 3:
        raise ValueError(f"detcompile.{VARLEN_OP}: expected q [T, Hq, D]; got {tuple(q.shape)}")
    _validate_paged(q.transpose(0, 1)[None], k_cache, v_cache, block_table[:1], kv_lens[:1], scale, softcap,
                    window, sinks)
    S = block_table.shape[0]
    for name, t in (("q_start", q_start), ("q_lens", q_lens), ("tiles", tiles)):
        if t.dtype != torch.int32 or t.device != q.device:
            raise ValueError(f"detcompile.{VARLEN_OP}: {name} must be int32 on {q.device}; got {t.dtype} on {t.device}")
    if q_start.shape != (S,) or q_lens.shape != (S,) or tiles.dim() != 2 or tiles.shape[0] != 2:
        raise ValueError(f"detcompile.{VARLEN_OP}: expected q_start and q_lens [{S}] and tiles [2, N]; got "
                         f"{tuple(q_start.shape)}, {tuple(q_lens.shape)}, {tuple(tiles.shape)}")


def _expand_kv(t: Tensor, hq: int) -> Tensor:
    hkv = t.shape[1]
    if hkv == hq:
        return t
    g = hq // hkv
    return t.unsqueeze(2).expand(t.shape[0], hkv, g, t.shape[2], t.shape[3]).reshape(t.shape[0], hq, t.shape[2], t.shape[3])


# ----------------------------------------------------------------------------------------------
# Mask analysis.
# ----------------------------------------------------------------------------------------------


def _visible(mask: Tensor) -> Tensor:
    """Bool 'this key is visible' for a bool or additive float mask (HF marks masked keys with
    finfo.min, torch with -inf; both count as masked, NaN too)."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min


def segment_origins(mask4: Tensor, L: int | None = None) -> Tensor:
    """Per-(mask batch, mask head, query) int32 key origin ``[b, h, L]`` for a mask broadcastable
    to ``[b, h, L, L]`` (b, h may be 1; L defaults to the mask's key dim): the start of the row's segment. Row i starts a segment iff it sees key i and
    does not see key i-1 (or i == 0); the segment start is the latest start <= i (0 before any).
    Packed sequences (block-diagonal masks) and left padding then align their KV tiles exactly as
    the sequence alone would, sliding windows included.

    The kernel never looks at keys before a row's origin, so for masks of other shapes (a row that
    also sees keys before its "segment", e.g. a hole in a causal mask) the origin is lowered to the
    row's first visible key: origin = min(segment start, first visible key). That changes nothing
    for packed / padded / windowed masks, where no key before the segment start is visible.
    Integer-only, hence deterministic."""
    b, h, lq = mask4.shape[0], mask4.shape[1], mask4.shape[2]
    L = mask4.shape[-1] if L is None else L
    mk = mask4.expand(b, h, lq, L)  # a query dim of 1 stays 1 (no [L, L] copy of a padding mask)
    m = mk.expand(b, h, L, L)
    diag = _visible(torch.diagonal(m, 0, -2, -1))  # sees key i
    prev = torch.zeros_like(diag)
    if L > 1:
        prev[..., 1:] = _visible(torch.diagonal(m, -1, -2, -1))  # sees key i-1
    start = diag & ~prev
    idx = torch.arange(L, device=mask4.device, dtype=torch.int32).expand_as(start)
    cand = torch.where(start, idx, torch.zeros_like(idx))
    seg_start = torch.cummax(cand, dim=-1).values
    # First visible key per row (argmax returns the first maximal index); L when none.
    vis = _visible(mk)
    first = vis.to(torch.uint8).argmax(dim=-1).to(torch.int32)
    first = torch.where(vis.any(dim=-1), first, torch.full_like(first, L)).expand(b, h, L)
    return torch.minimum(seg_start, first).to(torch.int32).contiguous()


def _visibility_and_bias(m4, is_causal, Lq, Lk, device):
    """(visible bool broadcastable to [B, H, Lq, Lk] or None, additive float bias or None)."""
    vis = None
    bias = None
    if is_causal:
        vis = torch.ones(Lq, Lk, dtype=torch.bool, device=device).tril()
    if m4 is not None:
        vis = _visible(m4)
        if m4.dtype != torch.bool:
            bias = m4
    return vis, bias
