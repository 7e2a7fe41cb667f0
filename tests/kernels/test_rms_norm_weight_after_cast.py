"""detcompile::rms_norm_weight_after_cast: bitwise the three eager ops it replaces
(``weight * rms_norm(x.float()).to(x.dtype)``), batch-invariant, on every row schedule."""
import pytest
import torch

from detcompile.kernels.rms_norm import triton_rms_norm

from ._util import SMALL_PATHS, needs_triton, same_bits
from ._util import one_launch_row_sync, small_rows  # noqa: F401 (fixtures used by name)

OP = torch.ops.detcompile.rms_norm_weight_after_cast
EPS = 1e-6


def unfused(x, w, rms=torch.ops.detcompile.rms_norm):
    return torch.mul(w, rms(x.float(), None, EPS).to(x.dtype))


def inputs(rows, hidden, dtype, gen, device="cpu"):
    x = (torch.randn(rows, hidden, generator=gen) * 3 + 0.5).to(device=device, dtype=dtype)
    w = (torch.rand(hidden, generator=gen) * 2 - 0.5).to(device=device, dtype=dtype)
    return x, w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_equals_unfused(dtype, gen):
    x, w = inputs(5, 300, dtype, gen)
    assert same_bits(OP(x, w, EPS), unfused(x, w))


def test_bad_inputs(gen):
    x, w = inputs(2, 16, torch.float32, gen)
    with pytest.raises(ValueError, match="16-bit"):
        OP(x, w, EPS)
    x, w = inputs(2, 16, torch.bfloat16, gen)
    with pytest.raises(ValueError, match="16-bit"):
        OP(x, w.half(), EPS)


@needs_triton
@pytest.mark.parametrize("path", SMALL_PATHS)
@pytest.mark.parametrize("dtype", [torch.float16])  # the interpreter's bf16 casts are not torch's: GPU only
def test_triton_equals_unfused_kernels(small_rows, path, dtype, gen):
    """The kernel's mode 2 against the same kernel's plain norm, a cast and an eager mul."""
    x, w = inputs(3, path, dtype, gen)
    got = triton_rms_norm(x, w, EPS, weight_after_cast=True)
    want = torch.mul(w, triton_rms_norm(x.float(), None, EPS).to(dtype))
    assert same_bits(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [4096, 5120, 12288])  # 12288 > 8192: a split-row schedule
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_equals_unfused_and_batch_invariant(hidden, dtype, gen):
    x, w = inputs(33, hidden, dtype, gen, device="cuda")
    out = OP(x, w, EPS)
    assert same_bits(out, unfused(x, w))
    assert same_bits(OP(x[7:8], w, EPS)[0], out[7])
