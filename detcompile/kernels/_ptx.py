"""Eager ATen's CUDA arithmetic, instruction for instruction, for the fused pointwise kernels
(``rotary_embedding``, ``silu_mul``).

A fused kernel gives the bits of the unfused eager ops only if each op rounds as ATen's kernel does:
ATen computes a 16-bit op in fp32 (its ``opmath`` type) and rounds the result to the tensor's dtype,
every op in its own kernel. Left to itself, Triton changes that in three ways, each seen in the PTX it
generates (Triton 3.9, sm_90a):

* it contracts a multiply and an add into one FMA (one rounding where ATen has two);
  ``enable_fp_fusion=False`` stops this one;
* it narrows ``bf16(fp32(a) * fp32(b))`` into a native ``mul.rn.bf16`` (one rounding where ATen rounds
  to fp32 and then to bf16: the same for normal results, not always in bf16's subnormal range);
* its libdevice calls (``__nv_expf``, ``__nv_fdiv_rn``) take their flush-to-zero paths (Triton sets
  ``nvvm-reflect-ftz``), while ATen is compiled without ``-ftz``.

So the arithmetic here is inline PTX, which reaches ptxas unchanged: ``mul.rn.f32`` / ``add.rn.f32``
(the ``.rn`` suffix forbids contraction), and :func:`silu` as the exact sequence nvcc (CUDA 13.0,
sm_90, default flags) emits for ATen's ``x / (opmath_t(1) + expf(-x))`` (ActivationSiluKernel.cu):
libdevice's accurate ``expf``, whose last multiply nvcc contracts into the ``1 +`` (``fma.rn``), then
an IEEE ``div.rn.f32``. Casts to the dtype stay Triton's ``.to()`` (``cvt.rn``, as ATen's
``__float2bfloat16`` / ``__float2half``).

``PTX=False`` (the Triton interpreter, where inline PTX cannot run; CPU tests) uses plain operations:
numpy's fp32 ``*``, ``+``, ``/`` are IEEE too, but its ``exp`` is not libdevice's, so the interpreter's
silu is close to ATen's, not bitwise. :func:`to_dtype` rounds to nearest even in both (the interpreter's
own fp32 -> bf16 cast truncates).
"""
from __future__ import annotations

import torch

from . import _common

#: Launch shape of the fused pointwise kernels: warps, and elements per program. Any value gives the
#: same bits (every element is computed on its own); these only set the speed.
NUM_WARPS = 4
TILE = 2048

#: libdevice ``__nv_expf`` (non-FTZ path) followed by ``fma.rn(2^f, 2^j, 1)`` and ``div.rn``:
#: ``$0 = $1 / (1 + exp(-$1))``, as nvcc compiles ATen's silu. The braces scope the registers.
SILU_PTX = """{
.reg .f32 a, t, j, k, f, s, e, d;
.reg .b32 jb;
neg.f32 a, $1;
fma.rn.f32 t, a, 0f3BBB989D, 0f3F000000;
cvt.sat.f32.f32 t, t;
fma.rm.f32 j, t, 0f437C0000, 0f4B400001;
add.rn.f32 k, j, 0fCB40007F;
neg.f32 k, k;
fma.rn.f32 f, a, 0f3FB8AA3B, k;
fma.rn.f32 f, a, 0f32A57060, f;
mov.b32 jb, j;
shl.b32 jb, jb, 23;
mov.b32 s, jb;
ex2.approx.ftz.f32 e, f;
fma.rn.f32 d, e, s, 0f3F800000;
div.rn.f32 $0, $1, d;
}"""


def use_ptx(t: torch.Tensor) -> bool:
    """Whether a kernel launched on ``t`` runs the inline PTX (compiled for an NVIDIA GPU), not the
    interpreter's plain operations."""
    return t.is_cuda and torch.version.hip is None and not _common.triton_interpret()


if _common.HAS_TRITON:
    triton = _common.triton
    tl = _common.tl
    _SILU_ASM = tl.constexpr(SILU_PTX)  # a jit function reads module globals only as constexprs

    @triton.jit
    def _f32_op(a, b, ASM: tl.constexpr):
        return tl.inline_asm_elementwise(ASM, "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def mul_rn(a, b, PTX: tl.constexpr):
        """fp32 ``a * b``, rounded once (never contracted into an FMA)."""
        if PTX:
            y = _f32_op(a, b, "mul.rn.f32 $0, $1, $2;")
        else:
            y = a * b
        return y

    @triton.jit
    def add_rn(a, b, PTX: tl.constexpr):
        """fp32 ``a + b``, rounded once (never contracted into an FMA)."""
        if PTX:
            y = _f32_op(a, b, "add.rn.f32 $0, $1, $2;")
        else:
            y = a + b
        return y

    @triton.jit
    def silu(x, PTX: tl.constexpr):
        """fp32 ``x / (1 + exp(-x))`` with ATen's CUDA bits (PTX); the interpreter's numpy otherwise."""
        if PTX:
            y = tl.inline_asm_elementwise(_SILU_ASM, "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
        else:
            y = x / (1.0 + tl.exp(-x))
        return y

    @triton.jit
    def to_dtype(x, dt: tl.constexpr, PTX: tl.constexpr):
        """fp32 ``x`` rounded to nearest even in ``dt`` (``cvt.rn``, as ATen's casts). The interpreter
        truncates fp32 to bf16, so there the bits are rounded first (NaN kept as is)."""
        if PTX:
            y = x.to(dt)
        elif dt == tl.bfloat16:
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            y = tl.where(x != x, x, b.to(tl.float32, bitcast=True)).to(dt)
        else:
            y = x.to(dt)
        return y
