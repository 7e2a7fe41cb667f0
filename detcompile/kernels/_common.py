"""Shared pieces of the kernels: dtype/device checks, Triton availability, and the CPU helpers.

The CPU path reduces *sequentially* along the reduced dimension with one elementwise torch op per
step (``acc = acc + x[..., j]``). Elementwise add and mul are exactly rounded whatever the vector
width or the thread split, so each output element sees the same operations in the same order
whatever the batch holds. A sequential sum is also unchanged by exact zeros before or after the
real terms, which makes masked (padded, packed) positions free on the CPU.
"""
from __future__ import annotations

import functools
import os

import torch

try:  # Triton is a Linux dependency; everything else still imports without it.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    triton = None
    tl = None
    HAS_TRITON = False

NAMESPACE = "detcompile"

#: Floating dtypes the kernels accept. float64 is accepted on the CPU path only.
HALF_DTYPES = (torch.float16, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = GPU_DTYPES + (torch.float64,)


class UnsupportedError(RuntimeError):
    """An input detcompile cannot compute batch-invariantly (dtype, device, shape)."""


def triton_interpret() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1), e.g. on CPU in CI."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_inputs(op: str, *tensors: torch.Tensor | None) -> None:
    """Clear errors for devices and dtypes no detcompile kernel handles."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type not in ("cpu", "cuda", "meta"):
            raise UnsupportedError(
                f"detcompile.{op}: device {t.device.type!r} is not supported (only cpu and cuda)"
            )
        if t.is_floating_point():
            allowed = CPU_DTYPES if t.device.type == "cpu" else GPU_DTYPES
            if t.dtype not in allowed:
                raise UnsupportedError(
                    f"detcompile.{op}: dtype {t.dtype} is not supported on {t.device.type} "
                    f"(supported: {', '.join(str(d) for d in allowed)})"
                )


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for 16-bit and 32-bit floats, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def _cuda_facts(index: int) -> tuple[int, tuple[int, int]]:
    # Asked on every launch: read the device properties once per GPU.
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, (props.major, props.minor)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def num_sms(device: torch.device) -> int:
    """Multiprocessor count for persistent grids (a fixed small number in the interpreter)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return _cuda_facts(_cuda_index(device))[0]
    return 4


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device (cached)."""
    return _cuda_facts(_cuda_index(device))[1]


def triton_launchable(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on this tensor: CUDA, or any device in interpreter mode."""
    return HAS_TRITON and (t.is_cuda or triton_interpret())


# ----------------------------------------------------------------------------------------------
# CPU helpers: sequential, elementwise-only reductions along the last dimension.
# ----------------------------------------------------------------------------------------------


def cpu_seq_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim, left to right, in x's dtype (callers upcast first)."""
    n = x.shape[-1]
    acc = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    for j in range(n):
        acc = acc + x[..., j]
    return acc


def cpu_seq_max(x: torch.Tensor) -> torch.Tensor:
    """Max over the last dim (max is exact, so any order gives the same bits; kept simple)."""
    if x.shape[-1] == 0:
        return torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)
    return torch.amax(x, dim=-1)


def cpu_seq_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a[..., M, K] @ b[..., K, N] with a sequential K loop of elementwise mul + add.

    Returns the accumulator dtype (float32, or float64 for float64 inputs). Separate mul and add
    ops (not addcmul) so no fused multiply-add can round the vector body and the tail differently.
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


def aligned16(t: torch.Tensor) -> torch.Tensor:
    """Contiguous, with a 16-byte aligned data pointer.

    Triton specializes a kernel on pointer alignment; an unaligned view (a slice at an odd offset)
    compiles a variant with other load vectorization, which can change the register layout and so
    the order of ``tl.sum``/``tl.cumsum``. Copying (deterministic) keeps one variant.
    """
    t = t.contiguous()
    if t.data_ptr() % 16 != 0:
        t = t.clone()
    return t
