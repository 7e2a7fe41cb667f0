"""The CPU path of the attention ops: ``cpu_attention`` (SDPA-style), and ``cpu_paged_attention`` /
``cpu_paged_attention_varlen``, which gather the pages of the KV cache and run ``cpu_attention``
with the paged causal mask (a row's masked keys add exact zeros, so this equals attention on the
row's sequence).

Why the result of one query row does not depend on anything else in the batch
------------------------------------------------------------------------------
CPU: scores and ``P @ V`` by fixed-shape GEMM tiles (``_cpu.tile_matmul``: the tile is a function
of the head dims only), ``exp`` on fixed blocks (``cpu_pointwise``, no vector tail). Keys
are reduced in chunks of ``KEY_CHUNK`` (P @ V per chunk in a fixed order, the softmax sum by
``_cpu.chunk_sum``), chunks added in ascending order and aligned, like the GPU tiles, at the row's
origin (modulo the chunk): masked keys are exact zeros, and whole zero chunks before or after the
visible keys add nothing, so padding, packing and decode give the row's bits. Keys that no query of
a (batch, head) can see are zeroed first, so NaN/inf in unwritten cache slots never reach a row.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _common, _cpu
from . import cpu_pointwise as _cpu_pointwise
from .attention_inputs import (
    _LOG2E, _default_scale, _expand_kv, _validate, _validate_paged, _validate_varlen, _visibility_and_bias,
    segment_origins,
)


def _pow2_int(n: Tensor, dtype: torch.dtype) -> Tensor:
    """2**n for integer-valued n in the normal exponent range, built from the bits (exact)."""
    if dtype == torch.float64:
        return ((n.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((n.to(torch.int32) + 127) << 23).view(torch.float32)


def _cpu_exp_nonpos(x: Tensor) -> Tensor:
    """exp(x) for x <= 0 (or -inf) from exactly rounded elementwise ops only, so the bits of an
    element never depend on where it sits in the tensor (torch.exp may use different vector and
    scalar code paths). Cody-Waite reduction x = n*ln2 + r, Taylor polynomial in r, times 2**n."""
    dt = x.dtype
    if dt == torch.float64:
        lo_clamp, min_exp, degree = -746.0, -1022, 13
        ln2_hi, ln2_lo = 6.93147180369123816490e-01, 1.90821492927058770002e-10
    else:
        lo_clamp, min_exp, degree = -104.0, -126, 8
        ln2_hi, ln2_lo = 0.693359375, -2.12194440e-4
    xc = torch.clamp(x, min=lo_clamp)
    n = torch.round(xc * _LOG2E)
    r = (xc - n * ln2_hi) - n * ln2_lo
    poly = torch.full_like(r, 1.0 / math.factorial(degree))
    for i in range(degree - 1, -1, -1):
        poly = poly * r + (1.0 / math.factorial(i))
    # 2**n in two exact steps so that n below the normal range still works (subnormal results).
    n1 = torch.clamp(n, min=min_exp)
    res = (poly * _pow2_int(n1, dt)) * _pow2_int(n - n1, dt)
    return torch.where(x < lo_clamp, torch.zeros_like(res), res)


def _cpu_tanh(x: Tensor) -> Tensor:
    """tanh from exactly rounded float64 ops (no cancellation trouble at this precision)."""
    xd = x.to(torch.float64)
    e = _cpu_exp_nonpos(-2.0 * xd.abs())
    th = (1.0 - e) / (1.0 + e)
    return torch.where(xd < 0, -th, th).to(x.dtype)


#: Keys per chunk on the CPU: P @ V and the softmax sum reduce each chunk in a fixed order and add
#: the chunks in ascending order, chunks aligned at the row's origin (modulo KEY_CHUNK).
KEY_CHUNK = 64
#: CPU GEMM tile rows (queries).
_CPU_TILE_Q = 64


def _dim_tile(d: int) -> int:
    """GEMM tile width for a head dim: d rounded up to 16, at most 256 (a constant of the model)."""
    return min(-(-max(d, 1) // 16) * 16, 256)


def cpu_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, softcap=0.0, sinks=None):
    squeeze = q.dim() == 3
    q4, k4, v4, m4 = _validate(q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap)
    B, Hq, Lq, D = q4.shape
    Lk, Dv = k4.shape[2], v4.shape[3]
    dt = _common.acc_dtype(q4.dtype)
    if scale is None:
        scale = _default_scale(D)
    vis, bias = _visibility_and_bias(m4, is_causal, Lq, Lk, q4.device)
    qf = q4.to(dt)
    kf = _expand_kv(k4.to(dt), Hq)
    vf = _expand_kv(v4.to(dt), Hq)
    if vis is not None:
        # A key that no query of its (batch, head) sees is never read: zero it, so that NaN/inf in
        # unwritten cache slots cannot reach the output through 0 * v in the GEMM.
        seen = vis.any(dim=-2).unsqueeze(-1)  # [b, h, Lk, 1]
        if not bool(seen.all()):
            kf = torch.where(seen, kf, torch.zeros((), dtype=dt))
            vf = torch.where(seen, vf, torch.zeros((), dtype=dt))

    # Scores: fixed GEMM tiles over the head dim (a constant of the model), so a score's bits do
    # not depend on Lq, Lk or the batch.
    s = _cpu.tile_matmul(qf, kf.transpose(-1, -2), (_CPU_TILE_Q, _dim_tile(D), KEY_CHUNK)) * scale
    if softcap > 0:
        s = softcap * _cpu_tanh(s / softcap)
    if bias is not None:
        s = s + bias.to(dt)
    if vis is not None:
        s = torch.where(vis, s, torch.full_like(s, float("-inf")))
    m = _cpu.row_max(s).unsqueeze(-1)  # max is exact in any order
    if sinks is not None:  # a per-head logit in the denominator only (gpt-oss), added after the keys
        sink = sinks.to(dt).view(1, Hq, 1, 1).expand_as(m)
        m = torch.maximum(m, sink)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    # exp on fixed zero-padded blocks (the cpu_pointwise op: no position-dependent tail); masked
    # keys get exp(-inf) = 0 exactly.
    p = _cpu_pointwise.blocked(s - m, "exp")

    # Keys are reduced in KEY_CHUNK chunks aligned at the row's origin (modulo KEY_CHUNK): whole
    # zero chunks before or after the visible keys add exact zeros, so a row gets the same bits
    # alone, in a batch, padded (right, or left in a full prefill), packed or in decode.
    residue = torch.zeros((1, 1, 1), dtype=torch.int64, device=q4.device)
    if m4 is not None and Lq == Lk:
        residue = segment_origins(m4, Lk).long() % KEY_CHUNK
    pv_tile = (_CPU_TILE_Q, KEY_CHUNK, _dim_tile(Dv))
    acc = l = None
    for r in torch.unique(residue).tolist():
        # Keys before r are invisible to rows of residue r (their origin is >= r): start there.
        sel = (residue == r).expand(B, Hq, Lq)
        b_idx = sel.flatten(1).any(1).nonzero().flatten() if residue.shape[0] > 1 else None
        pr, vr = p[..., r:], vf[..., r:, :]
        if b_idx is not None and len(b_idx) < B:  # only the batch elements that have such rows
            pr, vr, sel = pr[b_idx], vr[b_idx], sel[b_idx]
        acc_r = _cpu.tile_matmul(pr, vr, pv_tile)
        l_r = _cpu.chunk_sum(pr, KEY_CHUNK).unsqueeze(-1)
        if acc is None and r == 0 and bool(sel.all()):
            acc, l = acc_r, l_r
            break
        if acc is None:
            acc = torch.zeros((B, Hq, Lq, Dv), dtype=dt, device=q4.device)
            l = torch.zeros((B, Hq, Lq, 1), dtype=dt, device=q4.device)
        dst = slice(None) if b_idx is None or len(b_idx) == B else b_idx
        acc[dst] = torch.where(sel.unsqueeze(-1), acc_r, acc[dst])
        l[dst] = torch.where(sel.unsqueeze(-1), l_r, l[dst])
    if sinks is not None:
        l = l + _cpu_exp_nonpos(sink - m)
    out = torch.where(l > 0, acc / torch.where(l > 0, l, torch.ones_like(l)), torch.zeros_like(acc))
    out = out.to(q4.dtype)
    return out[0] if squeeze else out


def _gather_pages(cache: Tensor, block_table: Tensor, n_keys: int) -> Tensor:
    """[num_pages, page, Hkv, D] cache -> contiguous [B, Hkv, n_keys, D] (slots past a row's length
    hold whatever the table points at; the mask hides them)."""
    page = cache.shape[1]
    pos = torch.arange(n_keys, device=cache.device)
    pages = block_table[:, pos // page].long().clamp(0, cache.shape[0] - 1)
    return cache[pages, (pos % page).expand_as(pages)].permute(0, 2, 1, 3)


def paged_visibility(kv_lens: Tensor, Lq: int, n_keys: int, window: int = 0) -> Tensor:
    """Bool [B, 1, Lq, n_keys]: query i of row b sits at position kv_lens[b] - Lq + i and sees keys
    0..position (bottom-right causal; with a window only the last ``window`` of them), none past
    kv_lens[b]."""
    pos = torch.arange(n_keys, device=kv_lens.device)
    qpos = kv_lens.long()[:, None] - Lq + torch.arange(Lq, device=kv_lens.device)[None, :]
    vis = (pos[None, None, :] <= qpos[:, :, None]) & (pos[None, None, :] < kv_lens.long()[:, None, None])
    if window > 0:
        vis = vis & (pos[None, None, :] > qpos[:, :, None] - window)
    return vis[:, None]


def cpu_paged_attention(q, k_cache, v_cache, block_table, kv_lens, scale=None, softcap=0.0, window=0, sinks=None):
    """CPU path: gather the pages, then the sequential CPU attention with the paged causal mask
    (a sequential sum is unchanged by the masked keys, so this equals attention on the sequence)."""
    _validate_paged(q, k_cache, v_cache, block_table, kv_lens, scale, softcap, window, sinks)
    n_keys = block_table.shape[1] * k_cache.shape[1]
    k = _gather_pages(k_cache, block_table, n_keys)
    v = _gather_pages(v_cache, block_table, n_keys)
    vis = paged_visibility(kv_lens, q.shape[2], n_keys, window)
    return cpu_attention(q, k, v, vis, False, scale, q.shape[1] != k.shape[1], softcap, sinks)

def cpu_paged_attention_varlen(q, k_cache, v_cache, block_table, kv_lens, q_start, q_lens, tiles, scale=None,
                               softcap=0.0, window=0, sinks=None):
    """CPU path: each row on its own through ``cpu_paged_attention`` (no graphs on the CPU)."""
    _validate_varlen(q, k_cache, v_cache, block_table, kv_lens, q_start, q_lens, tiles, scale, softcap, window, sinks)
    out = q.new_zeros((q.shape[0], q.shape[1], v_cache.shape[3]))
    for b, (s, n) in enumerate(zip(q_start.tolist(), q_lens.tolist())):
        if n:
            o = cpu_paged_attention(q[s:s + n].transpose(0, 1)[None], k_cache, v_cache, block_table[b:b + 1],
                                    kv_lens[b:b + 1], scale, softcap, window, sinks)
            out[s:s + n] = o[0].transpose(0, 1)
    return out
