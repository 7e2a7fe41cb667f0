"""detcompile::grouped_mm: batch invariance, accuracy, and the sync-free Triton path (one launch,
offsets read on the device) equal bit for bit to the former per-group ``triton_matmul`` launches."""
import pytest
import torch

from detcompile.kernels import _common
from detcompile.kernels._common import UnsupportedError
from detcompile.kernels.grouped_mm import grouped_per_group, select_grouped_config, triton_grouped_mm
from detcompile.kernels.matmul import select_config, triton_matmul

from ._host_sync import HostSyncRecorder
from ._util import grouped_mm_ref

CAN_INTERPRET = _common.triton_launchable(torch.empty(0))
needs_interp = pytest.mark.skipif(
    not CAN_INTERPRET, reason="Triton interpreter unavailable (needs triton and TRITON_INTERPRET=1)"
)


def offs_cases(S, G, gen):
    """Offsets exercising every way the row ranges can fall (S rows, G groups)."""
    cases = [
        sorted(torch.randint(0, S + 1, (G,), generator=gen).tolist()),  # random, some empty
        [S] * G,  # everything in group 0
        [0] * (G - 1) + [S],  # everything in the last group
        [0] * G,  # all groups empty: all rows are the zero tail
        [S // 3] * (G - 1) + [S - 2],  # empty middle groups and a 2-row zero tail
        [1 + 17 * g // 2 for g in range(G)],  # odd sizes straddling 16-row tiles
        [10, 4, S + 50, S + 50, 20][:G] + [S] * (G - 5),  # decreasing / past S: clamped cummax
        [-3, 0, 7, 7, 9][:G] + [S] * (G - 5),  # negative offset: clamped to 0
    ]
    return [torch.tensor(c, dtype=torch.int32) for c in cases]


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


# ---------------------------------------------------------------------------------------------
# Sync-free Triton path (interpreter on CPU: fp32 / fp16; bf16 runs on the GPU tests below)
# ---------------------------------------------------------------------------------------------


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("S,K,N,G,w_t", [(37, 70, 40, 5, False), (150, 40, 20, 6, True)])
def test_interp_single_launch_equals_per_group_triton_matmul(gen, dtype, S, K, N, G, w_t):
    # K spans several BLOCK_K chunks with a ragged end; S, N are not tile multiples; w may be a
    # transposed view (HF stores experts as [G, N, K]).
    x = torch.randn(S, K, generator=gen).to(dtype)
    w = torch.randn(G, N, K, generator=gen).to(dtype).transpose(1, 2) if w_t else torch.randn(G, K, N, generator=gen).to(dtype)
    for offs in offs_cases(S, G, gen):
        got = triton_grouped_mm(x, w, offs)
        want = grouped_per_group(x, w, offs, triton_matmul)
        assert torch.equal(got, want), offs.tolist()


@needs_interp
def test_interp_equality_check_sees_a_different_reduction(gen):
    # The comparison above can fail: a per-group matmul chunking K differently differs in bits.
    x = torch.randn(37, 200, generator=gen)
    w = torch.randn(3, 200, 24, generator=gen)
    offs = torch.tensor([10, 30, 37], dtype=torch.int32)
    other = grouped_per_group(x, w, offs, lambda a, b: triton_matmul(a, b, _config={"BLOCK_K": 16}))
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
        grouped_per_group(x, w, offs, triton_matmul)
    assert "tolist" in rec.calls


@needs_interp
def test_interp_degenerate_shapes(gen):
    x = torch.randn(6, 8, generator=gen)
    for w, offs in [
        (torch.randn(0, 8, 5), torch.empty(0, dtype=torch.int32)),  # no group
        (torch.randn(2, 8, 0), torch.tensor([3, 6], dtype=torch.int32)),  # N = 0
    ]:
        assert torch.equal(triton_grouped_mm(x, w, offs), torch.zeros(6, w.shape[2]))
    # K = 0: matmul's epilogue of a zero accumulator, i.e. zeros
    out = triton_grouped_mm(torch.randn(6, 0), torch.randn(2, 0, 5), torch.tensor([3, 6], dtype=torch.int32))
    assert torch.equal(out, grouped_per_group(torch.randn(6, 0), torch.randn(2, 0, 5), torch.tensor([3, 6], dtype=torch.int32), triton_matmul))
    assert triton_grouped_mm(torch.randn(0, 8), torch.randn(2, 8, 5), torch.tensor([0, 0], dtype=torch.int32)).shape == (0, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_block_k_is_matmuls(dtype):
    # The one constant along the reduction must be the one matmul uses for every M.
    for S, N, G in [(1, 64, 8), (100, 4096, 8), (5000, 14336, 128), (40000, 2048, 8)]:
        bk = select_grouped_config(S, N, G, dtype, 132)["BLOCK_K"]
        for M in (1, 16, 17, 64, 65, 1000, 8192):
            assert bk == select_config(M, N, dtype, 132)["BLOCK_K"]


# ---------------------------------------------------------------------------------------------
# GPU: bf16 / fp16 / fp32 bits vs the per-group launches, tile configs, CUDA-graph capture
# ---------------------------------------------------------------------------------------------

_GPU_CONFIGS = [
    dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=4),  # mma.sync tiles
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4),  # wgmma tiles
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("S,K,N,G", [(330, 1000, 264, 8), (700, 2048, 1408, 64)])
def test_gpu_single_launch_equals_per_group_triton_matmul(dtype, S, K, N, G):
    # Group sizes 1, 16, 17, 64, 65, 130 put the per-group reference in every matmul bucket
    # (16-row pointer tiles, 64-row and 128-row TMA/wgmma tiles); the grouped kernel must give the
    # same bits with its default config and with every forced tile config, for both weight layouts.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(S, K, generator=g).to(dtype).cuda()
    w_kn = torch.randn(G, K, N, generator=g).to(dtype).cuda()
    w_nk = torch.randn(G, N, K, generator=g).to(dtype).cuda().transpose(1, 2)
    sizes = [0, 1, 16, 17, 64, 65, 130, 0] + [0] * (G - 8)
    cases = [torch.tensor(sizes).cumsum(0)] + offs_cases(S, G, g)
    for w in (w_kn, w_nk):
        for offs in cases:
            offs = offs.to(torch.int32).cuda()
            want = grouped_per_group(x, w, offs, triton_matmul)
            assert torch.equal(triton_grouped_mm(x, w, offs), want), offs.tolist()
            for cfg in _GPU_CONFIGS:
                assert torch.equal(triton_grouped_mm(x, w, offs, _config=cfg), want), (cfg, offs.tolist())
        ref = grouped_mm_ref(x.cpu(), w.cpu(), cases[0])
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert ((want.double().cpu() - ref).norm() / ref.norm()) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_cuda_graph_capture_replays_new_offsets(dtype):
    # The op captures (no host sync) and, replayed with other offsets and rows in the same
    # buffers, gives the per-group launches' bits.
    g = torch.Generator().manual_seed(5)
    S, K, N, G = 96, 520, 264, 8
    x = torch.randn(S, K, generator=g).to(dtype).cuda()
    w = torch.randn(G, N, K, generator=g).to(dtype).cuda().transpose(1, 2)
    offs = torch.tensor([12 * (i + 1) for i in range(G)], dtype=torch.int32, device="cuda")
    op = torch.ops.detcompile.grouped_mm
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile and warm up outside the capture
            op(x, w, offs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(x, w, offs)
    for new in offs_cases(S, G, g) + [torch.tensor([0, 1, 2, 3, 50, 50, 90, 95])]:
        offs.copy_(new.to(torch.int32))
        x.copy_(torch.randn(S, K, generator=g).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, grouped_per_group(x, w, offs, triton_matmul)), new.tolist()
