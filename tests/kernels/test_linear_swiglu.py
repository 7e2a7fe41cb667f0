"""detcompile.linear_swiglu: gate/up and SwiGLU in one launch, bitwise the unfused linear_group + silu_mul."""
import pytest
import torch

from detcompile.kernels import linear_swiglu as LS
from detcompile.kernels.linear_group import triton_linear_group
from detcompile.kernels.silu_mul import triton_silu_mul

from ._util import compile_for_sm90, needs_triton, rel_err

OP = torch.ops.detcompile.linear_swiglu


def unfused(a, wg, wu):
    """The two ops, through the dispatcher (the device's implementations)."""
    return torch.ops.detcompile.silu_mul(*torch.ops.detcompile.linear_group(a, [wg, wu]))


def unfused_triton(a, wg, wu):
    """The two ops' Triton kernels (in the interpreter on CPU tensors; the dispatcher would pick the CPU ops)."""
    return triton_silu_mul(*triton_linear_group(a, [wg, wu]))


def weights(gen, n, k, dtype, device="cpu"):
    return [(torch.randn(n, k, generator=gen) * 0.1).to(device=device, dtype=dtype) for _ in range(2)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 16])
def test_interpreter_one_launch_equals_unfused(dtype, M, gen, monkeypatch):
    K, N = 100, 48  # ragged K and N: masked tails
    a = (torch.randn(M, K, generator=gen) * 2).to(dtype)
    wg, wu = weights(gen, N, K, dtype)
    assert LS.fused(a, wg, wu)
    launches = []
    monkeypatch.setattr(LS, "_linear_swiglu_kernel", _Spy(LS._linear_swiglu_kernel, launches))
    out = LS.triton_linear_swiglu(a, wg, wu)
    assert launches and out.shape == (M, N) and out.is_contiguous()
    assert torch.equal(out, unfused_triton(a, wg, wu))
    g, u = (a.double() @ w.double().t() for w in (wg, wu))  # accuracy, a separate check
    assert rel_err(out, torch.nn.functional.silu(g) * u) < (1e-5 if dtype == torch.float32 else 2e-3)


class _Spy:
    """A kernel stand-in that records launches and forwards them."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(grid)
        return self.kernel[grid]


@needs_triton
def test_interpreter_tiling_changes_no_bit(gen):
    """Other column blocks, depths and K unrolls run the same per-chunk dots in the same order."""
    a = torch.randn(3, 130, generator=gen).to(torch.float16)
    wg, wu = weights(gen, 40, 130, torch.float16)
    ref = LS.triton_linear_swiglu(a, wg, wu)
    for bn, unroll in ((16, 1), (64, 1), (16, 2), (32, 4)):
        got = LS.triton_linear_swiglu(a, wg, wu, _config=dict(BLOCK_N=bn, num_stages=2, K_UNROLL=unroll))
        assert torch.equal(got, ref), (bn, unroll)


@needs_triton
def test_interpreter_prefill_runs_unfused(gen, monkeypatch):
    """M above the decode range, or a strided weight: the two ops unfused (the same bits by definition)."""
    a = torch.randn(17, 32, generator=gen)
    wg, wu = weights(gen, 24, 32, torch.float32)
    assert not LS.fused(a, wg, wu)
    assert not LS.fused(a[:2], wg.t().contiguous().t(), wu)
    launches = []
    monkeypatch.setattr(LS, "_linear_swiglu_kernel", _Spy(LS._linear_swiglu_kernel, launches))
    assert torch.equal(LS.triton_linear_swiglu(a, wg, wu), unfused(a, wg, wu)) and not launches  # the ops


def test_cpu_op_is_the_unfused_ops(gen):
    a = torch.randn(5, 33, generator=gen)
    wg, wu = weights(gen, 7, 33, torch.float32)
    assert torch.equal(OP(a, wg, wu), unfused(a, wg, wu))


def test_bad_inputs(gen):
    a = torch.randn(2, 8, generator=gen)
    with pytest.raises(ValueError, match="two weights"):
        OP(a, torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="two weights"):
        OP(a, torch.randn(4, 9), torch.randn(4, 9))
    with pytest.raises(ValueError, match="one dtype"):
        OP(a, torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float64))


_COMPILE_SCRIPT = r"""
from detcompile.kernels import linear_swiglu as LS
fn = LS._linear_swiglu_kernel
for pdl in (False, True):
    const = dict(IS_FP32=False, PRECISION="ieee", BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, K_UNROLL=1, PTX=True, PDL=pdl)
    # PF_BYTES stays a runtime argument: the prefetch (experimental, _pdl) is compiled in with PDL
    sig = {n: "i32" for n in fn.arg_names}
    sig.update({n: "*bf16" for n in ("a_ptr", "wg", "wu", "c")})
    sig.update({n: "constexpr" for n in const})
    ptx = triton.compile(source(fn, sig, const), target=TARGET, options={"num_warps": 4, "num_stages": 3}).asm["ptx"]
    assert ("griddepcontrol.wait" in ptx) == pdl == ("cp.async.bulk.prefetch.L2" in ptx)
    assert "div.rn.f32" in ptx and "ex2.approx.ftz.f32" in ptx  # silu_mul's inline silu
print("COMPILED")
"""


@needs_triton
def test_triton_compiles_for_sm90():
    """Compile the kernel for sm_90 without a GPU (in a subprocess: this one runs the interpreter)."""
    compile_for_sm90(_COMPILE_SCRIPT)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 7, 16, 17])
def test_gpu_llama_mlp_equals_unfused(M, dtype, gen, monkeypatch):
    """Llama-3-8B's gate/up at decode sizes (M = 17: the unfused path) and in a CUDA graph."""
    monkeypatch.setenv(LS.ONE_LAUNCH_ENV, "1")
    K, N = 4096, 14336
    a = torch.randn(M, K, generator=gen).to("cuda", dtype)
    wg, wu = weights(gen, N, K, dtype, "cuda")
    want = unfused(a, wg, wu)
    assert LS.fused(a, wg, wu) == (M <= 16)
    monkeypatch.delenv(LS.ONE_LAUNCH_ENV)
    assert not LS.fused(a, wg, wu)  # not yet by default on a GPU
    monkeypatch.setenv(LS.ONE_LAUNCH_ENV, "1")
    assert torch.equal(OP(a, wg, wu), want)
    # a row's bits do not depend on the other rows
    assert torch.equal(OP(a[:1], wg, wu)[0], want[0])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        OP(a, wg, wu)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            got = OP(a, wg, wu)
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)
