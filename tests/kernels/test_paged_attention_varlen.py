"""Tests for detcompile::paged_attention_varlen: ragged rows (decode tokens and prefill chunks of
any length) in one launch with a fixed grid, the layout of the engine's mixed steps.

The promise: each row gets *the bits* ``paged_attention`` gives it alone (and so a full causal
prefill, a chunk or a decode), whatever other rows share the launch or how many spare tiles pad
the grid; tokens of no row get zeros; the launch reads nothing on the host (CUDA graphs)."""
import pytest
import torch

from detcompile.kernels.paged_attention import (
    max_varlen_tiles, triton_paged_attention, triton_paged_attention_varlen, varlen_block_m, varlen_tiles,
)

from ._host_sync import HostSyncRecorder
from ._util import HAS_CUDA, LAUNCH_DEV, needs_triton
from .test_attention import randn
from .test_paged_attention import build_cache

gpu = pytest.mark.gpu
varlen_op = torch.ops.detcompile.paged_attention_varlen
SMALL = dict(_block_m=16, _block_n=16, _split=32)  # interpreter: 2 tiles per split


def ragged(q_full, kv_lens, q_lens, pad_tokens=0):
    """Flat q [T, Hq, D] of each row's last q_lens[b] positions, plus q_start and q_lens (int32)."""
    parts, starts, s = [], [], 0
    for b, (n, m) in enumerate(zip(kv_lens, q_lens)):
        parts.append(q_full[b, :, n - m : n].transpose(0, 1))
        starts.append(s)
        s += m
    q = torch.cat(parts + [torch.zeros_like(parts[0][:1]).expand(pad_tokens, -1, -1)])
    dev = q_full.device
    return (q.contiguous(), torch.tensor(starts, dtype=torch.int32, device=dev),
            torch.tensor(q_lens, dtype=torch.int32, device=dev))


def check_rows(out, q_full, kc, vc, bt, kv_lens, q_lens, starts, **kw):
    for b, (n, m) in enumerate(zip(kv_lens, q_lens)):
        alone = triton_paged_attention(q_full[b : b + 1, :, n - m : n], kc, vc, bt[b : b + 1],
                                       torch.tensor([n], dtype=torch.int32, device=bt.device), **kw)
        s = int(starts[b])
        assert torch.equal(out[s : s + m], alone[0].transpose(0, 1)), (b, n, m)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("feature", ["plain", "window", "softcap", "sinks"])
def test_triton_varlen_rows_equal_alone(gen, dtype, feature):
    # Decode rows (1 query), short and long chunks, a chunk starting mid-sequence; page 4, so a
    # row's keys cross pages, tiles and splits.
    B, Hq, Hkv, L, D, page = 5, 4, 2, 70, 16, 4
    q_full = randn(gen, B, Hq, L, D, dtype=dtype, device=LAUNCH_DEV)
    k, v = randn(gen, B, Hkv, L, D, dtype=dtype, device=LAUNCH_DEV), randn(gen, B, Hkv, L, D, dtype=dtype,
                                                                            device=LAUNCH_DEV)
    kc, vc, bt = build_cache(k, v, page, gen)
    kv_lens, q_lens = [70, 5, 33, 41, 9], [1, 5, 1, 20, 3]
    kw = dict(window=7 if feature == "window" else 0, softcap=5.0 if feature == "softcap" else 0.0,
              sinks=randn(gen, Hq, device=LAUNCH_DEV) if feature == "sinks" else None)
    q, starts, lens = ragged(q_full, kv_lens, q_lens, pad_tokens=3)
    kvl = torch.tensor(kv_lens, dtype=torch.int32, device=LAUNCH_DEV)
    G = Hq // Hkv
    tiles = varlen_tiles(q_lens, G, 16).to(LAUNCH_DEV)
    out = triton_paged_attention_varlen(q, kc, vc, bt, kvl, starts, lens, tiles, **kw, **SMALL)
    check_rows(out, q_full, kc, vc, bt, kv_lens, q_lens, starts, **kw, **SMALL)
    assert not out[sum(q_lens):].any()  # tokens of no row: zeros

    # A fixed grid (CUDA graph) padded with spare tiles of a row with no queries and no keys gives
    # the same bits, and the launch reads nothing on the host.
    bt2 = torch.cat([bt, torch.zeros_like(bt[:1])])
    kvl2 = torch.cat([kvl, kvl.new_zeros(1)])
    starts2, lens2 = torch.cat([starts, starts.new_zeros(1)]), torch.cat([lens, lens.new_zeros(1)])
    n = max_varlen_tiles(q.shape[0], B + 1, G, 16)
    tiles2 = varlen_tiles(q_lens + [0], G, 16, num_tiles=n, spare_row=B).to(LAUNCH_DEV)
    with HostSyncRecorder() as rec:
        out2 = triton_paged_attention_varlen(q, kc, vc, bt2, kvl2, starts2, lens2, tiles2, **kw, **SMALL)
    assert rec.calls == []
    assert torch.equal(out, out2)


def test_varlen_tiles_layout():
    t = varlen_tiles([1, 40, 3], group=4, block_m=64)
    assert t.tolist() == [[0, 1, 1, 1, 2], [0, 0, 1, 2, 0]]
    t = varlen_tiles([1, 40, 3], group=4, block_m=64, num_tiles=8, spare_row=3)
    assert t.tolist() == [[0, 1, 1, 1, 2, 3, 3, 3], [0, 0, 1, 2, 0, 0, 0, 0]]
    assert max_varlen_tiles(44, 3, 4, 64) >= 5
    with pytest.raises(ValueError, match="do not fit"):
        varlen_tiles([1, 40, 3], group=4, block_m=64, num_tiles=4, spare_row=3)


def test_cpu_varlen_rows_equal_alone(gen):
    B, Hq, Hkv, L, D, page = 3, 4, 2, 40, 16, 8
    q_full = randn(gen, B, Hq, L, D)
    k, v = randn(gen, B, Hkv, L, D), randn(gen, B, Hkv, L, D)
    kc, vc, bt = build_cache(k, v, page, gen)
    kv_lens, q_lens = [40, 7, 19], [1, 7, 4]
    q, starts, lens = ragged(q_full, kv_lens, q_lens, pad_tokens=2)
    tiles = varlen_tiles(q_lens, 2, 64)
    out = varlen_op(q, kc, vc, bt, torch.tensor(kv_lens, dtype=torch.int32), starts, lens, tiles)
    for b, (n, m) in enumerate(zip(kv_lens, q_lens)):
        alone = torch.ops.detcompile.paged_attention(q_full[b : b + 1, :, n - m : n], kc, vc, bt[b : b + 1],
                                                     torch.tensor([n], dtype=torch.int32))
        s = int(starts[b])
        assert torch.equal(out[s : s + m], alone[0].transpose(0, 1))
    assert not out[sum(q_lens):].any()


def test_varlen_bad_inputs(gen):
    kc = randn(gen, 4, 8, 2, 16)
    bt = torch.zeros(2, 2, dtype=torch.int32)
    kl = torch.tensor([3, 1], dtype=torch.int32)
    q = randn(gen, 4, 4, 16)
    with pytest.raises(ValueError, match="q_start"):
        varlen_op(q, kc, kc, bt, kl, torch.zeros(2, dtype=torch.int64), torch.ones(2, dtype=torch.int32),
                  torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[T, Hq, D\]"):
        varlen_op(q[None], kc, kc, bt, kl, torch.zeros(2, dtype=torch.int32), torch.ones(2, dtype=torch.int32),
                  torch.zeros(2, 1, dtype=torch.int32))


def test_varlen_fake_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = varlen_op(torch.empty(7, 8, 64), torch.empty(10, 16, 2, 64), torch.empty(10, 16, 2, 32),
                        torch.empty(3, 4, dtype=torch.int32), torch.empty(3, dtype=torch.int32),
                        torch.empty(3, dtype=torch.int32), torch.empty(3, dtype=torch.int32),
                        torch.empty(2, 5, dtype=torch.int32))
    assert out.shape == (7, 8, 32)


# ----------------------------------------------------------------------------------------------
# GPU (real tiles, the real SPLIT)
# ----------------------------------------------------------------------------------------------


@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_varlen_equals_alone_and_graph(gen, dtype):
    # Llama-3-8B attention shapes: decode rows next to chunks of 10..1500 queries (the paged call
    # alone uses 128-row tiles for those, the ragged launch 64-row ones: same bits), keys up to
    # 5000 (10 splits); then the same launch replayed from a CUDA graph with a padded grid.
    dev = torch.device("cuda")
    Hq, Hkv, D, page = 32, 8, 128, 16
    kv_lens, q_lens = [5000, 17, 1500, 2049, 700, 1], [1, 1, 1500, 10, 333, 1]
    B, L = len(kv_lens), max(kv_lens)
    q_full = randn(gen, B, Hq, L, D, dtype=dtype, device=dev)
    k, v = randn(gen, B, Hkv, L, D, dtype=dtype, device=dev), randn(gen, B, Hkv, L, D, dtype=dtype, device=dev)
    kc, vc, bt = build_cache(k, v, page, gen)
    q, starts, lens = ragged(q_full, kv_lens, q_lens, pad_tokens=5)
    kvl = torch.tensor(kv_lens, dtype=torch.int32, device=dev)
    G, bm = Hq // Hkv, varlen_block_m(D, D, dtype)
    tiles = varlen_tiles(q_lens, G, bm).to(dev)
    out = varlen_op(q, kc, vc, bt, kvl, starts, lens, tiles)
    check_rows(out, q_full, kc, vc, bt, kv_lens, q_lens, starts)

    bt2 = torch.cat([bt, torch.zeros_like(bt[:1])])
    kvl2, starts2, lens2 = (torch.cat([t, t.new_zeros(1)]) for t in (kvl, starts, lens))
    n = max_varlen_tiles(q.shape[0], B + 1, G, bm)
    tiles2 = varlen_tiles(q_lens + [0], G, bm, num_tiles=n, spare_row=B).to(dev)
    varlen_op(q, kc, vc, bt2, kvl2, starts2, lens2, tiles2)  # warm the launch
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = varlen_op(q, kc, vc, bt2, kvl2, starts2, lens2, tiles2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, out)


@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_varlen_opcheck(gen):
    dev = torch.device("cuda")
    q = randn(gen, 6, 4, 64, dtype=torch.bfloat16, device=dev)
    kc = randn(gen, 8, 16, 2, 64, dtype=torch.bfloat16, device=dev)
    bt = torch.arange(8, dtype=torch.int32, device=dev).reshape(2, 4)
    kl = torch.tensor([50, 3], dtype=torch.int32, device=dev)
    starts = torch.tensor([0, 3], dtype=torch.int32, device=dev)
    lens = torch.tensor([3, 3], dtype=torch.int32, device=dev)
    tiles = varlen_tiles([3, 3], 2, varlen_block_m(64, 64, torch.bfloat16)).to(dev)
    torch.library.opcheck(varlen_op.default, (q, kc, kc, bt, kl, starts, lens, tiles))
