"""detcompile.linear_group: sibling linears in one launch, each output bitwise its own matmul."""
import pytest
import torch

from detcompile.kernels.linear_group import triton_linear_group
from detcompile.kernels.matmul import triton_matmul

from ._util import compile_for_sm90, needs_triton

OP = torch.ops.detcompile.linear_group


def weights(gen, K, ns, dtype, device="cpu"):
    return [(torch.randn(n, K, generator=gen) * 0.1).to(device=device, dtype=dtype) for n in ns]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 16])
def test_interpreter_one_launch_equals_matmul(dtype, M, gen):
    K, ns = 100, (48, 16, 20)  # ragged K and N: masked tails
    a = torch.randn(M, K, generator=gen).to(dtype)
    ws = weights(gen, K, ns, dtype)
    outs = triton_linear_group(a, ws, _one_launch=True)
    assert len(outs) == 3
    for o, w in zip(outs, ws):
        assert o.shape == (M, w.shape[0]) and o.is_contiguous()
        assert torch.equal(o, triton_matmul(a, w.t()))


@needs_triton
def test_interpreter_two_weights_and_strided_input(gen):
    K = 64
    a = torch.randn(3, 2 * K, generator=gen)[:, ::2]  # a column stride of 2
    ws = weights(gen, K, (32, 40), torch.float32)
    for o, w in zip(triton_linear_group(a, ws, _one_launch=True), ws):
        assert torch.equal(o, triton_matmul(a, w.t()))


@needs_triton
def test_interpreter_config_override_changes_only_the_tiling(gen):
    """benchmarks/matmul_small_m.py sweeps the one-launch tile through ``_config``: each BLOCK_N gives
    the default's outputs (the interpreter runs the same per-chunk dots whatever the tiling)."""
    K, ns = 100, (48, 16, 20)
    a = torch.randn(2, K, generator=gen).to(torch.float16)
    ws = weights(gen, K, ns, torch.float16)
    ref = triton_linear_group(a, ws, _one_launch=True)
    for bn, unroll in ((16, 1), (64, 1), (16, 2), (32, 4)):  # K_UNROLL: the same chunks, the same order
        got = triton_linear_group(a, ws, _one_launch=True, _config=dict(BLOCK_N=bn, num_stages=2, K_UNROLL=unroll))
        assert all(torch.equal(g, r) for g, r in zip(got, ref)), (bn, unroll)


def test_cpu_op_equals_matmul(gen):
    a = torch.randn(5, 33, generator=gen)
    ws = weights(gen, 33, (7, 9, 11), torch.float32)
    for o, w in zip(OP(a, ws), ws):
        assert torch.equal(o, torch.ops.detcompile.matmul(a, w.t()))


def test_bad_inputs(gen):
    a = torch.randn(2, 8, generator=gen)
    with pytest.raises(ValueError, match="weights"):
        OP(a, [])
    with pytest.raises(ValueError, match="does not match"):
        OP(a, [torch.randn(4, 9)])
    with pytest.raises(ValueError, match="weights"):
        OP(a, [torch.randn(4, 8)] * 4)


_COMPILE_SCRIPT = r"""
from detcompile.kernels import linear_group as LG
fn = LG._linear_group_kernel
const = dict(IS_FP32=False, PRECISION="ieee", BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, K_UNROLL=4, PDL=True)
sig = {n: "i32" for n in fn.arg_names}
sig.update({n: "*bf16" for n in ("a_ptr", "w0", "w1", "w2", "c0", "c1", "c2")})
sig.update({n: "constexpr" for n in const})
k = triton.compile(source(fn, sig, const), target=TARGET, options={"num_warps": 4, "num_stages": 8})
assert "griddepcontrol.wait" in k.asm["ptx"] and "griddepcontrol.launch_dependents" in k.asm["ptx"]
print("COMPILED")
"""


@needs_triton
def test_triton_compiles_for_sm90():
    """Compile the kernel for sm_90 without a GPU (in a subprocess: this one runs the interpreter)."""
    compile_for_sm90(_COMPILE_SCRIPT)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 2, 7, 16, 17, 64])
def test_gpu_llama_qkv_equals_matmul(M, gen):
    K, ns = 4096, (4096, 1024, 1024)
    a = torch.randn(M, K, generator=gen).to("cuda", torch.bfloat16)
    ws = weights(gen, K, ns, torch.bfloat16, "cuda")
    for o, w in zip(OP(a, ws), ws):
        assert torch.equal(o, torch.ops.detcompile.matmul(a, w.t()))
    # a row's bits do not depend on the other rows (M = 1 vs its row in the batch)
    one = OP(a[:1], ws)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(one, OP(a, ws)))
