"""The Triton attention kernel (shared by ``attention``, ``paged_attention`` and
``paged_attention_varlen``), its fixed tile config, its launcher and the SDPA-style entry point
``triton_attention`` (CUDA, or CPU tensors under TRITON_INTERPRET=1).

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
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _common, _pdl
from ._common import HAS_TRITON, UnsupportedError, tl, triton
from .attention_inputs import OP, _LOG2E, _default_scale, _validate, segment_origins

_INT32_MAX = 2147483647
#: Largest supported (padded) head dim: larger tiles would not fit in registers/shared memory.
MAX_HEAD_DIM = 256


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
    (tests/kernels/test_paged_attention.py checks decode against prefill on the GPU). A 16-row
    one-warp tile for decode (less padding of a 4-row GQA group) ran 2x slower on the H200
    (2026-12-03: 33 vs 14 us at batch 1, 245 vs 117 us at batch 256): one warp cannot keep
    enough K/V loads in flight. A 32-row two-warp tile (split schedule) was faster at batch 32 x 2048
    keys (92 vs 110 us) but gave other bits than this one there (2026-12-03,
    benchmarks/decode_split_schedule.py --tiles): the decode tile stays 64 rows over 4 warps."""
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
    from ._pdl import start as pdl_start

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
    def _kv_rows(offs_n, col_ok, BT, bt_row, PAGE, PAGED: tl.constexpr):
        """int64 cache rows (slots) of keys ``offs_n``: contiguous (n) or through the page table (one
        read serves the K and the V tile)."""
        if PAGED:
            page = tl.load(BT + bt_row + offs_n // PAGE, mask=col_ok, other=0).to(tl.int64)
            return page * PAGE + offs_n % PAGE
        return offs_n.to(tl.int64)

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
        PDL: tl.constexpr = False,
    ):
        """Rows of a program: the GROUP query heads sharing KV head ``hk`` times the Lq queries,
        row r = query (r // GROUP), head hk * GROUP + r % GROUP, so one K/V tile load serves the
        whole group. Each row's arithmetic is its own: which rows share a program never matters."""
        pdl_start(PDL)
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
                # A row with one split of keys at most is finished by its split-0 program, with the
                # loop path's code (fold into the fresh state, finalize, store): the merge kernel
                # skips it. Same bits as the merge (the same _fold from the same state), one
                # workspace round trip less for every short row.
                direct = (kv_len <= SPLIT_KEYS) & (split_lo == 0)
            else:
                split_lo = 0
                split_hi = (n_tiles + TILES_PER_SPLIT - 1) // TILES_PER_SPLIT
                direct = kv_len >= 0  # always: the loop path stores every row itself
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
                    kv_row = _kv_rows(offs_n, col_ok, BT, bt_row, PAGE, PAGED)
                    k = tl.load(k_base + (kv_row * skn)[None, :] + offs_d[:, None] * skd, mask=offs_d[:, None] < D,
                                other=0.0)
                    s = _scores(q, k, scale, softcap, HAS_SOFTCAP, DOT_PREC) * _LOG2E_C
                    vv = tl.load(v_base + (kv_row * svn)[:, None] + offs_dv[None, :] * svd, mask=offs_dv[None, :] < Dv,
                                 other=0.0)
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
                        kv_row = _kv_rows(offs_n, col_ok, BT, bt_row, PAGE, PAGED)
                        k = tl.load(
                            k_base + (kv_row * skn)[None, :] + offs_d[:, None] * skd,
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
                        vv = tl.load(
                            v_base + (kv_row * svn)[:, None] + offs_dv[None, :] * svd,
                            mask=col_ok[:, None] & (offs_dv[None, :] < Dv),
                            other=0.0,
                        )
                        m_i, l_i, acc = _online_step(s, vv, m_i, l_i, acc, DOT_PREC)
                if PARALLEL_SPLITS:
                    # Hand the split's state to the merge kernel (which folds like _fold below).
                    # Splits past the row's keys hold nothing and the merge never reads them
                    # (a CUDA graph's grid covers the whole block table, a short row few splits).
                    ws_row = ((b * Hkv + hk) * n_rows + rows.to(tl.int64)) * NUM_SPLITS + sp
                    n_live = (kv_len + SPLIT_KEYS - 1) // SPLIT_KEYS
                    live = tl.zeros_like(rows) + n_live  # a vector: the interpreter's scalars are plain ints
                    st_ok = row_ok & (live > sp) & (live > 1)
                    tl.store(WsML + ws_row * 2, m_i, mask=st_ok)
                    tl.store(WsML + ws_row * 2 + 1, l_i, mask=st_ok)
                    tl.store(WsAcc + ws_row[:, None] * BLOCK_DV + offs_dv[None, :], acc, mask=st_ok[:, None])
                    if direct:
                        M, L, ACC = _fold(M, L, ACC, m_i, l_i, acc)
                else:
                    M, L, ACC = _fold(M, L, ACC, m_i, l_i, acc)
            if direct:
                if HAS_SINKS:
                    L, ACC = _fold_sink(M, L, ACC, tl.load(Sinks + h, mask=row_ok, other=0.0).to(tl.float32))
                res = _finalize(L, ACC)
                tl.store(
                    Out + b * sob + h[:, None] * soh + (q_row0 + qi)[:, None] * som + offs_dv[None, :] * sod,
                    res.to(Out.dtype.element_ty),
                    mask=(in_pass & row_ok)[:, None] & (offs_dv[None, :] < Dv),
                )
            o = tl.min(tl.where(org > o, org, _INT32_MAX_C), axis=0)

    @triton.jit(do_not_specialize=["Lq", "Lk", "NUM_SPLITS"])
    def _merge_splits_kernel(
        WsAcc, WsML, Out, KVLens,
        sob, soh, som, sod,
        Hkv, Lq, Lk, Dv, GROUP, NUM_SPLITS, Sinks,
        PAGED: tl.constexpr,
        HAS_SINKS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        SPLIT_KEYS: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """Fold the split states of each row in ascending split order (the same _fold as the
        one-program path), then normalise: the result has the bits of the one-program path.
        Only the splits that can hold keys of the row are read: the others hold no key (l = 0),
        and folding such a state is an exact no-op, so stopping early changes no bit (and saves
        a chain of dependent loads per split, which dominated short-context decode)."""
        pdl_start(PDL)
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        b = (pid_bh // Hkv).to(tl.int64)
        hk = (pid_bh % Hkv).to(tl.int64)
        if PAGED:
            kv_len = tl.load(KVLens + b)
        else:
            kv_len = Lk
        n_live = tl.minimum((kv_len + SPLIT_KEYS - 1) // SPLIT_KEYS, NUM_SPLITS)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        # A row of one split at most was finished by its split-0 program (the attention kernel).
        merges = (tl.zeros_like(rows) + n_live) > 1  # a vector: the interpreter's scalars are plain ints
        n_live = tl.where(n_live > 1, n_live, 0)
        n_rows = GROUP * Lq
        row_ok = rows < n_rows
        qi = rows // GROUP
        h = hk * GROUP + (rows % GROUP).to(tl.int64)
        offs_dv = tl.arange(0, BLOCK_DV)
        M = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        L = tl.zeros([BLOCK_M], dtype=tl.float32)
        ACC = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for sp in range(0, n_live):
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
            mask=(row_ok & merges)[:, None] & (offs_dv[None, :] < Dv),
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
    pdl = _pdl.enabled(q4)
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
        **_pdl.launch_kwargs(pdl),
        # No mul+add contraction into FMAs: each op rounds on its own, so the kernel variants
        # (mask kinds, softcap, causal, paged, split merge) give the same bits for the same scores.
        enable_fp_fusion=False,
    )
    if parallel_splits:
        _merge_splits_kernel[(B * Hkv, row_blocks)](
            ws_acc, ws_ml, out, kvl,
            *out.stride(),
            Hkv, Lq, Lk, Dv, G, num_splits, sinks if sinks is not None else out,
            PAGED=paged,
            HAS_SINKS=sinks is not None,
            BLOCK_M=bm,
            BLOCK_DV=block_dv,
            SPLIT_KEYS=split,
            num_warps=4,
            enable_fp_fusion=False,
            **_pdl.launch_kwargs(pdl),
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
