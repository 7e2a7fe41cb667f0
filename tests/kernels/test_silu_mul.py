"""detcompile::silu_mul: on the CPU today's graph bitwise (cpu_pointwise silu, then mul); in the Triton
interpreter the rounding steps of eager (silu rounded, then the product); on the GPU eager's bits for every
bf16 and fp16 value; batch invariance; opcheck; bad inputs."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detcompile.kernels import silu_mul as sm
from detcompile.kernels.silu_mul import triton_silu_mul

from ._util import LAUNCH_DEV, needs_triton, same_bits

OP = torch.ops.detcompile.silu_mul
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def gate_up(shape, dtype, gen, device="cpu"):
    g = (torch.randn(shape, generator=gen) * 4).to(device=device, dtype=dtype)
    u = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    return g, u


def all_values(dtype, device="cpu"):
    """Every value of a 16-bit dtype (NaNs and infinities included)."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).to(device)


# ---------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_cpu_is_todays_graph(dtype, gen):
    # Without the fusion the CPU graph runs cpu_pointwise(gate, "silu") (fixed blocks), then mul.
    g, u = gate_up((5, 7, 300), dtype, gen)
    today = torch.ops.detcompile.cpu_pointwise(g, "silu", []) * u
    assert same_bits(OP(g, u), today)


def test_cpu_batch_invariant(gen):
    g, u = gate_up((40, 344), torch.float32, gen)
    ref = OP(g[:1], u[:1])[0]
    for bs in (2, 3, 7, 33):
        for pos in (0, bs // 2, bs - 1):
            gb, ub = g[1:bs + 1].clone(), u[1:bs + 1].clone()
            gb[pos], ub[pos] = g[0], u[0]
            assert torch.equal(OP(gb, ub)[pos], ref), f"row at {pos} of {bs}"


def test_cpu_noncontiguous_halves(gen):
    # Phi-3: gate and up are the two halves of one projection (row stride 2N), multiplied up * silu(gate).
    gu = (torch.randn(3, 5, 64, generator=gen) * 3).to(torch.bfloat16)
    g, u = gu.chunk(2, dim=-1)
    out = OP(g, u)
    assert out.is_contiguous() and same_bits(out, torch.ops.detcompile.cpu_pointwise(g, "silu", []) * u)


def test_opcheck_cpu(gen):
    g, u = gate_up((4, 33), torch.float32, gen)
    torch.library.opcheck(OP.default, (g, u))


def test_bad_inputs_cpu(gen):
    g, u = gate_up((4, 8), torch.float32, gen)
    with pytest.raises(ValueError, match="one shape"):
        OP(g, u[:, :4])
    with pytest.raises(ValueError, match="one shape"):
        OP(g, u.bfloat16())
    with pytest.raises(Exception):
        OP(g.to(torch.int32), u.to(torch.int32))


# -------------------------------------------------------------------------- Triton (interpreter)


def _round(x: np.ndarray, dtype) -> np.ndarray:
    """float32 -> dtype (round to nearest even, through torch) -> float32."""
    return torch.from_numpy(x).to(dtype).float().numpy()


@needs_triton
@pytest.mark.skipif(LAUNCH_DEV == "cuda", reason="the interpreter's arithmetic (numpy exp)")
@pytest.mark.parametrize("dtype", DTYPES)
def test_interpreter_rounds_like_eager(dtype, gen):
    # In the interpreter silu is numpy's x / (1 + exp(-x)) (not libdevice's exp); the steps around it
    # must be eager's: silu rounded to the dtype, then the fp32 product, rounded once.
    g, u = gate_up((7, 300), dtype, gen)
    gate = g.float().numpy()
    with np.errstate(over="ignore"):
        s = gate / (np.float32(1) + np.exp(-gate))
    want = _round(_round(s, dtype) * u.float().numpy(), dtype)
    assert same_bits(triton_silu_mul(g, u), torch.from_numpy(want).to(dtype))
    torch.testing.assert_close(triton_silu_mul(g, u), F.silu(g) * u, rtol=1e-2 if dtype != torch.float32 else 1e-6,
                               atol=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_layouts_and_batch_invariance(dtype, gen):
    gu = (torch.randn(9, 6, 200, generator=gen) * 3).to(device=LAUNCH_DEV, dtype=dtype)
    g, u = gu.chunk(2, dim=-1)  # row stride 200, not 100
    out = triton_silu_mul(g, u)
    assert out.is_contiguous() and same_bits(out, triton_silu_mul(g.contiguous(), u.contiguous()))
    for rows in (1, 2, 5):
        assert same_bits(triton_silu_mul(g[:rows], u[:rows]), out[:rows])
    assert triton_silu_mul(g[:0], u[:0]).shape == (0, 6, 100)


# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_every_16bit_value_bitwise_eager(dtype):
    # Every gate value (NaN, inf, subnormals included), times 1 (silu's own bits) and times a shuffle of
    # all values (the product's rounding).
    x = all_values(dtype, "cuda")
    ups = (torch.ones_like(x), x.flip(0), x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
                                             .cuda()])
    for up in ups:
        got, want = triton_silu_mul(x, up).view(torch.int16), (F.silu(x) * up).view(torch.int16)
        bad = (got != want).nonzero()[:, 0]
        assert len(bad) == 0, (f"{len(bad)} of {len(x)} values differ from torch's silu * up, e.g. gate "
                               f"{x[bad[:4]].tolist()}: got {got[bad[:4]].tolist()}, torch {want[bad[:4]].tolist()}")
    assert sm.matches_eager(x.device) is True  # so the op runs the fused kernel
    assert same_bits(OP(x, ups[1]), F.silu(x) * ups[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 2, 17, 512])
def test_gpu_llama8b_shapes_bitwise_eager(dtype, tokens, gen):
    # Llama-3-8B's MLP: intermediate size 14336.
    g, u = gate_up((tokens, 14336), dtype, gen, device="cuda")
    assert same_bits(OP(g, u), F.silu(g) * u)
    assert same_bits(OP(g[None], u[None]), (F.silu(g) * u)[None])


@pytest.mark.gpu
def test_gpu_fp32_special_values_bitwise_eager(gen):
    g, u = gate_up((64, 1000), torch.float32, gen, device="cuda")
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, 88.0, 89.0, -88.0, -104.0, 1e30, -1e30,
                            float("inf"), -float("inf")], device="cuda")
    g[:, : len(special)] = special
    assert same_bits(OP(g, u), F.silu(g) * u)


@pytest.mark.gpu
def test_gpu_batch_invariant_and_opcheck(gen):
    g, u = gate_up((40, 14336), torch.bfloat16, gen, device="cuda")
    ref = OP(g[:1], u[:1])[0]
    for bs in (2, 7, 33):
        gb, ub = g[1:bs + 1].clone(), u[1:bs + 1].clone()
        gb[bs // 2], ub[bs // 2] = g[0], u[0]
        assert torch.equal(OP(gb, ub)[bs // 2], ref)
    torch.library.opcheck(OP.default, (g[:4], u[:4]))


@pytest.mark.gpu
def test_gpu_falls_back_to_eager_when_not_verified(monkeypatch, gen):
    # A GPU where the kernel's silu did not match torch's: the op runs the eager ops (same bits).
    g, u = gate_up((3, 100), torch.bfloat16, gen, device="cuda")
    monkeypatch.setitem(sm._MATCHES_EAGER, torch.cuda.current_device(), False)
    monkeypatch.setattr(sm, "triton_silu_mul", None)  # would raise if called
    assert same_bits(OP(g, u), F.silu(g) * u)
