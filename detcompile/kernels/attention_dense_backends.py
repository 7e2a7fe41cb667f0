"""The compile backend's attention through FA3 or FlashInfer:
``torch.compile(model, backend="deterministic", options={"attention_backend": "fa3" | "flashinfer"})``.

The SDPA rewrite (``passes/sdpa.py``) then calls ``detcompile.attention(..., backend=name)``, and the
CUDA kernel comes here instead of ``attention_triton``. Both libraries take a paged, ragged layout
(the engine's, ``attention_fa3`` / ``attention_flashinfer``), so a dense call is turned into one:

1. The mask (or ``is_causal``) gives each query row its visible keys, which must be one contiguous
   range [lo, hi] (or none: the row returns zeros, as ``detcompile.attention`` defines). A mask that
   shows a row keys with a gap, differs between heads, or adds a bias other than 0 is refused
   (``UnsupportedError``): these kernels cannot apply it, and other math is never returned silently.
2. Consecutive rows of one batch row with the same ``lo`` and ``hi`` growing by one are a *causal
   run*: one ragged sequence whose keys are ``k[b, lo:hi_last + 1]`` and whose queries are its last
   keys (bottom-right causal, as both libraries align it). Causal prefill is one run per batch row;
   left padding moves ``lo``; a decode step (one query) is a run of one; right padding's pad rows and
   non-causal rows are runs of one.
3. Each distinct (batch row, lo) gets pages holding its keys from ``lo`` on (page 0 stays a spare,
   as in the engine), and every run reads them through its block table.

So a token's keys always start at its own ``lo`` (the start of its sequence, whatever padding or
neighbours the call has) and the library reduces them with the engine's pins (``attention_fa3``,
``attention_flashinfer``): the same bits alone, in a padded batch, prefilled or decoded one token at
a time with a KV cache. The bits differ from the Triton kernel's (another reduction order). The price:
a host sync per call (the mask is read on the host) and a copy of K/V into pages.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor

from ._common import UnsupportedError
from .attention_inputs import OP, _default_scale, _visible

#: FA3's max_seqlen_q, one constant for every call (attention_fa3's module doc: a per-call value
#: could switch its kernel); also the longest run a call may have.
FA3_MAX_SEQLEN_Q = 1 << 17

_BACKENDS: dict = {}


def check_installed(name: str) -> None:
    """Raise ``BackendNotInstalledError`` (an ImportError) now if the package of ``name`` is missing."""
    if name == "fa3":
        from .attention_fa3 import _import_fa3

        _import_fa3()
    elif name == "flashinfer":
        from .attention_flashinfer import _import_flashinfer

        _import_flashinfer()
    else:
        raise ValueError(f"detcompile: unknown attention_backend {name!r}; expected 'triton', 'fa3' or 'flashinfer'")


# ----------------------------------------------------------------------------------------------
# Mask -> causal runs -> paged layout (host side, integer-only).
# ----------------------------------------------------------------------------------------------


def visible_keys(q_shape, k_len: int, attn_mask: Tensor | None, is_causal: bool) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) int64 [B, Lq]: each row's visible key range, hi = lo - 1 for a row that sees none.
    ``attn_mask`` is 4-D (broadcastable to [B, H, Lq, Lk]); refused when a row's keys have a gap, the
    heads' masks differ, or a float mask adds anything but 0 to a visible key."""
    B, _, Lq, _ = q_shape
    if attn_mask is None:
        rows = torch.arange(Lq, dtype=torch.int64)
        hi = rows if is_causal else torch.full((Lq,), k_len - 1, dtype=torch.int64)  # torch: top-left causal
        hi = hi.clamp(max=k_len - 1)
        return np.zeros((B, Lq), np.int64), np.broadcast_to(hi.numpy(), (B, Lq)).copy()
    vis = _visible(attn_mask)
    if vis.shape[1] > 1 and not torch.equal(vis, vis[:, :1].expand_as(vis)):
        raise UnsupportedError(f"detcompile.{OP}: the fa3/flashinfer attention backends take one mask for all "
                               "heads; this mask differs between heads (use attention_backend='triton')")
    if attn_mask.dtype != torch.bool and bool(attn_mask.masked_fill(~vis, 0).ne(0).any()):
        raise UnsupportedError(f"detcompile.{OP}: the fa3/flashinfer attention backends cannot add a float mask's "
                               "bias (e.g. ALiBi) to the scores; only 0 / -inf masks (use attention_backend='triton')")
    vis = vis[:, 0].expand(B, Lq, k_len)
    first = vis.to(torch.uint8).argmax(-1)
    last = k_len - 1 - vis.flip(-1).to(torch.uint8).argmax(-1)
    lo, hi, count = torch.stack([first, last, vis.sum(-1)]).cpu().numpy().astype(np.int64)  # one transfer
    seen = count > 0
    if (count[seen] != hi[seen] - lo[seen] + 1).any():
        raise UnsupportedError(f"detcompile.{OP}: the fa3/flashinfer attention backends need each query's visible "
                               "keys to be one contiguous range; this mask shows a query keys with a gap "
                               "(use attention_backend='triton')")
    hi[~seen] = lo[~seen] - 1
    return lo, hi


def causal_runs(lo: np.ndarray, hi: np.ndarray) -> dict:
    """Group rows into causal runs. Returns int64 arrays: per run ``b``, ``lo``, ``q0`` (first row),
    ``n`` (rows), ``kv`` (keys: hi of its last row - lo + 1); rows that see no key are in no run."""
    B, Lq = lo.shape
    seen = hi >= lo
    cont = np.zeros_like(seen)
    cont[:, 1:] = seen[:, 1:] & seen[:, :-1] & (lo[:, 1:] == lo[:, :-1]) & (hi[:, 1:] == hi[:, :-1] + 1)
    start = seen & ~cont
    bs, q0 = np.nonzero(start)  # row-major: runs in (b, row) order
    run_of = np.cumsum(start.ravel()) - 1  # run index of every row (valid where seen)
    n = np.bincount(run_of[seen.ravel()], minlength=bs.shape[0]).astype(np.int64)
    last = q0 + n - 1
    return {"b": bs.astype(np.int64), "lo": lo[bs, q0], "q0": q0.astype(np.int64), "n": n,
            "kv": hi[bs, last] - lo[bs, q0] + 1}


def paged_layout(runs: dict, page: int) -> dict:
    """Pages for the runs' keys: one page list per distinct (b, lo), page 0 a spare. Returns the key
    gather (``src_b``, ``src_pos`` -> cache slot ``slot``), ``num_pages``, and per run its ``table``
    row [runs, W] int32 and ``kv_lens``; ``cu_seqlens_q`` of the packed queries."""
    b, lo, kv = runs["b"], runs["lo"], runs["kv"]
    keys = b * (1 << 32) + lo
    uniq, group = np.unique(keys, return_inverse=True)
    need = np.zeros(uniq.shape[0], np.int64)
    np.maximum.at(need, group, kv)  # a group's pages hold its longest run's keys
    g_b, g_lo = uniq >> 32, uniq & ((1 << 32) - 1)
    g_pages = -(-need // page)
    g_first = 1 + np.concatenate(([0], np.cumsum(g_pages)[:-1])) if len(need) else np.zeros(0, np.int64)
    num_pages = 1 + int(g_pages.sum())
    # Key gather: group g's key j (position g_lo + j of batch row g_b) -> slot g_first * page + j.
    tok_group = np.repeat(np.arange(len(need)), need)
    j = np.arange(tok_group.shape[0]) - np.repeat(np.cumsum(need) - need, need)
    width = int(g_pages.max()) if len(need) else 1
    table = np.zeros((b.shape[0], width), np.int64)
    run_pages = -(-kv // page)
    cols = np.arange(width)
    table[:] = np.where(cols[None, :] < run_pages[:, None], g_first[group][:, None] + cols[None, :], 0)
    cu = np.zeros(b.shape[0] + 1, np.int64)
    cu[1:] = np.cumsum(runs["n"])
    return {"src_b": g_b[tok_group], "src_pos": g_lo[tok_group] + j, "slot": g_first[tok_group] * page + j,
            "num_pages": num_pages, "groups": int(uniq.shape[0]), "table": table, "kv_lens": kv, "cu_seqlens_q": cu}


# ----------------------------------------------------------------------------------------------
# The call.
# ----------------------------------------------------------------------------------------------


def _backend(name: str, q: Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """(backend object, page size), one per (backend, device, dtype, heads, head dim) of the process:
    the engine's backend objects with the engine's page size (FA3: one key tile per page)."""
    key = (name, q.device, q.dtype, num_heads, num_kv_heads, head_dim)
    if key not in _BACKENDS:
        from ..engine import attention_backends

        page = attention_backends.default_block_size(name, head_dim)
        _BACKENDS[key] = attention_backends.create(
            name, device=q.device, dtype=q.dtype, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            block_size=page, max_model_len=FA3_MAX_SEQLEN_Q, max_pages=1), page
    return _BACKENDS[key]


def dense_attention(name: str, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
                    scale: float | None, softcap: float, backend=None) -> Tensor:
    """``detcompile.attention`` on 4-D validated inputs (``attention_inputs._validate``) through the
    backend ``name``; returns [B, Hq, Lq, D]. ``backend``: (object with the engine backends'
    ``extra_inputs`` / ``plan`` / ``attend``, page size); None: the library's (tests pass others)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if Dv != D:
        raise UnsupportedError(f"detcompile.{OP}: attention_backend={name!r} needs the value head dim to equal the "
                               f"query's; got {D} and {Dv}")
    backend, page = backend if backend is not None else _backend(name, q, Hq, Hkv, D)
    out = q.new_zeros((B, Lq, Hq, D))
    if B == 0 or Lq == 0 or Lk == 0:
        return out.transpose(1, 2)
    lo, hi = visible_keys(q.shape, Lk, attn_mask, is_causal)
    runs = causal_runs(lo, hi)
    if runs["b"].shape[0] == 0:
        return out.transpose(1, 2)
    if int(runs["n"].max()) > FA3_MAX_SEQLEN_Q:
        raise UnsupportedError(f"detcompile.{OP}: attention_backend={name!r} takes at most {FA3_MAX_SEQLEN_Q} "
                               f"queries per sequence; got {int(runs['n'].max())}")
    lay = paged_layout(runs, page)
    if lay["num_pages"] * page > 2 * B * Lk + page * (lay["groups"] + 1):
        # Each row's own key start (a sliding window, say) would copy the keys once per row.
        raise UnsupportedError(f"detcompile.{OP}: attention_backend={name!r}: this mask gives {lay['groups']} "
                               f"different key starts for {B} sequences (a sliding window?), which would copy the "
                               f"keys {lay['num_pages'] * page // max(1, B * Lk)} times; use attention_backend='triton'")
    dev = q.device
    as_dev = lambda a, dt=torch.int64: torch.from_numpy(np.ascontiguousarray(a)).to(device=dev, dtype=dt)  # noqa: E731
    src_b, src_pos, slot = as_dev(lay["src_b"]), as_dev(lay["src_pos"]), as_dev(lay["slot"])
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # [B, Lk, Hkv, D]
    k_cache = k.new_zeros((lay["num_pages"] * page, Hkv, D))
    v_cache = v.new_zeros((lay["num_pages"] * page, Hkv, Dv))
    k_cache[slot] = kt[src_b, src_pos]
    v_cache[slot] = vt[src_b, src_pos]
    k_cache = k_cache.view(lay["num_pages"], page, Hkv, D)
    v_cache = v_cache.view(lay["num_pages"], page, Hkv, Dv)
    # Packed queries: run r's rows q0 .. q0 + n - 1 of batch row b.
    n = runs["n"]
    row_b = np.repeat(runs["b"], n)
    row_i = np.repeat(runs["q0"], n) + np.arange(int(n.sum())) - np.repeat(lay["cu_seqlens_q"][:-1], n)
    rb, ri = as_dev(row_b), as_dev(row_i)
    qp = q.transpose(1, 2)[rb, ri].contiguous()  # [T, Hq, D]
    host = {"table": torch.from_numpy(lay["table"].astype(np.int32)),
            "lens": torch.from_numpy(lay["kv_lens"].astype(np.int32)),
            "q_start": torch.from_numpy(lay["cu_seqlens_q"][:-1].astype(np.int32)),
            "q_lens": torch.from_numpy(n.astype(np.int32)),
            "ids": torch.empty(qp.shape[0], dtype=torch.int64)}
    ctx = SimpleNamespace(kv_lens=host["lens"].to(dev), block_table=host["table"].to(dev),
                          extra={k_: t.to(dev) for k_, t in backend.extra_inputs(host, True).items()},
                          plan=backend.plan(host, True, None))
    res = backend.attend(qp, k_cache, v_cache, ctx, float(scale if scale is not None else _default_scale(D)),
                         float(softcap), 0, None)
    out[rb, ri] = res.to(out.dtype)
    return out.transpose(1, 2)
