"""detcompile::grouped_mm: batch invariance, accuracy, errors; the one-launch Triton path (offsets
read on the device, no host sync) equal bit for bit to the per-group ``triton_matmul`` launches it
replaced, for every way the group ranges can fall on the row tiles; CUDA-graph capture."""
import numpy as np
import pytest
import torch

from detcompile.kernels import _common
from detcompile.kernels._common import UnsupportedError
from detcompile.kernels.grouped_mm import grouped_mm_per_group, select_grouped_config, triton_grouped_mm
from detcompile.kernels.matmul import select_config, triton_matmul

from .._subset import cpu_subset
from ._host_sync import HostSyncRecorder
from ._util import capture_cuda_graph, grouped_mm_ref, rel_err, tol

CAN_INTERPRET = _common.triton_launchable(torch.empty(0))
needs_interp = pytest.mark.skipif(
    not CAN_INTERPRET, reason="Triton interpreter unavailable (needs triton and TRITON_INTERPRET=1)"
)


def offs_cases(S, G, gen):
    """Offsets (int32 and int64) for S rows and G >= 5 groups, covering every way the group ranges
    can fall on 16- and 64-row tiles."""
    cases = [
        sorted(torch.randint(0, S + 1, (G,), generator=gen).tolist()),  # random, some empty
        sorted(torch.randint(0, S - 3, (G,), generator=gen).tolist()),  # random, a zero tail
        [S] * G,  # everything in group 0 (offs[0] > 0)
        [0] * (G - 1) + [S],  # everything in the last group (offs starting at 0)
        [0] * G,  # every group empty: all rows are the zero tail
        [S // 3] * (G - 1) + [S - 2],  # empty middle groups and a 2-row zero tail
        [min(S, 1 + 17 * g // 2) for g in range(G)],  # odd sizes straddling the tiles
        [min(S, 16 * (g + 1)) for g in range(G)],  # groups exactly on 16-row tiles
        [10, 4, S + 50, S + 50, 20] + [S] * (G - 5),  # decreasing / past S: the clamped cummax
        [-3, 0, 7, 7, 9] + [S - 1] * (G - 5),  # a negative offset: clamped to 0
    ]
    return [torch.tensor(c, dtype=torch.int64 if i % 2 else torch.int32) for i, c in enumerate(cases)]


@pytest.fixture
def nan_empty(monkeypatch):
    """``torch.empty`` returns NaN-filled floats: a row the kernel forgets to write shows."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def same_tiles(cfg):
    """matmul launch config with the grouped kernel's tiles (pointer loads): the per-group reference
    whose tl.dot operand tiles are the grouped kernel's (the interpreter's numpy dot then matches)."""
    return dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"], TMA=False)


# ---------------------------------------------------------------------------------------------
# The op (CPU path: one cpu_matmul per group)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_bitwise_whatever_its_group_holds(dtype, gen):
    # A token's expert output must not depend on how many other tokens chose the same expert.
    w = torch.randn(4, 37, 29, generator=gen).to(dtype)
    target = torch.randn(1, 37, generator=gen).to(dtype)
    ref = torch.ops.detcompile.grouped_mm(target, w, torch.tensor([0, 0, 1, 1], dtype=torch.int32))[0]
    for n_before, n_after in ((0, 3), (5, 0), (2, 7)):
        others = torch.randn(n_before + n_after, 37, generator=gen).to(dtype)
        x = torch.cat([others[:n_before], target, others[n_before:]])
        # group 2 holds the target among its neighbours
        offs = torch.tensor([0, 0, n_before + 1 + n_after, n_before + 1 + n_after], dtype=torch.int32)
        out = torch.ops.detcompile.grouped_mm(x, w, offs)
        assert torch.equal(out[n_before], ref)


def test_accuracy_and_rows_past_last_offset_are_zero(gen):
    x = torch.randn(10, 16, generator=gen)
    w = torch.randn(3, 16, 8, generator=gen)
    offs = torch.tensor([2, 5, 8], dtype=torch.int32)
    out = torch.ops.detcompile.grouped_mm(x, w, offs)
    ref = grouped_mm_ref(x, w, offs)
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-6
    assert torch.equal(out[8:], torch.zeros(2, 8))


def test_opcheck(gen):
    x = torch.randn(6, 8, generator=gen)
    w = torch.randn(2, 8, 5, generator=gen)
    torch.library.opcheck(torch.ops.detcompile.grouped_mm.default, (x, w, torch.tensor([3, 6], dtype=torch.int32)))


def test_bad_inputs_are_clear_errors(gen):
    x = torch.randn(6, 8, generator=gen)
    with pytest.raises(UnsupportedError, match="K mismatch"):
        torch.ops.detcompile.grouped_mm(x, torch.randn(2, 7, 5), torch.tensor([3, 6], dtype=torch.int32))
    with pytest.raises(UnsupportedError, match="offs"):
        torch.ops.detcompile.grouped_mm(x, torch.randn(2, 8, 5), torch.tensor([3.0, 6.0]))


# ---------------------------------------------------------------------------------------------
# One-launch Triton path in the interpreter (fp32 / fp16: the interpreter's bf16 tl.dot is wrong)
# ---------------------------------------------------------------------------------------------

_INTERP_TILES = [None, dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2),
                 dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=2)]


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tiles", _INTERP_TILES, ids=["default", "m16", "m64"])
@pytest.mark.parametrize("S,K,N,G,w_nk", cpu_subset([(70, 70, 40, 5, False), (150, 100, 20, 6, True)],
                                                 keep=[(150, 100, 20, 6, True)]))
def test_interp_one_launch_equals_per_group_triton_matmul(gen, nan_empty, dtype, tiles, S, K, N, G, w_nk):
    # K spans several BLOCK_K chunks (32 fp32, 64 fp16) with a ragged end; S and N are not tile
    # multiples; w may be the [G, N, K] -> [G, K, N] transposed view transformers passes; x a
    # strided view. Every row is written (NaN-filled outputs), the tail with zeros.
    x = torch.randn(S, 2 * K, generator=gen).to(dtype)[:, ::2]
    if w_nk:
        w = torch.randn(G, N, K, generator=gen).to(dtype).transpose(1, 2)
    else:
        w = torch.randn(G, K, N, generator=gen).to(dtype)
    cfg = dict(select_grouped_config(S, G, dtype), **(tiles or {}))
    for offs in offs_cases(S, G, gen):
        got = triton_grouped_mm(x, w, offs, _config=tiles)
        want = grouped_mm_per_group(x, w, offs, lambda a, b: triton_matmul(a, b, _config=same_tiles(cfg)))
        assert torch.equal(got, want), offs.tolist()
        end = int(offs.clamp(0, S).max())
        assert torch.equal(got[end:], torch.zeros(S - end, N, dtype=dtype))


@needs_interp
def test_interp_every_output_element_written_exactly_once(gen, monkeypatch):
    # The interpreter runs the programs one after another, so a program writing rows of another
    # group could be hidden by the later, right write; on the GPU that is a race. Record every
    # stored address: each output element must be stored by exactly one program, once.
    from triton.runtime import interpreter

    real = interpreter.InterpreterBuilder.create_masked_store
    stored = []

    def record(self, ptrs, value, mask, *args, **kwargs):
        stored.append(ptrs.data[mask.data].copy())
        return real(self, ptrs, value, mask, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_store", record)
    S, G, N = 70, 5, 40
    x = torch.randn(S, 24, generator=gen)
    w = torch.randn(G, 24, N, generator=gen)
    for tiles in _INTERP_TILES:
        for offs in offs_cases(S, G, gen):
            stored.clear()
            triton_grouped_mm(x, w, offs, _config=tiles)
            addrs = torch.from_numpy(np.concatenate(stored).astype(np.int64))
            assert addrs.numel() == S * N and addrs.unique().numel() == S * N, (tiles, offs.tolist())


@needs_interp
def test_interp_fp32_equals_default_per_group_launches(gen, nan_empty):
    # fp32 takes matmul's fp32 config whole: the very launches the op made before, unchanged.
    x = torch.randn(300, 50, generator=gen)
    w = torch.randn(3, 40, 50, generator=gen).transpose(1, 2)
    for offs in ([1, 129, 280], [0, 300, 300], [200, 200, 250]):
        offs = torch.tensor(offs, dtype=torch.int32)
        assert torch.equal(triton_grouped_mm(x, w, offs), grouped_mm_per_group(x, w, offs, triton_matmul))


@needs_interp
def test_interp_many_groups_and_random_sizes(gen, nan_empty):
    # G not a power of two and above the 16 search lanes (a longer binary search); decode-like
    # sizes (mostly 0-2 rows per group) and prefill-like ones.
    tiles = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    for S, G in [(24, 37), (120, 37), (40, 129)]:
        x = torch.randn(S, 40, generator=gen)
        w = torch.randn(G, 40, 16, generator=gen)
        for _ in range(2):
            sizes = torch.multinomial(torch.ones(G), S, replacement=True, generator=gen).bincount(minlength=G)
            offs = sizes.cumsum(0).to(torch.int32)
            got = triton_grouped_mm(x, w, offs, _config=tiles)
            ref = lambda a, b: triton_matmul(a, b, _config=dict(tiles, TMA=False))  # noqa: E731
            assert torch.equal(got, grouped_mm_per_group(x, w, offs, ref)), (S, G)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_row_bitwise_whatever_the_batch(gen, dtype):
    # The target row, in group 1, among more and more rows of its own and other groups.
    tiles = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)
    w = torch.randn(3, 80, 24, generator=gen).to(dtype)
    target = torch.randn(1, 80, generator=gen).to(dtype)
    ref = triton_grouped_mm(target, w, torch.tensor([0, 1, 1]), _config=tiles)[0]
    for before, same_before, same_after, after in [(0, 0, 0, 3), (5, 7, 20, 1), (17, 15, 0, 40), (40, 33, 2, 0)]:
        n = before + same_before + 1 + same_after + after
        x = torch.randn(n, 80, generator=gen).to(dtype)
        pos = before + same_before
        x[pos] = target[0]
        offs = torch.tensor([before, pos + 1 + same_after, n])
        assert torch.equal(triton_grouped_mm(x, w, offs, _config=tiles)[pos], ref)


@needs_interp
def test_interp_equality_check_sees_a_different_reduction(gen):
    # The bitwise comparisons above can fail: per-group matmuls chunking K differently differ.
    x = torch.randn(37, 200, generator=gen)
    w = torch.randn(3, 200, 24, generator=gen)
    offs = torch.tensor([10, 30, 37], dtype=torch.int32)
    other = grouped_mm_per_group(x, w, offs, lambda a, b: triton_matmul(a, b, _config={"BLOCK_K": 16}))
    assert not torch.equal(triton_grouped_mm(x, w, offs), other)


@needs_interp
def test_interp_no_host_sync(gen):
    x = torch.randn(20, 16, generator=gen)
    w = torch.randn(3, 16, 8, generator=gen)
    offs = torch.tensor([5, 5, 17], dtype=torch.int32)
    with HostSyncRecorder() as rec:
        triton_grouped_mm(x, w, offs)
    assert rec.calls == []
    with HostSyncRecorder() as rec:  # the recorder does see the per-group path's offs.tolist()
        grouped_mm_per_group(x, w, offs, triton_matmul)
    assert "tolist" in rec.calls


@needs_interp
def test_interp_degenerate_shapes(gen):
    x = torch.randn(6, 8, generator=gen)
    offs2 = torch.tensor([3, 6], dtype=torch.int32)
    for w, offs in [(torch.randn(0, 8, 5), torch.empty(0, dtype=torch.int32)),  # no group: all tail
                    (torch.randn(2, 8, 0), offs2)]:  # N = 0
        assert torch.equal(triton_grouped_mm(x, w, offs), torch.zeros(6, w.shape[2]))
    # K = 0: matmul's epilogue of a zero accumulator, i.e. zeros
    x0, w0 = torch.randn(6, 0), torch.randn(2, 0, 5)
    assert torch.equal(triton_grouped_mm(x0, w0, offs2), grouped_mm_per_group(x0, w0, offs2, triton_matmul))
    assert triton_grouped_mm(torch.randn(0, 8), torch.randn(2, 8, 5), offs2 * 0).shape == (0, 5)
    # one row, one group; offsets of another integer dtype
    w1 = torch.randn(1, 8, 5, generator=gen)
    for offs in (torch.tensor([1], dtype=torch.int16), torch.tensor([0])):
        assert torch.equal(triton_grouped_mm(x[:1], w1, offs), grouped_mm_per_group(x[:1], w1, offs, triton_matmul))
    with pytest.raises(UnsupportedError, match="dtype"):
        triton_grouped_mm(x.double(), torch.randn(2, 8, 5).double(), offs2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_block_k_is_matmuls(dtype):
    # The one constant along the reduction must be the one matmul uses for every M.
    for S, G in [(1, 8), (100, 8), (5000, 128), (40000, 8), (64, 128)]:
        bk = select_grouped_config(S, G, dtype)["BLOCK_K"]
        for M in (1, 16, 17, 64, 65, 1000, 8192):
            for N in (64, 4096, 14336):
                assert bk == select_config(M, N, dtype, 132)["BLOCK_K"]


def test_slots_cover_every_group_tile_without_collision(gen):
    # The slot numbering of the module doc, in Python: every row tile of every group (and of the
    # zero tail) gets its own slot below the grid bound, and the binary search finds it.
    for BM in (16, 64, 128):
        for S, G in [(1, 1), (5, 3), (100, 7), (300, 128), (1000, 8)]:
            for _ in range(20):
                ends = torch.randint(-2, S + 3, (G,), generator=gen).clamp(0, S).cummax(0).values.tolist()
                starts = [0] + ends[:-1]
                bounds = list(zip(starts, ends)) + [(ends[-1], S)]
                seen = {}
                for g, (s, e) in enumerate(bounds):
                    for j in range(-(-(e - s) // BM)):
                        slot = s // BM + g + j
                        assert slot < S // BM + G + 1 and slot not in seen
                        seen[slot] = (g, s + j * BM)
                firsts = [s // BM + g for g, (s, _) in enumerate(bounds)]
                for slot, (g, row_lo) in seen.items():
                    assert max(h for h, f in enumerate(firsts) if f <= slot) == g


# ---------------------------------------------------------------------------------------------
# GPU: bf16 / fp16 / fp32 bits vs the per-group launches, tile configs, CUDA-graph capture
# ---------------------------------------------------------------------------------------------

_GPU_TILES = [
    dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=4),  # mma.sync tiles
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4),  # wgmma tiles
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
]


def _gpu_case(dtype, S, K, N, G, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, K, generator=g).to(dtype).cuda()
    w_kn = torch.randn(G, K, N, generator=g).to(dtype).cuda()
    w_nk = torch.randn(G, N, K, generator=g).to(dtype).cuda().transpose(1, 2)  # as transformers passes it
    # Group sizes 1, 16, 17, 64, 65, 130 put the per-group reference in every matmul M bucket.
    sizes = torch.tensor([0, 1, 16, 17, 64, 65, 130, 0] + [0] * (G - 8))
    cases = [sizes.cumsum(0)] + offs_cases(S, G, g)
    return x, (w_kn, w_nk), [c.cuda() for c in cases]


@pytest.mark.gpu
@pytest.mark.parametrize("reference", ["same_tiles", "default_launches"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("S,K,N,G", [(330, 1000, 264, 8), (700, 2048, 1408, 64)])
def test_gpu_one_launch_equals_per_group_triton_matmul(reference, dtype, S, K, N, G):
    # The one launch (default and every forced tile config, both weight layouts, all the offsets
    # cases) gives the bits of one triton_matmul launch per group:
    # * default_launches: the former CUDA path, matmul's own config per group (16-row pointer
    #   tiles, 64- and 128-row TMA/wgmma tiles by group size): nothing changes for the user;
    # * same_tiles: matmul's pointer kernel with the grouped kernel's own tiles. If only
    #   default_launches fails, a tile config changes bits; if this fails, the grouped kernel's
    #   bookkeeping (rows, groups, tail) is wrong.
    x, ws, cases = _gpu_case(dtype, S, K, N, G, 3)
    for w in ws:
        for offs in cases:
            default = grouped_mm_per_group(x, w, offs, triton_matmul)
            for tiles in [None] + _GPU_TILES:
                if reference == "same_tiles":
                    cfg = dict(select_grouped_config(S, G, dtype), **(tiles or {}))
                    want = grouped_mm_per_group(x, w, offs, lambda a, b: triton_matmul(a, b, _config=same_tiles(cfg)))
                else:
                    want = default
                assert torch.equal(triton_grouped_mm(x, w, offs, _config=tiles), want), (tiles, offs.tolist())
            if reference == "default_launches":
                assert torch.equal(torch.ops.detcompile.grouped_mm(x, w, offs), default), offs.tolist()
        assert rel_err(default.cpu(), grouped_mm_ref(x.cpu(), w.cpu(), offs.cpu())) < tol(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_cuda_graph_capture_replays_new_offsets(dtype):
    # The op captures (no host sync) and, replayed with other offsets and rows in the same
    # buffers, gives the per-group launches' bits every time.
    g = torch.Generator().manual_seed(5)
    S, K, N, G = 96, 520, 264, 8
    x = torch.randn(S, K, generator=g).to(dtype).cuda()
    w = torch.randn(G, N, K, generator=g).to(dtype).cuda().transpose(1, 2)
    offs = torch.tensor([12 * (i + 1) for i in range(G)], dtype=torch.int32, device="cuda")
    op = torch.ops.detcompile.grouped_mm
    graph, out = capture_cuda_graph(lambda: op(x, w, offs))
    for new in offs_cases(S, G, g) + [torch.tensor([0, 1, 2, 3, 50, 50, 90, 95])]:
        offs.copy_(new.to(torch.int32))
        x.copy_(torch.randn(S, K, generator=g).to(dtype))
        out.fill_(float("nan"))  # every row must be rewritten by the replay
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, grouped_mm_per_group(x, w, offs, triton_matmul)), new.tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_decode_row_invariant_and_accurate(dtype):
    # Qwen3-MoE-like experts (128 of them, top-8 routing): a token's expert output keeps its bits
    # as the decode batch grows from 1 to 64 tokens (S = 8..512 rows, crossing the 16/64-row tile
    # configs for G = 8 too), and matches float64.
    gen = torch.Generator().manual_seed(6)
    for G, K, N in [(128, 2048, 1536), (8, 1024, 2816)]:
        w = (torch.randn(G, N, K, generator=gen) / K**0.5).to(dtype).cuda().transpose(1, 2)
        target = torch.randn(1, K, generator=gen).to(dtype).cuda()
        e = G // 3  # the target's expert
        ref = triton_grouped_mm(target, w, torch.tensor([0] * e + [1] * (G - e), device="cuda"))[0]
        for tokens in (1, 2, 3, 7, 8, 16, 33, 64):
            S = 8 * tokens
            experts = torch.randint(0, G, (S,), generator=gen)
            experts[S // 2] = e
            experts, order = experts.sort(stable=True)
            x = torch.randn(S, K, generator=gen).to(dtype)[order].cuda()
            pos = int((experts == e).nonzero()[0])
            x[pos] = target[0]
            offs = torch.bincount(experts, minlength=G).cumsum(0).to(torch.int32).cuda()
            out = torch.ops.detcompile.grouped_mm(x, w, offs)
            assert torch.equal(out[pos], ref), (G, tokens)
            assert rel_err(out.cpu(), grouped_mm_ref(x.cpu(), w.cpu(), offs.cpu())) < tol(dtype)


@pytest.mark.gpu
def test_gpu_row_bitwise_and_matches_cpu_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 512, 256, generator=g).to(torch.bfloat16).cuda()
    x = torch.randn(40, 512, generator=g).to(torch.bfloat16).cuda()
    offs = torch.tensor([10, 20, 30, 40], dtype=torch.int32, device="cuda")
    out = torch.ops.detcompile.grouped_mm(x, w, offs)
    alone = torch.ops.detcompile.grouped_mm(x[15:16], w, torch.tensor([0, 1, 1, 1], dtype=torch.int32, device="cuda"))
    assert torch.equal(out[15], alone[0])
    ref = grouped_mm_ref(x.cpu(), w.cpu(), offs.cpu())
    assert ((out.double().cpu() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.gpu
def test_gpu_op_has_no_host_sync_and_opcheck():
    x = torch.randn(20, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3, 64, 32, device="cuda", dtype=torch.bfloat16)
    offs = torch.tensor([5, 5, 17], dtype=torch.int32, device="cuda")
    want = torch.ops.detcompile.grouped_mm(x, w, offs)  # compiled outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a synchronizing CUDA call raises
    try:
        out = torch.ops.detcompile.grouped_mm(x, w, offs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out, want)
    torch.library.opcheck(torch.ops.detcompile.grouped_mm.default, (x, w, offs))
