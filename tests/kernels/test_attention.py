"""Tests for detcompile::attention: accuracy against torch SDPA in float64, and *bitwise* batch
invariance of a query row (batch, padding, packing, prefill vs decode, chunked prefill, sliding
windows) for the CPU path and the Triton path (interpreter here, CUDA in the gpu tests)."""
import math

import pytest
import torch
import torch.nn.functional as F

try:
    import triton
except Exception:  # pragma: no cover - Triton is a Linux dependency
    triton = None

from detcompile.kernels import _common
from detcompile.kernels.attention_cpu import _cpu_exp_nonpos, _cpu_tanh
from detcompile.kernels.attention_inputs import segment_origins
from detcompile.kernels.attention_triton import triton_attention

from ._util import HAS_CUDA, LAUNCH_DEV, needs_triton, rel_err

op = torch.ops.detcompile.attention
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def randn(gen, *shape, dtype=torch.float32, device="cpu"):
    if torch.device(device).type == "cpu":
        return torch.randn(*shape, generator=gen).to(dtype)
    # Large GPU tensors: draw on the device from a seed taken from the CPU generator.
    g = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    return torch.randn(*shape, generator=g, device=device).to(dtype)


def ref_attention(q, k, v, mask=None, is_causal=False, scale=None, enable_gqa=False, softcap=0.0):
    """float64 reference: torch SDPA, or the math formula when soft-capping."""
    q, k, v = q.double(), k.double(), v.double()
    if mask is not None and mask.is_floating_point():
        mask = mask.double()
    if softcap == 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    if enable_gqa:
        g = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(g, dim=-3), v.repeat_interleave(g, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    s = softcap * torch.tanh(s / softcap)
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    return torch.softmax(s, -1) @ v


# ----------------------------------------------------------------------------------------------
# Paths under test.
# ----------------------------------------------------------------------------------------------


def cpu_path(q, k, v, mask=None, is_causal=False, **kw):
    return op(q, k, v, mask, is_causal, **kw)


def triton_small_tiles(q, k, v, mask=None, is_causal=False, **kw):
    # 16x16 tiles so that L <= 40 spans several query blocks and key tiles; every compared run
    # of a test uses these same tiles.
    return triton_attention(q, k, v, mask, is_causal, _block_m=16, _block_n=16, **kw)


def triton_real_tiles(q, k, v, mask=None, is_causal=False, **kw):
    return triton_attention(q, k, v, mask, is_causal, **kw)


# ----------------------------------------------------------------------------------------------
# Accuracy cases (shared by the CPU, interpreter and GPU tests).
# ----------------------------------------------------------------------------------------------


def make_case(name, gen, dtype, device="cpu", B=2, H=4, D=16, L=37):
    """(args, kwargs) for op/launcher and for the reference. Masks never hide a whole row here."""
    Hkv = H
    Lq = Lk = L
    Dv = D
    mask, is_causal, kw = None, False, {}
    if name == "gqa":  # Hq=8, Hkv=2 (or more heads at the same ratio)
        H = max(H, 8)
        Hkv, is_causal, kw = H // 4, True, {"enable_gqa": True}
    if name == "lq_ne_lk":
        Lq, Lk = 5, L + 3
    if name == "lq_ne_lk_causal":  # top-left causal: query i sees keys j <= i
        Lq, Lk, is_causal = 7, L, True
    if name == "dv_ne_d":
        Dv = D + 8 if D < 128 else D // 2
        is_causal = True
    q = randn(gen, B, H, Lq, D, dtype=dtype, device=device)
    k = randn(gen, B, Hkv, Lk, D, dtype=dtype, device=device)
    v = randn(gen, B, Hkv, Lk, Dv, dtype=dtype, device=device)
    i = torch.arange(Lq, device=device)[:, None]
    j = torch.arange(Lk, device=device)[None, :]
    if name == "causal":
        is_causal = True
    elif name == "bool_mask":
        keep = torch.rand(B, 1, Lq, Lk, generator=gen).to(device) < 0.6
        mask = keep | (i == j)  # every row sees at least itself
    elif name == "mask_2d":
        mask = (torch.rand(Lq, Lk, generator=gen).to(device) < 0.5) | (i == j)
    elif name == "float_mask":  # ALiBi-like bias, causal via -inf
        slopes = torch.tensor([2.0 ** (-(h + 1)) for h in range(H)], device=device)[:, None, None]
        bias = -slopes * (i - j).abs()
        mask = torch.where(j <= i, bias, torch.tensor(float("-inf"), device=device)).to(dtype)[None]
    elif name == "float_mask_min":  # HF style 0 / finfo.min, with padding on one batch row
        vis = (j <= i).expand(B, 1, Lq, Lk).clone()
        vis[0, :, :, : Lk // 3] = False  # left-padding-like hole in batch row 0 ...
        vis |= i == j  # ... but every row still sees itself
        mask = torch.zeros(B, 1, Lq, Lk, dtype=dtype, device=device).masked_fill(~vis, torch.finfo(dtype).min)
    elif name == "scale":
        kw = {"scale": 0.3}
        is_causal = True
    elif name == "softcap":
        kw = {"softcap": 2.5}  # small cap so that tanh saturates for a good share of scores
        is_causal = True
    elif name == "softcap_gqa_mask":
        Hkv = q.shape[1] // 2
        k, v = k[:, :Hkv].contiguous(), v[:, :Hkv].contiguous()
        mask = (torch.rand(1, H, Lq, Lk, generator=gen).to(device) < 0.7) | (i == j)
        kw = {"softcap": 5.0, "enable_gqa": True, "scale": 0.2}
    return (q, k, v, mask, is_causal), kw


ACC_CASES = ["none", "causal", "bool_mask", "mask_2d", "float_mask", "float_mask_min", "gqa", "lq_ne_lk",
             "lq_ne_lk_causal", "dv_ne_d", "scale", "softcap", "softcap_gqa_mask"]


def check_accuracy(fn, name, gen, dtype, device="cpu", **shape):
    (q, k, v, mask, is_causal), kw = make_case(name, gen, dtype, device, **shape)
    out = fn(q, k, v, mask, is_causal, **kw)
    ref = ref_attention(q, k, v, mask, is_causal, **kw)
    assert out.dtype == q.dtype and out.shape == ref.shape
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{name} {dtype}: relative error {err:.3g}"


# ----------------------------------------------------------------------------------------------
# Invariance scenarios (shared by the CPU, interpreter and GPU tests).
# ----------------------------------------------------------------------------------------------


def seq(gen, L, H, Hkv, D, dtype, device):
    return tuple(randn(gen, h, L, D, dtype=dtype, device=device) for h in (H, Hkv, Hkv))


def cat(parts):
    return tuple(torch.cat([p[i] for p in parts], dim=1) for i in range(3))


def seg_mask(seg, causal=True, window=None):
    """bool [T, T] visibility from per-token segment ids (-1 = padding): HF-style masks, i.e.
    same segment, causal, inside the sliding window; padding keys are hidden from every row."""
    T = seg.shape[0]
    i = torch.arange(T, device=seg.device)[:, None]
    j = torch.arange(T, device=seg.device)[None, :]
    vis = (seg[:, None] == seg[None, :]) & (seg[None, :] >= 0)
    if causal:
        vis &= j <= i
    if window is not None:
        vis &= (i - j) < window
    return vis


def as_float(mask, dtype):
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def invariance_checks(attn, gen, dtype, device="cpu", H=4, Hkv=2, D=16, L=29, window=6, chunk=11,
                      positions=(0, 1, 5, 15, 16, 17, 28)):
    """Yield (name, got, expected): each pair must be bitwise equal. attn(q, k, v, mask, is_causal)
    gets 4-D tensors and runs with enable_gqa=True."""
    def run(q, k, v, mask=None, is_causal=False):
        return attn(q, k, v, mask, is_causal, enable_gqa=True)

    def ids(*segs):  # segment ids from (segment id, length) pairs
        return torch.cat([torch.full((n,), s, device=device) for s, n in segs])

    tq, tk, tv = target = seq(gen, L, H, Hkv, D, dtype, device)
    alone = run(tq[None], tk[None], tv[None], None, True)[0]

    # Explicit causal masks (bool, float) against is_causal.
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    yield "causal_bool_mask", run(tq[None], tk[None], tv[None], causal)[0], alone
    yield "causal_float_mask", run(tq[None], tk[None], tv[None], as_float(causal, dtype))[0], alone

    # In a batch of other sequences (is_causal, no mask).
    others = [seq(gen, L, H, Hkv, D, dtype, device) for _ in range(2)]
    rows = [others[0], target, others[1]]
    out = run(*(torch.stack([r[i] for r in rows]) for i in range(3)), None, True)
    yield "batch", out[1], alone

    # Right padding: the target is shorter than the batch; junk keys at the end are masked.
    lens = [L + 4, L, L + 7]
    T = max(lens)
    rows = [seq(gen, T, H, Hkv, D, dtype, device) for _ in lens]
    rows[1] = cat([target, seq(gen, T - L, H, Hkv, D, dtype, device)])
    qb, kb, vb = (torch.stack([r[i] for r in rows]) for i in range(3))
    m = torch.stack([seg_mask(ids((0, n), (-1, T - n)))[None] for n in lens])
    yield "right_pad_bool", run(qb, kb, vb, m)[1, :, :L], alone
    yield "right_pad_float", run(qb, kb, vb, as_float(m, dtype))[1, :, :L], alone

    # Decode (Lq = 1, no mask) against prefill, alone and in a right-padded batch.
    for p in positions:
        yield f"decode_p{p}", run(tq[None, :, p:p + 1], tk[None, :, :p + 1], tv[None, :, :p + 1])[0], alone[:, p:p + 1]
    p = positions[len(positions) // 2]
    kvlen = [p + 1 + 3, p + 1, p + 1 + 9]
    Tk = max(kvlen)
    rows = [seq(gen, Tk, H, Hkv, D, dtype, device) for _ in kvlen]
    rows[1] = cat([tuple(t[:, :p + 1] for t in target), seq(gen, Tk - p - 1, H, Hkv, D, dtype, device)])
    qd = torch.stack([rows[0][0][:, :1], tq[:, p:p + 1], rows[2][0][:, :1]])
    kd, vd = torch.stack([r[1] for r in rows]), torch.stack([r[2] for r in rows])
    md = torch.stack([(torch.arange(Tk, device=device) < n)[None, None, :] for n in kvlen])
    yield "decode_padded_batch", run(qd, kd, vd, md)[1], alone[:, p:p + 1]

    # Chunked prefill: a chunk of queries against all keys so far (explicit causal mask), plus
    # one chunk that also carries masked junk keys at the end.
    chunks = []
    for c0 in range(0, L, chunk):
        c1 = min(L, c0 + chunk)
        i = torch.arange(c1 - c0, device=device)[:, None]
        j = torch.arange(c1, device=device)[None, :]
        chunks.append(run(tq[None, :, c0:c1], tk[None, :, :c1], tv[None, :, :c1], j <= c0 + i)[0])
    yield "chunked", torch.cat(chunks, dim=1), alone
    c0, c1 = chunk, min(L, 2 * chunk)
    jq, jk, jv = seq(gen, 5, H, Hkv, D, dtype, device)
    kx, vx = torch.cat([tk[:, :c1], jk], 1), torch.cat([tv[:, :c1], jv], 1)
    i = torch.arange(c1 - c0, device=device)[:, None]
    j = torch.arange(c1 + 5, device=device)[None, :]
    yield "chunked_junk_keys", run(tq[None, :, c0:c1], kx[None], vx[None], j <= c0 + i)[0], alone[:, c0:c1]

    # Packed sequences (block-diagonal causal masks): target in the middle, and first.
    a, c = seq(gen, 13, H, Hkv, D, dtype, device), seq(gen, 7, H, Hkv, D, dtype, device)
    pq, pk, pv = cat([a, target, c])
    m = seg_mask(ids((0, 13), (1, L), (2, 7)))
    yield "packed_middle", run(pq[None], pk[None], pv[None], m)[0, :, 13:13 + L], alone
    yield "packed_middle_float", run(pq[None], pk[None], pv[None], as_float(m, dtype))[0, :, 13:13 + L], alone
    pq, pk, pv = cat([target, a])
    yield "packed_first", run(pq[None], pk[None], pv[None], seg_mask(ids((0, L), (1, 13))))[0, :, :L], alone

    # Left padding, in a batch with a longer unpadded row.
    P = 5
    rows = [seq(gen, P + L, H, Hkv, D, dtype, device), cat([seq(gen, P, H, Hkv, D, dtype, device), target])]
    qb, kb, vb = (torch.stack([r[i] for r in rows]) for i in range(3))
    m = torch.stack([seg_mask(ids((0, P + L)))[None], seg_mask(ids((-1, P), (0, L)))[None]])
    yield "left_pad_bool", run(qb, kb, vb, m)[1, :, P:], alone
    yield "left_pad_float", run(qb, kb, vb, as_float(m, dtype))[1, :, P:], alone

    # Sliding window: packed, left padded, decode and chunked against the windowed sequence alone.
    alone_sw = run(tq[None], tk[None], tv[None], seg_mask(ids((0, L)), window=window))[0]
    pq, pk, pv = cat([a, target])
    m = seg_mask(ids((0, 13), (1, L)), window=window)
    yield "sliding_packed", run(pq[None], pk[None], pv[None], m)[0, :, 13:], alone_sw
    lq, lk, lv = cat([seq(gen, P, H, Hkv, D, dtype, device), target])
    m = seg_mask(ids((-1, P), (0, L)), window=window)
    yield "sliding_left_pad", run(lq[None], lk[None], lv[None], as_float(m, dtype))[0, :, P:], alone_sw
    for p in positions[-3:]:
        md = (p - torch.arange(p + 1, device=device) < window)[None, :]
        got = run(tq[None, :, p:p + 1], tk[None, :, :p + 1], tv[None, :, :p + 1], md)[0]
        yield f"sliding_decode_p{p}", got, alone_sw[:, p:p + 1]

    # Bidirectional (encoder-style) attention: packed and padded.
    alone_bi = run(tq[None], tk[None], tv[None])[0]
    pq, pk, pv = cat([a, target, c])
    m = seg_mask(ids((0, 13), (1, L), (2, 7)), causal=False)
    yield "bidir_packed", run(pq[None], pk[None], pv[None], m)[0, :, 13:13 + L], alone_bi
    lq, lk, lv = cat([seq(gen, P, H, Hkv, D, dtype, device), target])
    m = (torch.arange(P + L, device=device) >= P)[None, None, None, :]
    yield "bidir_left_pad", run(lq[None], lk[None], lv[None], m)[0, :, P:], alone_bi


def assert_invariant(checks):
    bad = []
    n = 0
    for name, got, exp in checks:
        n += 1
        assert got.shape == exp.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(exp.shape)}"
        if not torch.equal(got, exp):
            bad.append(f"{name} (max diff {(got.double() - exp.double()).abs().max().item():.3g})")
    assert n > 20
    assert not bad, "not bitwise equal: " + ", ".join(bad)


def batch_rows_check(fn, gen, dtype, device, sizes, Lq, Lk, D, H=4, Hkv=2, mask_kind=None, is_causal=False):
    """A target row (fixed data) at a varying index of batches of fresh random neighbours."""
    t = [randn(gen, 1, h, l, D, dtype=dtype, device=device) for h, l in ((H, Lq), (Hkv, Lk), (Hkv, Lk))]
    tmask = None
    if mask_kind is not None:
        tmask = (torch.rand(1, 1, Lq, Lk, generator=gen) < 0.7).to(device)
        tmask |= torch.arange(Lq, device=device)[:, None] == torch.arange(Lk, device=device)[None, :]
        if mask_kind == "float":
            tmask = as_float(tmask, dtype)
    expected = None
    for n in sizes:
        idx = n // 2
        parts = [randn(gen, n, h, l, D, dtype=dtype, device=device) for h, l in ((H, Lq), (Hkv, Lk), (Hkv, Lk))]
        for p, tt in zip(parts, t):
            p[idx] = tt[0]
        mask = None
        if tmask is not None:
            mask = (torch.rand(n, 1, Lq, Lk, generator=gen) < 0.7).to(device)
            if mask_kind == "float":
                mask = as_float(mask, dtype)
            mask[idx] = tmask[0]
        out = fn(*parts, mask, is_causal, enable_gqa=True)[idx]
        if expected is None:
            expected = out
        assert torch.equal(out, expected), f"batch size {n}: target row changed"
    return expected


# ----------------------------------------------------------------------------------------------
# CPU path.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", ACC_CASES)
def test_cpu_accuracy(name, dtype, gen):
    check_accuracy(cpu_path, name, gen, dtype)


def test_cpu_3d_inputs(gen):
    q, k, v = (randn(gen, 4, 23, 16) for _ in range(3))
    out = op(q, k, v, None, True)
    assert out.shape == (4, 23, 16)
    assert torch.equal(out, op(q[None], k[None], v[None], None, True)[0])
    assert rel_err(out, ref_attention(q, k, v, is_causal=True)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Lq,Lk,D,mask_kind,is_causal", [(37, 37, 20, None, True), (1, 129, 24, None, False),
                                                        (29, 100, 16, "bool", False), (37, 37, 16, "float", False)])
def test_cpu_batch_invariance(Lq, Lk, D, mask_kind, is_causal, dtype, gen):
    batch_rows_check(cpu_path, gen, dtype, "cpu", range(1, 10), Lq, Lk, D, mask_kind=mask_kind, is_causal=is_causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_invariance_scenarios(dtype, gen):
    assert_invariant(invariance_checks(cpu_path, gen, dtype))


@pytest.mark.parametrize("D", [16, 40])
def test_cpu_invariance_scenarios_across_key_chunks(D, gen):
    # Sequences longer than two of the CPU path's 64-key chunks, offsets (packing, left padding)
    # that are not multiples of a chunk, decode positions on both sides of chunk boundaries.
    checks = invariance_checks(cpu_path, gen, torch.float32, D=D, L=150, window=70, chunk=50,
                               positions=(0, 63, 64, 65, 127, 128, 149))
    assert_invariant(checks)


def test_cpu_fully_masked_rows_are_zero(gen):
    q, k, v = (randn(gen, 2, 3, 9, 16) for _ in range(3))
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool).tril()
    mask[1, :, 4] = False  # row 4 of batch 1 sees nothing
    out = op(q, k, v, mask)
    assert torch.equal(out[1, :, 4], torch.zeros_like(out[1, :, 4]))
    ref = ref_attention(q, k, v, mask)
    keep = torch.ones(9, dtype=torch.bool)
    keep[4] = False
    assert rel_err(out[1][:, keep], ref[1][:, keep]) < 1e-5
    fm = as_float(mask, torch.float32)
    assert torch.equal(op(q, k, v, fm)[1, :, 4], torch.zeros_like(out[1, :, 4]))


def test_cpu_strided_inputs(gen):
    # HF passes [B, L, H, D] tensors transposed to [B, H, L, D]; the bits must not change.
    B, L, H, D = 2, 19, 4, 16
    qs, ks, vs = (randn(gen, B, L, H, D).transpose(1, 2) for _ in range(3))
    out = op(qs, ks, vs, None, True)
    assert torch.equal(out, op(qs.contiguous(), ks.contiguous(), vs.contiguous(), None, True))


def test_cpu_exp_and_tanh_helpers(gen):
    x = torch.cat([-torch.rand(20000, generator=gen) * 120, torch.tensor([0.0, -0.0, -1e-30, float("-inf")])])
    for dt, tol in ((torch.float32, 3e-7), (torch.float64, 5e-16)):
        got = _cpu_exp_nonpos(x.to(dt))
        ref = torch.exp(x.double())
        rel = ((got.double() - ref).abs() / ref.clamp_min(1e-300))[ref > torch.finfo(dt).tiny]
        assert rel.max().item() < tol
        assert got[-1].item() == 0.0 and got[-4].item() == 1.0
        # position independence: every element alone gives the same bits as in the big tensor
        assert torch.equal(torch.stack([_cpu_exp_nonpos(x[i:i + 1].to(dt))[0] for i in range(0, 20004, 997)]),
                           got[0:20004:997])
    y = torch.randn(5000, generator=gen) * 3
    assert (_cpu_tanh(y).double() - torch.tanh(y.double())).abs().max().item() < 1.2e-7


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("name", ["causal", "gqa", "float_mask", "bool_mask", "lq_ne_lk", "dv_ne_d", "softcap",
                                  "softcap_gqa_mask"])
def test_cpu_autograd(name, dtype, tol, gen):
    (q, k, v, mask, is_causal), kw = make_case(name, gen, dtype, B=2, H=4, D=16, L=13)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    w = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=gen).to(dtype)
    (op(q, k, v, mask, is_causal, **kw) * w).sum().backward()
    got = [t.grad for t in (q, k, v)]
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    m2 = mask.double() if mask is not None and mask.is_floating_point() else mask
    (ref_attention(q2, k2, v2, m2, is_causal, **kw) * w.double()).sum().backward()
    for name_, g, r in zip("qkv", got, (q2.grad, k2.grad, v2.grad)):
        assert g.dtype == dtype and g.shape == r.shape
        assert rel_err(g, r) < tol, f"grad {name_}: {rel_err(g, r):.3g}"


def test_cpu_autograd_3d(gen):
    q, k, v = (randn(gen, 4, 11, 16, dtype=torch.float64).requires_grad_() for _ in range(3))
    op(q, k, v, None, True).sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref_attention(q2, k2, v2, is_causal=True).sum().backward()
    for g, r in zip((q.grad, k.grad, v.grad), (q2.grad, k2.grad, v2.grad)):
        assert rel_err(g, r) < 1e-10


def opcheck_args(gen, device="cpu", dtype=torch.float32):
    def t(*s, grad=False):
        return randn(gen, *s, dtype=dtype, device=device).requires_grad_(grad)

    i, j = torch.arange(9, device=device)[:, None], torch.arange(9, device=device)[None, :]
    return [
        ((t(2, 4, 9, 16, grad=True), t(2, 4, 9, 16, grad=True), t(2, 4, 9, 16, grad=True)), {}),
        ((t(2, 4, 9, 16, grad=True), t(2, 2, 9, 16, grad=True), t(2, 2, 9, 24, grad=True)),
         {"is_causal": True, "enable_gqa": True, "softcap": 3.0, "scale": 0.2}),
        ((t(1, 2, 9, 16), t(1, 2, 9, 16), t(1, 2, 9, 16)), {"attn_mask": j <= i}),
        ((t(2, 2, 3, 16, grad=True), t(2, 2, 9, 16, grad=True), t(2, 2, 9, 16, grad=True)),
         {"attn_mask": as_float(((torch.rand(2, 1, 3, 9, generator=gen) < 0.6) | (j.cpu() == 0)).to(device), dtype)}),
        ((t(2, 9, 16, grad=True), t(2, 9, 16, grad=True), t(2, 9, 16, grad=True)), {"is_causal": True}),
    ]


def test_cpu_opcheck(gen):
    for args, kw in opcheck_args(gen):
        torch.library.opcheck(torch.ops.detcompile.attention.default, args, kw)


def test_fake_symbolic_shapes():
    # The fake impl must work under dynamic shapes (torch.compile with SymInts).
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        q = mode.from_tensor(torch.empty(2, 4, 7, 16), static_shapes=False)
        k = mode.from_tensor(torch.empty(2, 2, 9, 16), static_shapes=False)
        v = mode.from_tensor(torch.empty(2, 2, 9, 24), static_shapes=False)
        out = op(q, k, v, None, False, None, True)
        assert out.shape[:3] == q.shape[:3] and out.shape[3] == v.shape[3]


def test_bad_inputs(gen):
    q, k, v = (randn(gen, 1, 4, 8, 16) for _ in range(3))
    with pytest.raises(ValueError, match="floating dtype"):
        op(q.to(torch.int32), k.to(torch.int32), v.to(torch.int32))
    with pytest.raises(ValueError, match="floating dtype"):
        op(q, k.double(), v)
    with pytest.raises(ValueError, match="enable_gqa"):
        op(q, k[:, :2], v[:, :2])
    with pytest.raises(ValueError, match="Hq % Hkv"):
        op(q, k[:, :3], v[:, :3], enable_gqa=True)
    with pytest.raises(ValueError, match="is_causal"):
        op(q, k, v, torch.ones(8, 8, dtype=torch.bool), True)
    with pytest.raises(_common.UnsupportedError, match="bool"):
        op(q, k, v, torch.ones(8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="broadcast"):
        op(q, k, v, torch.ones(3, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="softcap"):
        op(q, k, v, softcap=-1.0)
    with pytest.raises(_common.UnsupportedError, match="4-D"):
        op(q[None], k[None], v[None])
    with pytest.raises(ValueError, match="shapes"):
        op(q, k[..., :8], v)


# ----------------------------------------------------------------------------------------------
# Triton path under the interpreter (small shapes; fp32 and fp16 only, see the bf16 tl.dot trap).
# On a CUDA machine the same small tests run on the GPU.
# ----------------------------------------------------------------------------------------------

INTERP_DTYPES = [torch.float32, torch.float16]


@needs_triton
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("name", ACC_CASES)
def test_triton_accuracy(name, dtype, gen):
    check_accuracy(triton_small_tiles, name, gen, dtype, LAUNCH_DEV, L=29)


@needs_triton
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_triton_accuracy_real_tiles(dtype, gen):
    for name in ("causal", "float_mask_min", "softcap_gqa_mask", "lq_ne_lk"):
        check_accuracy(triton_real_tiles, name, gen, dtype, LAUNCH_DEV, L=40)


@needs_triton
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_triton_invariance_scenarios(dtype, gen):
    assert_invariant(invariance_checks(triton_small_tiles, gen, dtype, LAUNCH_DEV, H=2, Hkv=1, positions=(0, 15, 16, 17, 28)))


@needs_triton
def test_triton_invariance_scenarios_real_tiles(gen):
    # Real tiles: L < BLOCK_M, so one program holds rows of several origins (the origin loop).
    assert_invariant(invariance_checks(triton_real_tiles, gen, torch.float16, LAUNCH_DEV, H=2, Hkv=1, positions=(0, 16, 28)))


@needs_triton
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_triton_batch_invariance(dtype, gen):
    kw = {"H": 2, "Hkv": 1}
    batch_rows_check(triton_small_tiles, gen, dtype, LAUNCH_DEV, range(1, 5), 21, 21, 16, is_causal=True, **kw)
    batch_rows_check(triton_small_tiles, gen, dtype, LAUNCH_DEV, range(1, 5), 1, 37, 16, **kw)
    batch_rows_check(triton_small_tiles, gen, dtype, LAUNCH_DEV, (1, 3), 19, 33, 16, mask_kind="float", **kw)


@needs_triton
def test_triton_strided_3d_and_empty(gen):
    B, L, H, D = 2, 19, 4, 16
    qs, ks, vs = (randn(gen, B, L, H, D, device=LAUNCH_DEV).transpose(1, 2) for _ in range(3))
    out = triton_small_tiles(qs, ks, vs, None, True)
    assert torch.equal(out, triton_small_tiles(qs.contiguous(), ks.contiguous(), vs.contiguous(), None, True))
    out3 = triton_small_tiles(qs[0], ks[0], vs[0], None, True)
    assert out3.shape == (H, L, D) and torch.equal(out3, out[0])
    # odd head dim (padded to 32 with masking)
    q, k, v = (randn(gen, 1, 2, 11, 20, device=LAUNCH_DEV) for _ in range(3))
    assert rel_err(triton_small_tiles(q, k, v, None, True), ref_attention(q, k, v, is_causal=True)) < 1e-5
    assert triton_small_tiles(q[:, :, :0], k, v).shape == (1, 2, 0, 20)
    assert torch.equal(triton_small_tiles(q, k[:, :, :0], v[:, :, :0]), torch.zeros(1, 2, 11, 20, device=LAUNCH_DEV))


@needs_triton
def test_triton_broadcast_masks(gen):
    # Masks with broadcast (size-1) dims, including the query and key dims, as torch allows.
    q, k, v = (randn(gen, 2, 4, 20, 16, device=LAUNCH_DEV) for _ in range(3))
    plain = triton_small_tiles(q, k, v)
    assert torch.equal(triton_small_tiles(q, k, v, torch.zeros(1, 1, 1, 1, device=LAUNCH_DEV)), plain)
    assert torch.equal(triton_small_tiles(q, k, v, torch.ones(20, 1, dtype=torch.bool, device=LAUNCH_DEV)), plain)
    keys = torch.rand(2, 1, 1, 20, generator=gen).to(LAUNCH_DEV) < 0.7
    keys[..., 0] = True
    heads = randn(gen, 1, 4, 20, 20, device=LAUNCH_DEV)
    for m in (keys, heads, as_float(keys, torch.float32) + heads):
        assert rel_err(triton_small_tiles(q, k, v, m), ref_attention(q, k, v, m)) < 1e-5
        assert rel_err(cpu_path(q.cpu(), k.cpu(), v.cpu(), m.cpu()), ref_attention(q, k, v, m).cpu()) < 1e-5


@needs_triton
def test_triton_fully_masked_rows_are_zero(gen):
    q, k, v = (randn(gen, 2, 2, 20, 16, device=LAUNCH_DEV) for _ in range(3))
    mask = torch.ones(2, 1, 20, 20, dtype=torch.bool, device=LAUNCH_DEV).tril()
    mask[1, :, 4] = False
    mask[1, :, 17] = False
    for m in (mask, as_float(mask, torch.float32)):
        out = triton_small_tiles(q, k, v, m)
        assert not out.isnan().any()
        assert torch.equal(out[1, :, 4], torch.zeros_like(out[1, :, 4]))
        assert torch.equal(out[1, :, 17], torch.zeros_like(out[1, :, 4]))
        assert rel_err(out[0], ref_attention(q, k, v, mask)[0]) < 1e-5


@needs_triton
def test_triton_bad_inputs(gen):
    q, k, v = (randn(gen, 1, 2, 8, 16, device=LAUNCH_DEV) for _ in range(3))
    with pytest.raises(_common.UnsupportedError, match="float64"):
        triton_attention(q.double(), k.double(), v.double())
    big = randn(gen, 1, 1, 4, 300, device=LAUNCH_DEV)
    with pytest.raises(_common.UnsupportedError, match="head dim"):
        triton_attention(big, big, big)
    with pytest.raises(ValueError, match="is_causal"):
        triton_attention(q, k, v, torch.ones(8, 8, dtype=torch.bool, device=LAUNCH_DEV), True)


_COMPILE_SCRIPT = r"""
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from detcompile.kernels import attention_triton as AT

fn = AT._attention_kernel
for dt, hd, mask_kind, causal, softcap, paged, par, extras, varlen in [
        ("bf16", 128, 2, False, True, False, False, False, False),
        ("fp16", 64, 1, False, False, False, False, False, False),
        ("fp32", 128, 0, True, False, False, False, False, False),
        ("bf16", 128, 0, True, False, True, True, True, False),
        ("bf16", 128, 0, True, True, True, False, True, False),
        ("bf16", 128, 0, True, False, True, False, False, True)]:
    bm, bn, nw, ns = AT.tile_config(hd, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt],
                                    64 if varlen else 1)
    const = dict(IS_CAUSAL=causal, MASK_KIND=mask_kind, HAS_ORIGIN=mask_kind != 0, HAS_SOFTCAP=softcap,
                 PAGED=paged, PARALLEL_SPLITS=par, HAS_WINDOW=extras, HAS_SINKS=extras, VARLEN=varlen, PDL=paged,
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=hd, BLOCK_DV=hd, DOT_PREC="ieee", SPLIT_KEYS=AT.SPLIT,
                 sqd=1, skd=1, svd=1, sod=1, smn=1)
    sig = {n: "i32" for n in fn.arg_names}
    sig.update({n: "*" + dt for n in ("Q", "K", "V", "Out")})
    sig.update({"Mask": "*u8" if mask_kind == 1 else "*" + dt, "Origin": "*i32", "scale": "fp32",
                "softcap": "fp32", "mask_min": "fp32", "BT": "*i32", "KVLens": "*i32",
                "WsAcc": "*fp32", "WsML": "*fp32", "Sinks": "*fp32",
                "QStart": "*i32", "QLens": "*i32", "TileSeq": "*i32", "TileBlk": "*i32"})
    sig.update({n: "constexpr" for n in const})
    try:
        src = ASTSource(fn, sig, constexprs=const)
    except Exception as e:  # API drift between Triton versions, not a kernel bug
        print("SKIP", e)
        sys.exit(0)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": nw, "num_stages": ns, "enable_fp_fusion": False})
    assert "ptx" in k.asm and ("griddepcontrol.wait" in k.asm["ptx"]) == paged  # PDL
mfn = AT._merge_splits_kernel
const = dict(BLOCK_M=16, BLOCK_DV=128, sod=1, HAS_SINKS=True, PAGED=True, SPLIT_KEYS=512, PDL=True)
sig = {n: "i32" for n in mfn.arg_names}
sig.update({"WsAcc": "*fp32", "WsML": "*fp32", "Out": "*bf16", "Sinks": "*fp32", "KVLens": "*i32"})
sig.update({n: "constexpr" for n in const})
k = triton.compile(ASTSource(mfn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4, "enable_fp_fusion": False})
assert "griddepcontrol.wait" in k.asm["ptx"]
print("COMPILED")
"""


@pytest.mark.skipif(triton is None or HAS_CUDA, reason="needs Triton; on a GPU the real tests compile it")
def test_triton_compiles_for_sm90():
    """Compile a few kernel variants for sm_90 without a GPU: catches what the interpreter cannot
    see (non-constexpr globals, unsupported constructs). Runs in a subprocess because this
    process has Triton in interpreter mode."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=root, capture_output=True,
                       text=True, timeout=300)
    if r.returncode == 0 and r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0 and "COMPILED" in r.stdout, r.stderr[-3000:]


def test_segment_origins():
    seg = torch.tensor([-1, -1, 0, 0, 0, 1, 1, 2])
    m = seg_mask(seg)[None, None]
    assert segment_origins(m).tolist() == [[[0, 0, 2, 2, 2, 5, 5, 7]]]
    assert segment_origins(as_float(m, torch.bfloat16)).tolist() == [[[0, 0, 2, 2, 2, 5, 5, 7]]]
    sw = seg_mask(torch.zeros(8, dtype=torch.long), window=2)[None, None]
    assert segment_origins(sw).tolist() == [[[0] * 8]]
    # A row that also sees keys before its segment start keeps them: origin <= first visible key.
    holes = torch.ones(6, 6, dtype=torch.bool).tril()
    holes[3, 2] = False  # row 3 "starts a segment" but still sees keys 0 and 1
    assert segment_origins(holes[None, None]).tolist() == [[[0, 0, 0, 0, 0, 0]]]
    holes[3, :3] = False
    assert segment_origins(holes[None, None]).tolist() == [[[0, 0, 0, 3, 0, 0]]]
    # broadcast query and key dims
    assert segment_origins(torch.ones(1, 1, 1, 1, dtype=torch.bool), 4).tolist() == [[[0, 0, 0, 0]]]
    pad = (torch.arange(6) >= 2)[None, None, None, :]  # bidirectional, left padding of 2
    assert segment_origins(pad).tolist() == [[[0, 0, 2, 2, 2, 2]]]


# ----------------------------------------------------------------------------------------------
# GPU (run on an H100 by the maintainer).
# ----------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def gpu_path(q, k, v, mask=None, is_causal=False, **kw):
    return op(q, k, v, mask, is_causal, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("name", ACC_CASES)
def test_gpu_accuracy(name, dtype, gen):
    check_accuracy(gpu_path, name, gen, dtype, "cuda", B=2, H=32, D=128, L=300)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("D", [64, 96, 256])
def test_gpu_accuracy_head_dims(D, dtype, gen):
    for name in ("causal", "float_mask_min", "softcap_gqa_mask"):
        check_accuracy(gpu_path, name, gen, dtype, "cuda", B=2, H=8, D=D, L=200)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_invariance_scenarios(dtype, gen):
    assert_invariant(invariance_checks(gpu_path, gen, dtype, "cuda", H=32, Hkv=8, D=128, L=300, window=64,
                                       chunk=100, positions=(0, 1, 63, 64, 65, 127, 128, 200, 299)))


@pytest.mark.gpu
def test_gpu_prefill_vs_decode_long(gen):
    dt, H, Hkv, D, L = torch.bfloat16, 32, 8, 128, 1024
    q = randn(gen, 1, H, L, D, dtype=dt, device="cuda")
    kc = randn(gen, 1, Hkv, L + 64, D, dtype=dt, device="cuda")  # a preallocated cache, sliced per step
    vc = randn(gen, 1, Hkv, L + 64, D, dtype=dt, device="cuda")
    k, v = kc[:, :, :L], vc[:, :, :L]
    full = op(q, k, v, None, True, enable_gqa=True)
    hf_mask = as_float(torch.ones(L, L, dtype=torch.bool, device="cuda").tril(), dt)[None, None]
    assert torch.equal(op(q, k, v, hf_mask, enable_gqa=True), full)
    for p in (0, 1, 63, 64, 127, 128, 129, 500, 777, 1023):
        dec = op(q[:, :, p:p + 1], kc[:, :, :p + 1], vc[:, :, :p + 1], None, False, enable_gqa=True)
        assert torch.equal(dec, full[:, :, p:p + 1]), f"decode at position {p} differs from prefill"
    ref = ref_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_err(full, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_batch_invariance(dtype, gen):
    sizes = list(range(1, 17)) + [33, 64]
    batch_rows_check(gpu_path, gen, dtype, "cuda", sizes, 257, 257, 128, H=32, Hkv=8, is_causal=True)
    batch_rows_check(gpu_path, gen, dtype, "cuda", sizes, 1, 1000, 128, H=32, Hkv=8)
    batch_rows_check(gpu_path, gen, dtype, "cuda", range(1, 17), 100, 300, 128, H=32, Hkv=8, mask_kind="float")
    batch_rows_check(gpu_path, gen, dtype, "cuda", range(1, 17), 130, 130, 128, H=32, Hkv=8, mask_kind="bool")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_repeatable(dtype, gen):
    (q, k, v, mask, is_causal), kw = make_case("softcap_gqa_mask", gen, dtype, "cuda", B=4, H=32, D=128, L=513)
    outs = [op(q, k, v, mask, is_causal, **kw) for _ in range(3)]
    assert all(torch.equal(o, outs[0]) for o in outs)


@pytest.mark.gpu
def test_gpu_strided_inputs(gen):
    B, L, H, D = 3, 200, 32, 128
    qs, ks, vs = (randn(gen, B, L, H, D, dtype=torch.bfloat16, device="cuda").transpose(1, 2) for _ in range(3))
    out = op(qs, ks, vs, None, True)
    assert torch.equal(out, op(qs.contiguous(), ks.contiguous(), vs.contiguous(), None, True))


@pytest.mark.gpu
def test_gpu_opcheck(gen):
    for dtype in (torch.float32, torch.bfloat16):
        for args, kw in opcheck_args(gen, "cuda", dtype):
            torch.library.opcheck(torch.ops.detcompile.attention.default, args, kw)


@pytest.mark.gpu
def test_gpu_autograd(gen):
    (q, k, v, mask, is_causal), kw = make_case("softcap_gqa_mask", gen, torch.float32, "cuda", B=2, H=8, D=64, L=50)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    op(q, k, v, mask, is_causal, **kw).square().sum().backward()
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_attention(q2, k2, v2, mask, is_causal, **kw).square().sum().backward()
    for g, r in zip((q.grad, k.grad, v.grad), (q2.grad, k2.grad, v2.grad)):
        assert rel_err(g, r) < 1e-4


@pytest.mark.gpu
def test_gpu_bad_inputs(gen):
    q, k, v = (randn(gen, 1, 2, 8, 16, device="cuda") for _ in range(3))
    with pytest.raises(_common.UnsupportedError, match="float64"):
        op(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="floating dtype"):
        op(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match="one device"):
        op(q, k.cpu(), v)
