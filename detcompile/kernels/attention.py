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
from ._common import HAS_TRITON, UnsupportedError, tl, triton

OP = "attention"
PAGED_OP = "paged_attention"
VARLEN_OP = "paged_attention_varlen"
_LOG2E = 1.4426950408889634
_INT32_MAX = 2147483647
#: Largest supported (padded) head dim: larger tiles would not fit in registers/shared memory.
MAX_HEAD_DIM = 256


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

#: Keys per split. A FIXED constant (a multiple of every BLOCK_N): a row's keys are reduced split
#: by split, each split from a fresh online-softmax state, and the split states are folded in
#: ascending order with ``_fold``. Inside one program (prefill) or across programs plus a merge
#: kernel (long-KV decode) the fold sequence is the same, so both give the same bits.
SPLIT = 512


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (max(int(n), 1) - 1).bit_length())


def tile_config(head_dim_pad: int, dtype: torch.dtype, rows: int = 1):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a launch whose programs hold ``rows`` query
    rows (GQA group x queries). BLOCK_N, the key tile width, is FIXED per (padded head dim, dtype):
    it never depends on Lq, Lk or the batch. For 16-bit inputs with head dim <= 128, launches with
    more than 64 rows (prefill) use 128-row tiles over 8 warps and the others (decode) 64-row tiles
    over 4 warps: Triton lays both out as 16-row slices per warp with the same columns per thread,
    so a row's score-tile max and sum reduce in the same order and the two give the same bits
    (tests/kernels/test_paged_attention.py checks decode against prefill on the GPU)."""
    if head_dim_pad > MAX_HEAD_DIM:
        raise UnsupportedError(f"detcompile.{OP}: head dim > {MAX_HEAD_DIM} is not supported on the Triton path")
    if dtype == torch.float32:
        if head_dim_pad <= 64:
            return 64, 32, 8, 2
        if head_dim_pad <= 128:
            return 32, 32, 8, 2
        return 32, 16, 8, 2
    if head_dim_pad <= 128:
        return (128, 64, 8, 3) if rows > 64 else (64, 64, 4, 2)
    return 64, 32, 8, 2


#: Benchmarks only (benchmarks/attention_configs.py): replaces tile_config's answer for every call.
_TILE_OVERRIDE: tuple | None = None


def _tiles(D: int, Dv: int, dtype: torch.dtype, rows: int):
    if _TILE_OVERRIDE is not None:
        return _TILE_OVERRIDE
    return tile_config(max(_pow2_at_least_16(D), _pow2_at_least_16(Dv)), dtype, rows)


if HAS_TRITON:
    # Compiled kernels may only read constexpr globals.
    _LOG2E_C = tl.constexpr(_LOG2E)
    _INT32_MAX_C = tl.constexpr(_INT32_MAX)

    @triton.jit
    def _fold(M, L, ACC, m_s, l_s, acc_s):
        """Fold one split's state (m_s, l_s, acc_s) into the running (M, L, ACC). A split in which a
        row saw no key (l_s == 0) leaves that row's state untouched, bit for bit."""
        M_new = tl.maximum(M, m_s)
        M_safe = tl.where(M_new == float("-inf"), 0.0, M_new)
        a = tl.where(M == M_new, 1.0, tl.exp2(M - M_safe))
        b = tl.where(m_s == M_new, 1.0, tl.exp2(m_s - M_safe))
        live = l_s > 0
        L = tl.where(live, L * a + l_s * b, L)
        ACC = tl.where(live[:, None], ACC * a[:, None] + acc_s * b[:, None], ACC)
        M = tl.where(live, M_new, M)
        return M, L, ACC

    @triton.jit
    def _fold_sink(M, L, ACC, sink):
        """Add a per-row sink logit (natural-log domain, as the scaled scores) to the softmax
        denominator: one more 'key' whose value is zero, folded after every real key."""
        s2 = sink * _LOG2E_C
        M_new = tl.maximum(M, s2)
        a = tl.where(M == M_new, 1.0, tl.exp2(M - M_new))
        b = tl.where(s2 == M_new, 1.0, tl.exp2(s2 - M_new))
        return L * a + b, ACC * a[:, None]

    @triton.jit
    def _finalize(L, ACC):
        """Normalise the folded state; a row that saw no key gives zeros."""
        seen = L > 0
        res = ACC / tl.where(seen, L, 1.0)[:, None]
        return tl.where(seen[:, None], res, 0.0)

    @triton.jit
    def _online_step(s, vv, m_i, l_i, acc, DOT_PREC: tl.constexpr):
        """One key tile of the online softmax: s = scores in the log2 domain, -inf where masked."""
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Safe max: a row that has seen only masked keys keeps (m, l, acc) = (-inf, 0, 0).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        # alpha is exactly 1 when the max did not move (all-masked tiles included), whatever
        # exp2(0) gives on the hardware's approximate exp2.
        alpha = tl.where(m_i == m_new, 1.0, tl.exp2(m_i - m_safe))
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(vv.dtype), vv, acc, input_precision=DOT_PREC)
        return m_new, l_i, acc

    @triton.jit
    def _scores(q, k, scale, softcap, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr):
        s = tl.dot(q, k, input_precision=DOT_PREC) * scale
        if HAS_SOFTCAP:
            x = s / softcap
            e = tl.exp2(tl.abs(x) * (-2.0 * _LOG2E_C))
            th = (1.0 - e) / (1.0 + e)
            s = softcap * tl.where(x < 0, -th, th)
        return s

    @triton.jit
    def _kv_offsets(offs_n, col_ok, BT, bt_row, PAGE, skn, PAGED: tl.constexpr):
        """int64 row offsets of keys ``offs_n``: contiguous (n * stride) or through the page table."""
        if PAGED:
            page = tl.load(BT + bt_row + offs_n // PAGE, mask=col_ok, other=0).to(tl.int64)
            return (page * PAGE + offs_n % PAGE) * skn
        return offs_n.to(tl.int64) * skn

    @triton.jit(do_not_specialize=["Lq", "Lk", "NUM_SPLITS", "sbt"])
    def _attention_kernel(
        Q, K, V, Mask, Origin, Out,
        BT, KVLens, WsAcc, WsML,
        QStart, QLens, TileSeq, TileBlk,
        sqb, sqh, sqm, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        smb, smh, smm, smn,
        sgb, sgh, sgm,
        sob, soh, som, sod,
        sbt, PAGE,
        Hkv, Lq, Lk, D, Dv, GROUP, NUM_SPLITS,
        scale, softcap, mask_min, WINDOW, Sinks,
        IS_CAUSAL: tl.constexpr,
        MASK_KIND: tl.constexpr,  # 0: none, 1: bool (stored as uint8), 2: additive float
        HAS_ORIGIN: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        PAGED: tl.constexpr,
        PARALLEL_SPLITS: tl.constexpr,
        HAS_WINDOW: tl.constexpr,  # query p sees keys p - WINDOW < k <= p
        HAS_SINKS: tl.constexpr,  # per-head sink logit in the softmax denominator (gpt-oss)
        VARLEN: tl.constexpr,  # paged, ragged: program (hk, tile) -> (row b, row block) via TileSeq/TileBlk
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        DOT_PREC: tl.constexpr,
        SPLIT_KEYS: tl.constexpr,
    ):
        """Rows of a program: the GROUP query heads sharing KV head ``hk`` times the Lq queries,
        row r = query (r // GROUP), head hk * GROUP + r % GROUP, so one K/V tile load serves the
        whole group. Each row's arithmetic is its own: which rows share a program never matters."""
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        if VARLEN:
            # Row b's Lq queries sit at QStart[b].. of a flat [T, Hq, D] q (sqb = sob = 0). Spare
            # tiles point at a row of no queries and no keys: they load nothing and store nothing.
            tile = tl.num_programs(1) - 1 - pid_m  # the host lists long rows' tiles last
            b = tl.load(TileSeq + tile).to(tl.int64)
            pid_m = tl.load(TileBlk + tile)
            hk = pid_bh.to(tl.int64)
            Lq = tl.load(QLens + b)
            q_row0 = tl.load(QStart + b).to(tl.int64)
        else:
            if IS_CAUSAL:
                # Last (longest) row blocks first: better load balance (scheduling only).
                pid_m = tl.num_programs(1) - 1 - pid_m
            b = (pid_bh // Hkv).to(tl.int64)
            hk = (pid_bh % Hkv).to(tl.int64)
            q_row0 = 0
        TILES_PER_SPLIT: tl.constexpr = SPLIT_KEYS // BLOCK_N

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n_rows = GROUP * Lq
        row_ok = rows < n_rows
        qi = rows // GROUP
        h = hk * GROUP + (rows % GROUP).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_nn = tl.arange(0, BLOCK_N)

        q = tl.load(
            Q + b * sqb + h[:, None] * sqh + (q_row0 + qi)[:, None] * sqm + offs_d[None, :] * sqd,
            mask=row_ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        if PAGED:
            kv_len = tl.load(KVLens + b)
            q_pos0 = kv_len - Lq  # chunk of the last Lq positions (bottom-right causal)
            k_base = K + hk * skh
            v_base = V + hk * svh
            bt_row = b * sbt
        else:
            kv_len = Lk
            q_pos0 = 0  # SDPA's is_causal is top-left aligned
            k_base = K + b * skb + hk * skh
            v_base = V + b * svb + hk * svh
            bt_row = 0
        qpos = q_pos0 + qi
        # Mask rows in 64 bits: an [L, L] mask overflows int32 offsets past L = 46k.
        mask_rows = Mask + b * smb + h * smh + qi.to(tl.int64) * smm

        if HAS_ORIGIN:
            org = tl.load(Origin + b * sgb + h * sgh + qi * sgm, mask=row_ok, other=0)
        else:
            org = tl.zeros([BLOCK_M], dtype=tl.int32)
        org = tl.where(row_ok, org, _INT32_MAX_C)

        # Keys this block may need: causal rows see nothing past the block's last query.
        last_q = tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, n_rows - 1) // GROUP
        first_q = (pid_m * BLOCK_M) // GROUP
        if IS_CAUSAL:
            kv_end = tl.minimum(kv_len, q_pos0 + last_q + 1)
            full_end = tl.minimum(kv_len, q_pos0 + first_q + 1)  # keys every row sees
        else:
            kv_end = kv_len
            full_end = kv_len
        # Tiles wholly before every row's window are exact identities: start past them.
        if HAS_WINDOW:
            t_win = tl.maximum(q_pos0 + first_q - WINDOW + 1, 0) // BLOCK_N
        else:
            t_win = 0

        M = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        L = tl.zeros([BLOCK_M], dtype=tl.float32)
        ACC = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

        # One pass per distinct origin, ascending: each row is reduced only in the pass of its
        # own origin, with its tiles and splits aligned at that origin (other rows are fully
        # masked there), and is stored at the end of that pass.
        o = tl.min(org, axis=0)
        while o < _INT32_MAX_C:
            in_pass = org == o
            M = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            L = tl.zeros([BLOCK_M], dtype=tl.float32)
            ACC = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
            n_tiles = (tl.maximum(kv_end - o, 0) + BLOCK_N - 1) // BLOCK_N
            # Tiles every row of the block sees in full need no masking at all.
            if MASK_KIND == 0 and not HAS_ORIGIN and not HAS_WINDOW:
                n_full = tl.maximum(full_end, 0) // BLOCK_N
            else:
                n_full = 0
            if PARALLEL_SPLITS:
                split_lo = tl.program_id(2)
                split_hi = split_lo + 1
            else:
                split_lo = 0
                split_hi = (n_tiles + TILES_PER_SPLIT - 1) // TILES_PER_SPLIT
            for sp in range(split_lo, split_hi):
                t_lo = sp * TILES_PER_SPLIT
                t_hi = tl.minimum(t_lo + TILES_PER_SPLIT, n_tiles)
                t_mid = tl.maximum(tl.minimum(n_full, t_hi), t_lo)
                m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
                l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
                acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
                # Fully visible tiles: no mask arithmetic.
                for t in range(t_lo, t_mid):
                    offs_n = o + t * BLOCK_N + offs_nn
                    col_ok = offs_n < kv_len
                    kr = _kv_offsets(offs_n, col_ok, BT, bt_row, PAGE, skn, PAGED)
                    k = tl.load(k_base + kr[None, :] + offs_d[:, None] * skd, mask=offs_d[:, None] < D, other=0.0)
                    s = _scores(q, k, scale, softcap, HAS_SOFTCAP, DOT_PREC) * _LOG2E_C
                    vr = _kv_offsets(offs_n, col_ok, BT, bt_row, PAGE, svn, PAGED)
                    vv = tl.load(v_base + vr[:, None] + offs_dv[None, :] * svd, mask=offs_dv[None, :] < Dv, other=0.0)
                    m_i, l_i, acc = _online_step(s, vv, m_i, l_i, acc, DOT_PREC)
                # Tiles with masked keys (diagonal, tail, explicit mask, other origins, window).
                for t in range(tl.maximum(t_mid, t_win), t_hi):
                    offs_n = o + t * BLOCK_N + offs_nn
                    col_ok = offs_n < kv_len
                    vis = in_pass[:, None] & col_ok[None, :]
                    if IS_CAUSAL:
                        vis = vis & (offs_n[None, :] <= qpos[:, None])
                    if HAS_WINDOW:
                        vis = vis & (offs_n[None, :] > qpos[:, None] - WINDOW)
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
                            bias = tl.where(vis, mvf, float("-inf"))
                    # A tile nobody here can see is an exact identity: skip its work. Without a
                    # mask every tile below kv_end has a visible key, so the block-wide test
                    # (a CTA-wide reduction) is only paid when there is a mask.
                    if MASK_KIND != 0 or HAS_WINDOW:
                        any_vis = tl.max(tl.max(vis.to(tl.int32), axis=1), axis=0)
                    else:
                        any_vis = 1
                    if any_vis > 0:
                        kr = _kv_offsets(offs_n, col_ok, BT, bt_row, PAGE, skn, PAGED)
                        k = tl.load(
                            k_base + kr[None, :] + offs_d[:, None] * skd,
                            mask=col_ok[None, :] & (offs_d[:, None] < D),
                            other=0.0,
                        )
                        s = _scores(q, k, scale, softcap, HAS_SOFTCAP, DOT_PREC)
                        # Log2 domain, -inf where masked. A visible key of a float mask gets
                        # (s + bias) * log2e, which for a bias of 0 is bitwise s * log2e, as in
                        # the other variants (FP contraction is off: every op rounds on its own).
                        if MASK_KIND == 2:
                            s = (s + bias) * _LOG2E_C
                        else:
                            s = tl.where(vis, s * _LOG2E_C, float("-inf"))
                        vr = _kv_offsets(offs_n, col_ok, BT, bt_row, PAGE, svn, PAGED)
                        vv = tl.load(
                            v_base + vr[:, None] + offs_dv[None, :] * svd,
                            mask=col_ok[:, None] & (offs_dv[None, :] < Dv),
                            other=0.0,
                        )
                        m_i, l_i, acc = _online_step(s, vv, m_i, l_i, acc, DOT_PREC)
                if PARALLEL_SPLITS:
                    # Hand the split's state to the merge kernel (which folds like _fold below).
                    ws_row = ((b * Hkv + hk) * n_rows + rows.to(tl.int64)) * NUM_SPLITS + sp
                    tl.store(WsML + ws_row * 2, m_i, mask=row_ok)
                    tl.store(WsML + ws_row * 2 + 1, l_i, mask=row_ok)
                    tl.store(WsAcc + ws_row[:, None] * BLOCK_DV + offs_dv[None, :], acc, mask=row_ok[:, None])
                else:
                    M, L, ACC = _fold(M, L, ACC, m_i, l_i, acc)
            if not PARALLEL_SPLITS:
                if HAS_SINKS:
                    L, ACC = _fold_sink(M, L, ACC, tl.load(Sinks + h, mask=row_ok, other=0.0).to(tl.float32))
                res = _finalize(L, ACC)
                tl.store(
                    Out + b * sob + h[:, None] * soh + (q_row0 + qi)[:, None] * som + offs_dv[None, :] * sod,
                    res.to(Out.dtype.element_ty),
                    mask=(in_pass & row_ok)[:, None] & (offs_dv[None, :] < Dv),
                )
            o = tl.min(tl.where(org > o, org, _INT32_MAX_C), axis=0)

    @triton.jit(do_not_specialize=["Lq", "NUM_SPLITS"])
    def _merge_splits_kernel(
        WsAcc, WsML, Out,
        sob, soh, som, sod,
        Hkv, Lq, Dv, GROUP, NUM_SPLITS, Sinks,
        HAS_SINKS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_DV: tl.constexpr,
    ):
        """Fold the split states of each row in ascending split order (the same _fold as the
        one-program path), then normalise: the result has the bits of the one-program path."""
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        b = (pid_bh // Hkv).to(tl.int64)
        hk = (pid_bh % Hkv).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n_rows = GROUP * Lq
        row_ok = rows < n_rows
        qi = rows // GROUP
        h = hk * GROUP + (rows % GROUP).to(tl.int64)
        offs_dv = tl.arange(0, BLOCK_DV)
        M = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        L = tl.zeros([BLOCK_M], dtype=tl.float32)
        ACC = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for sp in range(0, NUM_SPLITS):
            ws_row = ((b * Hkv + hk) * n_rows + rows.to(tl.int64)) * NUM_SPLITS + sp
            m_s = tl.load(WsML + ws_row * 2, mask=row_ok, other=float("-inf"))
            l_s = tl.load(WsML + ws_row * 2 + 1, mask=row_ok, other=0.0)
            acc_s = tl.load(WsAcc + ws_row[:, None] * BLOCK_DV + offs_dv[None, :], mask=row_ok[:, None], other=0.0)
            M, L, ACC = _fold(M, L, ACC, m_s, l_s, acc_s)
        if HAS_SINKS:
            L, ACC = _fold_sink(M, L, ACC, tl.load(Sinks + h, mask=row_ok, other=0.0).to(tl.float32))
        res = _finalize(L, ACC)
        tl.store(
            Out + b * sob + h[:, None] * soh + qi[:, None] * som + offs_dv[None, :] * sod,
            res.to(Out.dtype.element_ty),
            mask=row_ok[:, None] & (offs_dv[None, :] < Dv),
        )


def _launch(
    q4, k4, v4, out, *, kv_strides, paged, block_table, kv_lens, page, Lk, mask_args, is_causal,
    scale, softcap, parallel_splits=None, block_m=None, block_n=None, split=None, window=0, sinks=None,
):
    """Shared launcher of the SDPA-style and the paged entry points (one kernel, one config).
    ``parallel_splits`` None picks the schedule (``_want_parallel_splits``); both give the same bits."""
    B, Hq, Lq, D = q4.shape
    Hkv, Dv = kv_strides["Hkv"], v4.shape[-1]
    G = Hq // Hkv
    block_d, block_dv = _pow2_at_least_16(D), _pow2_at_least_16(Dv)
    bm, bn, num_warps, num_stages = _tiles(D, Dv, q4.dtype, G * Lq)
    bm = block_m or bm
    bn = block_n or bn
    split = split or SPLIT
    assert split % bn == 0
    num_splits = max(1, triton.cdiv(Lk, split))
    row_blocks = triton.cdiv(G * Lq, bm)
    mask_kind, has_origin, mask_arg, mstr, origin_arg, gstr, mask_min = mask_args
    dev = q4.device
    if parallel_splits is None:  # auto: split over programs only where SMs would sit idle
        parallel_splits = _want_parallel_splits(dev, B * Hkv * row_blocks, Lk, split)
    # Segment origins (masked self-attention) need the one-program pass loop.
    if parallel_splits and num_splits > 1 and not has_origin:
        ws_acc = torch.empty((B * Hq * Lq * num_splits, block_dv), dtype=torch.float32, device=dev)
        ws_ml = torch.empty((B * Hq * Lq * num_splits, 2), dtype=torch.float32, device=dev)
        grid = (B * Hkv, row_blocks, num_splits)
    else:
        parallel_splits = False
        ws_acc = ws_ml = out  # never touched
        grid = (B * Hkv, row_blocks)
    bt = block_table if paged else out
    kvl = kv_lens if paged else out
    sbt = block_table.stride(0) if paged else 0
    _attention_kernel[grid](
        q4, k4, v4, mask_arg, origin_arg, out,
        bt, kvl, ws_acc, ws_ml,
        out, out, out, out,  # varlen metadata: unused
        *q4.stride(), *kv_strides["k"], *kv_strides["v"], *mstr, *gstr, *out.stride(),
        sbt, page,
        Hkv, Lq, Lk, D, Dv, G, num_splits,
        float(scale), float(softcap), mask_min, int(window), sinks if sinks is not None else out,
        IS_CAUSAL=bool(is_causal),
        MASK_KIND=mask_kind,
        HAS_ORIGIN=has_origin,
        HAS_SOFTCAP=softcap > 0,
        PAGED=paged,
        PARALLEL_SPLITS=parallel_splits,
        HAS_WINDOW=window > 0,
        HAS_SINKS=sinks is not None,
        VARLEN=False,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        DOT_PREC=_common.dot_precision(q4.dtype),
        SPLIT_KEYS=split,
        num_warps=num_warps,
        num_stages=num_stages,
        # No mul+add contraction into FMAs: each op rounds on its own, so the kernel variants
        # (mask kinds, softcap, causal, paged, split merge) give the same bits for the same scores.
        enable_fp_fusion=False,
    )
    if parallel_splits:
        _merge_splits_kernel[(B * Hkv, row_blocks)](
            ws_acc, ws_ml, out,
            *out.stride(),
            Hkv, Lq, Dv, G, num_splits, sinks if sinks is not None else out,
            HAS_SINKS=sinks is not None,
            BLOCK_M=bm,
            BLOCK_DV=block_dv,
            num_warps=4,
            enable_fp_fusion=False,
        )


def _want_parallel_splits(dev, programs: int, Lk: int, split: int) -> bool:
    """Split the keys over programs only when the grid would otherwise leave SMs idle: fewer
    programs than SMs (decode or a short chunk with a small batch and long KV). From one full wave
    up, the split programs and the merge kernel cost more than they win (H100, 2026-11-24: decode
    KV 1k batch 32 66 us unsplit vs 69 us split; causal prefill 1k batch 1 37 us vs 71 us). It
    changes the schedule, never the bits."""
    return Lk > split and programs < _common.num_sms(dev)


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
    _parallel_splits: bool | None = None,
    _split: int | None = None,
) -> Tensor:
    """Run the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1).

    ``_block_m``/``_block_n`` override the fixed tiles for TESTS ONLY (small interpreter shapes);
    results are comparable bitwise only between calls that use the same tiles.
    ``_parallel_splits`` forces the split schedule on/off (tests; same bits either way);
    ``_split`` overrides SPLIT (tests only, like the tiles)."""
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

    _launch(
        q4, k4, v4, out,
        kv_strides={"Hkv": Hkv, "k": k4.stride(), "v": v4.stride()},
        paged=False, block_table=None, kv_lens=None, page=1, Lk=Lk,
        mask_args=(mask_kind, has_origin, mask_arg, mstr, origin_arg, gstr, mask_min),
        is_causal=is_causal, scale=scale, softcap=softcap,
        parallel_splits=_parallel_splits, block_m=_block_m, block_n=_block_n, split=_split,
    )
    return out[0] if squeeze else out


# ----------------------------------------------------------------------------------------------
# Paged KV cache entry point (serving: decode and chunked prefill).
# ----------------------------------------------------------------------------------------------


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


def triton_paged_attention(q, k_cache, v_cache, block_table, kv_lens, scale=None, softcap=0.0, window=0, sinks=None,
                           *, _block_m=None, _block_n=None, _parallel_splits=None, _split=None):
    _validate_paged(q, k_cache, v_cache, block_table, kv_lens, scale, softcap, window, sinks)
    if q.dtype not in _common.GPU_DTYPES:
        raise UnsupportedError(f"detcompile.{PAGED_OP}: dtype {q.dtype} is not supported by the Triton kernel")
    B, Hq, Lq, D = q.shape
    page, Hkv = k_cache.shape[1], k_cache.shape[2]
    Dv = v_cache.shape[3]
    out = torch.empty((B, Hq, Lq, Dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if scale is None:
        scale = _default_scale(D)
    max_kv = block_table.shape[1] * page  # a bound known without reading kv_lens (no host sync)
    ks, vs = k_cache.stride(), v_cache.stride()
    # Paged addressing: the kernel's "row" stride is the stride of one token (page slot); a
    # page's base is page * page_size * row stride, which needs slots of one page to be evenly
    # spaced by that stride (true for [num_pages, page_size, Hkv, D] caches with contiguous pages).
    if ks[0] != page * ks[1] or vs[0] != page * vs[1]:
        raise ValueError(f"detcompile.{PAGED_OP}: pages of the cache must be contiguous slots (stride(0) == page_size * stride(1))")
    _launch(
        q, k_cache, v_cache, out,
        kv_strides={"Hkv": Hkv, "k": (0, ks[2], ks[1], ks[3]), "v": (0, vs[2], vs[1], vs[3])},
        paged=True, block_table=block_table, kv_lens=kv_lens, page=page, Lk=max_kv,
        mask_args=(0, False, q, (0, 0, 0, 0), torch.zeros(1, dtype=torch.int32, device=q.device), (0, 0, 0), 0.0),
        is_causal=True, scale=scale, softcap=softcap,
        parallel_splits=_parallel_splits, block_m=_block_m, block_n=_block_n, split=_split,
        window=window, sinks=None if sinks is None else sinks.float().contiguous(),
    )
    return out


def varlen_block_m(head_dim: int, head_dim_v: int, dtype: torch.dtype) -> int:
    """Query rows (GQA group x queries) per program of the ragged paged launch. The host lays the
    tiles out with it (``varlen_tiles``); it is the decode launch's tile (same bits as prefill's)."""
    return _tiles(head_dim, head_dim_v, dtype, 1)[0]


def varlen_tiles(q_lens: list[int], group: int, block_m: int, num_tiles: int | None = None,
                 spare_row: int | None = None) -> Tensor:
    """int32 [2, num_tiles] (row, row block) of every program of a ragged launch, row by row.
    ``num_tiles`` pads the list (a CUDA graph's fixed grid) with tiles of ``spare_row``, a row of
    no queries and no keys."""
    rows, blocks = [], []
    for b, n in enumerate(q_lens):
        k = -(-group * n // block_m)
        rows.extend([b] * k)
        blocks.extend(range(k))
    if num_tiles is not None:
        if len(rows) > num_tiles or spare_row is None:
            raise ValueError(f"detcompile.{PAGED_OP}: {len(rows)} tiles do not fit a launch of {num_tiles}")
        rows.extend([spare_row] * (num_tiles - len(rows)))
        blocks.extend([0] * (num_tiles - len(blocks)))
    return torch.tensor([rows, blocks], dtype=torch.int32)


def max_varlen_tiles(tokens: int, rows: int, group: int, block_m: int) -> int:
    """Most tiles ``tokens`` query tokens over at most ``rows`` rows can need (a fixed grid)."""
    return -(-group * tokens // block_m) + rows


def _validate_varlen(q, k_cache, block_table, kv_lens, q_start, q_lens, tiles):
    if q.dim() != 3:
        raise ValueError(f"detcompile.{VARLEN_OP}: expected q [T, Hq, D]; got {tuple(q.shape)}")
    S = block_table.shape[0]
    for name, t in (("q_start", q_start), ("q_lens", q_lens), ("tiles", tiles)):
        if t.dtype != torch.int32 or t.device != q.device:
            raise ValueError(f"detcompile.{VARLEN_OP}: {name} must be int32 on {q.device}; got {t.dtype} on {t.device}")
    if q_start.shape != (S,) or q_lens.shape != (S,) or tiles.dim() != 2 or tiles.shape[0] != 2:
        raise ValueError(f"detcompile.{VARLEN_OP}: expected q_start and q_lens [{S}] and tiles [2, N]; got "
                         f"{tuple(q_start.shape)}, {tuple(q_lens.shape)}, {tuple(tiles.shape)}")


def triton_paged_attention_varlen(q, k_cache, v_cache, block_table, kv_lens, q_start, q_lens, tiles, scale=None,
                                  softcap=0.0, window=0, sinks=None, *, _block_m=None, _block_n=None,
                                  _split=None):
    """One launch for ragged rows: row b's queries are ``q[q_start[b] : q_start[b] + q_lens[b]]``
    (the last q_lens[b] of its kv_lens[b] tokens); ``tiles`` from ``varlen_tiles``. Tokens of no
    row get zeros. Grid (Hkv, tiles): no host sync, so a CUDA graph can hold it."""
    _validate_paged(q.transpose(0, 1)[None], k_cache, v_cache, block_table[:1], kv_lens[:1], scale, softcap,
                    window, sinks)
    _validate_varlen(q, k_cache, block_table, kv_lens, q_start, q_lens, tiles)
    if q.dtype not in _common.GPU_DTYPES:
        raise UnsupportedError(f"detcompile.{VARLEN_OP}: dtype {q.dtype} is not supported by the Triton kernel")
    T, Hq, D = q.shape
    page, Hkv, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    out = torch.zeros((T, Hq, Dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0 or tiles.shape[1] == 0:
        return out
    scale = _default_scale(D) if scale is None else scale
    G = Hq // Hkv
    bm, bn, num_warps, num_stages = _tiles(D, Dv, q.dtype, 1)
    bm, bn = _block_m or bm, _block_n or bn
    block_d, block_dv = _pow2_at_least_16(D), _pow2_at_least_16(Dv)
    ks, vs = k_cache.stride(), v_cache.stride()
    if ks[0] != page * ks[1] or vs[0] != page * vs[1]:
        raise ValueError(f"detcompile.{VARLEN_OP}: pages of the cache must be contiguous slots")
    sinks_arg = out if sinks is None else sinks.float().contiguous()
    sq, so = q.stride(), out.stride()
    _attention_kernel[(Hkv, tiles.shape[1])](
        q, k_cache, v_cache, out, out, out,
        block_table, kv_lens, out, out,
        q_start, q_lens, tiles[0], tiles[1],
        0, sq[1], sq[0], sq[2],
        0, ks[2], ks[1], ks[3],
        0, vs[2], vs[1], vs[3],
        0, 0, 0, 0,
        0, 0, 0,
        0, so[1], so[0], so[2],
        block_table.stride(0), page,
        Hkv, 0, block_table.shape[1] * page, D, Dv, G, 1,
        float(scale), float(softcap), 0.0, int(window), sinks_arg,
        IS_CAUSAL=True, MASK_KIND=0, HAS_ORIGIN=False, HAS_SOFTCAP=softcap > 0, PAGED=True,
        PARALLEL_SPLITS=False, HAS_WINDOW=window > 0, HAS_SINKS=sinks is not None, VARLEN=True,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_DV=block_dv,
        DOT_PREC=_common.dot_precision(q.dtype), SPLIT_KEYS=_split or SPLIT,
        num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False,
    )
    return out


def cpu_paged_attention_varlen(q, k_cache, v_cache, block_table, kv_lens, q_start, q_lens, tiles, scale=None,
                               softcap=0.0, window=0, sinks=None):
    """CPU path: each row on its own through ``cpu_paged_attention`` (no graphs on the CPU)."""
    _validate_varlen(q, k_cache, block_table, kv_lens, q_start, q_lens, tiles)
    out = q.new_zeros((q.shape[0], q.shape[1], v_cache.shape[3]))
    for b, (s, n) in enumerate(zip(q_start.tolist(), q_lens.tolist())):
        if n:
            o = cpu_paged_attention(q[s:s + n].transpose(0, 1)[None], k_cache, v_cache, block_table[b:b + 1],
                                    kv_lens[b:b + 1], scale, softcap, window, sinks)
            out[s:s + n] = o[0].transpose(0, 1)
    return out


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


@torch.library.custom_op(f"{_common.NAMESPACE}::{PAGED_OP}", mutates_args=())
def paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    kv_lens: Tensor,
    scale: float | None = None,
    softcap: float = 0.0,
    window: int = 0,
    sinks: Tensor | None = None,
) -> Tensor:
    """Causal attention of q [B, Hq, Lq, D] (the last Lq positions of each row) over a paged KV
    cache [num_pages, page_size, Hkv, D]; ``block_table[b, j]`` is the page of row b's tokens
    j*page_size ..., ``kv_lens[b]`` the row's token count (int32). Same kernel and tiles as
    ``attention``, so a decoded token gets the bits that its row had in the full prefill.
    ``window`` > 0: query p sees keys p - window < k <= p (a sliding window; tiles wholly outside
    it are skipped, an exact identity). ``sinks`` [Hq]: a per-head logit that joins the softmax
    denominator only (gpt-oss), folded after every key."""
    _common.check_inputs(PAGED_OP, q, k_cache, v_cache)
    raise UnsupportedError(f"detcompile.{PAGED_OP}: device {q.device.type!r} is not supported (only cpu and cuda)")


@paged_attention.register_fake
def _(q, k_cache, v_cache, block_table, kv_lens, scale=None, softcap=0.0, window=0, sinks=None):
    return q.new_empty((*q.shape[:-1], v_cache.shape[-1]))


@paged_attention.register_kernel("cpu")
def _(q, k_cache, v_cache, block_table, kv_lens, scale=None, softcap=0.0, window=0, sinks=None):
    return cpu_paged_attention(q, k_cache, v_cache, block_table, kv_lens, scale, softcap, window, sinks)


@paged_attention.register_kernel("cuda")
def _(q, k_cache, v_cache, block_table, kv_lens, scale=None, softcap=0.0, window=0, sinks=None):
    if not HAS_TRITON:
        raise UnsupportedError(f"detcompile.{PAGED_OP}: the CUDA path needs Triton")
    return triton_paged_attention(q, k_cache, v_cache, block_table, kv_lens, scale, softcap, window, sinks)


@torch.library.custom_op(f"{_common.NAMESPACE}::{VARLEN_OP}", mutates_args=())
def paged_attention_varlen(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    kv_lens: Tensor,
    q_start: Tensor,
    q_lens: Tensor,
    tiles: Tensor,
    scale: float | None = None,
    softcap: float = 0.0,
    window: int = 0,
    sinks: Tensor | None = None,
) -> Tensor:
    """``paged_attention`` of ragged rows in one call: q [T, Hq, D] holds row b's queries at
    ``q_start[b] .. + q_lens[b]`` (its last positions, as in ``paged_attention``); returns
    [T, Hq, Dv], zeros for tokens of no row. ``tiles`` [2, N] (``varlen_tiles``) lists the
    programs, so the launch needs no host sync (CUDA graphs of mixed prefill/decode steps). Same
    kernel, tiles and bits as ``paged_attention``."""
    _common.check_inputs(VARLEN_OP, q, k_cache, v_cache)
    raise UnsupportedError(f"detcompile.{VARLEN_OP}: device {q.device.type!r} is not supported (only cpu and cuda)")


@paged_attention_varlen.register_fake
def _(q, k_cache, v_cache, block_table, kv_lens, q_start, q_lens, tiles, scale=None, softcap=0.0, window=0,
      sinks=None):
    return q.new_empty((q.shape[0], q.shape[1], v_cache.shape[-1]))


@paged_attention_varlen.register_kernel("cpu")
def _(q, k_cache, v_cache, block_table, kv_lens, q_start, q_lens, tiles, scale=None, softcap=0.0, window=0,
      sinks=None):
    return cpu_paged_attention_varlen(q, k_cache, v_cache, block_table, kv_lens, q_start, q_lens, tiles, scale,
                                      softcap, window, sinks)


@paged_attention_varlen.register_kernel("cuda")
def _(q, k_cache, v_cache, block_table, kv_lens, q_start, q_lens, tiles, scale=None, softcap=0.0, window=0,
      sinks=None):
    if not HAS_TRITON:
        raise UnsupportedError(f"detcompile.{VARLEN_OP}: the CUDA path needs Triton")
    return triton_paged_attention_varlen(q, k_cache, v_cache, block_table, kv_lens, q_start, q_lens, tiles, scale,
                                         softcap, window, sinks)


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
