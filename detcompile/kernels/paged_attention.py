"""Attention over a paged KV cache (serving: decode, chunked prefill, mixed steps):
``torch.ops.detcompile.paged_attention`` (rows of equal query count, q [B, Hq, Lq, D]) and
``torch.ops.detcompile.paged_attention_varlen`` (ragged rows in one launch, q [T, Hq, D]), their
Triton entry points and the host-side tile list of the ragged launch (``varlen_tiles``).

Why a decoded token gets the bits its row had in the full prefill
-----------------------------------------------------------------
Both ops run the kernel of ``attention_triton`` with its fixed tiles and split order; only the
addresses differ (K/V rows are read through the block table), and the queries are the last Lq
positions of the row (bottom-right causal), so a row's keys are visited in the same tiles, splits
and order as in ``attention`` on the whole sequence. The ragged launch uses the decode launch's
tile (``varlen_block_m``; its layout gives the same bits as the prefill tile, see
``attention_triton.tile_config``) and its programs come from a host-side list (``varlen_tiles``),
each program holding rows of one sequence only, so no host sync is needed (CUDA graphs) and a row's
bits are those of ``paged_attention``. The CPU entry points live in ``attention_cpu``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _common, _pdl
from ._common import HAS_TRITON, UnsupportedError
from .attention_cpu import cpu_paged_attention, cpu_paged_attention_varlen
from .attention_inputs import PAGED_OP, VARLEN_OP, _default_scale, _validate_paged, _validate_varlen
from .attention_triton import SPLIT, _launch, _pow2_at_least_16, _tiles

if HAS_TRITON:
    from .attention_triton import _attention_kernel


# ----------------------------------------------------------------------------------------------
# Triton entry points.
# ----------------------------------------------------------------------------------------------


def _slot_strides(op: str, k_cache: Tensor, v_cache: Tensor) -> tuple:
    """The caches' strides. Paged addressing: the kernel's "row" stride is the stride of one token
    (page slot); a page's base is page * page_size * row stride, which needs slots of one page to be
    evenly spaced by that stride (true for [num_pages, page_size, Hkv, D] caches with contiguous pages)."""
    page = k_cache.shape[1]
    ks, vs = k_cache.stride(), v_cache.stride()
    if ks[0] != page * ks[1] or vs[0] != page * vs[1]:
        raise ValueError(f"detcompile.{op}: pages of the cache must be contiguous slots (stride(0) == page_size * stride(1))")
    return ks, vs


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
    ks, vs = _slot_strides(PAGED_OP, k_cache, v_cache)
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


#: Rows the ragged launch's tile is chosen for: its 64-row tile, the same whatever the step holds.
_VARLEN_ROWS = 64


def varlen_block_m(head_dim: int, head_dim_v: int, dtype: torch.dtype) -> int:
    """Query rows (GQA group x queries) per program of the ragged paged launch. The host lays the
    tiles out with it (``varlen_tiles``): the 64-row tile (same bits as prefill's and decode's),
    whatever the step holds, so the host's tile list never depends on the kernel's choice."""
    return _tiles(head_dim, head_dim_v, dtype, _VARLEN_ROWS)[0]


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


def triton_paged_attention_varlen(q, k_cache, v_cache, block_table, kv_lens, q_start, q_lens, tiles, scale=None,
                                  softcap=0.0, window=0, sinks=None, *, _block_m=None, _block_n=None,
                                  _split=None):
    """One launch for ragged rows: row b's queries are ``q[q_start[b] : q_start[b] + q_lens[b]]``
    (the last q_lens[b] of its kv_lens[b] tokens); ``tiles`` from ``varlen_tiles``. Tokens of no
    row get zeros. Grid (Hkv, tiles): no host sync, so a CUDA graph can hold it."""
    _validate_varlen(q, k_cache, v_cache, block_table, kv_lens, q_start, q_lens, tiles, scale, softcap, window, sinks)
    if q.dtype not in _common.GPU_DTYPES:
        raise UnsupportedError(f"detcompile.{VARLEN_OP}: dtype {q.dtype} is not supported by the Triton kernel")
    T, Hq, D = q.shape
    page, Hkv, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    out = torch.zeros((T, Hq, Dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0 or tiles.shape[1] == 0:
        return out
    scale = _default_scale(D) if scale is None else scale
    G = Hq // Hkv
    bm, bn, num_warps, num_stages = _tiles(D, Dv, q.dtype, _VARLEN_ROWS)
    bm, bn = _block_m or bm, _block_n or bn
    block_d, block_dv = _pow2_at_least_16(D), _pow2_at_least_16(Dv)
    ks, vs = _slot_strides(VARLEN_OP, k_cache, v_cache)
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
        num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False, **_pdl.launch_kwargs(_pdl.enabled(q)),
    )
    return out


# ----------------------------------------------------------------------------------------------
# Op registration.
# ----------------------------------------------------------------------------------------------


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
