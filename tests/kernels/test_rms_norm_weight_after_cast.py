"""detcompile::rms_norm_weight_after_cast: bitwise the three eager ops it replaces
(``weight * rms_norm(x.float()).to(x.dtype)``), batch-invariant, on every row schedule."""
import pytest
import torch

from detcompile.kernels import _common
from detcompile.kernels.rms_norm import add_fusable, triton_add_rms_norm_weight_after_cast, triton_rms_norm

from ._util import SMALL_PATHS, compile_for_sm90, needs_triton, same_bits
from ._util import one_launch_row_sync, small_rows  # noqa: F401 (fixtures used by name)

OP = torch.ops.detcompile.rms_norm_weight_after_cast
ADD_OP = torch.ops.detcompile.add_rms_norm_weight_after_cast
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


# ----------------------------------------------------------------------------------------------
# add_rms_norm_weight_after_cast: the residual add in the same launch
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_cpu_equals_add_then_norm(dtype, gen):
    (a, w), (b, _) = inputs(5, 300, dtype, gen), inputs(5, 300, dtype, gen)
    total, out = ADD_OP(a, b, w, EPS)
    assert same_bits(total, torch.add(a, b)) and same_bits(out, OP(torch.add(a, b), w, EPS))


def test_add_bad_inputs(gen):
    (a, w), (b, _) = inputs(2, 16, torch.bfloat16, gen), inputs(2, 16, torch.bfloat16, gen)
    with pytest.raises(ValueError, match="must match"):
        ADD_OP(a, b[:1], w, EPS)
    with pytest.raises(ValueError, match="must match"):
        ADD_OP(a, b.half(), w, EPS)


@needs_triton
@pytest.mark.parametrize("path", [5, 16, 17, 32, 33, 64, 300])
def test_add_triton_equals_add_then_norm(small_rows, path, gen):
    """Rows of one program: the sum's bits are eager add's and the norm's those of the unfused
    kernel on that sum; split rows (longer than a segment here) are refused, the pass never fuses them."""
    (a, w), (b, _) = inputs(3, path, torch.float16, gen), inputs(3, path, torch.float16, gen)
    if not add_fusable(path):
        with pytest.raises(_common.UnsupportedError, match="one Triton program"):
            triton_add_rms_norm_weight_after_cast(a, b, w, EPS)
        return
    total, out = triton_add_rms_norm_weight_after_cast(a, b, w, EPS)
    want = torch.add(a, b)
    assert same_bits(total, want)
    assert same_bits(out, triton_rms_norm(want, w, EPS, weight_after_cast=True))


def test_add_fusable_is_every_common_hidden_size():
    assert all(add_fusable(n) for n in (768, 2048, 4096, 5120, 8192))
    assert not add_fusable(16384)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [4096, 5120, 12288])  # 12288: split rows, the op's add-then-norm fallback
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_add_equals_add_then_norm_and_batch_invariant(hidden, dtype, gen):
    (a, w), (b, _) = inputs(33, hidden, dtype, gen, device="cuda"), inputs(33, hidden, dtype, gen, device="cuda")
    total, out = ADD_OP(a, b, w, EPS)
    assert same_bits(total, torch.add(a, b)) and same_bits(out, OP(torch.add(a, b), w, EPS))
    one_total, one_out = ADD_OP(a[7:8], b[7:8], w, EPS)
    assert same_bits(one_total[0], total[7]) and same_bits(one_out[0], out[7])


_COMPILE_SCRIPT = r"""
from detcompile.kernels import rms_norm as RN, row_kernels as rk
fn = RN._rms_norm_rows_kernel
plan = rk.row_plan(4096)
const = dict(plan.constexprs(), HAS_WEIGHT=2, HAS_RESIDUAL=True, PDL=True, PHASE=0)
sig = {n: "i32" for n in fn.arg_names}
sig.update({n: "*bf16" for n in ("x_ptr", "w_ptr", "out_ptr", "b_ptr", "sum_ptr")})
sig.update({"ws_ptr": "*fp32", "cnt_ptr": "*i32", "eps": "fp32", "timeout_ns": "i64"})
sig.update({n: "constexpr" for n in const})
k = triton.compile(source(fn, sig, const), target=TARGET, options={"num_warps": plan.num_warps, "enable_fp_fusion": False})
assert "griddepcontrol.wait" in k.asm["ptx"] and "cvt.rn.bf16.f32" in k.asm["ptx"]
print("COMPILED")
"""


@needs_triton
def test_add_rows_kernel_compiles_for_sm90():
    """The residual rows kernel (bf16, with PDL) for sm_90 without a GPU: what the interpreter cannot
    check (bf16 casts, the griddepcontrol instructions). A subprocess: this one runs the interpreter."""
    compile_for_sm90(_COMPILE_SCRIPT)
