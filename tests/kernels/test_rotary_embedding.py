"""detcompile::rotary_embedding: bitwise the unfused ops (HF's apply_rotary_pos_emb), on the CPU, in the
Triton interpreter and on the GPU; layouts; batch invariance; opcheck; bad inputs."""
import pytest
import torch

from detcompile.kernels.rotary_embedding import triton_rotary_embedding

from ._util import LAUNCH_DEV, needs_triton, same_bits

OP = torch.ops.detcompile.rotary_embedding
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def unfused(x, cos, sin):
    """transformers' apply_rotary_pos_emb, one tensor at a time."""
    return (x * cos) + (rotate_half(x) * sin)


def qk_cos_sin(B, T, H, Hk, D, cos_batch, dtype, gen, device="cpu", scale=1.0):
    """q [B, H, T, D] and k [B, Hk, T, D] as the attention layers make them (transposed views of
    [B, T, H, D]); cos, sin [cos_batch, 1, T, D]."""
    q = (torch.randn(B, T, H, D, generator=gen) * scale).to(device=device, dtype=dtype).transpose(1, 2)
    k = (torch.randn(B, T, Hk, D, generator=gen) * scale).to(device=device, dtype=dtype).transpose(1, 2)
    ang = torch.rand(cos_batch, T, D // 2, generator=gen) * 100
    ang = torch.cat([ang, ang], -1)
    cos, sin = (f(ang).to(device=device, dtype=dtype).unsqueeze(1) for f in (torch.cos, torch.sin))
    return q, k, cos, sin


#: (B, T, H, Hk, D, cos batch): Llama-like, cos per sequence, D not a power of two, one token.
SHAPES = [(2, 5, 4, 2, 16, 1), (3, 4, 2, 1, 20, 3), (1, 3, 4, 4, 128, 1), (2, 1, 2, 2, 8, 2)]


# ---------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_is_the_unfused_ops(dtype, shape, gen):
    q, k, cos, sin = qk_cos_sin(*shape, dtype, gen)
    oq, ok = OP([q, k], cos, sin)
    assert same_bits(oq, unfused(q, cos, sin)) and same_bits(ok, unfused(k, cos, sin))
    assert oq.stride() == torch.empty_like(q).stride()


def test_cpu_batch_invariant(gen):
    q, _, cos, sin = qk_cos_sin(1, 6, 4, 4, 16, 1, torch.bfloat16, gen)
    ref = OP([q], cos, sin)[0]
    for b in (2, 5):
        qs, _, _, _ = qk_cos_sin(b, 6, 4, 4, 16, 1, torch.bfloat16, gen)
        qs = qs.contiguous()
        qs[b - 1] = q[0]
        assert torch.equal(OP([qs], cos, sin)[0][b - 1], ref[0])


def test_opcheck_cpu(gen):
    q, k, cos, sin = qk_cos_sin(2, 5, 4, 2, 16, 1, torch.float32, gen)
    torch.library.opcheck(OP.default, ([q, k], cos, sin))
    torch.library.opcheck(OP.default, ([q], cos, sin))


def test_bad_inputs_cpu(gen):
    q, _, cos, sin = qk_cos_sin(1, 3, 2, 2, 8, 1, torch.float32, gen)
    with pytest.raises(ValueError, match="even"):
        OP([q[..., :7]], cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="last dim"):
        OP([q], cos[..., :4], sin[..., :4])
    with pytest.raises(ValueError, match="broadcast"):
        OP([q], cos.expand(2, 2, 3, 8), sin.expand(2, 2, 3, 8))
    with pytest.raises(ValueError, match="empty"):
        OP([], cos, sin)
    with pytest.raises(ValueError, match="one floating dtype"):
        OP([q.bfloat16()], cos, sin)


# -------------------------------------------------------------------- Triton (interpreter / GPU)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_is_the_unfused_ops(dtype, shape, gen):
    q, k, cos, sin = qk_cos_sin(*shape, dtype, gen, device=LAUNCH_DEV)
    oq, ok = triton_rotary_embedding([q, k], cos, sin)
    assert same_bits(oq, unfused(q, cos, sin)) and same_bits(ok, unfused(k, cos, sin))
    assert oq.stride() == torch.empty_like(q).stride() and ok.stride() == torch.empty_like(k).stride()
    (one,) = triton_rotary_embedding([k], cos, sin)
    assert same_bits(one, ok)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_rounding_edges(dtype, gen):
    # Large and tiny magnitudes: products that round at every step (bf16: into the subnormal range
    # too), signed zeros, cancellation in the add.
    q, k, cos, sin = qk_cos_sin(2, 4, 3, 2, 16, 2, dtype, gen, device=LAUNCH_DEV)
    mags = torch.tensor([1e-20, 1e-3, 1.0, 3e3, 1e20], dtype=torch.float32)
    limit = torch.finfo(dtype).max ** 0.5
    scale = mags[torch.randint(0, 5, q.shape, generator=gen)].clamp(max=limit).to(device=LAUNCH_DEV)
    q = (q.float() * scale).to(dtype)
    q[0, 0, 0, :4] = torch.tensor([0.0, -0.0, 0.0, -0.0])
    k = torch.cat([q[:, :2, :, 8:], q[:, :2, :, :8]], -1)  # x2 == x1 pairs: exact cancellation
    (oq, ok) = triton_rotary_embedding([q, k], cos, sin)
    assert same_bits(oq, unfused(q, cos, sin)) and same_bits(ok, unfused(k, cos, sin))


@needs_triton
def test_triton_partial_rotary_slice_and_ranks(gen):
    # The rotated slice of a partial rotary (GPT-NeoX rotary_pct): a non-dense view of x.
    q, _, cos, sin = qk_cos_sin(2, 5, 4, 4, 32, 1, torch.bfloat16, gen, device=LAUNCH_DEV)
    part, c, s = q[..., :16], cos[..., :16], sin[..., :16]
    (out,) = triton_rotary_embedding([part], c, s)
    ref = unfused(part, c, s)
    assert same_bits(out, ref) and out.stride() == ref.stride()
    # Ranks 3 and 2: cos [T, D] against x [H, T, D] / [T, D].
    x3, c2, s2 = q[0], cos[0, 0], sin[0, 0]
    assert same_bits(triton_rotary_embedding([x3], c2, s2)[0], unfused(x3, c2, s2))
    assert same_bits(triton_rotary_embedding([x3[0]], c2, s2)[0], unfused(x3[0], c2, s2))


@needs_triton
def test_triton_more_than_two_tensors_and_empty(gen):
    q, k, cos, sin = qk_cos_sin(2, 3, 2, 2, 8, 1, torch.float16, gen, device=LAUNCH_DEV)
    outs = triton_rotary_embedding([q, k, q[:0], k], cos, sin)
    for x, o in zip([q, k, q[:0], k], outs):
        assert same_bits(o, unfused(x, cos, sin))


# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 2, 7, 300])
def test_gpu_llama8b_shapes_bitwise_eager(dtype, T, gen):
    # Llama-3-8B's attention: 32 query heads, 8 KV heads, head dim 128; cos per sequence or shared.
    for cos_batch in (1, 2):
        q, k, cos, sin = qk_cos_sin(2, T, 32, 8, 128, cos_batch, dtype, gen, device="cuda", scale=4.0)
        oq, ok = OP([q, k], cos, sin)
        assert same_bits(oq, unfused(q, cos, sin)) and same_bits(ok, unfused(k, cos, sin))
        assert oq.stride() == q.stride()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_special_values_bitwise_eager(dtype, gen):
    q, k, cos, sin = qk_cos_sin(2, 16, 4, 2, 64, 1, dtype, gen, device="cuda")
    fi = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, fi.tiny, -fi.tiny, fi.tiny / 4, fi.max, -fi.max, float("inf"),
                            -float("inf"), float("nan"), 1e-30, -1e-30], dtype=torch.float32)
    idx = torch.randint(0, len(special), q.shape, generator=gen)
    q = torch.where(torch.rand(q.shape, generator=gen) < 0.3, special[idx], q.float().cpu()).to(dtype).cuda()
    oq, ok = OP([q, k], cos, sin)
    for x, out, ref in ((q, oq, unfused(q, cos, sin)), (k, ok, unfused(k, cos, sin))):
        nan = out.isnan()
        assert torch.equal(nan, ref.isnan()), _differences(x, cos, sin, out, ref, out.isnan() != ref.isnan())
        out0, ref0 = torch.where(nan, 0, out), torch.where(nan, 0, ref)
        assert same_bits(out0, ref0), _differences(x, cos, sin, out, ref, _bits(out0) != _bits(ref0))


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _differences(x, cos, sin, out, ref, where, limit=6):
    """The first differing elements with their inputs (x, its rotate_half partner, cos, sin), so a run
    that fails says which values the fused kernel treats differently from the eager ops."""
    rows, mask = [], (1 << 8 * out.element_size()) - 1  # bit patterns printed unsigned
    half = x.shape[-1] // 2
    for idx in where.nonzero()[:limit].tolist():
        b, h, t, d = idx
        p = d + half if d < half else d - half
        c, s = cos[min(b, cos.shape[0] - 1), 0, t, d].item(), sin[min(b, sin.shape[0] - 1), 0, t, d].item()
        rows.append(f"at {idx}: x={x[b, h, t, d].item()!r} partner={x[b, h, t, p].item()!r} cos={c!r} sin={s!r} "
                    f"out={out[b, h, t, d].item()!r} ({_bits(out)[b, h, t, d].item() & mask:#x}) "
                    f"ref={ref[b, h, t, d].item()!r} ({_bits(ref)[b, h, t, d].item() & mask:#x})")
    return f"{int(where.sum())} elements differ; " + "; ".join(rows)


@pytest.mark.gpu
def test_gpu_batch_invariant(gen):
    q, k, cos, sin = qk_cos_sin(1, 9, 32, 8, 128, 1, torch.bfloat16, gen, device="cuda")
    ref = OP([q, k], cos, sin)
    for b in (2, 8, 33):
        qs, ks, _, _ = qk_cos_sin(b, 9, 32, 8, 128, 1, torch.bfloat16, gen, device="cuda")
        qs, ks = qs.contiguous(), ks.contiguous()
        qs[b // 2], ks[b // 2] = q[0], k[0]
        oq, ok = OP([qs, ks], cos, sin)
        assert torch.equal(oq[b // 2], ref[0][0]) and torch.equal(ok[b // 2], ref[1][0])


@pytest.mark.gpu
def test_gpu_opcheck_and_bad_inputs(gen):
    q, k, cos, sin = qk_cos_sin(2, 5, 4, 2, 16, 1, torch.bfloat16, gen, device="cuda")
    torch.library.opcheck(OP.default, ([q, k], cos, sin))
    with pytest.raises(ValueError, match="one floating dtype"):
        OP([q], cos.float(), sin.float())
    from detcompile.kernels._common import UnsupportedError

    with pytest.raises(UnsupportedError):
        OP([q.double()], cos.double(), sin.double())
    # A layout the Triton kernel does not take (last stride 2): the eager ops, their definition.
    wide = torch.cat([q, q], -1)[..., ::2]
    assert same_bits(OP([wide], cos, sin)[0], unfused(wide, cos, sin))
