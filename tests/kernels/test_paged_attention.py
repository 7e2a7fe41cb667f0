"""Tests for detcompile::paged_attention and the split-KV schedule of the attention kernel.

The promise under test: a token decoded from a paged cache (alone or in a batch, with the keys
split over programs or not) gets *the same bits* as its row in a full causal prefill of the
sequence, and chunked prefill from the cache does too. Interpreter runs use small tiles and a
small split size so that a few dozen keys cross tiles, pages and splits."""
import pytest
import torch

from detcompile.kernels.attention_triton import SPLIT, _want_parallel_splits, triton_attention
from detcompile.kernels.paged_attention import triton_paged_attention

from ._util import LAUNCH_DEV, needs_triton, rel_err
from .test_attention import randn, ref_attention

gpu = pytest.mark.gpu
TOL16 = 2e-2
paged_op = torch.ops.detcompile.paged_attention
SMALL = dict(_block_m=16, _block_n=16, _split=32)  # interpreter: 2 tiles per split


def build_cache(k, v, page, gen, extra_pages=3):
    """Scatter contiguous per-row K/V [B, Hkv, L, D] into a shuffled paged cache."""
    B, Hkv, L, D = k.shape
    n_pages = -(-L // page)
    total = B * n_pages + extra_pages
    perm = torch.randperm(total, generator=gen)[: B * n_pages].reshape(B, n_pages).to(torch.int32)
    k_cache = torch.zeros(total, page, Hkv, D, dtype=k.dtype, device=k.device)
    v_cache = torch.zeros_like(k_cache)
    for b in range(B):
        for j in range(n_pages):
            n = min(page, L - j * page)
            k_cache[perm[b, j], :n] = k[b, :, j * page : j * page + n].transpose(0, 1)
            v_cache[perm[b, j], :n] = v[b, :, j * page : j * page + n].transpose(0, 1)
    return k_cache, v_cache, perm.to(k.device)


def prefill_rows(q_full, k, v, b, L, run):
    """Causal prefill of row b's first L tokens (the sequence alone)."""
    return run(q_full[b : b + 1, :, :L], k[b : b + 1, :, :L], v[b : b + 1, :, :L])[0]


# ----------------------------------------------------------------------------------------------
# Interpreter / CPU
# ----------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("page", [4, 16])
@pytest.mark.parametrize("par", [False, True])
def test_triton_decode_from_cache_equals_prefill(gen, page, par):
    B, Hq, Hkv, L, D = 3, 4, 2, 70, 16
    q_full = randn(gen, B, Hq, L, D, device=LAUNCH_DEV)
    k, v = randn(gen, B, Hkv, L, D, device=LAUNCH_DEV), randn(gen, B, Hkv, L, D, device=LAUNCH_DEV)
    k_cache, v_cache, bt = build_cache(k, v, page, gen)
    kv_lens = torch.tensor([70, 5, 33], dtype=torch.int32, device=LAUNCH_DEV)

    def run_prefill(q, kk, vv):
        return triton_attention(q, kk, vv, None, True, enable_gqa=True, **SMALL)

    # Decode: query = the last token of each row.
    q_dec = torch.stack([q_full[b, :, int(kv_lens[b]) - 1] for b in range(B)])[:, :, None]
    out = triton_paged_attention(q_dec, k_cache, v_cache, bt, kv_lens, _parallel_splits=par, **SMALL)
    for b in range(B):
        n = int(kv_lens[b])
        want = prefill_rows(q_full, k, v, b, n, run_prefill)[:, n - 1 : n]
        assert torch.equal(out[b], want), b
        # The same row decoded alone.
        alone = triton_paged_attention(q_dec[b : b + 1], k_cache, v_cache, bt[b : b + 1], kv_lens[b : b + 1],
                                       _parallel_splits=not par, **SMALL)
        assert torch.equal(alone[0], out[b])
    ref = ref_attention(q_dec[:1], k[:1, :, :70], v[:1, :, :70], enable_gqa=True)
    assert rel_err(out[:1], ref) < 1e-5


@needs_triton
def test_triton_chunked_prefill_from_cache_equals_prefill(gen):
    B, Hq, Hkv, L, D, page = 2, 2, 1, 50, 16, 8
    q_full = randn(gen, B, Hq, L, D, device=LAUNCH_DEV)
    k, v = randn(gen, B, Hkv, L, D, device=LAUNCH_DEV), randn(gen, B, Hkv, L, D, device=LAUNCH_DEV)
    k_cache, v_cache, bt = build_cache(k, v, page, gen)
    full = triton_attention(q_full, k, v, None, True, enable_gqa=True, **SMALL)
    # Both rows at the same length, processed in chunks of 7 queries (the last chunk shorter).
    for start in range(0, L, 7):
        end = min(L, start + 7)
        kv_lens = torch.full((B,), end, dtype=torch.int32, device=LAUNCH_DEV)
        out = triton_paged_attention(q_full[:, :, start:end], k_cache, v_cache, bt, kv_lens, **SMALL)
        assert torch.equal(out, full[:, :, start:end]), start


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
def test_triton_parallel_splits_same_bits(gen, causal):
    # Keys split over programs + merge kernel == the one-program fold, bit for bit.
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 3, 100, 16
    q = randn(gen, B, Hq, Lq if not causal else Lk, D, device=LAUNCH_DEV)
    k, v = randn(gen, B, Hkv, Lk, D, device=LAUNCH_DEV), randn(gen, B, Hkv, Lk, D, device=LAUNCH_DEV)
    a = triton_attention(q, k, v, None, causal, enable_gqa=True, _parallel_splits=True, **SMALL)
    b = triton_attention(q, k, v, None, causal, enable_gqa=True, _parallel_splits=False, **SMALL)
    assert torch.equal(a, b)
    assert rel_err(a, ref_attention(q, k, v, None, causal, enable_gqa=True)) < 1e-5
    # A bool mask (Lq != Lk: no segment origins) goes through the split schedule as well.
    if not causal:
        m = torch.rand(B, 1, Lq, Lk, generator=gen).to(LAUNCH_DEV) > 0.3
        a = triton_attention(q, k, v, m, False, enable_gqa=True, _parallel_splits=True, **SMALL)
        b = triton_attention(q, k, v, m, False, enable_gqa=True, _parallel_splits=False, **SMALL)
        assert torch.equal(a, b)


@needs_triton
def test_triton_split_boundaries_do_not_move_with_length(gen):
    # The same query row with more keys after it (masked by causality) keeps its bits: splits and
    # tiles sit at absolute offsets from position 0.
    Hq, D, L = 2, 16, 90
    q, k, v = (randn(gen, 1, Hq, L, D, device=LAUNCH_DEV) for _ in range(3))
    full = triton_attention(q, k, v, None, True, **SMALL)
    for n in (33, 64, 65, 80):
        assert torch.equal(triton_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], None, True, **SMALL),
                           full[:, :, :n]), n


def test_cpu_paged_equals_cpu_attention(gen):
    B, Hq, Hkv, L, D, page = 3, 4, 2, 21, 8, 4
    q_full = randn(gen, B, Hq, L, D)
    k, v = randn(gen, B, Hkv, L, D), randn(gen, B, Hkv, L, D)
    k_cache, v_cache, bt = build_cache(k, v, page, gen)
    kv_lens = torch.tensor([21, 9, 1], dtype=torch.int32)
    q_dec = torch.stack([q_full[b, :, int(kv_lens[b]) - 1] for b in range(B)])[:, :, None]
    out = paged_op(q_dec, k_cache, v_cache, bt, kv_lens)
    for b in range(B):
        n = int(kv_lens[b])
        want = torch.ops.detcompile.attention(q_full[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n],
                                              None, True, None, True)[0, :, n - 1 : n]
        assert torch.equal(out[b], want), b
    assert rel_err(out[:1], ref_attention(q_dec[:1], k[:1], v[:1], enable_gqa=True)) < 1e-5


def poison_unwritten(cache, bt, kv_lens, page, values=(float("nan"), float("inf"), float("-inf"))):
    """A copy of ``cache`` with every slot that no row's first kv_lens[b] tokens map to filled with
    NaN / inf / -inf in turn (what an engine's torch.empty cache holds)."""
    live = torch.zeros(cache.shape[:2], dtype=torch.bool)
    for b in range(bt.shape[0]):
        for t in range(int(kv_lens[b])):
            live[int(bt[b, t // page]), t % page] = True
    out = cache.clone()
    dead = (~live).nonzero().tolist()
    for i, (p, s) in enumerate(dead):
        out[p, s] = values[i % len(values)]
    assert dead, "the test needs unwritten slots"
    return out


def _unwritten_slot_cases(gen, device, dtype=torch.float32):
    B, Hq, Hkv, L, D, page = 3, 4, 2, 45, 16, 8
    q_full = randn(gen, B, Hq, L, D, dtype=dtype, device=device)
    k, v = randn(gen, B, Hkv, L, D, dtype=dtype, device=device), randn(gen, B, Hkv, L, D, dtype=dtype, device=device)
    k_cache, v_cache, bt = build_cache(k, v, page, gen)
    # Decode (one query per row) and a 3-query chunk per row, rows of different lengths.
    for Lq, lens in ((1, [45, 9, 20]), (3, [12, 3, 33])):
        kv_lens = torch.tensor(lens, dtype=torch.int32, device=device)
        q = torch.stack([q_full[b, :, n - Lq : n] for b, n in enumerate(lens)])
        bad_k = poison_unwritten(k_cache.cpu(), bt.cpu(), lens, page).to(device)
        bad_v = poison_unwritten(v_cache.cpu(), bt.cpu(), lens, page).to(device)
        # Unused block-table entries point anywhere (here: page 0, whose slots a row may not own).
        bt_junk = bt.clone()
        for b, n in enumerate(lens):
            bt_junk[b, -(-n // page):] = 0
        yield (q, k_cache, v_cache, bt, kv_lens), (q, bad_k, bad_v, bt_junk, kv_lens)


def test_cpu_unwritten_slots_holding_nan_do_not_leak(gen):
    # Issue #11 item 6: pages are gathered whole, and a masked key used to add 0 * NaN.
    for clean, poisoned in _unwritten_slot_cases(gen, "cpu"):
        want = paged_op(*clean)
        got = paged_op(*poisoned)
        assert torch.isfinite(got).all()
        assert torch.equal(got, want)


@needs_triton
def test_triton_unwritten_slots_holding_nan_do_not_leak(gen):
    # Masked loads return 0 for slots past a row's length, so NaN/inf there never reach a row.
    for clean, poisoned in _unwritten_slot_cases(gen, LAUNCH_DEV):
        want = triton_paged_attention(*clean, **SMALL)
        got = triton_paged_attention(*poisoned, **SMALL)
        assert torch.isfinite(got).all()
        assert torch.equal(got, want)


def test_paged_bad_inputs(gen):
    q = randn(gen, 2, 4, 1, 8)
    kc = randn(gen, 6, 4, 2, 8)
    bt = torch.zeros(2, 3, dtype=torch.int32)
    kl = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="int32"):
        paged_op(q, kc, kc, bt.long(), kl)
    with pytest.raises(ValueError, match="block_table"):
        paged_op(q, kc, kc, bt[:1], kl)
    with pytest.raises(ValueError, match="multiple"):
        paged_op(randn(gen, 2, 3, 1, 8), kc, kc, bt, kl)
    with pytest.raises(ValueError, match="shapes"):
        paged_op(randn(gen, 2, 4, 1, 16), kc, kc, bt, kl)


def test_paged_fake_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = paged_op(torch.empty(2, 8, 3, 64), torch.empty(10, 16, 2, 64), torch.empty(10, 16, 2, 32),
                       torch.empty(2, 4, dtype=torch.int32), torch.empty(2, dtype=torch.int32))
    assert out.shape == (2, 8, 3, 32)


# ----------------------------------------------------------------------------------------------
# GPU (real tiles, the real SPLIT)
# ----------------------------------------------------------------------------------------------

CUDA = torch.device("cuda")


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_decode_equals_prefill_long(gen, dtype):
    # 5000 keys = 10 splits; decode alone (keys split over programs + merge) and in a batch of 80
    # (one program per row and KV head: too many programs to split) both equal the row of a full
    # causal prefill (128-row tiles vs the decode's 64-row tiles).
    Hq, Hkv, D, L, page = 32, 8, 128, 5000, 16
    q_full = randn(gen, 1, Hq, L, D, dtype=dtype, device=CUDA)
    k, v = randn(gen, 1, Hkv, L, D, dtype=dtype, device=CUDA), randn(gen, 1, Hkv, L, D, dtype=dtype, device=CUDA)
    full = triton_attention(q_full, k, v, None, True, enable_gqa=True)
    # Accuracy of the last 64 rows against float64 (bottom-right causal mask).
    tail = torch.arange(L, device=CUDA)[None, :] <= torch.arange(L - 64, L, device=CUDA)[:, None]
    assert rel_err(full[:, :, -64:], ref_attention(q_full[:, :, -64:], k, v, tail, enable_gqa=True)) < TOL16
    k_cache, v_cache, bt = build_cache(k, v, page, gen, extra_pages=64)
    for n in (L, 512, 513, 2049, 4097):
        kv = torch.tensor([n], dtype=torch.int32, device=CUDA)
        one = triton_paged_attention(q_full[:, :, n - 1 : n], k_cache, v_cache, bt, kv)
        assert torch.equal(one, full[:, :, n - 1 : n]), n
        # A batch of 80 rows (no key split) with the same sequence in the middle and last.
        B = 80
        assert not _want_parallel_splits(CUDA, B * 8, L, SPLIT)
        qb = randn(gen, B, Hq, 1, D, dtype=dtype, device=CUDA)
        kvb = torch.randint(1, L + 1, (B,), device=CUDA, dtype=torch.int32)
        for r in (B // 2, B - 1):
            qb[r] = q_full[0, :, n - 1 : n]
            kvb[r] = n
        outb = triton_paged_attention(qb, k_cache, v_cache, bt.expand(B, -1).contiguous(), kvb)
        assert torch.equal(outb[B // 2], one[0]) and torch.equal(outb[B - 1], one[0]), n


@gpu
def test_gpu_chunked_prefill_from_cache(gen):
    Hq, Hkv, D, L, page = 32, 8, 128, 3000, 16
    dtype = torch.bfloat16
    q_full = randn(gen, 1, Hq, L, D, dtype=dtype, device=CUDA)
    k, v = randn(gen, 1, Hkv, L, D, dtype=dtype, device=CUDA), randn(gen, 1, Hkv, L, D, dtype=dtype, device=CUDA)
    full = triton_attention(q_full, k, v, None, True, enable_gqa=True)
    k_cache, v_cache, bt = build_cache(k, v, page, gen)
    # Chunks of 10 queries (40 rows: the 64-row decode tiles) and of hundreds (128-row tiles).
    for start, end in [(0, 512), (512, 1700), (1700, 1710), (1710, 2100), (2100, 3000)]:
        kv = torch.tensor([end], dtype=torch.int32, device=CUDA)
        out = triton_paged_attention(q_full[:, :, start:end], k_cache, v_cache, bt, kv)
        assert torch.equal(out, full[:, :, start:end]), (start, end)


@gpu
def test_gpu_parallel_splits_same_bits(gen):
    dtype = torch.bfloat16
    q = randn(gen, 2, 32, 1, 128, dtype=dtype, device=CUDA)
    k, v = (randn(gen, 2, 8, 9000, 128, dtype=dtype, device=CUDA) for _ in range(2))
    a = triton_attention(q, k, v, None, False, enable_gqa=True, _parallel_splits=True)
    b = triton_attention(q, k, v, None, False, enable_gqa=True, _parallel_splits=False)
    assert torch.equal(a, b)
    assert rel_err(a, ref_attention(q, k, v, enable_gqa=True)) < TOL16


@gpu
def test_gpu_paged_opcheck(gen):
    q = randn(gen, 2, 4, 1, 64, dtype=torch.bfloat16, device=CUDA)
    kc = randn(gen, 8, 16, 2, 64, dtype=torch.bfloat16, device=CUDA)
    bt = torch.arange(8, dtype=torch.int32, device=CUDA).reshape(2, 4)
    kl = torch.tensor([50, 3], dtype=torch.int32, device=CUDA)
    torch.library.opcheck(paged_op.default, (q, kc, kc, bt, kl))
