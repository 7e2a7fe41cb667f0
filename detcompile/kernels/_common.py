"""Shared pieces of the kernels: dtype/device checks, Triton availability, device facts.

The CPU building blocks (fixed-tile GEMM, fixed-order sums) are in ``_cpu``.
"""
from __future__ import annotations

import contextlib
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


def check_norm_params(
    op: str, x: torch.Tensor, numel: int, expected: str, **params: torch.Tensor | None
) -> None:
    """A norm's weight/bias (None: absent): floating, on x's device, ``numel`` elements (``expected``
    names that count in the error)."""
    for name, t in params.items():
        if t is None:
            continue
        if not t.is_floating_point():
            raise UnsupportedError(f"detcompile.{op}: {name} must be floating point, got {t.dtype}")
        if t.device != x.device:
            raise UnsupportedError(f"detcompile.{op}: {name} is on {t.device} but x is on {x.device}")
        if t.numel() != numel:
            raise ValueError(f"detcompile.{op}: {name} has {t.numel()} elements, expected {expected}")


def wrap_dim(op: str, dim: int, ndim: int) -> int:
    """``dim`` in ``[0, ndim)`` (a 0-d tensor takes dim 0 or -1), as aten wraps it."""
    n = max(ndim, 1)
    if not -n <= dim < n:
        raise IndexError(f"detcompile.{op}: dim {dim} is out of range for {ndim} dims")
    return dim % n


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for 16-bit and 32-bit floats, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def exact_upcast(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether src -> dst is exact, so a kernel may load src and convert in registers."""
    if src == dst:
        return True
    if src in HALF_DTYPES:
        return dst in (torch.float32, torch.float64)
    return src == torch.float32 and dst == torch.float64


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: tf32 for fp32 when torch allows it for matmuls, else ieee."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def rows_last(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x with ``dim`` moved last, as a contiguous [rows, R] tensor (a 0-d x is one row of one)."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    return x.movedim(dim, -1).reshape(-1, x.shape[dim]).contiguous()


def restore_rows(out2: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """A [rows, R] result of ``rows_last(x, dim)`` back to x's shape, contiguous."""
    if x.dim() == 0:
        return out2.reshape(())
    shape = list(x.shape)
    moved = shape[:dim] + shape[dim + 1:] + [shape[dim]]
    return out2.reshape(moved).movedim(-1, dim).contiguous()


@functools.lru_cache(maxsize=None)
def _cuda_facts(index: int) -> tuple[int, tuple[int, int], int | None]:
    # Asked on every launch: read the device properties once per GPU.
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", None)
    if smem is None and HAS_TRITON:  # older torch: ask Triton's driver
        try:
            smem = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
        except Exception:  # noqa: BLE001  (no limit known: configs are not fitted, only retried)
            smem = None
    return props.multi_processor_count, (props.major, props.minor), smem


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


def shared_memory_limit(device: torch.device) -> int | None:
    """Bytes of shared memory one program may opt into on a CUDA device (cached); None in the
    interpreter or where the driver does not say."""
    if device.type == "cuda" and torch.cuda.is_available():
        return _cuda_facts(_cuda_index(device))[2]
    return None


def on_device(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device); a no-op for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def triton_launchable(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on this tensor: CUDA, or any device in interpreter mode."""
    return HAS_TRITON and (t.is_cuda or triton_interpret())


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
