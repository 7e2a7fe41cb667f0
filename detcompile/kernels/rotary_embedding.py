"""Fused rotary position embedding: ``detcompile::rotary_embedding``.

``out = x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``: Hugging
Face's ``apply_rotary_pos_emb`` (Llama, Mistral, Qwen, Gemma, Phi-3; the rotated slice of GPT-NeoX's and
Phi's partial rotary), which eager runs as five kernels per tensor (mul, neg, cat, mul, add). ``xs`` is a
list because a layer's q and k share cos and sin: they go in one launch.

Bits: those of the unfused eager ops, which round each op to the dtype: ``a = dt(x * cos)``,
``b = dt(rotate_half(x) * sin)`` (the negation is exact), ``out = dt(a + b)``, each product and the sum
computed in fp32 (fp32 tensors: just fp32, one rounding per op). The Triton kernel computes exactly
that, with ``_ptx.mul_rn`` / ``_ptx.add_rn`` so that the compiler can neither contract a product into
the add nor narrow it to bf16 arithmetic; the casts are ``cvt.rn`` like ATen's. Every element runs the
same instructions whatever its position, so the op is batch-invariant like the eager ops it replaces.
CPU: the same torch ops as the unfused graph (mul, neg, cat, add: exactly rounded per element on the
CPU, see ``passes/classify.CPU_EXACT``), so the CPU bits are the graph's.

Inputs: one float dtype for x, cos and sin; cos and sin broadcast to x (``[1 or B, 1, T, D]`` against
``[B, H, T, D]``); D even. The output has x's layout (``torch.empty_like``), as HF's ``x * cos + ...``
gives, or with ``contiguous`` the row-major one (``... + x * cos``: the add's layout follows its first
operand, there the contiguous ``cat`` product). The
Triton path takes xs of one rank <= 4 with a unit last stride; anything else (and ROCm) runs the eager
ops, which are the definition.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from . import _common, _pdl, _ptx
from ._ptx import NUM_WARPS, TILE

if _common.HAS_TRITON:
    triton = _common.triton
    tl = _common.tl
    from ._pdl import start as pdl_start
    from ._ptx import add_rn, mul_rn, to_dtype

    @triton.jit
    def _rotary_rows(x_ptr, o_ptr, c_ptr, s_ptr, blk, R, S1, S2, xs0, xs1, xs2, os0, os1, os2,
                     cs0, cs1, cs2, D, HALF, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PTX: tl.constexpr):
        """Rows ``blk * ROWS ...`` of x viewed as [S0, S1, S2, D] (cos/sin broadcast, same strides)."""
        r = blk * ROWS + tl.arange(0, ROWS)  # int32: fewer than 2**31 rows
        rmask = r < R
        i2 = (r % S2).to(tl.int64)
        t = r // S2
        i1 = (t % S1).to(tl.int64)
        i0 = (t // S1).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        first = d < HALF
        partner = tl.where(first, d + HALF, d - HALF)
        mask = rmask[:, None] & (d < D)[None, :]
        xrow = (i0 * xs0 + i1 * xs1 + i2 * xs2)[:, None]
        crow = (i0 * cs0 + i1 * cs1 + i2 * cs2)[:, None]
        x = tl.load(x_ptr + xrow + d[None, :], mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(x_ptr + xrow + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + crow + d[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + crow + d[None, :], mask=mask, other=0.0).to(tl.float32)
        # xp * -1, not -xp: Triton compiles -xp as 0 - xp, which turns -0.0 into +0.0 (eager's neg flips the sign)
        rot = tl.where(first[None, :], xp * -1.0, xp)
        dt: tl.constexpr = o_ptr.dtype.element_ty
        a = to_dtype(mul_rn(x, c, PTX), dt, PTX).to(tl.float32)
        b = to_dtype(mul_rn(rot, s, PTX), dt, PTX).to(tl.float32)
        y = to_dtype(add_rn(a, b, PTX), dt, PTX)
        orow = (i0 * os0 + i1 * os1 + i2 * os2)[:, None]
        tl.store(o_ptr + orow + d[None, :], y, mask=mask)

    # Sizes and strides that change with the number of tokens: not specialized, so that a new token
    # count never compiles a new variant (in a CUDA graph capture, say). Pointwise: no bit depends on it.
    @triton.jit(do_not_specialize=["Q_BLOCKS", "RQ", "S2Q", "qs0", "oqs0", "RK", "S2K", "ks0", "oks0", "cs0"])
    def _rotary_kernel(
        q_ptr, oq_ptr, k_ptr, ok_ptr, c_ptr, s_ptr, Q_BLOCKS,
        RQ, S1Q, S2Q, qs0, qs1, qs2, oqs0, oqs1, oqs2,
        RK, S1K, S2K, ks0, ks1, ks2, oks0, oks1, oks2,
        cs0, cs1, cs2, D, HALF,
        ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PTX: tl.constexpr, PDL: tl.constexpr,
    ):
        """Programs ``[0, Q_BLOCKS)`` rotate q, the rest k (one launch for a layer's q and k)."""
        pdl_start(PDL)
        pid = tl.program_id(0)
        if pid < Q_BLOCKS:
            _rotary_rows(q_ptr, oq_ptr, c_ptr, s_ptr, pid, RQ, S1Q, S2Q, qs0, qs1, qs2, oqs0, oqs1, oqs2,
                         cs0, cs1, cs2, D, HALF, ROWS, BLOCK_D, PTX)
        else:
            _rotary_rows(k_ptr, ok_ptr, c_ptr, s_ptr, pid - Q_BLOCKS, RK, S1K, S2K, ks0, ks1, ks2,
                         oks0, oks1, oks2, cs0, cs1, cs2, D, HALF, ROWS, BLOCK_D, PTX)


def _empty_out(x: Tensor, contiguous: bool) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device) if contiguous else torch.empty_like(x)


def eager_rotary_embedding(x: Tensor, cos: Tensor, sin: Tensor, contiguous: bool = False) -> Tensor:
    """The unfused ops, as Hugging Face writes them (the definition; the CPU path)."""
    h = x.shape[-1] // 2
    rotated = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return torch.add(x * cos, rotated * sin, out=_empty_out(x, contiguous))


def _check(xs: list[Tensor], cos: Tensor, sin: Tensor) -> None:
    _common.check_inputs("rotary_embedding", *xs, cos, sin)
    if not xs:
        raise ValueError("detcompile.rotary_embedding: xs is empty")
    if any(t.dtype != xs[0].dtype for t in (*xs, cos, sin)) or not xs[0].is_floating_point():
        raise ValueError("detcompile.rotary_embedding: x, cos and sin must have one floating dtype, got "
                         f"{[t.dtype for t in xs]}, {cos.dtype} and {sin.dtype}")
    for x in xs:
        if x.dim() == 0 or x.shape[-1] % 2:
            raise ValueError(f"detcompile.rotary_embedding: the last dim must be even, got shape {tuple(x.shape)}")
        if cos.shape[-1] != x.shape[-1] or sin.shape[-1] != x.shape[-1]:
            raise ValueError("detcompile.rotary_embedding: cos and sin must have x's last dim "
                             f"({x.shape[-1]}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
        if torch.broadcast_shapes(x.shape, cos.shape, sin.shape) != x.shape:
            raise ValueError(f"detcompile.rotary_embedding: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} "
                             f"must broadcast to x {tuple(x.shape)}")
        if x.device != cos.device or x.device != sin.device:
            raise _common.UnsupportedError("detcompile.rotary_embedding: x, cos and sin must be on one device")


def _as4(t: Tensor) -> Tensor:
    """t as a 4-D view (leading 1s)."""
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def _triton_ok(xs: list[Tensor], cos: Tensor, sin: Tensor) -> bool:
    return (
        xs[0].dtype in _common.GPU_DTYPES and cos.shape == sin.shape and torch.version.hip is None
        and all(x.dim() == xs[0].dim() <= 4 and x.stride(-1) == 1 for x in xs)
    )


def _broadcast_strides(c: Tensor) -> tuple:
    """Strides of the first three dims of c (4-D) broadcast to any shape: 0 where c has size 1."""
    c4 = _as4(c)
    return tuple(0 if n == 1 else st for n, st in zip(c4.shape[:3], c4.stride()[:3]))


def _rows(x4: Tensor, o4: Tensor) -> tuple:
    S0, S1, S2, _ = x4.shape
    return (S0 * S1 * S2, S1, S2, *x4.stride()[:3], *o4.stride()[:3])


def triton_rotary_embedding(xs: list[Tensor], cos: Tensor, sin: Tensor, contiguous: bool = False) -> list[Tensor]:
    """Launch the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1), two tensors a launch."""
    _check(xs, cos, sin)
    if not _common.triton_launchable(xs[0]) or not _triton_ok(xs, cos, sin):
        raise _common.UnsupportedError("detcompile.rotary_embedding: the Triton kernel cannot take these inputs")
    outs = [_empty_out(x, contiguous) for x in xs]
    D = xs[0].shape[-1]
    block_d = triton.next_power_of_2(D)
    rows = max(1, TILE // block_d)
    # Same shapes, contiguous: the same strides, for every x they broadcast to.
    c, s = cos.contiguous(), sin.contiguous()
    ptx = _ptx.use_ptx(xs[0])
    pdl = _pdl.enabled(xs[0])
    ctx = torch.cuda.device(xs[0].device) if xs[0].is_cuda else contextlib.nullcontext()
    with ctx:
        for i in range(0, len(xs), 2):
            pair = [(x, o) for x, o in zip(xs[i:i + 2], outs[i:i + 2]) if x.numel()]
            if not pair:
                continue
            (q, oq), (k, ok) = pair[0], pair[-1]
            q4, k4 = _as4(q), _as4(k)
            cs = _broadcast_strides(c)
            q_blocks = triton.cdiv(q.numel() // D, rows)
            k_blocks = triton.cdiv(k.numel() // D, rows) if len(pair) == 2 else 0
            _rotary_kernel[(q_blocks + k_blocks,)](
                q4, _as4(oq), k4, _as4(ok), c, s, q_blocks,
                *_rows(q4, _as4(oq)), *_rows(k4, _as4(ok)), *cs, D, D // 2,
                ROWS=rows, BLOCK_D=block_d, PTX=ptx, num_warps=NUM_WARPS, enable_fp_fusion=False,
                **_pdl.launch_kwargs(pdl),
            )
    return outs


@torch.library.custom_op("detcompile::rotary_embedding", mutates_args=())
def rotary_embedding(xs: list[Tensor], cos: Tensor, sin: Tensor, contiguous: bool = False) -> list[Tensor]:
    """``x * cos + rotate_half(x) * sin`` for each x; the outputs in x's layout, or row-major if
    ``contiguous`` (the eager add's layout follows its first operand)."""
    _check(xs, cos, sin)
    raise _common.UnsupportedError(
        f"detcompile.rotary_embedding: device {xs[0].device.type!r} is not supported (only cpu and cuda)"
    )


@rotary_embedding.register_fake
def _(xs, cos, sin, contiguous=False):
    return [_empty_out(x, contiguous) for x in xs]


@rotary_embedding.register_kernel("cpu")
def _(xs, cos, sin, contiguous=False):
    _check(xs, cos, sin)
    return [eager_rotary_embedding(x, cos, sin, contiguous) for x in xs]


@rotary_embedding.register_kernel("cuda")
def _(xs, cos, sin, contiguous=False):
    _check(xs, cos, sin)
    if _triton_ok(xs, cos, sin):
        return triton_rotary_embedding(xs, cos, sin, contiguous)
    return [eager_rotary_embedding(x, cos, sin, contiguous) for x in xs]
