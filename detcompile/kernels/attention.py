"""Batch-invariant scaled-dot-product attention: ``torch.ops.detcompile.attention``.

Semantics are those of ``torch.nn.functional.scaled_dot_product_attention`` (no dropout) plus
optional logit soft-capping, with one deliberate difference: a query row that sees no key at all
returns zeros (torch returns NaN for an all-False bool mask, and a plain average of ``v`` for an
all-``finfo.min`` float mask). Float-mask entries ``<= finfo(mask.dtype).min`` (and ``-inf``) count
as *masked* (exactly excluded), which is what Hugging Face means by them.

Why the result of one query row does not depend on anything else in the batch
------------------------------------------------------------------------------
GPU (Triton): flash attention with an online softmax over key tiles of a FIXED width ``BLOCK_N``
(a constant of the head dim and dtype), visited in ascending order. Tiles are aligned at
``origin + t * BLOCK_N`` where ``origin`` is a per-query-row key offset (0 by default). A tile in
which every score of a row is masked is an exact identity on that row's state ``(m, l, acc)``
(the max does not move, so ``alpha`` is exactly 1, and ``p = 0``), and a row that has seen only
masked keys keeps ``(-inf, 0, 0)`` thanks to a "safe" max, so a row may visit any superset of the
tiles it needs without changing a bit. Hence a query gives the same bits alone, in a batch, with
right padding, in prefill or in decode, and in chunked prefill. With a mask and ``Lq == Lk`` the
wrapper derives each row's origin as the start of its *segment* (packed sequences, left padding,
also with sliding windows), so those cases line the tiles up exactly as for the sequence alone.
The kernel, its tiles and its num_warps never depend on ``Lq``, ``Lk`` or the batch size, and FP
contraction is off so that the kernel variants (mask or not, softcap or not) round alike.

CPU: scores by a sequential loop over the head dim, softmax with a sequential sum over keys, and
``P @ V`` by a sequential loop over keys, all with exactly rounded elementwise ops (``exp`` too is
built from such ops, see ``_cpu_exp_nonpos``). A sequential sum is unchanged by exact zeros before
or after the real terms, so padding and packing need no special handling there.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _common
from ._common import HAS_TRITON, UnsupportedError, tl, triton

OP = "attention"
_LOG2E = 1.4426950408889634
_INT32_MAX = 2147483647
#: Largest supported (padded) head dim: larger tiles would not fit in registers/shared memory.
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------
# Argument checks and normalisation (shared by every path).
# ----------------------------------------------------------------------------------------------


def _default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)


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
    if softcap < 0 or not math.isfinite(softcap):
        raise ValueError(f"detcompile.{OP}: softcap must be finite and >= 0 (0 disables it); got {softcap}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"detcompile.{OP}: scale must be finite; got {scale}")
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


# ----------------------------------------------------------------------------------------------
# Triton path.
# ----------------------------------------------------------------------------------------------


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (max(int(n), 1) - 1).bit_length())


def tile_config(head_dim_pad: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): FIXED per (padded head dim, dtype). BLOCK_N is
    the reduced (key) tile width, so it must never depend on Lq, Lk or the batch; BLOCK_M is
    fixed too, so prefill and decode run the very same MMA shapes."""
    if head_dim_pad > MAX_HEAD_DIM:
        raise UnsupportedError(f"detcompile.{OP}: head dim > {MAX_HEAD_DIM} is not supported on the Triton path")
    # num_warps is part of the arithmetic (it sets the layout, hence the order of the row sums),
    # so it is fixed here too; the choices keep register spills small on sm_90 for every variant.
    if dtype == torch.float32:
        if head_dim_pad <= 64:
            return 64, 32, 8, 2
        if head_dim_pad <= 128:
            return 32, 32, 8, 2
        return 32, 16, 8, 2
    if head_dim_pad <= 64:
        return 64, 64, 4, 2
    if head_dim_pad <= 128:
        return 64, 64, 8, 2
    return 64, 32, 8, 2


if HAS_TRITON:
    # Compiled kernels may only read constexpr globals.
    _LOG2E_C = tl.constexpr(_LOG2E)
    _INT32_MAX_C = tl.constexpr(_INT32_MAX)

    @triton.jit(do_not_specialize=["Lq", "Lk"])
    def _attention_kernel(
        Q, K, V, Mask, Origin, Out,
        sqb, sqh, sqm, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        smb, smh, smm, smn,
        sgb, sgh, sgm,
        sob, soh, som, sod,
        Hq, Lq, Lk, D, Dv, GROUP,
        scale, softcap, mask_min,
        IS_CAUSAL: tl.constexpr,
        MASK_KIND: tl.constexpr,  # 0: none, 1: bool (stored as uint8), 2: additive float
        HAS_ORIGIN: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        b = (pid_bh // Hq).to(tl.int64)
        h = (pid_bh % Hq).to(tl.int64)
        hk = h // GROUP
        # 64-bit per-(batch, head) bases; offsets inside one head fit in int32.
        q_ptr = Q + b * sqb + h * sqh
        k_ptr = K + b * skb + hk * skh
        v_ptr = V + b * svb + hk * svh
        o_ptr = Out + b * sob + h * soh

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_nn = tl.arange(0, BLOCK_N)
        row_ok = offs_m < Lq

        q = tl.load(
            q_ptr + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
            mask=row_ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        # Mask rows in 64 bits: an [L, L] mask overflows int32 offsets past L = 46k.
        mask_rows = Mask + b * smb + h * smh + offs_m.to(tl.int64) * smm

        if HAS_ORIGIN:
            org = tl.load(Origin + b * sgb + h * sgh + offs_m * sgm, mask=row_ok, other=0)
        else:
            org = tl.zeros([BLOCK_M], dtype=tl.int32)
        org = tl.where(row_ok, org, _INT32_MAX_C)

        # Causal (top-left): no row of this block sees a key past its last row.
        if IS_CAUSAL:
            kv_end = tl.minimum(Lk, tl.minimum(pid_m * BLOCK_M + BLOCK_M, Lq))
        else:
            kv_end = Lk

        # One pass per distinct origin, ascending: each row is reduced only in the pass of its
        # own origin, with its tiles aligned at that origin (other rows are fully masked there),
        # and is stored at the end of that pass.
        o = tl.min(org, axis=0)
        while o < _INT32_MAX_C:
            in_pass = org == o
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
            n_tiles = (tl.maximum(kv_end - o, 0) + BLOCK_N - 1) // BLOCK_N
            for t in range(0, n_tiles):
                # Keys o + t*BLOCK_N + [0, BLOCK_N): never before the row's origin.
                offs_n = o + t * BLOCK_N + offs_nn
                col_ok = offs_n < Lk
                vis = in_pass[:, None] & col_ok[None, :]
                if IS_CAUSAL:
                    vis = vis & (offs_n[None, :] <= offs_m[:, None])
                if MASK_KIND != 0:
                    mv = tl.load(
                        mask_rows[:, None] + offs_n[None, :] * smn,
                        mask=row_ok[:, None] & col_ok[None, :],
                        other=0,
                    )
                    if MASK_KIND == 1:
                        vis = vis & (mv != 0)
                    else:
                        mvf = mv.to(tl.float32)
                        vis = vis & (mvf > mask_min)
                        # One live tile instead of two: the bias, -inf where masked.
                        bias = tl.where(vis, mvf, float("-inf"))
                    # A tile nobody here can see is an exact identity: skip its work.
                    any_vis = tl.max(tl.max(vis.to(tl.int32), axis=1), axis=0)
                else:
                    any_vis = 1
                if any_vis > 0:
                    k = tl.load(
                        k_ptr + offs_n[None, :] * skn + offs_d[:, None] * skd,
                        mask=col_ok[None, :] & (offs_d[:, None] < D),
                        other=0.0,
                    )
                    s = tl.dot(q, k, input_precision=DOT_PREC) * scale
                    if HAS_SOFTCAP:
                        x = s / softcap
                        e = tl.exp2(tl.abs(x) * (-2.0 * _LOG2E_C))
                        th = (1.0 - e) / (1.0 + e)
                        s = softcap * tl.where(x < 0, -th, th)
                    # Scores in the log2 domain, -inf where masked. A visible key of a float mask
                    # gets (s + bias) * log2e, which for a bias of 0 is bitwise s * log2e, as in
                    # the other variants (FP contraction is off, so every op rounds on its own).
                    if MASK_KIND == 2:
                        s = (s + bias) * _LOG2E_C
                    else:
                        s = tl.where(vis, s * _LOG2E_C, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, axis=1))
                    # Safe max: a row that has seen only masked keys keeps (m, l, acc) = (-inf, 0, 0).
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    # alpha is exactly 1 when the max did not move (all-masked tiles included),
                    # whatever exp2(0) gives on the hardware's approximate exp2.
                    alpha = tl.where(m_i == m_new, 1.0, tl.exp2(m_i - m_safe))
                    p = tl.exp2(s - m_safe[:, None])
                    l_i = l_i * alpha + tl.sum(p, axis=1)
                    vv = tl.load(
                        v_ptr + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                        mask=col_ok[:, None] & (offs_dv[None, :] < Dv),
                        other=0.0,
                    )
                    acc = acc * alpha[:, None]
                    acc = tl.dot(p.to(vv.dtype), vv, acc, input_precision=DOT_PREC)
                    m_i = m_new
            seen = l_i > 0
            res = acc / tl.where(seen, l_i, 1.0)[:, None]
            res = tl.where(seen[:, None], res, 0.0)  # no visible key -> zeros
            tl.store(
                o_ptr + offs_m[:, None] * som + offs_dv[None, :] * sod,
                res.to(Out.dtype.element_ty),
                mask=(in_pass & row_ok)[:, None] & (offs_dv[None, :] < Dv),
            )
            o = tl.min(tl.where(org > o, org, _INT32_MAX_C), axis=0)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    softcap: float = 0.0,
    *,
    _block_m: int | None = None,
    _block_n: int | None = None,
) -> Tensor:
    """Run the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1).

    ``_block_m``/``_block_n`` override the fixed tiles for TESTS ONLY (small interpreter shapes);
    results are comparable bitwise only between calls that use the same tiles."""
    if not HAS_TRITON:
        raise UnsupportedError(f"detcompile.{OP}: Triton is not available")
    squeeze = q.dim() == 3
    q4, k4, v4, m4 = _validate(q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap)
    if q4.dtype not in _common.GPU_DTYPES:
        raise UnsupportedError(f"detcompile.{OP}: dtype {q4.dtype} is not supported by the Triton kernel")
    B, Hq, Lq, D = q4.shape
    Hkv, Lk, Dv = k4.shape[1], k4.shape[2], v4.shape[3]
    out = torch.empty((B, Hq, Lq, Dv), dtype=q4.dtype, device=q4.device)
    if out.numel() == 0:
        return out[0] if squeeze else out
    if scale is None:
        scale = _default_scale(D)

    block_d, block_dv = _pow2_at_least_16(D), _pow2_at_least_16(Dv)
    block_m, block_n, num_warps, num_stages = tile_config(max(block_d, block_dv), q4.dtype)
    if _block_m is not None:
        block_m = _block_m
    if _block_n is not None:
        block_n = _block_n

    mask_kind, has_origin = 0, False
    mask_arg, mstr = q4, (0, 0, 0, 0)
    origin_arg, gstr = torch.zeros(1, dtype=torch.int32, device=q4.device), (0, 0, 0)
    mask_min = 0.0
    if m4 is not None:
        if Lq == Lk:
            org = segment_origins(m4, Lk)
            has_origin = True
            origin_arg = org
            gstr = tuple(org.stride(i) if org.shape[i] != 1 else 0 for i in range(3))
        if m4.dtype == torch.bool:
            mask_kind = 1
            mk = m4.view(torch.uint8)  # same bytes; Triton loads uint8 more portably than i1
        else:
            mask_kind = 2
            mk = m4
            mask_min = float(torch.finfo(m4.dtype).min)
        mk = mk.expand(B, Hq, Lq, Lk)  # broadcast dims get stride 0 (no copy)
        mask_arg, mstr = mk, mk.stride()

    grid = (B * Hq, triton.cdiv(Lq, block_m))
    _attention_kernel[grid](
        q4, k4, v4, mask_arg, origin_arg, out,
        *q4.stride(), *k4.stride(), *v4.stride(), *mstr, *gstr, *out.stride(),
        Hq, Lq, Lk, D, Dv, Hq // Hkv,
        float(scale), float(softcap), mask_min,
        IS_CAUSAL=bool(is_causal),
        MASK_KIND=mask_kind,
        HAS_ORIGIN=has_origin,
        HAS_SOFTCAP=softcap > 0,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        DOT_PREC=_dot_precision(q4.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
        # No mul+add contraction into FMAs: each op rounds on its own, so the kernel variants
        # (mask kinds, softcap, causal) give the same bits for the same visible scores.
        enable_fp_fusion=False,
    )
    return out[0] if squeeze else out


# ----------------------------------------------------------------------------------------------
# CPU path.
# ----------------------------------------------------------------------------------------------


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


def _expand_kv(t: Tensor, hq: int) -> Tensor:
    hkv = t.shape[1]
    if hkv == hq:
        return t
    g = hq // hkv
    return t.unsqueeze(2).expand(t.shape[0], hkv, g, t.shape[2], t.shape[3]).reshape(t.shape[0], hq, t.shape[2], t.shape[3])


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


def cpu_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, softcap=0.0):
    squeeze = q.dim() == 3
    q4, k4, v4, m4 = _validate(q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap)
    B, Hq, Lq, D = q4.shape
    Lk, Dv = k4.shape[2], v4.shape[3]
    dt = _common.acc_dtype(q4.dtype)
    if scale is None:
        scale = _default_scale(D)
    qf = q4.to(dt)
    kf = _expand_kv(k4.to(dt), Hq)
    vf = _expand_kv(v4.to(dt), Hq)

    s = _common.cpu_seq_matmul(qf, kf.transpose(-1, -2)) * scale  # [B, Hq, Lq, Lk], sequential over D
    if softcap > 0:
        s = softcap * _cpu_tanh(s / softcap)
    vis, bias = _visibility_and_bias(m4, is_causal, Lq, Lk, q4.device)
    if bias is not None:
        s = s + bias.to(dt)
    if vis is not None:
        s = torch.where(vis, s, torch.full_like(s, float("-inf")))
    m = _common.cpu_seq_max(s).unsqueeze(-1)  # max is exact in any order
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    p = _cpu_exp_nonpos(s - m)
    l = _common.cpu_seq_sum(p).unsqueeze(-1)
    acc = _common.cpu_seq_matmul(p, vf)  # sequential over keys: masked keys add exact zeros
    out = torch.where(l > 0, acc / torch.where(l > 0, l, torch.ones_like(l)), torch.zeros_like(acc))
    out = out.to(q4.dtype)
    return out[0] if squeeze else out


# ----------------------------------------------------------------------------------------------
# Op registration.
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_common.NAMESPACE}::{OP}", mutates_args=())
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    softcap: float = 0.0,
) -> Tensor:
    _common.check_inputs(OP, q, k, v, attn_mask)
    raise UnsupportedError(f"detcompile.{OP}: device {q.device.type!r} is not supported (only cpu and cuda)")


@attention.register_fake
def _(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, softcap=0.0):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@attention.register_kernel("cpu")
def _(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, softcap=0.0):
    return cpu_attention(q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap)


@attention.register_kernel("cuda")
def _(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, softcap=0.0):
    _common.check_inputs(OP, q, k, v, attn_mask)
    if not HAS_TRITON:
        raise UnsupportedError(f"detcompile.{OP}: the CUDA path needs Triton")
    return triton_attention(q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap)


# ----------------------------------------------------------------------------------------------
# Autograd: the backward recomputes attention in float32 (float64 for float64) with the math
# formula (no batch invariance needed there) and applies the closed-form gradients.
# ----------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, is_causal, scale, enable_gqa, softcap = inputs
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.is_causal, ctx.scale, ctx.softcap = is_causal, scale, softcap


def _backward(ctx, grad_out):
    q, k, v, attn_mask = ctx.saved_tensors
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v, grad_out = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), grad_out.unsqueeze(0)
    dt = _common.acc_dtype(q.dtype)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    scale = ctx.scale if ctx.scale is not None else _default_scale(D)
    softcap = ctx.softcap
    qf, kf, vf, go = q.to(dt), _expand_kv(k.to(dt), Hq), _expand_kv(v.to(dt), Hq), grad_out.to(dt)

    s1 = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if softcap > 0:
        th = torch.tanh(s1 / softcap)
        s = softcap * th
    else:
        s = s1
    m4 = None
    if attn_mask is not None:
        m4 = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    vis, bias = _visibility_and_bias(m4, ctx.is_causal, Lq, Lk, q.device)
    if bias is not None:
        s = s + bias.to(dt)
    if vis is not None:
        s = torch.where(vis, s, torch.full_like(s, float("-inf")))
    m = torch.amax(s, dim=-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    l = e.sum(-1, keepdim=True)
    p = torch.where(l > 0, e / torch.where(l > 0, l, torch.ones_like(l)), torch.zeros_like(e))
    out = torch.matmul(p, vf)

    dv = torch.matmul(p.transpose(-1, -2), go)
    dp = torch.matmul(go, vf.transpose(-1, -2))
    ds = p * (dp - (go * out).sum(-1, keepdim=True))  # softmax backward; masked p = 0
    if softcap > 0:
        ds = ds * (1.0 - th * th)
    ds = ds * scale
    dq = torch.matmul(ds, kf)
    dk = torch.matmul(ds.transpose(-1, -2), qf)
    if g > 1:  # sum the gradients of the query heads that share a kv head
        dk = dk.reshape(B, Hkv, g, Lk, D).sum(2)
        dv = dv.reshape(B, Hkv, g, Lk, dv.shape[-1]).sum(2)
    dq, dk, dv = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    if squeeze:
        dq, dk, dv = dq[0], dk[0], dv[0]
    return dq, dk, dv, None, None, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)
