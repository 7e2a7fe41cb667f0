"""Fused SwiGLU activation: ``detcompile::silu_mul``, ``silu(gate) * up`` in one kernel (eager: two).

Bits: those of the unfused eager ops. ATen's CUDA silu computes ``x / (1 + expf(-x))`` in fp32 and
rounds to the dtype; ``mul`` multiplies in fp32 and rounds. The Triton kernel runs the same fp32
instruction sequence (``_ptx.silu``: nvcc's code for ATen's expression, libdevice ``expf`` included),
rounds silu to the dtype, then ``_ptx.mul_rn`` and one more rounding. Each element runs the same
instructions whatever its position: batch-invariant.

That the PTX reproduces ATen's silu is checked, not assumed: on its first use on a GPU (outside CUDA
graph capture) the op runs the kernel on every bf16 and every fp16 value and compares the bits with
``torch.nn.functional.silu`` there (a few microseconds). If any differ (another CUDA build of torch),
it warns and runs the eager ops on that GPU from then on: the same bits as the graph without the pass,
one launch more.

CPU: today's graph for these ops: silu through ``cpu_pointwise`` (fixed blocks, no vector tail; see
``kernels/cpu_pointwise.py``), then ``mul`` (exactly rounded). ROCm: the eager ops.
The output is contiguous, as eager's ``mul`` of two row-major operands.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor

from . import _common, _pdl, _ptx
from . import cpu_pointwise as _cpu_pointwise
from ._ptx import NUM_WARPS, TILE

#: Columns per program at most (rows x columns = TILE).
BLOCK_N_MAX = 1024

if _common.HAS_TRITON:
    triton = _common.triton
    tl = _common.tl
    from ._pdl import start as pdl_start
    from ._ptx import mul_rn, silu, to_dtype

    @triton.jit
    def swiglu(g, u, dt: tl.constexpr, PTX: tl.constexpr):
        """``dt(dt(silu(g)) * u)`` for fp32 ``g``, ``u`` holding ``dt`` values: the eager ops' roundings
        (shared with linear_swiglu's epilogue, so the fused kernel cannot drift from this one)."""
        s = to_dtype(silu(g, PTX), dt, PTX).to(tl.float32)
        return to_dtype(mul_rn(s, u, PTX), dt, PTX)

    @triton.jit(do_not_specialize=["R"])  # the token count: no new variant per count (no bit depends on it)
    def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, R, N, gs, us, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                         PTX: tl.constexpr, PDL: tl.constexpr):
        """[R, N] rows (row strides gs, us; the output contiguous)."""
        pdl_start(PDL)
        r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (r < R)[:, None] & (c < N)[None, :]
        g = tl.load(g_ptr + (r * gs)[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + (r * us)[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        y = swiglu(g, u, o_ptr.dtype.element_ty, PTX)
        tl.store(o_ptr + (r * N)[:, None] + c[None, :], y, mask=mask)


def eager_silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """The unfused eager ops (the definition on CUDA), into a contiguous output."""
    return torch.mul(torch.nn.functional.silu(gate), up, out=torch.empty(gate.shape, dtype=gate.dtype,
                                                                          device=gate.device))


def cpu_silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """Today's CPU graph: ``cpu_pointwise`` silu (fixed blocks), then an exactly rounded mul."""
    s = _cpu_pointwise.blocked(gate, "silu")
    return torch.mul(s, up, out=torch.empty(gate.shape, dtype=gate.dtype, device=gate.device))


def _check(gate: Tensor, up: Tensor) -> None:
    _common.check_inputs("silu_mul", gate, up)
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"detcompile.silu_mul: gate and up must have one shape, dtype and device, got "
                         f"{tuple(gate.shape)} {gate.dtype} {gate.device} and {tuple(up.shape)} {up.dtype} {up.device}")
    if not gate.is_floating_point():
        raise _common.UnsupportedError(f"detcompile.silu_mul: gate must be floating point, got {gate.dtype}")


def _rows(t: Tensor) -> Tensor:
    """t as [rows, N] with a unit last stride (a view where one exists, else a copy)."""
    n = t.shape[-1] if t.dim() else 1
    if t.dim() == 0 or t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, n)
    except RuntimeError:
        return t.reshape(-1, n).contiguous()


def triton_silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """Launch the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    _check(gate, up)
    if not _common.triton_launchable(gate) or gate.dtype not in _common.GPU_DTYPES:
        raise _common.UnsupportedError("detcompile.silu_mul: the Triton kernel cannot take these inputs")
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    g2, u2 = _rows(gate), _rows(up)
    R, N = g2.shape
    block_n = min(BLOCK_N_MAX, triton.next_power_of_2(N))
    block_r = max(1, TILE // block_n)
    grid = (triton.cdiv(R, block_r), triton.cdiv(N, block_n))
    ctx = torch.cuda.device(gate.device) if gate.is_cuda else contextlib.nullcontext()
    with ctx:
        pdl = _pdl.enabled(gate)
        _silu_mul_kernel[grid](g2, u2, out, R, N, g2.stride(0), u2.stride(0), BLOCK_R=block_r, BLOCK_N=block_n,
                               PTX=_ptx.use_ptx(gate), num_warps=NUM_WARPS, enable_fp_fusion=False,
                               **_pdl.launch_kwargs(pdl))
    return out


#: CUDA device index -> whether the kernel's silu gave ATen's bits on every 16-bit value there.
_MATCHES_EAGER: dict[int, bool] = {}


def matches_eager(device: torch.device) -> bool | None:
    """Whether the kernel reproduces eager silu-then-mul on this GPU (checked once per device, on every
    bf16 and fp16 value); None while a CUDA graph is being captured and it was not checked yet."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _MATCHES_EAGER:
        if torch.cuda.is_current_stream_capturing():
            return None
        ok = True
        for dt in (torch.bfloat16, torch.float16):
            x = torch.arange(-(2**15), 2**15, dtype=torch.int32, device=device).to(torch.int16).view(dt)
            # up = 1 leaves silu's bits; up = x checks the rounding of the product too.
            for up in (torch.ones_like(x), x.flip(0)):
                got, want = triton_silu_mul(x, up), eager_silu_mul(x, up)
                ok = ok and torch.equal(got.view(torch.int16), want.view(torch.int16))
        if not ok:
            warnings.warn(f"detcompile.silu_mul: the fused kernel's silu differs from torch's on {device} "
                          "(a torch built with other CUDA flags?); running the eager silu and mul there "
                          "(the same bits, one kernel more)", stacklevel=3)
        _MATCHES_EAGER[index] = ok
    return _MATCHES_EAGER[index]


@torch.library.custom_op("detcompile::silu_mul", mutates_args=())
def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    _check(gate, up)
    raise _common.UnsupportedError(
        f"detcompile.silu_mul: device {gate.device.type!r} is not supported (only cpu and cuda)"
    )


@silu_mul.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@silu_mul.register_kernel("cpu")
def _(gate, up):
    _check(gate, up)
    return cpu_silu_mul(gate, up)


@silu_mul.register_kernel("cuda")
def _(gate, up):
    _check(gate, up)
    if _ptx.use_ptx(gate) and matches_eager(gate.device):
        return triton_silu_mul(gate, up)
    return eager_silu_mul(gate, up)
