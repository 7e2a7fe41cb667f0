"""CPU building blocks of the kernels: one fixed-shape GEMM tile and fixed-order sums.

Why they are batch-invariant
----------------------------
* ``tile_matmul``: every BLAS call has the same shape, ``[TILE_M, TILE_K] @ [TILE_K, TILE_N]``
  (batched over the M tiles by ``torch.bmm``), on freshly packed contiguous, zero-padded operands. M, N and K are
  cut into tiles, so no call's shape, strides or alignment depend on M, N, K or the batch. K is
  reduced tile by tile in ascending order, each tile's product added to the accumulator with an
  exactly rounded elementwise add. Trailing zeros along K (padding) therefore change nothing: the
  last real tile sees the same zero padding, and whole zero tiles add exact zeros.
  What BLAS does inside one call is its own business; what we need is that an element's bits do not
  depend on its row/column slot in the tile, on its matrix's slot in the batch, on the batch count
  or on the thread count. That is measured (tests/kernels/test_cpu_tiles.py, MKL on x86: threads
  1..16, batch counts 1..64; MKL does split K across threads at K >= 1024, which is why TILE_K is
  128) and re-checked once per dtype in every process by ``tiles_invariant`` before the tiles are
  used; where it fails (another BLAS, another CPU) the exact but slow sequential matmul runs
  instead, with a warning.
* ``tree_sum``: the last dim zero-padded to a power of two, then halves added elementwise
  (``x[:h] + x[h:]``) until one is left: a fixed pairwise tree of exactly rounded adds, a function
  of the row length only. Zero padding at the end is free: while the padded length is above the
  real one, the upper half is all zeros and the fold copies the lower half bit for bit.
* ``chunk_sum``: ``tree_sum`` inside fixed chunks of the last dim, chunks added in ascending order.
  Whole zero chunks before or after the real terms change nothing (attention aligns its key chunks
  at a row's origin this way).
* ``normalize``: layer / group norm from two ``tree_sum`` passes (mean, then biased variance) and
  elementwise ops.
* ``seq_sum`` / ``seq_matmul``: sequential loops of elementwise ops (slow; fallbacks and tests).
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ._common import acc_dtype

#: The GEMM tile. TILE_K <= 512 keeps MKL from splitting K across threads (measured: from 1024 on,
#: the bits changed with the thread count). 64 x 128 x 128 measured within ~1.4x of one stock GEMM
#: on Llama-tiny shapes (benchmarks/cpu_forward.py).
TILE_M = 64
TILE_K = 128
TILE_N = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------
# Fixed-tile GEMM
# ----------------------------------------------------------------------------------------------

_VERIFIED: dict = {}


def _probe_tiles(dt: torch.dtype, tm: int, tk: int, tn: int) -> bool:
    """Four probe rows times four probe columns, placed at different tile slots, batch slots and
    batch counts among random neighbours, B tiles stored and passed as ``tile_matmul`` does
    ([tk, tn] contiguous; also one tile broadcast over the batch with stride 0): the 4 x 4
    products must have the same bits every time."""
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(4, tk, generator=g).to(dt)
    ys = torch.randn(tk, 4, generator=g).to(dt)

    def slots(n, *picks):  # 4 distinct slots < n: the picks (mod n), then the lowest free ones
        out = list(dict.fromkeys(i % n for i in picks))
        out += [i for i in range(n) if i not in out]
        return out[:4]

    trials = [  # (batch count, batch slot, rows, columns, one B tile for the whole batch)
        (1, 0, slots(tm, 0, 1, 2, 3), slots(tn, 0, 1, 2, 3), False),
        (3, 2, slots(tm, -1, -2, tm // 2, 5), slots(tn, -1, -2, tn // 2 + 1, 7), False),
        (6, 1, slots(tm, 17, -9, 33, 8), slots(tn, -17, 3, 64, -5), False),
        (2, 0, slots(tm, -3, 4, 1, -17), slots(tn, 9, -1, 30, 1), False),
        (5, 3, slots(tm, 9, -5, 2, 40), slots(tn, 2, -9, 5, 41), True),
    ]
    ref = None
    for count, slot, rows, cols, shared in trials:
        a = torch.randn(count, tm, tk, generator=g).to(dt)
        b = torch.randn(1 if shared else count, tk, tn, generator=g).to(dt)
        a[slot, rows] = xs
        b[0 if shared else slot][:, cols] = ys
        if shared:
            b = b.expand(count, tk, tn)
        got = torch.bmm(a, b)[slot][rows][:, cols]
        if ref is None:
            ref = got
        elif not torch.equal(got, ref):
            return False
    return True


def tiles_invariant(dt: torch.dtype, tile: tuple[int, int, int] = (TILE_M, TILE_K, TILE_N)) -> bool:
    """Whether this process's BLAS gives each element of a ``tile``-shaped GEMM the same bits
    wherever it sits (checked once per dtype, tile and float32 matmul precision)."""
    key = (dt, tuple(tile), torch.get_float32_matmul_precision())
    if key not in _VERIFIED:
        ok = _probe_tiles(dt, *tile)
        if not ok:
            warnings.warn(
                f"detcompile: this CPU's BLAS gives {dt} GEMM tiles {tuple(tile)} position-dependent "
                "bits; the CPU matmul falls back to a slow sequential loop (still batch-invariant)",
                RuntimeWarning,
                stacklevel=3,
            )
        _VERIFIED[key] = ok
    return _VERIFIED[key]


def _pack(t: Tensor, tr: int, tc: int, dt: torch.dtype) -> Tensor:
    """[G, R, C] -> zero-padded tiles [C/tc, G, R/tr, tr, tc] in a fresh (so always equally aligned)
    contiguous buffer, column tile outermost."""
    g, rows, cols = t.shape
    nr, nc = _cdiv(rows, tr), _cdiv(cols, tc)
    if rows != nr * tr or cols != nc * tc:
        t = torch.nn.functional.pad(t, (0, nc * tc - cols, 0, nr * tr - rows))
    out = torch.empty((nc, g, nr, tr, tc), dtype=dt, device=t.device)
    out.copy_(t.reshape(g, nr, tr, nc, tc).permute(3, 0, 1, 2, 4))
    return out


def tile_matmul(a: Tensor, b: Tensor, tile: tuple[int, int, int] = (TILE_M, TILE_K, TILE_N)) -> Tensor:
    """a [..., M, K] @ b [..., K, N] (batch dims broadcast) in the accumulation dtype (float32, or
    float64 for float64 inputs), from fixed ``tile`` = (tm, tk, tn): [tm, tk] @ [tk, tn] BLAS
    calls. The tile must not depend on the batch (nor tk on K where K can be zero-padded)."""
    tm, tk, tn = tile
    dt = acc_dtype(a.dtype)
    if a.shape[:-2] == b.shape[:-2] or all(s == 1 for s in b.shape[:-2]):
        batch = tuple(a.shape[:-2])  # the common cases, without broadcast_shapes' cost
    else:
        batch = tuple(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    if M == 0 or N == 0 or K == 0 or math.prod(batch) == 0:
        return torch.zeros((*batch, M, N), dtype=dt, device=a.device)
    if not tiles_invariant(dt, tile):
        return seq_matmul(a, b)
    G = math.prod(batch)
    a3 = a.expand(*batch, M, K).reshape(G, M, K)
    # A weight shared by the whole batch is packed once, and its tiles are passed with a stride-0
    # batch dim (the probe checks that form too).
    b_shared = all(s == 1 for s in b.shape[:-2])
    b3 = b.reshape(1, K, N) if b_shared else b.expand(*batch, K, N).reshape(G, K, N)
    T, C, NT = _cdiv(M, tm), _cdiv(K, tk), _cdiv(N, tn)
    A = _pack(a3, tm, tk, dt)  # [C, G, T, tm, tk]
    B = _pack(b3, tk, tn, dt).transpose(0, 2)  # [NT, Gb, C, tk, tn] -> [C, Gb, NT, tk, tn]
    acc = torch.empty((NT, G * T, tm, tn), dtype=dt, device=a.device)
    for c in range(C):
        ac = A[c].reshape(G * T, tm, tk)  # every M tile of every batch element
        for n in range(NT):
            bc = B[c, :, n]  # [Gb, tk, tn], each tile contiguous
            if b_shared:
                bc = bc.expand(G * T, tk, tn)
            elif T > 1:
                bc = bc.unsqueeze(1).expand(G, T, tk, tn).reshape(G * T, tk, tn)
            if c == 0:
                torch.bmm(ac, bc, out=acc[n])
            else:
                acc[n].add_(torch.bmm(ac, bc))  # K tiles in ascending order, exactly rounded adds
    out = acc.view(NT, G, T * tm, tn)
    out = out[0] if NT == 1 else out.permute(1, 2, 0, 3).reshape(G, T * tm, NT * tn)
    return out[:, :M, :N].reshape(*batch, M, N)


# ----------------------------------------------------------------------------------------------
# Fixed-order sums
# ----------------------------------------------------------------------------------------------


def tree_sum(x: Tensor) -> Tensor:
    """Sum over the last dim by a fixed pairwise tree (zero-padded to a power of two), in x's dtype."""
    n = x.shape[-1]
    if n == 0:
        return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    if n == 1:
        return x[..., 0].clone()  # a new tensor: an op's output may not alias its input
    p = 1 << (n - 1).bit_length()
    if p != n:
        x = torch.nn.functional.pad(x, (0, p - n))
    while p > 1:
        p //= 2
        x = x[..., :p] + x[..., p:]
    return x[..., 0]


def chunk_sum(x: Tensor, chunk: int) -> Tensor:
    """Sum over the last dim: ``tree_sum`` of each ``chunk`` elements (zero-padded), chunks added in
    ascending order."""
    n = x.shape[-1]
    c = max(_cdiv(n, chunk), 1)
    if c * chunk != n:
        x = torch.nn.functional.pad(x, (0, c * chunk - n))
    parts = tree_sum(x.reshape(*x.shape[:-1], c, chunk))
    acc = parts[..., 0]
    for i in range(1, c):
        acc = acc + parts[..., i]
    return acc


def normalize(u: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Layer / group norm of the last dim of u (already in the accumulation dtype): two-pass mean and
    biased variance by ``tree_sum``, then elementwise ops. Returns ``((u - mean) * rstd, mean, rstd)``."""
    n = u.shape[-1]
    mean = tree_sum(u) / n
    d = u - mean.unsqueeze(-1)
    var = tree_sum(d * d) / n
    # sqrt and division are correctly rounded in vector and scalar code alike (unlike a fast rsqrt).
    rstd = 1.0 / torch.sqrt(var + eps)
    return d * rstd.unsqueeze(-1), mean, rstd


def seq_sum(x: Tensor) -> Tensor:
    """Sum over the last dim, left to right, in x's dtype (callers upcast first)."""
    n = x.shape[-1]
    acc = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    for j in range(n):
        acc = acc + x[..., j]
    return acc


def row_max(x: Tensor) -> Tensor:
    """Max over the last dim (max is exact, so any order gives the same bits); -inf when empty."""
    if x.shape[-1] == 0:
        return torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)
    return torch.amax(x, dim=-1)


def seq_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a[..., M, K] @ b[..., K, N] with a sequential K loop of elementwise mul + add.

    Returns the accumulator dtype. Separate mul and add ops (not addcmul) so no fused multiply-add
    can round the vector body and the tail differently. Slow: the fallback where GEMM tiles fail
    ``tiles_invariant``.
    """
    dt = acc_dtype(a.dtype)
    a = a.to(dt)
    b = b.to(dt)
    k = a.shape[-1]
    out_shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
    acc = torch.zeros(out_shape, dtype=dt, device=a.device)
    for j in range(k):
        acc = acc + a[..., :, j : j + 1] * b[..., j : j + 1, :]
    return acc
